"""``linear_cross_entropy`` of :mod:`torchbp.functional`: the fused, chunked
``cross_entropy(linear(...))``, and the calls that run the unfused pair instead (K-dim
weights, float64 probabilities with half input, torch.func transforms, export and trace)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.overrides import handle_torch_function, has_torch_function

from torchbp import _checks
from torchbp._execution import carries_tangent, exporting, has_storage, make_fx_tracing
from torchbp.autograd import LinearCrossEntropyFunction
from torchbp.autograd.cross_entropy import accumulation_dtype
from torchbp.autograd.linear_cross_entropy import chunk_size_from_options, default_chunk_size
from torchbp.functional._autocast import _autocast_dtype, _cast_low, _run_without_autocast
from torchbp.functional._loss_terms import (
    _mean_denominator,
    _one_index_of_unbatched,
    _probability_loss_dtype,
)
from torchbp.functional._recording import _differentiated
from torchbp.functional.affine import linear
from torchbp.functional.losses import cross_entropy

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
    """Whether torch.export, torch.jit.trace or make_fx (``torch.func.linearize`` too)
    records the call: the chunk loop would bake the example's batch size into the graph
    (export with a dynamic batch refuses it), its ``needs`` flags differ under
    jit.trace's no-grad check run, and under make_fx its backward's ``out=`` matmuls are
    refused ("functions with out=... arguments don't support automatic
    differentiation"), so the unfused pair (one graph for any batch) serves them. (While
    torch.compile traces, Dynamo records the Function itself: make_fx is not asked.)"""
    if exporting() or torch.jit.is_tracing():
        return True
    return not torch.compiler.is_compiling() and make_fx_tracing()


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


#: torch 2.14's native chunked path also takes probability targets (2.13's does not)
_NATIVE_CHUNKS_PROBABILITIES = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14)


def _native_chunks(
    options, label_smoothing: float, target: torch.Tensor, out_features, probabilities=False
) -> bool:
    """Whether native's ``linear_cross_entropy`` takes its chunked path (``options`` given,
    no label smoothing, int64 class indices or, with ``probabilities``, a probability
    target it chunks, a 2-D weight, not recorded by ``torch.jit.trace``) rather than its
    reference formula, ``cross_entropy(linear(...))``."""
    return (
        options is not None
        and label_smoothing == 0.0
        and (target.dtype == torch.int64 or probabilities)
        and not out_features
        and not torch.jit.is_tracing()
    )


def _native_chunks_probabilities(input, target, reduction: str, soft: bool) -> bool:
    """Whether native's chunked path (torch >= 2.14) takes this probability target:
    ``'mean'`` / ``'sum'``, the input's dtype, and no gradient wanted for it."""
    return (
        _NATIVE_CHUNKS_PROBABILITIES
        and soft
        and reduction in ("mean", "sum")
        and target.dtype == input.dtype
        and not (target.requires_grad and torch.is_grad_enabled())
    )


def _check_accumulation_dtype(options, dtype: torch.dtype) -> None:
    """``options.acc_dtype`` where native's chunked path takes the call: ``None``, the
    input's ``dtype``, or float32 for a float16 / bfloat16 input (torchbp accumulates
    exactly so); native refuses any other with a RuntimeError, which torchbp raises too
    instead of accepting a precision it would not use (float64 for a float32 input)."""
    wanted = options.acc_dtype
    if wanted is None or wanted == dtype:
        return
    if dtype in _LOW_PRECISION and wanted == torch.float32:
        return
    raise _checks.OptionError(
        f"linear_cross_entropy: options.acc_dtype={wanted} is not supported with {dtype} "
        "input (as native's chunked path: the input's dtype, or torch.float32 for "
        "float16 / bfloat16 input); pass acc_dtype=None"
    )


def _linear_cross_entropy_unfused(
    input, linear_weight, target, linear_bias, weight, reduction, ignore_index, smoothing, soft
):
    """Native's reference formula, ``cross_entropy(linear(...))``, with torchbp's
    ``linear`` and ``cross_entropy`` Functions: the logits are materialised, and every
    transform those two support (vmap, jvp, double backward) works. For K-dim weights
    ``(C, d1, ..., dK, in)`` the logits are ``(N, C, d1, ..., dK)``. The TorchScript-based
    ONNX exporter (``torch.onnx.export(..., dynamo=False)``) records this pair as
    :func:`~torchbp.functional.cross_entropy` exports itself, label smoothing and
    probability targets included (which native's ONNX symbolic refuses)."""
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
    options: Any = None,
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
            ``acc_policy`` and ``allow_retain_graph`` are accepted and ignored: torchbp
            accumulates half inputs in float32, others in their dtype, and
            ``retain_graph=True`` always works. ``acc_dtype`` must agree with that where
            native's chunked path takes the call (``None``, the input's dtype, or float32
            for half inputs); another is a RuntimeError, as native's.
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
    as native's does). So do calls that :func:`torch.export.export`,
    :func:`torch.jit.trace` or ``make_fx`` (``torch.func.linearize`` too) records: the
    chunk loop would fix the batch size in the graph (an export with a dynamic batch dim
    refuses it; a trace would fail its check; make_fx refuses the backward's ``out=``
    matmuls), and the unfused pair exports and traces as native's does (with the
    ``(N, C)`` logits).

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
    if isinstance(input, torch.Tensor) and input.dim() == 1:
        # (d,) input: the logits are (C,) for a (C, d) weight
        logits_shape = getattr(linear_weight, "shape", (None,))[:-1]
        target = _one_index_of_unbatched(logits_shape, target, True)
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
    probabilities = _native_chunks_probabilities(input, target, reduction, soft)
    if _native_chunks(options, label_smoothing, target, call.out_features, probabilities):
        _check_accumulation_dtype(options, input.dtype)
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
            denominator = _mean_denominator(flat_target, weight, ignore_index, acc, label_smoothing)
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
