"""The activations of :mod:`torchbp.functional`: ``sigmoid``, ``tanh``, ``relu``, ``leaky_relu``,
``gelu``, ``silu``, ``elu``, ``softplus`` and the in-place ``relu_`` / ``leaky_relu_`` / ``elu_``,
with how an ``inplace=True`` call is written (into the input by the Function, or computed
out of place and copied in)."""

from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function

from torchbp import _checks, _native
from torchbp._execution import exporting, has_storage
from torchbp.autograd import (
    ELUFunction,
    GELUFunction,
    LeakyReLUFunction,
    ReLUFunction,
    SigmoidFunction,
    SiLUFunction,
    SoftplusFunction,
    TanhFunction,
)
from torchbp.autograd._compile import apply, pair
from torchbp.functional._recording import _differentiated, _recorded_view, _traced

# (Function, jvp-free twin) pairs for autograd._compile.apply
_ELU = pair(ELUFunction)
_GELU = pair(GELUFunction)
_LEAKYRELU = pair(LeakyReLUFunction)
_RELU = pair(ReLUFunction)
_SIGMOID = pair(SigmoidFunction)
_SILU = pair(SiLUFunction)
_SOFTPLUS = pair(SoftplusFunction)
_TANH = pair(TanhFunction)


def _written_by_copy(input: torch.Tensor) -> bool:
    """Whether an in-place activation recorded on ``input`` is computed apart from it and
    copied in (:func:`_computed_apart`, :func:`_copied_into_view`): on a view, under a
    torch.func transform (no storage: vmap, grad, ...), whose support for Functions cannot
    batch one that saves an input it returns as its output (in-place: the input is the
    output), and while torch.compile traces, whose graph has no version check on what a
    Function keeps: the in-place form writing ``input`` keeps it, which ``h += skip``
    after it overwrote (ReLU's backward read the mask of ``h + skip``, silently, where
    native refuses).

    Never while :func:`torch.export.export` traces: there the Function's forward runs
    as plain ops (see :func:`~torchbp.autograd._compile.apply`), whose autograd records
    an in-place write on a view as native's does, while the out-of-place op (``clamp_min``,
    ``elu``) saves the view that the copy then overwrites (the exported module's backward
    failed: "modified by an inplace operation")."""
    if exporting():
        return False
    return torch.compiler.is_compiling() or _recorded_view(input) or not has_storage(input)


def _copied_into_view(view: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """An in-place activation where :func:`_written_by_copy` says so (a view autograd
    records, ...): ``result``, computed apart, copied into ``view`` by a native
    in-place op, which asks autograd before writing whether the view may be modified (not
    one of several outputs of ``unbind`` / ``split``, nor one made under ``no_grad``:
    native's error then, with the view untouched). A Function that writes in place is
    told only after its forward has written. Costs the memory saving: the Function keeps
    its own output."""
    return view.copy_(result)


def _inplace_activation(name: str, functions, native, input: torch.Tensor, *args):
    """``relu`` / ``leaky_relu`` / ``elu`` with ``inplace=True``: refused before anything
    is written where autograd could not record the write (native's error); computed out of
    place and copied in while traced (:func:`_traced`); native's own in-place kernel where
    nothing is recorded; computed out of place and copied in where :func:`_written_by_copy`
    says so; else the Function writes into ``input`` and marks it dirty. Out of place the
    Function keeps its output, which the copy leaves alone (ReLU; LeakyReLU / ELU with
    the slope >= 0 that :func:`~torchbp._checks.check_inplace_slope` leaves where
    autograd records ``input``); while torch.compile traces, see :func:`_computed_apart`."""
    _checks.check_inplace_writable(name, input)
    if _traced():
        return input.copy_(apply(functions, input, *args, False))
    if not _differentiated(input):  # nothing to record: native's kernel returns input
        return native(input, *args, inplace=True)
    if _written_by_copy(input):
        return _copied_into_view(input, _computed_apart(functions, input, *args))
    return apply(functions, input, *args, True)


def _computed_apart(functions, input: torch.Tensor, *args) -> torch.Tensor:
    """The activation of ``input`` in a tensor of its own, for :func:`_copied_into_view`.

    Eagerly the out-of-place Function, which keeps that output. While torch.compile
    traces, the out-of-place Function keeps its input (``autograd/activations.py``,
    ``_save_output_or_input``), which the copy into ``input`` overwrites without
    autograd's version check (ELU's backward read ``α e^y`` for ``α e^x``, silently):
    there the in-place Function runs on a clone, which it keeps as its output, as native's
    in-place op keeps its result (the out-of-place one on a clone would keep the clone as
    its input: a compiled ``LeakyReLU(inplace=True)`` MLP then kept a one-byte mask per
    unit more than native's, 10240 vs 8192 bytes per sample with Inductor). Dynamo runs
    that in-place Function under ``torch.func.grad`` too (eager torch.func cannot batch
    it), and cannot trace :func:`~torchbp._execution.has_storage` of a torch.func-wrapped
    tensor, so nothing here asks it while compiling."""
    if not torch.compiler.is_compiling():
        return apply(functions, input, *args, False)
    return apply(functions, input.clone(), *args, True)


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
        return _native.sigmoid(input)
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
        return _native.tanh(input)
    return apply(_TANH, input)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    r""":math:`\max(x, 0)` (as :func:`torch.nn.functional.relu`); gradient 0 at 0.

    With ``inplace=True`` the result overwrites ``input`` (which is returned). On a view
    that autograd records, under torch.func transforms, while :func:`torch.compile` traces
    and while :func:`torch.jit.trace` records the call (``relu``, ``leaky_relu``, ``elu``
    and ``silu`` alike), it is computed out of place and copied in, so that a view
    autograd refuses to modify (an ``unbind`` / ``split`` output, one made under
    ``no_grad``) raises native's error untouched, ``vmap(grad(...))`` runs, a compiled
    ``h += skip`` after it gets the true gradient, and a traced model runs (TorchScript
    cannot run a Function that writes into its input).

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
        return _native.relu(input, inplace=inplace)
    if not isinstance(input, torch.Tensor) or input.dtype == torch.bool:
        _checks.check_tensor("relu", input=input)
        # native raises RuntimeError (torch 2.13) or NotImplementedError (2.14): this is both
        raise _checks.UnsupportedDTypeError("relu: boolean inputs are not supported (as native)")
    if inplace:
        return _inplace_activation("relu", _RELU, _native.relu, input)
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
    (``y += residual``, ``nn.Dropout(inplace=True)``) then raises autograd's "modified by
    an inplace operation" error, with a line saying why: write ``y = y + residual``.

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
        return _native.leaky_relu(input, negative_slope, inplace)
    negative_slope = _checks.scalar_argument("leaky_relu", "negative_slope", negative_slope)
    _checks.check_inplace_slope("leaky_relu", "negative_slope", negative_slope, inplace, input)
    if inplace:
        return _inplace_activation(
            "leaky_relu", _LEAKYRELU, _native.leaky_relu, input, negative_slope
        )
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
        return _native.gelu(input, approximate=approximate)
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
        return _native.silu(input, inplace=inplace)
    if not inplace:
        return apply(_SILU, input)
    if not (_differentiated(input) or _traced()):
        # nothing to record: native's own in-place kernel (x·σ(x) would round twice)
        return _native.silu(input, inplace=True)
    return input.copy_(apply(_SILU, input.clone()))


def elu(input: torch.Tensor, alpha: float = 1.0, inplace: bool = False) -> torch.Tensor:
    r""":math:`x` for :math:`x > 0`, :math:`\alpha (e^x - 1)` otherwise (as
    :func:`torch.nn.functional.elu`). Saves the output rather than the input when
    ``alpha >= 0``; unlike native (which saves the input), modifying the output in place
    before backward (``y += residual``, ``nn.Dropout(inplace=True)``) then raises
    autograd's "modified by an inplace operation" error, with a line saying why: write
    ``y = y + residual``.

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
        return _native.elu(input, alpha, inplace)
    alpha = _checks.scalar_argument("elu", "alpha", alpha)
    _checks.check_inplace_slope("elu", "alpha", alpha, inplace, input)
    if inplace:
        return _inplace_activation("elu", _ELU, _native.elu, input, alpha)
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
        return _native.softplus(input, beta, threshold)
    beta = _checks.scalar_argument("softplus", "beta", beta)
    threshold = _checks.scalar_argument("softplus", "threshold", threshold)
    return apply(_SOFTPLUS, input, beta, threshold)
