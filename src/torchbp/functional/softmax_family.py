"""``softmax``, ``softmin`` and ``log_softmax`` of :mod:`torchbp.functional`: native's
implicit-dim choice and warning, the ``dtype`` cast, and CUDA / XPU / MPS autocast's
float32."""

from __future__ import annotations

import warnings

import torch
from torch.overrides import handle_torch_function, has_torch_function

from torchbp import _checks, _native
from torchbp.autograd import LogSoftmaxFunction, SoftmaxFunction
from torchbp.autograd._compile import apply, pair
from torchbp.functional._autocast import _autocast_dtype, _device_type, _run_without_autocast

# Where native autocast runs softmax / log_softmax in float32 (aten/src/ATen/autocast_mode.cpp,
# torch 2.11-2.14): CUDA and XPU (AT_FORALL_FP32_SET_OPT_DTYPE: dtype=float32 unless given)
# and MPS (KERNEL_MPS softmax / log_softmax, fp32: the input cast to float32). On CPU, and
# other devices, autocast leaves them in the input's dtype.
_FLOAT32_AUTOCAST_DEVICES = ("cuda", "xpu", "mps")

# (Function, jvp-free twin) pairs for autograd._compile.apply
_LOGSOFTMAX = pair(LogSoftmaxFunction)
_SOFTMAX = pair(SoftmaxFunction)


def _softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    """Native's implicit dim for an ``ndim``-D input, with its deprecation warning
    ``stacklevel`` frames up. Not while Dynamo traces: it cannot trace ``warnings.warn``
    (``torch.compile(fullgraph=True)`` refused the call, and graph-broke without it), and
    native's ``F.softmax`` / ``F.softmin`` warn there only once, at compilation, from
    inside torch."""
    if not torch.compiler.is_dynamo_compiling():
        warnings.warn(
            f"Implicit dimension choice for {name} has been deprecated. "
            "Change the call to include dim=X as an argument.",
            stacklevel=stacklevel,
        )
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_common(name, function, input, dim, stacklevel, dtype, negate=False):
    _checks.check_tensor(name, input=input)
    if dim is None:
        dim = _softmax_dim(name, input.dim(), stacklevel + 1)
    if negate:  # softmin: negated first, in the input's dtype, as native's (-input).softmax
        input = -input
    _checks.check_dtype_argument(name, dtype)  # before dim, as native parses them
    dim = _checks.softmax_dim(name, dim, input.dim())
    if dtype is not None:
        input = input.to(dtype)
    _checks.check_floating(name, "input", input)
    if dtype is None and _float32_under_autocast(input):
        device = _device_type(input)
        return _run_without_autocast(device, _softmax_apply, function, input.float(), dim)
    return _softmax_apply(function, input, dim)


def _float32_under_autocast(input: torch.Tensor) -> bool:
    """Whether native autocast would run softmax / log_softmax of ``input`` in float32:
    on a device of :data:`_FLOAT32_AUTOCAST_DEVICES` with its autocast on, for an input
    autocast may cast (not float64). A given ``dtype`` is kept, as native does."""
    return (
        _device_type(input) in _FLOAT32_AUTOCAST_DEVICES
        and input.dtype != torch.float64
        and _autocast_dtype(input) is not None
    )


def _softmax_apply(function, input, dim):
    if input.dim() == 0:  # dim is 0 or -1 (checked)
        return apply(function, input.reshape(1), 0).reshape(())
    return apply(function, input, dim)


def softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Softmax along ``dim`` with the max trick (as :func:`torch.nn.functional.softmax`).

    Args:
        input: any shape.
        dim: the dim that sums to 1 (``None`` picks one as native does, with its warning).
        dtype: a ``torch.dtype`` or ``None``; if given, ``input`` is cast to it first
            (anything else is a ``TypeError``, as native).

    Shape:
        Output: the input's shape.

    Examples::

        >>> softmax(torch.tensor([[1.0, 1.0], [0.0, 2.0]]), dim=1)
        tensor([[0.5000, 0.5000],
                [0.1192, 0.8808]])
    """
    if has_torch_function((input,)):
        return handle_torch_function(softmax, (input,), input, dim, _stacklevel, dtype)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return _native.softmax(input, dim, _stacklevel + 1, dtype)
    return _softmax_common("softmax", _SOFTMAX, input, dim, _stacklevel, dtype)


def softmin(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Softmin, the softmax of ``-input`` along ``dim`` (as
    :func:`torch.nn.functional.softmin`): torchbp's softmax Function of the negated input,
    whose backward saves only the output.

    Args:
        input: any shape.
        dim: the dim that sums to 1 (``None`` picks one as native does, with its warning).
        dtype: a ``torch.dtype`` or ``None``; if given, the negated input is cast to it
            first (anything else is a ``TypeError``, as native).

    Shape:
        Output: the input's shape.

    Examples::

        >>> softmin(torch.tensor([[1.0, 1.0], [0.0, 2.0]]), dim=1)
        tensor([[0.5000, 0.5000],
                [0.8808, 0.1192]])
    """
    if has_torch_function((input,)):
        return handle_torch_function(softmin, (input,), input, dim, _stacklevel, dtype)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return _native.softmin(input, dim, _stacklevel + 1, dtype)
    return _softmax_common("softmin", _SOFTMAX, input, dim, _stacklevel, dtype, negate=True)


def log_softmax(
    input: torch.Tensor,
    dim: int | None = None,
    _stacklevel: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Log-softmax :math:`(x - m) - \log \sum e^{x - m}` along ``dim`` (as
    :func:`torch.nn.functional.log_softmax`).

    Args:
        input: any shape.
        dim: the dim to normalise over (``None`` picks one as native does, with its
            warning).
        dtype: a ``torch.dtype`` or ``None``; if given, ``input`` is cast to it first.

    Shape:
        Output: the input's shape.

    Examples::

        >>> log_softmax(torch.tensor([1.0, 1.0]), dim=0)
        tensor([-0.6931, -0.6931])
    """
    if has_torch_function((input,)):
        return handle_torch_function(log_softmax, (input,), input, dim, _stacklevel, dtype)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return _native.log_softmax(input, dim, _stacklevel + 1, dtype)
    return _softmax_common("log_softmax", _LOGSOFTMAX, input, dim, _stacklevel, dtype)
