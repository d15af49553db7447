"""Affine layer ``y = x Wᵀ + b`` with a hand-written backward."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
from torch.autograd import Function

from torchbp._execution import any_without_storage, compiling_or_tracing, has_storage

if TYPE_CHECKING:
    from torchbp.per_sample.recorder import Recorder


class _PerSampleRecording(threading.local):
    """While a ``torchbp.per_sample_grads`` context is open on this thread, ``.recorder`` is
    its recorder: each Linear call tells it its inputs and, in backward, its ``x`` and ``g``
    (the per-sample logic lives in ``torchbp/per_sample``). ``None`` on every other thread
    and before any context: a class default, so that reading it (on each Linear call)
    finds it at once rather than through a missed thread-local lookup."""

    recorder: Recorder | None = None


per_sample_recording = _PerSampleRecording()
# The recorders of the contexts open on any thread, by the id of each weight they record:
# on CUDA the backward runs on autograd's device thread, and a reentrant checkpoint
# recomputes its segment's forward there, where ``per_sample_recording`` holds nothing.
per_sample_recorders_by_weight: dict[int, object] = {}


def _per_sample_recorder(weight: torch.Tensor):
    """The recorder of the context open on this thread, else of one recording ``weight``."""
    recorder = per_sample_recording.recorder
    return recorder if recorder is not None else per_sample_recorders_by_weight.get(id(weight))


def save_split(ctx, inputs, for_backward: tuple, for_forward: tuple) -> None:
    """Save ``for_backward`` for backward and ``for_forward`` for jvp, two tuples of the
    same length, position for position the same tensor or ``None`` in one of them.

    When a tensor input is one that torch.func wraps (``vmap``, ``grad``, ...), save
    their union, each position's tensor from whichever tuple has one, for both: the
    vmap rule that ``generate_vmap_rule`` builds records the batch dims of one save
    only (whichever ran last) and reads both backward's and jvp's saved tensors with
    them, so two different tuples hand a ``None`` a batch dim, or a batched tensor none
    (crashes deep in torch.func). Eager, each mode keeps only what it needs."""
    if any_without_storage(inputs):
        for_backward = for_forward = tuple(
            b if b is not None else f for b, f in zip(for_backward, for_forward, strict=True)
        )
    ctx.save_for_backward(*for_backward)
    ctx.save_for_forward(*for_forward)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(*, features)`` as ``(M, features)``: a 2-D ``t`` as it is (the common case: no
    reshape call, whose dispatch costs more than a small layer's bias sum), any other a
    reshape (a copy only if the strides demand it; M counted, not inferred, so that
    ``features = 0`` works too)."""
    if t.dim() == 2:
        return t
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def _bias_in_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether native's ``F.linear`` adds ``bias`` inside the GEMM of ``x``'s rows (addmm:
    ``x Wᵀ + b`` rounded once) rather than after a matmul (rounded twice, which differs in
    the last bit: ~30% of bf16 / fp16 outputs, a few % of float32 / float64 ones for long
    rows): for a contiguous ``x`` of any dim but 2 (2-D always takes addmm) and a
    contiguous ``(out,)``, ``(1,)`` or ``(1, out)`` bias, as native (torch 2.13). Not under a
    torch.func transform (tensors without storage), torch.compile or torch.jit.trace,
    which cannot take the ``resize_`` of :func:`_addmm_rows` (the tracer: "Cannot insert a
    Tensor that requires grad as a constant"): there the bias is added after the matmul
    (a trace runs this forward again when called, outside the tracer, taking addmm)."""
    if bias.dim() != 1 and (bias.dim() != 2 or bias.shape[0] != 1):
        return False
    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and x.is_contiguous()
        and bias.is_contiguous()
        and has_storage(x)
        and has_storage(weight)
        and has_storage(bias)
        and not x.is_nested
    )


def _addmm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ + b`` of a contiguous ``(*, in)`` ``x`` as one addmm of its rows ``(M, in)``
    (a view), the fresh ``(M, out)`` result then given the shape ``(*, out)`` in place
    (``resize_`` of an equal size keeps its memory): a view of it, the Function's output,
    could not be modified in place, and writing through ``out=`` costs more (~5 us)."""
    rows = x.shape[:-1]
    y = torch.addmm(bias, x.view(rows.numel(), x.shape[-1]), weight.t())
    return y.resize_(*rows, weight.shape[0])


def column_major(t: torch.Tensor) -> bool:
    """Whether 2-D ``t`` is laid out column by column (``t.t()`` contiguous: a transposed
    parameter, say), native's test in its mm backward, which then returns the gradient in
    that layout too (so that accumulating it into ``.grad`` needs no copy)."""
    if t.layout != torch.strided or t.is_nested or t.dim() != 2:
        return False  # (a sparse tensor has no strides)
    strides = t.stride()  # (one call: each stride(i) costs as much as the whole tuple)
    return strides[0] == 1 and strides[1] == t.shape[0]


def _input_grad(ctx, g: torch.Tensor, weight: torch.Tensor, grad_dim: int) -> torch.Tensor:
    """``dL/dx = g conj(W)`` in ``x``'s shape. Should it raise (running out of memory)
    inside a per-sample context, the context is told: the backward was cut short, and an
    earlier Linear backward of it may have filed its recording (this layer's other call
    included), so the context must form nothing and refuse any later backward."""
    try:
        if ctx.x_column_major:
            # the same product as its transpose, (in, out) @ (out, M), to come out in x's
            # column-major layout
            return (weight.conj().t() @ g.t()).t()
        # (M, out) @ (out, in) -> (M, in)
        grad_x = g @ weight.conj()
        # back to x's shape (*, in)
        return grad_x if grad_dim == 2 else grad_x.reshape(ctx.x_shape)
    except BaseException:
        if ctx.per_sample is not None:
            ctx.per_sample.on_backward_error()
        raise


class LinearFunction(Function):
    """``y = x Wᵀ + b`` for ``x`` of shape ``(*, in)``, ``W`` ``(out, in)``, ``b`` ``(out,)``
    (or any shape that broadcasts to ``y``'s, its gradient then summed back to it).

    Backward: ``dx = g W``, ``dW = gᵀ x``, ``db = Σ g`` over every leading dim, where ``g``
    is ``dL/dy`` flattened to ``(M, out)`` (for complex tensors ``g conj(W)`` and
    ``gᵀ conj(x)``, native's convention; ``conj`` is a no-op for real ones).
    Forward-mode: ``dy = dx Wᵀ + x dWᵀ + db``.
    Saves ``x`` only when ``W`` needs a gradient and ``W`` only when ``x`` does (both
    for jvp; under torch.func, both for backward too: see :func:`save_split`).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias):
        # x: (*, in), weight: (out, in), bias: (out,) or None -> y: (*, out)
        # The result is always a fresh tensor, never a view, so callers may modify it in
        # place (e.g. a following ReLU(inplace=True)).
        if bias is not None and x.dim() == 2:
            return torch.addmm(bias, x, weight.t())
        if bias is None:
            return torch.matmul(x, weight.t())
        if compiling_or_tracing():
            # out of place while compiling: torch 2.11's compiled backward of a Function
            # whose forward adds into its fresh output in place (add_, resize_) got every
            # gradient wrong; the compiled graph fuses the add anyway. And while make_fx
            # traces: its graph, run on inputs that require grad, refuses the resize_
            # ("cannot resize variables that require grad"), and torch.func.linearize,
            # which folds the matmul into a constant (a leaf that requires grad), the add_
            return torch.matmul(x, weight.t()) + bias
        if _bias_in_gemm(x, weight, bias):
            return _addmm_rows(x, weight, bias)
        return torch.matmul(x, weight.t()).add_(bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        needs_x, needs_w, _ = ctx.needs_input_grad
        # dW needs x and dx needs W: save each only if the *other* gradient is wanted;
        # jvp: dy = dx Wᵀ + x dWᵀ + db needs both.
        for_backward = (x if needs_w else None, weight if needs_x else None)
        save_split(ctx, inputs, for_backward, (x, weight))
        ctx.set_materialize_grads(False)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.x_shape = x.shape
        # the layouts of the gradients backward forms (asked only of those it forms)
        ctx.x_column_major = needs_x and column_major(x)
        ctx.w_column_major = needs_w and column_major(weight)
        recorder = None
        if not torch.compiler.is_compiling():
            recorder = _per_sample_recorder(weight)
        ctx.per_sample = None if recorder is None else recorder.on_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None, None, None
        x, weight = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad
        out_features = grad_y.shape[-1]
        # g: (M, out) -- reshape, never view: grad_y may be expanded or transposed.
        g = _rows(grad_y)
        grad_x = grad_w = grad_b = None
        if needs_x:
            grad_x = _input_grad(ctx, g, weight, grad_y.dim())
        # filed only once dx is formed: a backward failing there files nothing
        if ctx.per_sample is not None and not ctx.per_sample.on_backward(x, g):
            # the per-sample context forms dW and db itself once the backward is done
            needs_w = needs_b = False
        if needs_w:
            # dL/dW = gᵀ conj(x)       (out, M) @ (M, in) -> (out, in)
            if ctx.w_column_major:  # as its transpose (in, M) @ (M, out): W's layout
                grad_w = (_rows(x).conj().t() @ g).t()
            else:
                grad_w = g.t() @ _rows(x).conj()
        if needs_b:  # (False without a bias: a None input never needs a gradient)
            if ctx.bias_shape == (out_features,):
                # dL/db = Σ_rows g          summed over every leading dim -> (out,)
                grad_b = g.sum(0)
            else:
                # a broadcast bias (0-dim, (1,), (1, out), (N, out), ...): dL/db sums g over
                # every dim the bias was broadcast along
                grad_b = grad_y.sum_to_size(ctx.bias_shape)
        return grad_x, grad_w, grad_b

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        x, weight = ctx.saved_tensors
        out = None
        # dy = dx Wᵀ + x dWᵀ + db
        if x_t is not None:
            out = x_t @ weight.t()
        if weight_t is not None:
            term = x @ weight_t.t()
            out = term if out is None else out + term
        if bias_t is not None:
            shape = (*x.shape[:-1], weight.shape[0])
            # A tangent must be laid out like the output: materialise the broadcast.
            out = bias_t.expand(shape).clone() if out is None else out + bias_t
        return out
