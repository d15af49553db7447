"""``nll_loss`` and ``cross_entropy`` of :mod:`torchbp.functional`: the class dim moved last
(K-dim losses as rows), the legacy ``size_average`` / ``reduce``, autocast's float32, the
path each call takes (fused Function, in-place gradient, weighted probabilities) and the
reduction of the per-row losses."""

from __future__ import annotations

import math
import warnings

import torch
from torch.overrides import handle_torch_function, has_torch_function

from torchbp import _checks, _native
from torchbp._execution import has_storage, shares_storage, values_inspectable
from torchbp.autograd import CrossEntropyFunction, NLLLossFunction
from torchbp.autograd._compile import apply, pair
from torchbp.autograd.cross_entropy import accumulation_dtype
from torchbp.autograd.losses import ClassLastRowsFunction
from torchbp.functional._autocast import _autocast_dtype, _cast_low, _device_type
from torchbp.functional._loss_terms import (
    _mean_denominator,
    _one_index_of_unbatched,
    _probability_loss_dtype,
    _target_weight_sum,
)
from torchbp.functional._recording import _differentiated, _recorded_view, _traced
from torchbp.functional.softmax_family import log_softmax

# (Function, jvp-free twin) pairs for autograd._compile.apply
_CLASSLASTROWS = pair(ClassLastRowsFunction)
_CROSSENTROPY = pair(CrossEntropyFunction)
_NLLLOSS = pair(NLLLossFunction)


def _cast_loss_for_autocast(input: torch.Tensor, weight: torch.Tensor | None):
    """``(input, weight)`` as autocast casts them for a loss (native lists ``nll_loss`` /
    ``cross_entropy`` as float32 ops): half ones to float32; float64 ones stay."""
    return _cast_low(input, torch.float32), _cast_low(weight, torch.float32)


def _legacy_reduction(size_average, reduce, reduction: str) -> str:
    """The ``reduction`` that the deprecated ``size_average`` / ``reduce`` give, as native
    reads them (each defaults to True: both -> 'mean', ``reduce`` alone -> 'sum', no
    ``reduce`` -> 'none'), with native's deprecation warning; ``reduction`` if neither."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    legacy = ("mean" if size_average else "sum") if reduce else "none"
    if not torch.compiler.is_dynamo_compiling():
        # (Dynamo cannot trace warnings.warn: torch.compile(fullgraph=True) refused the
        # call; native's loss warns once, at compilation, from inside torch)
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


def _flat_indices(target: torch.Tensor) -> torch.Tensor:
    """Class indices ``target`` as an int64 ``(M,)`` tensor (uint8 indices are accepted, as
    native does): a 1-D int64 target as it is (no view to make: the common case)."""
    flat = target if target.dim() == 1 else target.reshape(-1)
    return flat if flat.dtype == torch.int64 else flat.long()  # (.long() dispatches even then)


def _differentiated_or_traced(t: torch.Tensor | None) -> bool:
    """:func:`_differentiated`, or ``t`` is a tensor and :func:`torch.jit.trace` records
    the call: the trace serves later calls that record gradients, and torch's check
    traces again under ``no_grad`` (where a computed tensor no longer requires grad) and
    refuses a graph that differs, so the path taken must not depend on either."""
    return _differentiated(t) or (_traced() and isinstance(t, torch.Tensor))


def _wrapped_by_torch_func(weight: torch.Tensor | None) -> bool:
    """Whether the class weights are torch.func-wrapped (batched by ``vmap``, a primal of
    ``jvp`` / ``jacfwd``): a grad transform above may differentiate them though their
    ``requires_grad`` reads False there, and the fused Function holds them constant.
    (Never while torch.compile traces: its tensors under vmap have no storage to ask.)"""
    if weight is None or torch.compiler.is_compiling():
        return False
    return not has_storage(weight)


def _weighted_probability_rows(logits, target, weight, smoothing: float) -> torch.Tensor:
    """``ℓ_i = -Σ_c w_c t'_c logp_ic`` with ``t' = (1-ε) t + ε/C`` of ``(M, C)`` logits and
    probabilities: native's formula, on torchbp's log-softmax, for class weights that need
    their gradient ``∂ℓ_i/∂w_c = -t'_ic logp_ic`` (the fused Function holds them constant)."""
    logp = log_softmax(logits, 1)
    if smoothing and logits.shape[1]:  # (with no class, C = 0, there is nothing to smooth)
        target = target * (1 - smoothing) + smoothing / logits.shape[1]
    return -(logp * target * weight).sum(1)


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


def _exported_to_onnx() -> bool:
    """Whether the TorchScript-based ONNX exporter (``torch.onnx.export(...,
    dynamo=False)``) traces this call. That exporter replaces each Function by the
    operators its forward recorded; cross_entropy's Function also builds the logits'
    gradient there, in place, which for plain class-index targets made the export fail
    (``aten::unsqueeze``) or, in earlier kernels, write a file computing a wrong loss.

    ``torch.jit.is_tracing()`` is per thread but torch's ONNX flag is process-wide: a plain
    :func:`torch.jit.trace` in another thread while an export (either exporter) runs also
    records the unfused pair, which computes the same loss and gradient. Plain traces,
    ``torch.export`` and the dynamo-based exporter otherwise never take it; eagerly it
    costs one ``torch.jit.is_tracing()`` call (~0.1 us)."""
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()


def _kept_from_logits(t: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    """``t``, or a copy of it where it shares ``logits``' storage: ``inplace=True`` writes
    the gradient over the logits while the target and class weights are still being read
    (the weights also after the call, for the ``'mean'`` denominator). Called only where
    :func:`_writes_gradient_over_logits` holds, so every tensor here has storage."""
    return t.clone() if t is not None and shares_storage(t, logits) else t


def _reduce(rows, reduction, batch_shape, out_dtype, denominator):
    """The per-row losses ``rows`` (M,) reduced, in ``out_dtype``: ``'mean'`` divides their
    sum by ``denominator``, or by M where it is None (every row counts 1)."""
    if reduction == "none":
        # a copy, never the Function's own output (which it may save, or which may share a
        # buffer with its other outputs): the caller may modify it in place, as native's
        return rows.reshape(batch_shape).to(out_dtype, copy=True)
    if reduction == "sum":
        out = rows.sum()
    elif denominator is None:
        out = _row_mean(rows)
    else:
        out = rows.sum() / denominator
    # (a same-dtype .to costs as much as a small op)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _row_mean(rows: torch.Tensor) -> torch.Tensor:
    """``Σ_i ℓ_i / M`` of ``rows`` (M,). On the CPU ``rows.mean()``: torch's CPU mean is
    that sum, then that division (the same bits), in one op and one autograd node instead
    of two (~2 us of a small loss's forward + backward). Elsewhere the sum, then the
    division, as native's losses divide (CUDA's mean kernel scales by 1/M, which may round
    differently)."""
    if _device_type(rows) == "cpu":
        return rows.mean()
    return rows.sum() / rows.shape[0]


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
        target: class indices of shape ``()`` (or ``(1,)``, as native), ``(N,)`` or
            ``(N, d1, ..., dK)``: int64, or uint8 for ``(C,)`` / ``(N, C)`` input (K-dim
            input needs int64, as native, even empty: see docs/ops.md).
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
        return _native.nll_loss(
            input, target, weight, size_average, ignore_index, reduce, reduction
        )
    reduction = _legacy_reduction(size_average, reduce, reduction)
    ignore_index = _checks.int_argument("nll_loss", "ignore_index", ignore_index)
    if isinstance(input, torch.Tensor):
        target = _one_index_of_unbatched(input.shape, target, False)
    (classes, class_dim, batch_shape), unmasked = _checks.validate_nll_loss(
        input, target, weight, ignore_index, reduction
    )
    if _autocast_dtype(input) is not None:
        input, weight = _cast_loss_for_autocast(input, weight)
    _checks.check_class_weight_dtype("nll_loss", weight, input.dtype)
    flat_target = _flat_indices(target)
    logp = _rows(input, class_dim, classes)
    rows = apply(_NLLLOSS, logp, flat_target, weight, None if unmasked else ignore_index)
    acc = accumulation_dtype(input.dtype)
    denominator = None  # 'mean': every row counts 1
    if reduction == "mean" and not (unmasked and weight is None):
        ignored = None if unmasked else ignore_index
        denominator = _target_weight_sum(flat_target, weight, ignored, acc)
    if rows.dtype != acc:  # (a same-dtype .to costs as much as a small op)
        rows = rows.to(acc)
    return _reduce(rows, reduction, batch_shape, input.dtype, denominator)


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
        target: class indices of the input's shape without the class dim (``()``, or
            ``(1,)`` as native, for ``(C,)`` input; int64, or uint8 for ``(C,)`` /
            ``(N, C)`` input: K-dim input needs int64, as native, even empty), or class
            probabilities of the input's shape.
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
        return _native.cross_entropy(
            input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        )
    reduction = _legacy_reduction(size_average, reduce, reduction)
    ignore_index = _checks.int_argument("cross_entropy", "ignore_index", ignore_index)
    if isinstance(input, torch.Tensor):
        target = _one_index_of_unbatched(input.shape, target, True)
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
        if not label_smoothing and _exported_to_onnx():
            # the unfused pair, which the exporter records faithfully (other calls, with
            # label smoothing or probabilities, take a path of the Function that it does)
            logp = log_softmax(input, class_dim)
            return nll_loss(logp, target, weight, ignore_index=ignore_index, reduction=reduction)
    if soft:  # promoted with the target and class weights, as native's formula
        common = _probability_loss_dtype(input, target, weight)
        input, target = input.to(common), target.to(common)
    weight_grad = soft and (_differentiated_or_traced(weight) or _wrapped_by_torch_func(weight))
    # With inplace, the (N, C) input itself (not a view of it) is modified and marked dirty.
    logits = input if inplace and not weight_grad else _rows(input, class_dim, classes)
    flat_target = _rows(target, class_dim, classes) if soft else _flat_indices(target)
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
    denominator = None  # 'mean': every row counts 1 (soft, or unmasked without weights)
    if reduction == "mean":
        if soft and classes == 0:
            # native divides by numel / C = 0 / 0 for probability targets
            denominator = math.nan
        elif not (soft or (unmasked and weight is None)):
            # W = Σ w_y over kept rows; native's smoothed mean is
            # (1-ε) Σ w_y nll / W + (ε/C) Σ_i Σ_c w_c nll_ic / W, NaN (0/0) at W = 0
            ignored = None if unmasked else ignore_index
            denominator = _mean_denominator(
                flat_target, weight, ignored, rows.dtype, label_smoothing
            )
    loss = _reduce(rows, reduction, batch_shape, input.dtype, denominator)
    if reduction == "sum" and classes == 0 and label_smoothing and not soft:
        # native scales the summed smoothing term by ε/C = ε/0 = inf: NaN, with no row too
        # (inf · 0; the rows themselves are NaN already, see autograd.losses._no_classes)
        loss = loss + math.nan
    return loss
