"""Drop-in replacements for :mod:`torch.nn.functional`, backed by torchbp's Functions.

Every function has the signature, defaults and semantics of its native namesake
(``torch.sigmoid`` / ``torch.tanh`` for those two), plus two keyword-only extras,
``cross_entropy(..., inplace=)`` and ``linear_cross_entropy(..., chunk_size=)``, and a few
deliberate differences: a negative ``label_smoothing`` is refused (native extrapolates),
and ``linear`` takes a 1-D weight with a bias for 2-D input and ``linear_cross_entropy`` a
``(*, in)`` input, which native refuses. The wrappers check arguments (clear errors instead
of failures deep inside), apply autocast the way native ops are listed
(``linear`` in the low-precision dtype; ``nll_loss`` / ``cross_entropy``, and on CUDA
also ``softmax`` / ``log_softmax``, in float32), move the class dim of K-dimensional
losses last, and reduce per-row losses. A sparse (COO, CSR, CSC, BSR, BSC) or strided
nested tensor argument runs the native op instead, with its result and gradients, or its
own error where it has none (torchbp's Functions take dense and jagged nested tensors; as
under ``torchbp.enable()``); ``linear`` runs native's for any nested input, jagged too,
and takes sparse ones itself, as ``linear_cross_entropy`` does. Like native's, each takes part in
``__torch_function__``: a tensor subclass or mode that overrides it sees the call
(``torch.fx`` records it as one node, so a traced torchbp module keeps its backward).

Examples::

    >>> import torch, torchbp.functional as TF
    >>> x = torch.randn(8, 4, requires_grad=True)
    >>> loss = TF.cross_entropy(TF.linear(x, torch.randn(3, 4)), torch.randint(3, (8,)))
    >>> loss.backward()
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.overrides import handle_torch_function, has_torch_function

from torchbp import _checks
from torchbp._execution import (
    carries_tangent,
    exporting,
    has_storage,
    shares_storage,
    values_inspectable,
)
from torchbp.autograd import (
    CrossEntropyFunction,
    ELUFunction,
    GELUFunction,
    LeakyReLUFunction,
    LinearCrossEntropyFunction,
    LinearFunction,
    LogSoftmaxFunction,
    NLLLossFunction,
    ReLUFunction,
    SigmoidFunction,
    SiLUFunction,
    SoftmaxFunction,
    SoftplusFunction,
    TanhFunction,
)
from torchbp.autograd._compile import apply, pair
from torchbp.autograd.cross_entropy import accumulation_dtype
from torchbp.autograd.linear_cross_entropy import chunk_size_from_options, default_chunk_size
from torchbp.autograd.losses import ClassLastRowsFunction

__all__ = [
    "linear",
    "sigmoid",
    "tanh",
    "relu",
    "relu_",
    "leaky_relu",
    "leaky_relu_",
    "gelu",
    "silu",
    "elu",
    "elu_",
    "softplus",
    "softmax",
    "log_softmax",
    "nll_loss",
    "cross_entropy",
    "linear_cross_entropy",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# (Function, jvp-free twin) pairs for autograd._compile.apply
_CLASSLASTROWS = pair(ClassLastRowsFunction)
_CROSSENTROPY = pair(CrossEntropyFunction)
_ELU = pair(ELUFunction)
_GELU = pair(GELUFunction)
_LEAKYRELU = pair(LeakyReLUFunction)
_LINEAR = pair(LinearFunction)
_LOGSOFTMAX = pair(LogSoftmaxFunction)
_NLLLOSS = pair(NLLLossFunction)
_RELU = pair(ReLUFunction)
_SIGMOID = pair(SigmoidFunction)
_SILU = pair(SiLUFunction)
_SOFTMAX = pair(SoftmaxFunction)
_SOFTPLUS = pair(SoftplusFunction)
_TANH = pair(TanhFunction)


# --------------------------------------------------------------------------- autocast
def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    device = t.device.type
    if device not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _cast_low(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # Autocast casts floating tensors other than float64, as native does.
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _cast_loss_for_autocast(input: torch.Tensor, weight: torch.Tensor | None):
    """``(input, weight)`` as autocast casts them for a loss (native lists ``nll_loss`` /
    ``cross_entropy`` as float32 ops): half ones to float32; float64 ones stay."""
    return _cast_low(input, torch.float32), _cast_low(weight, torch.float32)


def _run_without_autocast(device_type: str, fn, *args):
    with torch.autocast(device_type, enabled=False):
        return fn(*args)


# --------------------------------------------------------------------------- linear
def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    r"""Affine map :math:`y = x W^T + b` (as :func:`torch.nn.functional.linear`).

    Args:
        input: ``(*, in_features)``, at least 1-D.
        weight: ``(out_features, in_features)``, or ``(in_features,)`` for an output
            without the feature dim.
        bias: ``None``, or any shape that broadcasts to the output's: ``(out_features,)``,
            ``(1,)``, 0-dim, ``(1, out_features)``, ... (its gradient is summed back to it).
            With a 1-D weight too, for every input (``x @ w + b``): native takes a bias
            there only for some inputs (a non-contiguous one, or a 0-dim bias on one of 3+
            dims), and its addmm path refuses the others; see docs/ops.md.

    Shape:
        Output ``(*, out_features)``; ``(*,)`` for a 1-D weight.

    Examples::

        >>> y = linear(torch.randn(2, 5, 3), torch.randn(4, 3), torch.randn(4))
        >>> y.shape
        torch.Size([2, 5, 4])
        >>> linear(torch.randn(5, 3), torch.randn(3)).shape
        torch.Size([5])
    """
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear, (input, weight, bias), input, weight, bias)
    if _checks.nested(input) or _checks.nested(weight):  # (strided or jagged): native's op
        return torch.nn.functional.linear(input, weight, bias)
    op = "linear"
    _checks.validate_linear(input, weight, bias)
    amp = _autocast_dtype(input)
    if amp is not None:
        input, weight, bias = (_cast_low(t, amp) for t in (input, weight, bias))
    _checks.check_linear_dtypes(op, input, weight, bias, "weight", "bias")
    if input.dim() == 1 and bias is not None and bias.dim() > 1:
        # an unbatched input with a (1, out)-like bias: as native, computed as one row
        return linear(input.unsqueeze(0), weight, bias).squeeze(0)
    if weight.dim() == 1:
        # y = x w + b = (x Wᵀ + b)[..., 0] with W = w as one row (1, in): the bias gains
        # the output's dim of size 1 (a 0-dim bias broadcasts as it is)
        weight = weight.unsqueeze(0)
        bias = bias if bias is None or bias.dim() == 0 else bias.unsqueeze(-1)
        return _linear_apply(input, weight, bias, amp).squeeze(-1)
    return _linear_apply(input, weight, bias, amp)


def _linear_apply(input, weight, bias, amp):
    if amp is not None:
        return _run_without_autocast(input.device.type, apply, _LINEAR, input, weight, bias)
    return apply(_LINEAR, input, weight, bias)


# --------------------------------------------------------------------------- activations
def _written_by_copy(input: torch.Tensor) -> bool:
    """Whether an in-place activation recorded on ``input`` is computed out of place and
    copied in (:func:`_copied_into_view`): on a view, and under a torch.func transform
    (no storage: vmap, grad, ...), whose support for Functions cannot batch one that
    saves an input it returns as its output (in-place: the input is the output).

    Never while :func:`torch.export.export` traces: there the Function's forward runs
    as plain ops (see :func:`~torchbp.autograd._compile.apply`), whose autograd records
    an in-place write on a view as native's does, while the out-of-place op (``clamp_min``,
    ``elu``) saves the view that the copy then overwrites (the exported module's backward
    failed: "modified by an inplace operation")."""
    if exporting():
        return False
    return _recorded_view(input) or not has_storage(input)


def _copied_into_view(view: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """An in-place activation recorded on a view: ``result``, computed out of place, copied
    into ``view`` by a native in-place op, which asks autograd before writing whether the
    view may be modified (not one of several outputs of ``unbind`` / ``split``, nor one
    made under ``no_grad``: native's error then, with the view untouched). A Function that
    writes in place is told only after its forward has written. Costs the memory saving:
    the Function keeps its own output."""
    return view.copy_(result)


def _traced() -> bool:
    """Whether :func:`torch.jit.trace` records the call. TorchScript cannot run a Function
    that marks its input dirty ("inplace ReLUFunction not supported in the JIT", at every
    call of the trace), and torch's check traces again under ``no_grad``, which must record
    the same graph: an in-place call there is the Function out of place, then a copy into
    ``input``, whether or not a gradient is recorded."""
    return torch.jit.is_tracing()


def _inplace_activation(name: str, functions, native, input: torch.Tensor, *args):
    """``relu`` / ``leaky_relu`` / ``elu`` with ``inplace=True``: refused before anything
    is written where autograd could not record the write (native's error); computed out of
    place and copied in while traced (:func:`_traced`); native's own in-place kernel where
    nothing is recorded; computed out of place and copied in where :func:`_written_by_copy`
    says so; else the Function writes into ``input`` and marks it dirty."""
    _checks.check_inplace_writable(name, input)
    if _traced():
        return input.copy_(apply(functions, input, *args, False))
    if not _differentiated(input):  # nothing to record: native's kernel returns input
        return native(input, *args, inplace=True)
    if _written_by_copy(input):
        return _copied_into_view(input, apply(functions, input, *args, False))
    return apply(functions, input, *args, True)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    r""":math:`\sigma(x) = 1 / (1 + e^{-x})` (as :func:`torch.sigmoid`); finite for any x.

    Args:
        input: any shape.

    Shape:
        Output: the input's shape.

    Examples::

        >>> sigmoid(torch.tensor([0.0, 2.0]))
        tensor([0.5000, 0.8808])
    """
    if has_torch_function((input,)):
        return handle_torch_function(sigmoid, (input,), input)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return torch.sigmoid(input)
    return apply(_SIGMOID, input)


def tanh(input: torch.Tensor) -> torch.Tensor:
    r""":math:`\tanh(x)` (as :func:`torch.tanh`); derivative :math:`1 - \tanh^2(x)`.

    Args:
        input: any shape.

    Shape:
        Output: the input's shape.

    Examples::

        >>> tanh(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.7616])
    """
    if has_torch_function((input,)):
        return handle_torch_function(tanh, (input,), input)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return torch.tanh(input)
    return apply(_TANH, input)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    r""":math:`\max(x, 0)` (as :func:`torch.nn.functional.relu`); gradient 0 at 0.

    With ``inplace=True`` the result overwrites ``input`` (which is returned). On a view
    that autograd records, under torch.func transforms and while :func:`torch.jit.trace`
    records the call (``relu``, ``leaky_relu``, ``elu`` and ``silu`` alike), it is
    computed out of place and copied in, so that a view autograd refuses to modify (an
    ``unbind`` / ``split`` output, one made under ``no_grad``) raises native's error
    untouched, ``vmap(grad(...))`` runs, and a traced model runs (TorchScript cannot run a
    Function that writes into its input).

    Args:
        input: any shape (not bool, as native).
        inplace: overwrite ``input`` with the result (default ``False``).

    Shape:
        Output: the input's shape.

    Examples::

        >>> relu(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    if has_torch_function((input,)):
        return handle_torch_function(relu, (input,), input, inplace=inplace)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return torch.nn.functional.relu(input, inplace=inplace)
    if not isinstance(input, torch.Tensor) or input.dtype == torch.bool:
        _checks.check_tensor("relu", input=input)
        # native raises RuntimeError (torch 2.13) or NotImplementedError (2.14): this is both
        raise _checks.UnsupportedDTypeError("relu: boolean inputs are not supported (as native)")
    if inplace:
        return _inplace_activation("relu", _RELU, torch.nn.functional.relu, input)
    return apply(_RELU, input, False)


def relu_(input: torch.Tensor) -> torch.Tensor:
    """In-place :func:`relu`, as :func:`torch.nn.functional.relu_`: ``relu(input,
    inplace=True)``, which overwrites ``input`` and returns it.

    Args:
        input: any shape (not bool, as native).

    Shape:
        Output: ``input`` itself.

    Examples::

        >>> x = torch.tensor([-1.0, 2.0])
        >>> relu_(x) is x, x
        (True, tensor([0., 2.]))
    """
    if has_torch_function((input,)):  # handed the in-place function, as native's relu_
        return handle_torch_function(relu_, (input,), input)
    return relu(input, inplace=True)


def leaky_relu(
    input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False
) -> torch.Tensor:
    r""":math:`x` for :math:`x \ge 0`, :math:`\alpha x` otherwise (as
    :func:`torch.nn.functional.leaky_relu`). Saves the output rather than the input when
    ``negative_slope >= 0``, which halves the memory an MLP keeps for backward; unlike
    native (which saves the input), modifying the output in place before backward
    (``y += residual``) then raises autograd's "modified by an inplace operation" error:
    write ``y = y + residual``.

    Args:
        input: any shape.
        negative_slope: :math:`\alpha` (default ``0.01``).
        inplace: overwrite ``input`` with the result. With ``negative_slope < 0`` this
            raises a ``RuntimeError`` at the call when autograd records ``input``
            (native refuses at backward): the overwritten result no longer tells which
            branch produced it.

    Shape:
        Output: the input's shape.

    Examples::

        >>> leaky_relu(torch.tensor([-1.0, 2.0]), 0.1)
        tensor([-0.1000,  2.0000])
    """
    if has_torch_function((input,)):
        return handle_torch_function(leaky_relu, (input,), input, negative_slope, inplace)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return torch.nn.functional.leaky_relu(input, negative_slope, inplace)
    negative_slope = _checks.scalar_argument("leaky_relu", "negative_slope", negative_slope)
    _checks.check_inplace_slope("leaky_relu", "negative_slope", negative_slope, inplace, input)
    if inplace:
        native = torch.nn.functional.leaky_relu
        return _inplace_activation("leaky_relu", _LEAKYRELU, native, input, negative_slope)
    return apply(_LEAKYRELU, input, negative_slope, False)


def leaky_relu_(input: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """In-place :func:`leaky_relu`, as :func:`torch.nn.functional.leaky_relu_`:
    ``leaky_relu(input, negative_slope, inplace=True)``, which overwrites ``input`` and
    returns it (a negative slope is refused when autograd records ``input``, see
    :func:`leaky_relu`).

    Args:
        input: any shape.
        negative_slope: the slope for negative inputs (default ``0.01``).

    Shape:
        Output: ``input`` itself.

    Examples::

        >>> x = torch.tensor([-1.0, 2.0])
        >>> leaky_relu_(x, 0.1) is x, x
        (True, tensor([-0.1000,  2.0000]))
    """
    if has_torch_function((input,)):  # handed the in-place function, as native's
        return handle_torch_function(leaky_relu_, (input,), input, negative_slope)
    return leaky_relu(input, negative_slope, inplace=True)


def gelu(input: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    r""":math:`x \Phi(x)`, or its tanh approximation with ``approximate='tanh'`` (as
    :func:`torch.nn.functional.gelu`; ``approximate`` is keyword-only there too).

    Args:
        input: any shape.
        approximate: ``'none'`` (default) or ``'tanh'``.

    Shape:
        Output: the input's shape.

    Examples::

        >>> gelu(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.8413])
    """
    if has_torch_function((input,)):
        return handle_torch_function(gelu, (input,), input, approximate=approximate)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return torch.nn.functional.gelu(input, approximate=approximate)
    _checks.validate_gelu(approximate)
    return apply(_GELU, input, approximate)


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    r""":math:`x \sigma(x)` (as :func:`torch.nn.functional.silu`).

    ``inplace=True`` writes the result into ``input``; when autograd records it, the
    Function works on a copy of ``input`` (its backward needs the original values).

    Args:
        input: any shape.
        inplace: overwrite ``input`` with the result (default ``False``).

    Shape:
        Output: the input's shape.

    Examples::

        >>> silu(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.7311])
    """
    if has_torch_function((input,)):
        return handle_torch_function(silu, (input,), input, inplace=inplace)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return torch.nn.functional.silu(input, inplace=inplace)
    if not inplace:
        return apply(_SILU, input)
    if not (_differentiated(input) or _traced()):
        # nothing to record: native's own in-place kernel (x·σ(x) would round twice)
        return torch.nn.functional.silu(input, inplace=True)
    return input.copy_(apply(_SILU, input.clone()))


def elu(input: torch.Tensor, alpha: float = 1.0, inplace: bool = False) -> torch.Tensor:
    r""":math:`x` for :math:`x > 0`, :math:`\alpha (e^x - 1)` otherwise (as
    :func:`torch.nn.functional.elu`). Saves the output rather than the input when
    ``alpha >= 0``; unlike native (which saves the input), modifying the output in place
    before backward (``y += residual``) then raises autograd's "modified by an inplace
    operation" error: write ``y = y + residual``.

    Args:
        input: any shape.
        alpha: :math:`\alpha`, the value approached as :math:`x \to -\infty` is
            :math:`-\alpha` (default 1).
        inplace: overwrite ``input`` with the result. With ``alpha < 0`` this raises a
            ``RuntimeError`` at the call when autograd records ``input`` (native
            refuses at backward): for x < 0 the result alpha (e^x - 1) is positive, so the
            overwritten input cannot tell which branch gave it.

    Shape:
        Output: the input's shape.

    Examples::

        >>> elu(torch.tensor([-1.0, 0.0, 2.0]))
        tensor([-0.6321,  0.0000,  2.0000])
    """
    if has_torch_function((input,)):
        return handle_torch_function(elu, (input,), input, alpha, inplace)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return torch.nn.functional.elu(input, alpha, inplace)
    alpha = _checks.scalar_argument("elu", "alpha", alpha)
    _checks.check_inplace_slope("elu", "alpha", alpha, inplace, input)
    if inplace:
        return _inplace_activation("elu", _ELU, torch.nn.functional.elu, input, alpha)
    return apply(_ELU, input, alpha, False)


def elu_(input: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """In-place :func:`elu`, as :func:`torch.nn.functional.elu_`: ``elu(input, alpha,
    inplace=True)``, which overwrites ``input`` and returns it (a negative ``alpha`` is
    refused when autograd records ``input``, see :func:`elu`).

    Args:
        input: any shape.
        alpha: the value approached as x -> -inf is ``-alpha`` (default 1).

    Shape:
        Output: ``input`` itself.

    Examples::

        >>> x = torch.tensor([-1.0, 2.0])
        >>> elu_(x) is x, x
        (True, tensor([-0.6321,  2.0000]))
    """
    if has_torch_function((input,)):  # handed the in-place function, as native's elu_
        return handle_torch_function(elu_, (input,), input, alpha)
    return elu(input, alpha, inplace=True)


def softplus(input: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    r""":math:`\frac{1}{\beta} \log(1 + e^{\beta x})`, and :math:`x` where
    :math:`\beta x > \text{threshold}` (as :func:`torch.nn.functional.softplus`).

    Args:
        input: any shape.
        beta: :math:`\beta` (default 1).
        threshold: above :math:`\beta x > \text{threshold}` the result is ``x`` (default 20).

    Shape:
        Output: the input's shape.

    Examples::

        >>> softplus(torch.tensor([0.0, 30.0]))
        tensor([ 0.6931, 30.0000])
    """
    if has_torch_function((input,)):
        return handle_torch_function(softplus, (input,), input, beta, threshold)
    if _checks.native_layout(input):  # sparse or strided nested: native's op
        return torch.nn.functional.softplus(input, beta, threshold)
    beta = _checks.scalar_argument("softplus", "beta", beta)
    threshold = _checks.scalar_argument("softplus", "threshold", threshold)
    return apply(_SOFTPLUS, input, beta, threshold)


# --------------------------------------------------------------------------- softmax family
def _softmax_dim(name: str, ndim: int, stacklevel: int) -> int:
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_common(name, function, input, dim, stacklevel, dtype):
    _checks.check_tensor(name, input=input)
    if dim is None:
        dim = _softmax_dim(name, input.dim(), stacklevel + 1)
    _checks.check_dtype_argument(name, dtype)  # before dim, as native parses them
    dim = _checks.softmax_dim(name, dim, input.dim())
    if dtype is not None:
        input = input.to(dtype)
    _checks.check_floating(name, "input", input)
    if input.device.type == "cuda" and _autocast_dtype(input) is not None and dtype is None:
        # CUDA autocast runs softmax / log_softmax in float32 (not so on CPU).
        input = input.float()
        return _run_without_autocast("cuda", _softmax_apply, function, input, dim)
    return _softmax_apply(function, input, dim)


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
        return torch.nn.functional.softmax(input, dim, _stacklevel + 1, dtype)
    return _softmax_common("softmax", _SOFTMAX, input, dim, _stacklevel, dtype)


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
        return torch.nn.functional.log_softmax(input, dim, _stacklevel + 1, dtype)
    return _softmax_common("log_softmax", _LOGSOFTMAX, input, dim, _stacklevel, dtype)


# --------------------------------------------------------------------------- losses
def _legacy_reduction(size_average, reduce, reduction: str) -> str:
    """The ``reduction`` that the deprecated ``size_average`` / ``reduce`` give, as native
    reads them (each defaults to True: both -> 'mean', ``reduce`` alone -> 'sum', no
    ``reduce`` -> 'none'), with native's deprecation warning; ``reduction`` if neither."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    legacy = ("mean" if size_average else "sum") if reduce else "none"
    warnings.warn(
        "size_average and reduce args will be deprecated, please use "
        f"reduction='{legacy}' instead.",
        stacklevel=3,
    )
    return legacy


def _rows(t: torch.Tensor, class_dim: int, classes: int) -> torch.Tensor:
    """``(..., C, ...)`` -> ``(M, C)`` with the class dim last (M counted, not inferred:
    with C = 0 a ``-1`` could be any M)."""
    if t.dim() == 1:
        return t.reshape(1, classes)
    if t.dim() == 2:
        return t  # (N, C) already
    moved = t.movedim(class_dim, -1)
    if not moved.is_contiguous() and _differentiated_or_traced(t):
        # rows copied from the input (N, C, d1, ...): its gradient comes back contiguous,
        # as native's, not as the class-last permuted view ``movedim`` would give
        return apply(_CLASSLASTROWS, t, class_dim)
    rows = math.prod(t.shape[:class_dim] + t.shape[class_dim + 1 :])
    return moved.reshape(rows, classes)


def _target_weight_sum(target, weight, ignore_index, dtype) -> torch.Tensor:
    """Σ over non-ignored rows of ``w_{y_i}``: the denominator of ``reduction='mean'``."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    if weight.shape[0] == 0:  # no class: every target is ignore_index (checked)
        return torch.zeros((), dtype=dtype, device=target.device)
    safe = torch.where(valid, target, 0)
    return torch.where(valid, weight.to(dtype)[safe], 0.0).sum()


def _differentiated(t: torch.Tensor | None) -> bool:
    """Whether autograd records a gradient for ``t`` in this call."""
    return isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()


def _differentiated_or_traced(t: torch.Tensor | None) -> bool:
    """:func:`_differentiated`, or ``t`` is a tensor and :func:`torch.jit.trace` records
    the call: the trace serves later calls that record gradients, and torch's check
    traces again under ``no_grad`` (where a computed tensor no longer requires grad) and
    refuses a graph that differs, so the path taken must not depend on either."""
    return _differentiated(t) or (_traced() and isinstance(t, torch.Tensor))


def _weighted_probability_rows(logits, target, weight, smoothing: float) -> torch.Tensor:
    """``ℓ_i = -Σ_c w_c t'_c logp_ic`` with ``t' = (1-ε) t + ε/C`` of ``(M, C)`` logits and
    probabilities: native's formula, on torchbp's log-softmax, for class weights that need
    their gradient ``∂ℓ_i/∂w_c = -t'_ic logp_ic`` (the fused Function holds them constant)."""
    logp = log_softmax(logits, 1)
    if smoothing:
        target = target * (1 - smoothing) + smoothing / logits.shape[1]
    return -(logp * target * weight).sum(1)


def _recorded_view(t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of another tensor (``t._base``, as torch's "Tensor Views"
    documentation checks it) and autograd records the call: autograd refuses a Function
    with several outputs (cross-entropy's) that modifies such a tensor in place."""
    return torch.is_grad_enabled() and t.requires_grad and t._base is not None


def _probability_loss_dtype(logits, target, weight) -> torch.dtype:
    """The dtype of a probability-target loss: native's ``-Σ_c w_c t_c logp_c`` promotes
    the logits' dtype with the target's and the class weights'."""
    dtype = torch.promote_types(logits.dtype, target.dtype)
    return dtype if weight is None else torch.promote_types(dtype, weight.dtype)


def _writes_gradient_over_logits(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, inplace: bool
) -> bool:
    """Whether ``cross_entropy(..., inplace=True)`` writes the gradient over ``logits``:
    only where autograd records a gradient for them (otherwise nothing needs it, and the
    logits are kept), in eager mode (a target or weights batched by torch.func alone
    included), not for a view (see :func:`_recorded_view`), and not while
    :func:`torch.jit.trace` records the call (see :func:`_traced`)."""
    return (
        inplace
        and _differentiated(logits)
        and all(values_inspectable(t) for t in (logits, target, weight) if t is not None)
        and not _recorded_view(logits)
        and not _traced()
    )


def _kept_from_logits(t: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    """``t``, or a copy of it where it shares ``logits``' storage: ``inplace=True`` writes
    the gradient over the logits while the target and class weights are still being read
    (the weights also after the call, for the ``'mean'`` denominator). Called only where
    :func:`_writes_gradient_over_logits` holds, so every tensor here has storage."""
    return t.clone() if t is not None and shares_storage(t, logits) else t


def _reduce(rows, reduction, batch_shape, out_dtype, denominator):
    if reduction == "none":
        # a copy, never the Function's own output (which it may save, or which may share a
        # buffer with its other outputs): the caller may modify it in place, as native's
        return rows.reshape(batch_shape).to(out_dtype, copy=True)
    out = rows.sum() if reduction == "sum" else rows.sum() / denominator
    # (a same-dtype .to costs as much as a small op)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Negative log-likelihood of log-probabilities (as :func:`torch.nn.functional.nll_loss`).

    Args:
        input: log-probabilities ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        target: class indices of shape ``()``, ``(N,)`` or ``(N, d1, ..., dK)``: int64, or
            uint8 for ``(C,)`` / ``(N, C)`` input (K-dim input needs int64, as native, even
            empty: see docs/ops.md).
        weight: per-class weights ``(C,)`` of the input's dtype (float32 under autocast,
            which casts half weights to it), as native.
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: ``'none'`` | ``'mean'`` (divided by the summed weights of the non-ignored
            targets) | ``'sum'``.
        size_average, reduce: deprecated, as in torch (they set ``reduction``).

    Shape:
        Output: a scalar, or ``target``'s shape with ``reduction='none'``.

    Examples::

        >>> nll_loss(torch.tensor([[-0.5, -1.0], [-2.0, -0.1]]), torch.tensor([0, 1]))
        tensor(0.3000)
    """
    if has_torch_function((input, target, weight)):
        return handle_torch_function(
            nll_loss,
            (input, target, weight),
            input,
            target,
            weight,
            size_average,
            ignore_index,
            reduce,
            reduction,
        )
    if _checks.any_native_layout(input, target, weight):  # sparse or strided nested
        return torch.nn.functional.nll_loss(
            input, target, weight, size_average, ignore_index, reduce, reduction
        )
    reduction = _legacy_reduction(size_average, reduce, reduction)
    ignore_index = _checks.int_argument("nll_loss", "ignore_index", ignore_index)
    (classes, class_dim, batch_shape), unmasked = _checks.validate_nll_loss(
        input, target, weight, ignore_index, reduction
    )
    if _autocast_dtype(input) is not None:
        input, weight = _cast_loss_for_autocast(input, weight)
    _checks.check_class_weight_dtype("nll_loss", weight, input.dtype)
    flat_target = target.reshape(-1).long()  # uint8 indices are accepted, as native does
    logp = _rows(input, class_dim, classes)
    rows = apply(_NLLLOSS, logp, flat_target, weight, None if unmasked else ignore_index)
    acc = accumulation_dtype(input.dtype)
    denominator = None
    if reduction == "mean" and unmasked and weight is None:
        denominator = logp.shape[0]  # every row counts 1
    elif reduction == "mean":
        denominator = _target_weight_sum(flat_target, weight, ignore_index, acc)
    return _reduce(rows.to(acc), reduction, batch_shape, input.dtype, denominator)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    r"""Cross-entropy of unnormalised logits, fused log-softmax + NLL in one Function (as
    :func:`torch.nn.functional.cross_entropy`, plus ``inplace``).

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
        target: class indices of the input's shape without the class dim (int64, or uint8
            for ``(C,)`` / ``(N, C)`` input: K-dim input needs int64, as native, even
            empty), or class probabilities of the input's shape.
        weight: per-class weights ``(C,)``; with class indices of the input's dtype
            (float32 under autocast, which casts half weights to it), as native; with
            probabilities of any real dtype (integer and bool too), promoted with the
            input and target as native's formula (a float64 weight gives a float64 loss).
        ignore_index: class-index target value to skip (not allowed with probabilities).
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``; with class indices ``'mean'``
            divides by the summed weights of the non-ignored targets, with probabilities by
            the number of rows.
        size_average, reduce: deprecated, as in torch (they set ``reduction``).
        label_smoothing: ε in [0, 1]: the target becomes ``(1-ε) target + ε/C``.
        inplace: write the gradient over the logits' storage instead of a new buffer
            (saves one logits-sized allocation; 2-D ``(N, C)`` logits only). The logits
            then hold the gradient: do not use them afterwards (autograd's version check
            catches any op that saved them). Ignored (the logits are kept, the loss is the
            same) where no gradient is recorded for the logits (under ``torch.no_grad`` or
            ``torch.inference_mode``, or logits that do not require grad: nothing needs
            the gradient), under torch.compile, torch.func and torch.jit.trace, and for
            logits requiring grad that are a view of another tensor (e.g.
            ``logits.view(-1, C)``; autograd cannot record the in-place write there),
            which get the same values without the memory saving.

    Shape:
        Output: a scalar, or the batch shape (the input's without the class dim) with
        ``reduction='none'``.

    The gradient ``softmax(z) - target`` is computed in the forward pass from the single
    softmax evaluation (in float32 for half-precision logits) and kept instead of the
    log-probabilities, so backward only scales it.

    Examples::

        >>> import torch.nn.functional as F
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> target = torch.tensor([1, 0, 9, 3])
        >>> loss = cross_entropy(logits, target, label_smoothing=0.1)
        >>> torch.allclose(loss, F.cross_entropy(logits, target, label_smoothing=0.1))
        True
        >>> loss.backward()
        >>> logits.grad.shape
        torch.Size([4, 10])
    """
    if has_torch_function((input, target, weight)):
        return handle_torch_function(
            cross_entropy,
            (input, target, weight),
            input,
            target,
            weight,
            size_average,
            ignore_index,
            reduce,
            reduction,
            label_smoothing,
            inplace=inplace,
        )
    if _checks.any_native_layout(input, target, weight):  # sparse or strided nested
        return torch.nn.functional.cross_entropy(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        )
    reduction = _legacy_reduction(size_average, reduce, reduction)
    ignore_index = _checks.int_argument("cross_entropy", "ignore_index", ignore_index)
    call = _checks.validate_cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, inplace
    )
    (classes, class_dim, batch_shape), soft, unmasked, label_smoothing = call
    if inplace:
        _checks.check_inplace_writable("cross_entropy", input)
    inplace = _writes_gradient_over_logits(input, target, weight, inplace)
    if inplace:
        target, weight = (_kept_from_logits(t, input) for t in (target, weight))
    if _autocast_dtype(input) is not None:
        input, weight = _cast_loss_for_autocast(input, weight)
    if not soft:
        _checks.check_class_weight_dtype("cross_entropy", weight, input.dtype)
    if soft:  # promoted with the target and class weights, as native's formula
        common = _probability_loss_dtype(input, target, weight)
        input, target = input.to(common), target.to(common)
    weight_grad = soft and _differentiated_or_traced(weight)
    # With inplace, the (N, C) input itself (not a view of it) is modified and marked dirty.
    logits = input if inplace and not weight_grad else _rows(input, class_dim, classes)
    # uint8 class indices are accepted, as native does
    flat_target = _rows(target, class_dim, classes) if soft else target.reshape(-1).long()
    if weight_grad:
        rows = _weighted_probability_rows(logits, flat_target, weight, label_smoothing)
    else:
        rows, _grad, _lse = apply(
            _CROSSENTROPY,
            logits,
            flat_target,
            weight,
            None if unmasked else ignore_index,
            label_smoothing,
            inplace,
        )
    denominator = None
    if reduction == "mean":
        if soft and classes == 0:
            # native divides by numel / C = 0 / 0 for probability targets
            denominator = math.nan
        elif soft or (unmasked and weight is None):
            denominator = logits.shape[0]  # every row counts 1
        else:
            denominator = _target_weight_sum(flat_target, weight, ignore_index, rows.dtype)
    loss = _reduce(rows, reduction, batch_shape, input.dtype, denominator)
    if reduction == "sum" and classes == 0 and label_smoothing and not soft:
        # native scales the summed smoothing term by ε/C = ε/0 = inf: NaN, with no row too
        # (inf · 0; the rows themselves are NaN already, see losses._no_classes)
        loss = loss + math.nan
    return loss


# --------------------------------------------------------------------------- linear + CE
def _under_func_transform(*tensors: torch.Tensor | None) -> bool:
    """Whether a tensor is torch.func-wrapped (vmap, grad, jvp, ...; as sparse tensors,
    it has no storage) or carries a forward-mode tangent: then the chunked Function, which
    has no vmap rule and no jvp, cannot serve the call. (Never while torch.compile traces:
    it runs the Function.)"""
    if torch.compiler.is_compiling():
        return False
    present = [t for t in tensors if t is not None]
    if not all(has_storage(t) for t in present):  # wrapped or batched by torch.func
        return True
    return any(carries_tangent(t) for t in present)


def _exporting_or_tracing() -> bool:
    """Whether torch.export or torch.jit.trace records the call: the chunk loop would bake
    the example's batch size into the graph (export with a dynamic batch refuses it) and
    its ``needs`` flags differ under jit.trace's no-grad check run, so the unfused pair
    (one graph for any batch) serves them."""
    return exporting() or torch.jit.is_tracing()


def _wider_than_accumulation(input: torch.Tensor, target: torch.Tensor, weight, soft) -> bool:
    """A float64 probability target or class weight with lower-precision input: native
    promotes the loss to float64 and computes it there, which the chunked Function
    (float32 accumulation) cannot."""
    if not soft or input.dtype == torch.float64:
        return False
    return _probability_loss_dtype(input, target, weight) == torch.float64


def _lce_loss_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype of the logits' cross-entropy in ``linear_cross_entropy``: float32 under
    autocast (the linear runs in the low-precision dtype, the loss in float32) unless the
    input is float64 (which autocast leaves alone), else the input's."""
    if _autocast_dtype(input) is not None and input.dtype != torch.float64:
        return torch.float32
    return input.dtype


def _native_chunks(options, label_smoothing: float, target: torch.Tensor, out_features) -> bool:
    """Whether native's ``linear_cross_entropy`` takes its chunked path (``options`` given,
    no label smoothing, int64 class indices, a 2-D weight) rather than its reference
    formula, ``cross_entropy(linear(...))``."""
    return (
        options is not None
        and label_smoothing == 0.0
        and target.dtype == torch.int64
        and not out_features
    )


def _linear_cross_entropy_unfused(
    input, linear_weight, target, linear_bias, weight, reduction, ignore_index, smoothing, soft
):
    """Native's reference formula, ``cross_entropy(linear(...))``, with torchbp's
    ``linear`` and ``cross_entropy`` Functions: the logits are materialised, and every
    transform those two support (vmap, jvp, double backward) works. For K-dim weights
    ``(C, d1, ..., dK, in)`` the logits are ``(N, C, d1, ..., dK)``."""
    classes, features = linear_weight.shape[0], linear_weight.shape[-1]
    out_features = tuple(linear_weight.shape[1:-1])
    batch_shape = tuple(input.shape[:-1])
    w, b = linear_weight, linear_bias  # a 2-D weight as it is (a sparse one cannot reshape)
    if out_features:
        w = linear_weight.reshape(math.prod(out_features, start=classes), features)
        b = None if linear_bias is None else linear_bias.reshape(w.shape[0])
    flatten = input.dim() > 2  # torchbp's (*, in) input: rows first, class dim last
    if flatten:
        input = input.reshape(-1, features)
        target = target.reshape(-1, classes) if soft else target.reshape(-1)
    logits = linear(input, w, b).reshape(*input.shape[:-1], classes, *out_features)
    loss = cross_entropy(
        logits,
        target,
        weight=weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=smoothing,
    )
    return loss.reshape(batch_shape) if flatten and reduction == "none" else loss


def _check_lce_saves_no_inference_tensor(input, linear_weight, target, weight) -> None:
    """What native's ``cross_entropy(linear(x, W, b), t)`` saves must not be an inference
    tensor: x for W's gradient, W for x's, the target and class weights for the loss's."""
    op = "linear_cross_entropy"
    if linear_weight.requires_grad:
        _checks.check_not_inference(op, "linear_weight's gradient", input=input)
    if input.requires_grad:
        _checks.check_not_inference(op, "input's gradient", linear_weight=linear_weight)
    _checks.check_not_inference(op, "the loss's gradient", target=target, weight=weight)


def _savable(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a copy of it if it was created under inference mode (autograd cannot save
    an inference tensor; never while compiling, see ``_checks.check_not_inference``)."""
    if t is None or torch.compiler.is_compiling() or not t.is_inference():
        return t
    return t.clone()


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)`` computed
    chunk by chunk of rows, without ever holding the ``(N, C)`` logits: the signature,
    defaults and results of :func:`torch.nn.functional.linear_cross_entropy` (torch 2.13),
    plus ``chunk_size``; works on torch 2.11+ too.

    Args:
        input: ``(in,)`` or ``(N, in)``. With a 2-D ``linear_weight`` torchbp also takes
            ``(*, in)``, every leading dim a batch dim (class dim last; native refuses
            more than 2 dims).
        linear_weight: ``(C, in)``, or ``(C, d1, ..., dK, in)`` for a K-dimensional loss
            (then ``input`` must be ``(N, in)``; the logits are ``(N, C, d1, ..., dK)``).
        target: class indices (int64 or uint8) of shape ``(*)`` = ``input.shape[:-1]``
            (``(N, d1, ..., dK)`` of int64 for K-dim, as native), or class probabilities of
            the logits' shape.
        linear_bias: ``(C,)`` (``(C, d1, ..., dK)`` for K-dim) or ``None``.
        weight: per-class weights ``(C,)``; with class indices of the logits' loss dtype
            (the input's; float32 under autocast) unless ``options`` sends the call to
            native's chunked path (no label smoothing, int64 targets, 2-D
            ``linear_weight``), which takes any floating dtype, as native.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``, as :func:`cross_entropy`.
        ignore_index: class-index target to skip; ``None`` (default, as native) means
            ``-100``. Must stay ``None`` for probability targets (native raises too).
        label_smoothing: ε in [0, 1] (torchbp refuses a negative ε; native extrapolates).
        options: ``torch.nn.LinearCrossEntropyOptions`` or ``None``, validated as native
            (torch >= 2.13). torchbp always chunks; the options only choose how many rows
            per chunk (:func:`torchbp.autograd.linear_cross_entropy.chunk_size_from_options`:
            ``batch_chunk_size``, or ``chunking_method='aspect_ratio[:k]'`` by torch's
            documented formula; ``'auto'`` means torchbp's memory budget below).
            ``acc_policy`` / ``acc_dtype`` / ``allow_retain_graph`` are accepted and
            ignored: torchbp accumulates half inputs in float32, others in their dtype, and
            ``retain_graph=True`` always works.
        chunk_size: rows per chunk (overrides ``options``). Default: chosen so that the
            ``(chunk, C)`` working set (one logits buffer in which the gradient is built in
            place; half inputs add a float32 one) fits
            ``autograd.linear_cross_entropy.CHUNK_BUDGET_BYTES`` (48 MiB on CPU, 256 MiB
            on CUDA): e.g. 384 rows for C = 32768 in float32. See
            :func:`torchbp.autograd.linear_cross_entropy.default_chunk_size`.

    Shape:
        Output: a scalar, or ``target``'s class-index shape with ``reduction='none'``.

    Peak extra memory is O(chunk · C + N · d + C · d), never O(N · C). With ``'mean'`` /
    ``'sum'`` the input, weight and bias gradients are computed in the forward pass (3
    matmuls in all, as the unfused pair) and backward only scales them; with ``'none'``
    backward recomputes the logits chunk by chunk (4 matmuls). Gradients are accumulated
    in float32 for half-precision inputs. Double backward raises a clear error.

    A tensor created under ``torch.inference_mode()`` is refused where native's
    ``cross_entropy(linear(...))`` would save it for backward (the input when
    ``linear_weight`` requires grad, the weight when the input does, the target and class
    weights whenever the loss is recorded), with an error naming it, as native refuses it.

    A probability target is promoted with the input and the class weights as native does
    (the loss comes out in the promoted dtype: float32 for bfloat16 input with a float32
    target or float32 class weights).

    Five kinds of call run torchbp's unfused ``cross_entropy(linear(...))`` (native's
    reference formula, logits materialised) instead: a K-dim ``linear_weight`` (native's
    chunked path falls back the same way; so does one with no class, ``(0, in)``), a
    float64 probability target or class weight (with probabilities) and lower-precision
    input (native computes that loss in float64; the chunked Function accumulates in
    float32), probability targets whose class weights require grad (the chunked
    Function has no gradient for them), and calls under torch.func
    transforms (vmap, grad, jvp) or with forward-mode dual tensors, which the chunked
    Function (no vmap rule, no jvp) cannot serve, and a sparse (COO / CSR) input or 2-D
    ``linear_weight``, which it cannot chunk (a sparse K-dim ``linear_weight`` is refused
    by name, where native's reshape fails; a sparse ``linear_bias`` fails in ``linear``,
    as native's does). So do calls that :func:`torch.export.export` or
    :func:`torch.jit.trace` records: the chunk loop would fix the batch size in the graph
    (an export with a dynamic batch dim refuses it; a trace would fail its check), and
    the unfused pair exports and traces as native's does (with the ``(N, C)`` logits).

    Examples::

        >>> import torch.nn.functional as F
        >>> x = torch.randn(8, 16, requires_grad=True)
        >>> w = torch.randn(100, 16, requires_grad=True)
        >>> target = torch.randint(100, (8,))
        >>> loss = linear_cross_entropy(x, w, target, chunk_size=4)
        >>> torch.allclose(loss, F.cross_entropy(F.linear(x, w), target))
        True
        >>> loss.backward()
        >>> x.grad.shape, w.grad.shape
        (torch.Size([8, 16]), torch.Size([100, 16]))
    """
    if has_torch_function((input, linear_weight, target, linear_bias, weight)):
        return handle_torch_function(
            linear_cross_entropy,
            (input, linear_weight, target, linear_bias, weight),
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            options=options,
            chunk_size=chunk_size,
        )
    call = _checks.validate_linear_cross_entropy(
        input,
        linear_weight,
        target,
        linear_bias,
        weight,
        reduction,
        ignore_index,
        label_smoothing,
        options,
        chunk_size,
    )
    soft, ignore_index, label_smoothing = call.soft, call.ignore_index, call.label_smoothing
    recorded = any(
        _differentiated(t) for t in (input, linear_weight, linear_bias, target if soft else None)
    )
    if recorded:
        _check_lce_saves_no_inference_tensor(input, linear_weight, target, weight)
    # native's chunked path takes class weights of any dtype; its reference path, as
    # cross_entropy, refuses one of another dtype than the loss's input
    any_weight_dtype = _native_chunks(options, label_smoothing, target, call.out_features)
    loss_dtype = _lce_loss_dtype(input)
    if (
        call.out_features
        or linear_weight.shape[0] == 0  # no class: rows of 0 (the chunks' softmax has none)
        or _wider_than_accumulation(input, target, weight, soft)
        or (soft and _differentiated(weight))  # class weights' gradient: the reference formula
        or _under_func_transform(input, linear_weight, linear_bias, target, weight)
        or _exporting_or_tracing()
    ):
        return _linear_cross_entropy_unfused(
            input,
            linear_weight,
            target,
            linear_bias,
            weight.to(loss_dtype) if any_weight_dtype and weight is not None else weight,
            reduction,
            ignore_index,
            label_smoothing,
            soft,
        )
    classes, features = linear_weight.shape
    batch_shape = tuple(input.shape[:-1])
    amp = _autocast_dtype(input)
    if amp is not None:
        # Autocast runs the linear in the low-precision dtype and the loss in float32.
        input, linear_weight, linear_bias = (
            _cast_low(t, amp) for t in (input, linear_weight, linear_bias)
        )
    _checks.check_linear_dtypes(
        "linear_cross_entropy", input, linear_weight, linear_bias, "linear_weight", "linear_bias"
    )
    if amp is not None:  # and the loss in float32: half class weights are cast to it
        weight = _cast_low(weight, torch.float32)
    if not (soft or any_weight_dtype):
        _checks.check_class_weight_dtype("linear_cross_entropy", weight, loss_dtype)
    rows = math.prod(batch_shape)
    x = input.reshape(rows, features)
    # uint8 class indices are accepted, as native does; probabilities are promoted with
    # the logits as native's cross_entropy does (float32 ones stay float32 for half inputs)
    flat_target = target.reshape(rows, classes) if soft else target.reshape(rows).long()
    if soft and flat_target.dtype != x.dtype:
        flat_target = flat_target.to(torch.promote_types(x.dtype, flat_target.dtype))
    acc = accumulation_dtype(x.dtype)
    denominator = None
    if reduction == "mean":
        if soft:
            denominator = torch.tensor(rows, dtype=acc, device=x.device)
        else:
            denominator = _target_weight_sum(flat_target, weight, ignore_index, acc)
    if chunk_size is None and options is not None:
        chunk_size = chunk_size_from_options(options, rows, features, classes, x.dtype, x.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(rows, classes, x.dtype, x.device)
    needs = tuple(
        _differentiated(t) for t in (x, linear_weight, linear_bias, flat_target if soft else None)
    )
    if reduction == "none" and recorded:
        # backward recomputes the logits from x, W and b: an inference-mode one that native
        # keeps no reference to (checked above) is saved as a copy
        x, linear_weight, linear_bias = (_savable(t) for t in (x, linear_weight, linear_bias))
    args = (
        x,
        linear_weight,
        linear_bias,
        flat_target,
        weight,
        ignore_index,
        label_smoothing,
        reduction,
        denominator,
        chunk_size,
        needs,
    )
    if amp is not None:
        loss = _run_without_autocast(x.device.type, LinearCrossEntropyFunction.apply, *args)[0]
    else:
        loss = LinearCrossEntropyFunction.apply(*args)[0]
    out_dtype = torch.float32 if amp is not None and x.dtype in _LOW_PRECISION else input.dtype
    if soft:  # promoted with the target and class weights, as native's cross_entropy
        out_dtype = torch.promote_types(out_dtype, _probability_loss_dtype(x, flat_target, weight))
    if reduction == "none":
        # a copy, not the Function's output: the caller may modify it in place
        return loss.reshape(batch_shape).to(out_dtype, copy=True)
    return loss.to(out_dtype)
