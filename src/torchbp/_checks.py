"""Argument validation for :mod:`torchbp.functional`: clear errors that name the problem.

One ``validate_<op>`` per wrapper that needs more than a line (at the end of this module),
built from the shared checks above it. Every error class subclasses both the Pythonic
exception and ``RuntimeError`` (native's), so code written against native keeps working.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from torchbp._execution import values_inspectable


class ShapeError(ValueError, RuntimeError):
    """A tensor has the wrong shape (a ``ValueError``; also a ``RuntimeError`` like
    native's, so existing ``except RuntimeError`` code keeps working)."""


class MissingDimError(ShapeError, IndexError):
    """A tensor lacks a dim the op indexes: a 0-dim loss input (no class dim) or a 0-dim
    target of a batched one (no batch dim). A :class:`ShapeError`; also an ``IndexError``,
    native's class where it indexes the missing dim ("Dimension specified as 1 but tensor
    has no dimensions"), which it raises for some of these calls and a ``ValueError`` or
    ``RuntimeError`` for the others."""


class DTypeError(TypeError, RuntimeError):
    """A tensor has the wrong dtype (a ``TypeError`` and a ``RuntimeError``)."""


class DeviceError(ValueError, RuntimeError):
    """Tensors live on different devices."""


class InplaceError(ValueError, RuntimeError):
    """An in-place call that autograd could not differentiate."""


class ClassIndexError(IndexError, RuntimeError):
    """A class index lies outside ``[0, C)`` and is not ``ignore_index``."""


class DimTypeError(TypeError, RuntimeError):
    """``dim`` is not an int (a ``TypeError``; also a ``RuntimeError``, native's class on
    torch 2.11, where a string ``dim`` is looked up as a tensor dimension name)."""


class UnsupportedDTypeError(DTypeError, NotImplementedError):
    """A tensor's dtype has no kernel in this op (a :class:`DTypeError`; also a
    ``NotImplementedError``, native's class for "not implemented for 'Long'")."""


class OptionError(ValueError, RuntimeError):
    """An option (a keyword argument) has a value outside its range (a ``ValueError``;
    also a ``RuntimeError``, native's class for these)."""


class InferenceTensorError(ValueError, RuntimeError):
    """A tensor created under ``torch.inference_mode()`` would have to be saved for backward
    (a ``ValueError``; also a ``RuntimeError``, native's class for this)."""


class LayoutError(TypeError, RuntimeError):
    """A tensor has a layout (sparse, ...) that the op cannot take (a ``TypeError``; also a
    ``RuntimeError``, native's class for "not implemented for sparse tensors")."""


class NotATensorError(TypeError, AttributeError):
    """A tensor argument is not a tensor (a ``TypeError``, as native's argument parser
    raises; also an ``AttributeError``, which native's Python wrappers such as
    ``softmax`` raise when they call a tensor method on it)."""


class OptionsTypeError(TypeError, AttributeError):
    """``linear_cross_entropy``'s ``options`` is not a ``torch.nn.LinearCrossEntropyOptions``
    (a ``TypeError``; also an ``AttributeError``, which native raises when it reads the
    options' fields)."""


_STRIDED, _JAGGED = torch.strided, torch.jagged


def native_layout(t) -> bool:
    """Whether ``t`` is a tensor that torchbp's Functions cannot take: a sparse one (COO,
    CSR, CSC, BSR, BSC) or a nested tensor of strided layout. The functional call then
    runs native's op (its result and gradients, or its own error), as under
    ``torchbp.enable()``. A jagged nested tensor (``torch.jagged``) is not one: a tensor
    subclass whose ops torchbp's Functions run on. Cheap (two attribute reads) for the
    dense tensors of every call; ``False`` for ``None`` and any other non-tensor."""
    if not isinstance(t, torch.Tensor):
        return False
    layout = t.layout
    return t.is_nested if layout is _STRIDED else layout is not _JAGGED


def nested(t) -> bool:
    """Whether ``t`` is a nested tensor, strided or jagged (``False`` for a non-tensor)."""
    return isinstance(t, torch.Tensor) and t.is_nested


def any_native_layout(*tensors) -> bool:
    """Whether any of ``tensors`` is a :func:`native_layout` one (the same test, inlined:
    this runs on every call of the multi-tensor functions)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            layout = t.layout
            if t.is_nested if layout is _STRIDED else layout is not _JAGGED:
                return True
    return False


def check_tensor(op: str, **tensors) -> None:
    """Every named argument is a tensor (``None`` where the caller allows it is skipped
    before): a :class:`NotATensorError` naming it otherwise."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise _not_a_tensor(op, name, value)


def check_optional_tensor(op: str, **tensors) -> None:
    """Every named argument is ``None`` or a tensor: a :class:`NotATensorError` naming it
    otherwise."""
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise _not_a_tensor(op, name, value)


def _not_a_tensor(op: str, name: str, value) -> NotATensorError:
    return NotATensorError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")


def scalar_argument(op: str, name: str, value) -> float:
    """``value`` as a float, where native takes a Number: a Python bool / int / float, a
    0-dim tensor that does not require grad, or either of them complex with a zero
    imaginary part (its real part, as native converts it); a ``TypeError`` naming the
    argument otherwise (a multi-element tensor, a tensor requiring grad, a str...), as
    native (for another complex number or tensor a :class:`DTypeError`, also native's
    ``RuntimeError``)."""
    if type(value) is float or type(value) is int:  # the common case, first
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor):
        _check_number_tensor(op, name, value)
        if not value.is_complex():
            return float(value.item())
        return _real_part(op, name, complex(value.item()), "a complex tensor")
    if isinstance(value, numbers.Complex):
        return _real_part(op, name, value, f"complex {value!r}")
    raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__} {value!r}")


def _check_number_tensor(op: str, name: str, value: torch.Tensor) -> None:
    """A ``TypeError`` where the tensor ``value`` cannot stand for a Number, whatever its
    dtype (native: "must be Number, not Tensor"): more than 0 dims, or requires grad."""
    if value.dim() != 0:
        raise TypeError(
            f"{op}: {name} must be a number, got a tensor of shape {tuple(value.shape)} "
            "(only a 0-dim tensor stands for a number)"
        )
    if value.requires_grad:
        raise TypeError(
            f"{op}: {name} must be a number; a tensor that requires grad would lose "
            "its gradient (pass a float, or a detached 0-dim tensor)"
        )


def _real_part(op: str, name: str, value: complex | numbers.Complex, shown: str) -> float:
    """The real part of the complex ``value`` whose imaginary part is zero, as native
    converts it. Native cannot convert another ("value cannot be converted to type float
    without overflow", a RuntimeError): a :class:`DTypeError`, that and a TypeError."""
    if value.imag == 0:
        return float(value.real)
    raise DTypeError(f"{op}: {name} must be a real number, got {shown}")


def float_argument(op: str, name: str, value) -> float:
    """``value`` as a float, where native takes a ``float`` (``label_smoothing``): as
    :func:`scalar_argument`, but a complex number without ``__float__`` (a Python
    complex) is refused even with a zero imaginary part (native's argument parser: "must
    be float, not complex"; a :class:`DTypeError` is its ``TypeError``). A NumPy complex
    scalar, which native reads through its ``__float__``, is its real part where its
    imaginary part is zero, as :func:`scalar_argument` reads it (native drops any other
    with a ``ComplexWarning``; torchbp refuses it)."""
    complex_number = isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real)
    if complex_number and not hasattr(value, "__float__"):
        raise DTypeError(f"{op}: {name} must be a real number, got complex {value!r}")
    return scalar_argument(op, name, value)


def int_argument(op: str, name: str, value) -> int:
    """``value`` as an int, where native takes one: a Python or NumPy integer (not a
    bool), or a one-element integer tensor; a ``TypeError`` naming the argument otherwise
    (a float such as ``255.0``, ``True``, ``None``, a str...), as native, and a
    ``ValueError`` for an int outside int64's range (native's argument parser's class)."""
    if type(value) is int:  # the common case, first
        return _within_int64(op, name, value)
    if not isinstance(value, bool) and isinstance(value, numbers.Integral):
        return _within_int64(op, name, int(value))
    if isinstance(value, torch.Tensor):
        integral = not (value.is_floating_point() or value.is_complex())
        if integral and value.dtype != torch.bool and value.numel() == 1:
            return int(value.item())
        shown = f"Tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    else:
        shown = f"{type(value).__name__} {value!r}"
    raise TypeError(f"{op}: {name} must be an int, got {shown}")


def _within_int64(op: str, name: str, value: int) -> int:
    """``value``, which native passes to its kernels as an int64: a ``ValueError`` if it
    does not fit (native's "Overflow when unpacking long long")."""
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{op}: {name} must fit in int64, got {value}")
    return value


def _integer_scalar_tensor(value) -> bool:
    """A 0-dim tensor of an integer dtype (not bool, floating or complex): native's argument
    parser takes it for an int."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    )


def softmax_dim(op: str, dim, ndim: int) -> int:
    """``dim`` checked against a ``ndim``-dim input (0-dim counts as 1-dim, as native):
    a :class:`DimTypeError` unless it is an int (bools excluded) or a 0-dim integer tensor
    (bool and complex ones excluded, as native), an ``IndexError`` naming the
    valid range unless it lies in it. Returns it as an int."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        if not _integer_scalar_tensor(dim):
            raise DimTypeError(f"{op}: dim must be an int, got {type(dim).__name__} {dim!r}")
    dim = int(dim)
    rank = max(ndim, 1)
    if not -rank <= dim < rank:
        raise IndexError(
            f"{op}: Dimension out of range (expected to be in range of [{-rank}, {rank - 1}], "
            f"but got {dim}) for a {ndim}-dim input"
        )
    return dim


def check_dtype_argument(op: str, dtype) -> None:
    """``dtype`` is ``None`` or a ``torch.dtype`` (Python's ``float``, ``int``, ``bool`` and
    ``complex`` stand for one, as in native's argument parser): a ``TypeError`` naming it
    otherwise, as native. (``Tensor.to`` would read a str as a device and a tensor as
    its dtype and device.)"""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype in (float, int, bool, complex):
        return
    shown = "Tensor" if isinstance(dtype, torch.Tensor) else f"{type(dtype).__name__} {dtype!r}"
    raise TypeError(f"{op}: dtype must be a torch.dtype or None, got {shown}")


def check_inplace_slope(op: str, name: str, value: float, inplace: bool, input) -> None:
    """An in-place activation whose negative ``value`` (slope or alpha) flips the sign of
    the negative branch overwrites the only tensor that tells the branch: refuse it when
    autograd would need it (as native does, at backward)."""
    if inplace and value < 0 and torch.is_grad_enabled() and input.requires_grad:
        raise InplaceError(
            f"{op}: inplace=True with {name}={value}: a negative slope cannot be differentiated "
            "(the input is overwritten and the sign of its result no longer tells the "
            "branch); use inplace=False"
        )


def check_inplace_writable(op: str, input) -> None:
    """Autograd refuses an in-place write to a leaf that requires grad, or to a view of
    one, but a Function's forward has already written when it does: refuse it here, before
    anything is written, with native's message (native checks before its kernel runs)."""
    if not (isinstance(input, torch.Tensor) and input.requires_grad and torch.is_grad_enabled()):
        return
    if input._base is not None:  # a view (torch's documented check)
        if input.is_leaf:
            # made under no_grad: not a leaf Variable; the caller writes into a recorded
            # view through a native op, which raises autograd's own error before writing
            return
        what = "a view of a leaf Variable" if input._base.is_leaf else None
    else:
        what = "a leaf Variable" if input.is_leaf else None
    if what is None:
        return
    raise InplaceError(
        f"{op}: {what} that requires grad is being used in an in-place operation "
        "(inplace=True); use inplace=False or clone it first"
    )


def check_not_inference(op: str, needed_for: str, **tensors: torch.Tensor | None) -> None:
    """Refuse a tensor created under ``torch.inference_mode()`` that backward needs (autograd
    cannot save one): :class:`InferenceTensorError` naming it and what it is needed for.
    Skipped while compiling: Dynamo cannot trace ``is_inference()``, and a traced graph
    is never given an inference tensor to save."""
    if torch.compiler.is_compiling():
        return
    for name, t in tensors.items():
        if t is not None and t.is_inference():
            raise InferenceTensorError(
                f"{op}: {name} was created under torch.inference_mode() and cannot be saved "
                f"for backward, which {needed_for} needs (native refuses it too: 'Inference "
                "tensors cannot be saved for backward'); clone it outside inference_mode, or "
                "create it under torch.no_grad() instead"
            )


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """The given tensors (``None`` skipped) share one device: a :class:`DeviceError`
    listing each one's otherwise."""
    if _one_device(tensors.values()):
        return
    listing = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
    raise DeviceError(f"{op}: expected all tensors on one device, got {listing}")


def _one_device(tensors) -> bool:
    """Whether the tensors (``None`` skipped) share one device: a plain loop comparing each
    with the first (this runs on every loss call; a set of devices costs more)."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            return False
    return True


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    """An :class:`UnsupportedDTypeError` (native: ``NotImplementedError``) unless floating."""
    if not t.is_floating_point():
        raise UnsupportedDTypeError(
            f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}"
        )


def check_reduction(reduction: str) -> None:
    """``reduction`` is ``'none'``, ``'mean'`` or ``'sum'``: native's ``ValueError`` otherwise."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(
            f"{reduction} is not a valid value for reduction (expected 'none', 'mean' or 'sum')"
        )


def check_class_indices(op: str, target: torch.Tensor, classes: int, ignore_index: int) -> bool:
    """Raise :class:`ClassIndexError` naming the first bad class index (eager only: on CUDA
    this costs one host sync, and it replaces a device-side assert).

    Returns whether every target is now known to be a class index in ``[0, C)`` other than
    ``ignore_index`` (so no row is ignored and the loss needs no masks). Never while
    torch.jit.trace records the call: the answer would hold for the example only, and
    the trace would serve every later batch without the masks.
    """
    if target.dtype not in (torch.int64, torch.uint8):
        raise DTypeError(
            f"{op}: expected class-index target of dtype int64 (Long) or uint8 (Byte), "
            f"got {target.dtype}"
        )
    if target.numel() == 0 or torch.jit.is_tracing() or not values_inspectable(target):
        return False
    extremes = torch.aminmax(target)
    if target.device.type == "cpu":
        low, high = int(extremes.min), int(extremes.max)
    else:  # one host sync for both (each int() of a device tensor is one)
        low, high = torch.stack(extremes).tolist()
    if 0 <= low and high < classes:  # the common case: one reduction
        return not low <= ignore_index <= high
    if _only_ignored_out_of_range(target, classes, ignore_index, low, high):
        return False  # some row is ignored (it holds an extreme of the target)
    _raise_first_bad_class_index(op, target, classes, ignore_index)
    return False


def _only_ignored_out_of_range(
    target: torch.Tensor, classes: int, ignore_index: int, low: int, high: int
) -> bool:
    """Whether the targets outside ``[0, C)`` all equal ``ignore_index``, given the
    target's extremes ``low`` / ``high`` (one at least outside). The usual case of a
    padded batch (``ignore_index = -100`` as ``low``): one more reduction, of the target
    with the ignored entries replaced by the class 0. ``False`` may also mean "not
    known" (``C = 0``, where 0 is no class): the caller's exact check decides."""
    low_ignored, high_ignored = low == ignore_index, high == ignore_index
    if not (low_ignored or 0 <= low) or not (high_ignored or high < classes):
        return False  # an extreme is outside [0, C) and not ignore_index: a bad target
    # ignore_index equals an extreme, so it is a value of the target's dtype (no uint8
    # wrap-around in the comparison)
    kept = target.masked_fill(target == ignore_index, 0)
    if low_ignored:  # high is ignore_index too or below C: the low side remains
        return 0 <= int(kept.amin())
    return int(kept.amax()) < classes  # (low >= 0 here)


def _raise_first_bad_class_index(
    op: str, target: torch.Tensor, classes: int, ignore_index: int
) -> None:
    """Raise :class:`ClassIndexError` naming the first target, in row-major order, outside
    ``[0, C)`` that is not ``ignore_index``, if any."""
    # compared in int64: uint8 would wrap ignore_index (-1 or 511 equal 255 there) and let
    # an out-of-range 255 through to the gather (a RuntimeError, a device assert on CUDA)
    wide = target.long()
    bad = ((wide < 0) | (wide >= classes)) & (wide != ignore_index)
    if bool(bad.any()):
        value = int(wide[bad].reshape(-1)[0])
        raise ClassIndexError(
            f"{op}: target {value} is out of bounds: class indices must lie in [0, {classes}) "
            f"(C = {classes}) or equal ignore_index = {ignore_index}"
        )


def check_class_weight(
    op: str, weight: torch.Tensor | None, classes: int, differentiable: bool = False
) -> None:
    """``weight`` ``None`` or ``(C,)``: floating with class indices; with probability
    targets (where the loss is ``differentiable`` in it, as native) also integer or
    boolean (native's formula promotes it with the logits), not complex. One requiring
    grad only where the loss is ``differentiable`` in it or nothing is recorded."""
    if weight is None:
        return
    if weight.dim() != 1 or weight.shape[0] != classes:
        raise ShapeError(
            f"{op}: weight must have shape ({classes},), one entry per class, "
            f"got {tuple(weight.shape)}"
        )
    if not differentiable:
        check_floating(op, "weight", weight)
    elif weight.is_complex():
        raise UnsupportedDTypeError(
            f"{op}: weight must be a real tensor (floating, integer or bool), got dtype "
            f"{weight.dtype}"
        )
    if weight.requires_grad and torch.is_grad_enabled() and not differentiable:
        # as native: refused only where autograd would record the call (not under no_grad)
        raise class_weight_not_differentiable(op)


def class_weight_not_differentiable(op: str, forward_mode: bool = False) -> RuntimeError:
    """The error for class weights differentiated with class-index targets: native's
    reverse mode refuses them (its forward mode silently drops their tangent, which
    torchbp's ``jvp`` refuses instead, ``forward_mode``)."""
    dropped = "; native's forward-mode AD drops their tangent" if forward_mode else ""
    return RuntimeError(
        f"{op}: class weights are not differentiable with class-index targets (as in "
        f"torch.nn.functional; they are with probability targets{dropped}); pass "
        "weight.detach()"
    )


def check_class_weight_dtype(op: str, weight: torch.Tensor | None, dtype: torch.dtype) -> None:
    """With class-index targets, class weights must have the dtype the loss is computed in
    (the input's, after autocast's casts): native's kernel refuses any other ("expected
    scalar type Float but found Double"). A :class:`DTypeError` (native: ``RuntimeError``)."""
    if weight is not None and weight.dtype != dtype:
        raise DTypeError(
            f"{op}: class weights must have the loss input's dtype {dtype} with class-index "
            f"targets, got weight of dtype {weight.dtype}; pass weight.to({dtype})"
        )


def check_linear_dtypes(op, input, weight, bias, w_name, b_name) -> None:
    """``input``, ``weight`` and ``bias`` (if any) share one dtype: a :class:`DTypeError`
    naming all three otherwise."""
    if input.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        got = f"input {input.dtype}, {w_name} {weight.dtype}"
        got += f", {b_name} {bias.dtype}" if bias is not None else ""
        raise DTypeError(f"{op}: expected one dtype for all tensors, got {got}")


class ClassLayout(NamedTuple):
    """Where a loss input keeps its classes: ``classes`` = C, the ``class_dim``, and the
    ``batch_shape`` (the input's shape without the class dim)."""

    classes: int
    class_dim: int
    batch_shape: tuple[int, ...]


def class_layout(op: str, input: torch.Tensor) -> ClassLayout:
    """The :class:`ClassLayout` of input ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``."""
    shape = input.shape  # (read once: each read of it, or of dim(), is a call into torch)
    if len(shape) == 0:
        raise MissingDimError(
            f"{op}: input must have a class dim: (C,), (N, C) or (N, C, d1, ...); got 0-dim"
        )
    if len(shape) == 1:
        return ClassLayout(shape[0], 0, ())
    return ClassLayout(shape[1], 1, (shape[0],) if len(shape) == 2 else (shape[0], *shape[2:]))


def check_batch_size(op: str, input: torch.Tensor, target: torch.Tensor) -> None:
    """A batched class-index loss input ``(N, C, ...)`` and its target share ``N`` (an
    unbatched ``(C,)`` input's 1-D target has one element): a :class:`ShapeError`
    (native's ``ValueError``) otherwise, a :class:`MissingDimError` for a 0-dim target
    (native's ``IndexError`` for ``N = 0``). Native checks this before any dtype or class
    weight, so a call with both wrong gets its ``ValueError``."""
    if input.dim() >= 2 and (target.dim() == 0 or target.shape[0] != input.shape[0]):
        got = target.shape[0] if target.dim() else "a 0-dim target"
        raise (ShapeError if target.dim() else MissingDimError)(
            f"{op}: Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({got}); input {tuple(input.shape)}, target {tuple(target.shape)}"
        )
    if input.dim() == 1 and target.dim() == 1 and target.shape[0] != 1:
        raise ShapeError(
            f"{op}: an unbatched input {tuple(input.shape)} takes one class index, a 0-dim "
            f"target, got target shape {tuple(target.shape)}"
        )


def check_hard_target(op: str, input: torch.Tensor, target: torch.Tensor, batch_shape) -> None:
    """A class-index ``target`` has the input's ``batch_shape``: a :class:`ShapeError`
    otherwise (with native's batch-size wording where the first dims differ)."""
    if tuple(target.shape) == tuple(batch_shape):
        return
    check_batch_size(op, input, target)
    raise ShapeError(
        f"{op}: target of class indices must have shape {tuple(batch_shape)} for input "
        f"{tuple(input.shape)} (the input's shape without the class dim), "
        f"got {tuple(target.shape)}"
    )


def check_index_dtype(op: str, target: torch.Tensor, layout: ClassLayout) -> None:
    """uint8 class indices serve ``(C,)`` and ``(N, C)`` input only, as native's: its kernel
    for K-dimensional input ``(N, C, d1, ...)`` reads int64 targets (on CPU and CUDA alike)
    and raises a ``RuntimeError`` for uint8, which :class:`DTypeError` is."""
    k_dimensional = layout.class_dim == 1 and len(layout.batch_shape) > 1
    if k_dimensional and target.dtype == torch.uint8:
        raise DTypeError(
            f"{op}: K-dimensional input (N, C, d1, ...) needs an int64 (Long) class-index "
            f"target, got {target.dtype} (uint8 serves (C,) and (N, C) input only, as "
            "native); convert it with target.long()"
        )


def check_smoothing(op: str, label_smoothing) -> float:
    """``label_smoothing`` as a float in [0, 1]: a ``TypeError`` for a non-number, else an
    :class:`OptionError` (native: ``RuntimeError``) outside [0, 1]. Stricter than native on
    purpose: native accepts a negative value (it extrapolates away from the uniform
    distribution); torchbp refuses it."""
    value = float_argument(op, "label_smoothing", label_smoothing)
    if not 0.0 <= value <= 1.0:
        hint = " (torchbp refuses negative smoothing on purpose)" if value < 0 else ""
        raise OptionError(f"{op}: label_smoothing must be in [0, 1], got {value}{hint}")
    return value


def check_chunk_size(op: str, chunk_size) -> None:
    """``chunk_size`` is ``None`` or a positive int (not a bool): an :class:`OptionError`
    naming it otherwise."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise OptionError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")


def check_linear_cross_entropy_options(op: str, options) -> None:
    """``options`` is ``None`` or a ``torch.nn.LinearCrossEntropyOptions`` (torch >= 2.13;
    which validates its own fields when built); a ``chunking_method`` other than
    ``'auto'`` together with a ``batch_chunk_size`` is checked at the call, where both
    sizes are known."""
    if options is None:
        return
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options_type is None:
        raise OptionsTypeError(
            f"{op}: options needs torch.nn.LinearCrossEntropyOptions (torch >= 2.13), which "
            f"this torch ({torch.__version__}) lacks; pass options=None (torchbp chunks "
            "anyway) or chunk_size="
        )
    if not isinstance(options, options_type):
        raise OptionsTypeError(
            f"{op}: options must be a torch.nn.LinearCrossEntropyOptions or None, "
            f"got {type(options).__name__}"
        )


def check_target_kind(op, target, soft: bool, ignore_index: int, prob_shape: str) -> None:
    """A target of the probabilities' shape (``soft``) must be floating point and comes
    without ignore_index; a floating-point target must have that shape."""
    if soft:
        if not target.is_floating_point():
            raise DTypeError(
                f"{op}: target of {prob_shape} is read as class probabilities and must be "
                f"floating point, got {target.dtype}"
            )
        if ignore_index >= 0:
            raise OptionError(
                f"{op}: ignore_index ({ignore_index}) is not supported for probability targets "
                "(a floating-point target of the input's shape); leave it at -100"
            )
    elif target.is_floating_point():
        raise ShapeError(
            f"{op}: floating-point target must have {prob_shape} (class probabilities), "
            f"got {tuple(target.shape)}"
        )


# --------------------------------------------------------------------------- one per wrapper
def plain_linear(input, weight, bias) -> bool:
    """Whether ``linear``'s arguments are the common call, which passes every check of
    :func:`validate_linear` and :func:`check_linear_dtypes` and takes no special path:
    tensors, none nested, ``input`` ``(*, in)`` (at least 1-D), ``weight`` ``(out, in)``,
    ``bias`` ``None`` or ``(out,)``, one device and one dtype (then one dtype after
    autocast's casts too, which cast equal dtypes alike). One cheap test for every call:
    the checks themselves, with their errors, run only where it fails."""
    if not (isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    if input.is_nested or weight.is_nested:
        return False
    in_shape, w_shape = input.shape, weight.shape  # (each read builds a torch.Size)
    if len(w_shape) != 2 or not in_shape or in_shape[-1] != w_shape[1]:
        return False
    device, dtype = weight.device, weight.dtype
    if input.device != device or input.dtype != dtype:
        return False
    return bias is None or (
        isinstance(bias, torch.Tensor)
        and bias.dim() == 1  # (first: a nested bias has no shape to read)
        and bias.shape[0] == w_shape[0]
        and bias.device == device
        and bias.dtype == dtype
    )


def validate_linear(input, weight, bias) -> None:
    """``linear``: ``input`` ``(*, in)`` (at least 1-D), ``weight`` ``(out, in)`` or ``(in,)``
    (then the output is ``(*,)``), ``bias`` any shape that broadcasts to the output's
    without growing it (``(out,)``, ``(1,)``, 0-dim, ``(1, out)``, ...), and one device.
    The dtypes are checked after autocast casts."""
    op = "linear"
    check_tensor(op, input=input, weight=weight)
    if bias is not None:
        check_tensor(op, bias=bias)
    if input.dim() == 0 or weight.dim() == 0 or weight.dim() > 2:
        raise ShapeError(
            f"{op}: expected input (*, in_features) with at least 1 dim and weight "
            f"(out_features, in_features) or (in_features,): input {tuple(input.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if input.shape[-1] != weight.shape[-1]:
        raise ShapeError(
            f"{op}: input's last dim must equal weight's in_features: input "
            f"{tuple(input.shape)}, weight {tuple(weight.shape)} "
            f"(in_features = {weight.shape[-1]})"
        )
    device = input.device  # one device, the common case: no generic check
    if weight.device != device or (bias is not None and bias.device != device):
        check_same_device(op, input=input, weight=weight, bias=bias)
    if bias is None or (bias.dim() == 1 and weight.dim() == 2 and bias.shape[0] == weight.shape[0]):
        return  # the common case
    # an unbatched input counts as one row here (native accepts a (1, out) bias for it)
    rows = input.shape[:-1] if input.dim() > 1 or bias.dim() <= 1 else (1,)
    output = (*rows, *weight.shape[:-1])
    try:
        fits = torch.broadcast_shapes(bias.shape, output) == output
    except RuntimeError:
        fits = False
    if not fits:
        raise ShapeError(
            f"{op}: bias {tuple(bias.shape)} does not broadcast to the output's shape "
            f"{output} (input {tuple(input.shape)}, weight {tuple(weight.shape)}); "
            f"expected e.g. ({output[-1] if output else 1},)"
        )


def validate_gelu(approximate) -> None:
    if not isinstance(approximate, str):
        raise TypeError(
            f"gelu: approximate must be a str ('none' or 'tanh'), got {type(approximate).__name__}"
        )
    if approximate not in ("none", "tanh"):
        raise OptionError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


class NLLLossCall(NamedTuple):
    """What :func:`validate_nll_loss` found out about a call."""

    layout: ClassLayout
    unmasked: bool  #: every target is a class index and none is ignore_index


def validate_nll_loss(input, target, weight, ignore_index: int, reduction: str) -> NLLLossCall:
    """``nll_loss``: log-probabilities, class-index target, weights, devices, every index."""
    op = "nll_loss"
    check_tensor(op, input=input, target=target)
    check_optional_tensor(op, weight=weight)
    check_reduction(reduction)
    layout = class_layout(op, input)
    check_batch_size(op, input, target)  # first, as native (nll_loss_nd)
    check_floating(op, "input", input)
    if target.is_floating_point():
        raise DTypeError(
            f"{op}: target must hold class indices (int64 or uint8), got {target.dtype}; "
            "for class probabilities use cross_entropy"
        )
    check_hard_target(op, input, target, layout.batch_shape)
    check_index_dtype(op, target, layout)
    check_class_weight(op, weight, layout.classes)
    check_same_device(op, input=input, target=target, weight=weight)
    unmasked = check_class_indices(op, target, layout.classes, ignore_index)
    return NLLLossCall(layout, unmasked)


class CrossEntropyCall(NamedTuple):
    """What :func:`validate_cross_entropy` found out about a call."""

    layout: ClassLayout
    soft: bool  #: the target holds class probabilities (the input's shape)
    unmasked: bool  #: every target is a class index and none is ignore_index
    label_smoothing: float  #: ε, checked to lie in [0, 1]


def validate_cross_entropy(
    input, target, weight, ignore_index: int, reduction: str, label_smoothing: float, inplace
) -> CrossEntropyCall:
    """``cross_entropy``: options, logits, target kind and shape, weights, devices, every
    class index, and what ``inplace=True`` needs."""
    op = "cross_entropy"
    check_tensor(op, input=input, target=target)
    check_optional_tensor(op, weight=weight)
    check_reduction(reduction)
    # (dims first: torch.Size compares element-wise, and under torch.export a (N, C, d)
    # input against an (N, d) target would guard d != C)
    soft = input.dim() == target.dim() and input.shape == target.shape
    # native checks label_smoothing first with class indices, but after log_softmax (the
    # input's dtype) and the target's dtype and ignore_index with probabilities
    float_argument(op, "label_smoothing", label_smoothing)  # (not a number: a TypeError first)
    if not soft:
        smoothing = check_smoothing(op, label_smoothing)
    layout = class_layout(op, input)
    check_floating(op, "input", input)
    if not soft:  # native: log_softmax (the input's dtype), then nll_loss_nd's batch check
        check_batch_size(op, input, target)
    check_class_weight(op, weight, layout.classes, differentiable=soft)
    check_same_device(op, input=input, target=target, weight=weight)
    if soft or target.is_floating_point():  # (class indices: nothing to check, no message)
        check_target_kind(op, target, soft, ignore_index, f"the input's shape {tuple(input.shape)}")
    if soft:
        smoothing = check_smoothing(op, label_smoothing)
    unmasked = False
    if not soft:
        check_hard_target(op, input, target, layout.batch_shape)
        check_index_dtype(op, target, layout)
        unmasked = check_class_indices(op, target, layout.classes, ignore_index)
    if inplace:
        if input.dim() != 2:
            raise ShapeError(
                f"{op}: inplace=True needs 2-D (N, C) logits, got shape {tuple(input.shape)}"
            )
        if soft and target.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{op}: inplace=True cannot be used when the probability target needs a "
                "gradient (that gradient needs the logits)"
            )
    return CrossEntropyCall(layout, soft, unmasked, smoothing)


class LinearCrossEntropyCall(NamedTuple):
    """What :func:`validate_linear_cross_entropy` found: whether the target holds class
    probabilities (``soft``), the K-dim ``out_features`` ``(d1, ..., dK)`` of a
    ``(C, d1, ..., dK, in)`` linear weight (``()`` for a 2-D one), ``ignore_index``
    resolved (``None`` means -100) and ``label_smoothing`` as a float in [0, 1]."""

    soft: bool
    out_features: tuple[int, ...]
    ignore_index: int
    label_smoothing: float


def _check_lce_linear_part(op, input, linear_weight, linear_bias) -> tuple[int, ...]:
    """Native's shape rules for the linear part: weight ``(C, d1, ..., dK, in)`` with
    ``K >= 0``, bias ``(C, d1, ..., dK)``, input ``(in,)`` or ``(N, in)`` (torchbp also
    takes ``(*, in)`` with a 2-D weight); returns ``(d1, ..., dK)``."""
    if input.dim() == 0:
        raise ShapeError(f"{op}: expected input with dimensionality 1 or 2, got 0 (a 0-dim input)")
    if linear_weight.dim() < 2:
        raise ShapeError(
            f"{op}: expected linear_weight with dimensionality at least 2, (C, in_features) or "
            f"(C, d1, ..., dK, in_features), got shape {tuple(linear_weight.shape)}"
        )
    if input.shape[-1] != linear_weight.shape[-1]:
        raise ShapeError(
            f"{op}: input's last dim must equal linear_weight's last dim (in_features): input "
            f"{tuple(input.shape)}, linear_weight {tuple(linear_weight.shape)}"
        )
    out_features = tuple(linear_weight.shape[1:-1])
    bias_shape = tuple(linear_weight.shape[:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != bias_shape:
        raise ShapeError(
            f"{op}: linear_bias must have shape {bias_shape} to match linear_weight "
            f"{tuple(linear_weight.shape)}, got {tuple(linear_bias.shape)}"
        )
    if out_features and input.dim() != 2:
        raise ShapeError(
            f"{op}: a K-dimensional linear_weight {tuple(linear_weight.shape)} needs batched "
            f"2-D input (N, {input.shape[-1]}), got input of shape {tuple(input.shape)}"
        )
    if out_features:
        _check_strided(
            op,
            "a K-dimensional linear_weight is reshaped to (C * d1 * ... * dK, in)",
            linear_weight=linear_weight,
            linear_bias=linear_bias,
        )
    return out_features


def _check_strided(op: str, reason: str, **tensors: torch.Tensor | None) -> None:
    """Each given tensor must be strided (dense): ``reason`` says why."""
    for name, t in tensors.items():
        if t is not None and t.layout != torch.strided:
            raise LayoutError(
                f"{op}: {name} must be a strided (dense) tensor, got layout "
                f"{str(t.layout).removeprefix('torch.')} ({reason}, which a sparse tensor "
                f"cannot be; native's reshape() fails too): pass {name}.to_dense()"
            )


def _refuse_nested(op: str, **tensors) -> None:
    """A nested tensor argument (strided or jagged) is refused by name, as native refuses
    one (``expected input with dimensionality 1 or 2``): the loss has no row structure
    for ragged batches to be chunked over."""
    for name, t in tensors.items():
        if nested(t):
            raise ShapeError(
                f"{op}: {name} is a nested tensor, which is not supported (as native); pass "
                "the rows as one dense (N, in) tensor (torch.cat of the components)"
            )


def validate_linear_cross_entropy(
    input,
    linear_weight,
    target,
    linear_bias,
    weight,
    reduction: str,
    ignore_index: int | None,
    label_smoothing: float,
    options,
    chunk_size,
) -> LinearCrossEntropyCall:
    """``linear_cross_entropy``: options, the linear part's shapes (native's rules), dtype
    kinds, devices, the target kind (probabilities iff the target has the logits' shape,
    and then ``ignore_index`` must be ``None``, as native) and, for 2-D weights, the class
    weights, target shape and every class index (a K-dim weight goes through
    :func:`torchbp.functional.cross_entropy`, which checks those)."""
    op = "linear_cross_entropy"
    check_tensor(op, input=input, linear_weight=linear_weight, target=target)
    check_optional_tensor(op, linear_bias=linear_bias, weight=weight)
    _refuse_nested(
        op,
        input=input,
        linear_weight=linear_weight,
        target=target,
        linear_bias=linear_bias,
        weight=weight,
    )
    out_features = _check_lce_linear_part(op, input, linear_weight, linear_bias)
    classes = linear_weight.shape[0]
    batch_shape = tuple(input.shape[:-1])
    soft = tuple(target.shape) == (*batch_shape, classes, *out_features)
    if soft and ignore_index is not None:
        raise OptionError(
            f"{op}: ignore_index cannot be specified when target contains probabilities "
            f"(target of the logits' shape {tuple(target.shape)}); leave it at None"
        )
    ignore_index = -100 if ignore_index is None else int_argument(op, "ignore_index", ignore_index)
    check_reduction(reduction)
    smoothing = check_smoothing(op, label_smoothing)
    check_linear_cross_entropy_options(op, options)
    check_chunk_size(op, chunk_size)
    check_floating(op, "input", input)
    check_floating(op, "linear_weight", linear_weight)
    check_same_device(
        op,
        input=input,
        linear_weight=linear_weight,
        linear_bias=linear_bias,
        target=target,
        weight=weight,
    )
    if out_features:
        return LinearCrossEntropyCall(soft, out_features, ignore_index, smoothing)
    if not soft:  # before the class weights, as native's cross_entropy (nll_loss_nd)
        check_batch_size(op, input, target)
    check_class_weight(op, weight, classes, differentiable=soft)
    check_target_kind(
        op, target, soft, ignore_index, f"shape {(*batch_shape, classes)} = (*input.shape[:-1], C)"
    )
    if not soft:
        if tuple(target.shape) != batch_shape:
            raise ShapeError(
                f"{op}: target of class indices must have shape {batch_shape} for input "
                f"{tuple(input.shape)} (the input's shape without in_features), "
                f"got {tuple(target.shape)}"
            )
        check_class_indices(op, target, classes, ignore_index)
    return LinearCrossEntropyCall(soft, (), ignore_index, smoothing)
