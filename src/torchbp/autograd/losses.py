"""Negative log-likelihood and the fused log-softmax + NLL cross-entropy.

Both Functions work on 2-D ``(M, C)`` inputs (class dim last) and return one loss per
row; :mod:`torchbp.functional` moves the class dim, flattens K-dim inputs and reduces
(``mean`` divides by the summed target weights, as native does). Per row ``i`` with
target ``y_i`` and class weights ``w`` (1 if absent):

* NLL: ``ℓ_i = -w_{y_i} logp_{i, y_i}`` (0 for ``y_i == ignore_index``).
* Cross-entropy: ``ℓ_i = a_i lse_i - Σ_c B_ic z_ic``, ``∂ℓ_i/∂z_i = a_i p_i - B_i`` with
  ``p = softmax(z_i)`` — for plain cross-entropy ``p - onehot(y)``. The coefficients and
  the reference formulas are in :mod:`torchbp.autograd.cross_entropy`; here the host
  functions :func:`ce_forward` / :func:`ce_backward` / :func:`ce_jvp` (which path runs)
  and the thin :class:`CrossEntropyFunction`.
"""

from __future__ import annotations

import math

import torch
from torch.autograd import Function

from torchbp._checks import class_weight_not_differentiable
from torchbp._execution import may_reuse_saved, values_inspectable
from torchbp.autograd.cross_entropy import (
    NO_IGNORE,
    CERows,
    accumulation_dtype,
    ce_rows,
    coefficients,
    grad_derivative,
    grad_from_logits,
    log_softmax_rows,
    softmax_from_grad,
)
from torchbp.autograd.linear import save_split
from torchbp.kernels import _triton, cpu_ce, triton_ce

# Eager cross-entropy runs in blocks of rows of about this many elements: large enough
# that the per-op overhead vanishes, small enough to bound the float32 temporaries.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- NLL
def nll_rows(logp, target, weight, ignore_index):
    """``ℓ_i = -w_{y_i} logp_{i, y_i}`` (0 on ignored rows) of ``(M, C)`` ``logp``;
    ``ignore_index`` None: every target is a class index in ``[0, C)`` (no mask)."""
    if logp.shape[1] == 0:
        # no class to pick: every target is ignore_index (checked), so every row is 0
        return logp.new_zeros(target.shape[0])
    if ignore_index is None:
        picked = logp.gather(1, target.unsqueeze(1)).squeeze(1)
        return -_times_target_weight(picked, target, weight)
    ignored, index = _ignored_rows(target, ignore_index)
    picked = logp.gather(1, index.unsqueeze(1)).squeeze(1)
    return (-_times_target_weight(picked, index, weight)).masked_fill(ignored, 0.0)


def _ignored_rows(target, ignore_index):
    """``(ignored, index)`` of class indices ``target`` (m,): the rows whose target is
    ``ignore_index``, and ``target`` with 0 there (safe to gather and scatter with).
    (masked_fill, out of place as torch.func needs, not ``where`` of a scalar: ~1 us less
    each on the CPU.)"""
    ignored = target == ignore_index
    return ignored, target.masked_fill(ignored, 0)


def _times_target_weight(v, index, weight):
    """``w_{y_i} v_i`` (m,) of class indices ``index`` (m,) in ``[0, C)`` (ignored rows
    mapped to a class: the caller masks them), ``v`` as it is without class weights."""
    return v if weight is None else weight.to(v.dtype).index_select(0, index) * v


def nll_grad(grad_rows, target, weight, ignore_index, classes):
    """``∂ℓ/∂logp`` scaled by ``grad_rows`` (M,): ``-w_{y_i} g_i`` in column ``y_i``."""
    if classes == 0:  # every row ignored (see nll_rows): an empty (M, 0) gradient
        return grad_rows.new_zeros((target.shape[0], 0))
    # ∂ℓ_i/∂logp_ic = -w_{y_i} [c = y_i]: scatter -w_{y_i} g_i into a zero (M, C) grad
    if ignore_index is None:  # no row ignored (see nll_rows): no mask
        index = target
        src = -_times_target_weight(grad_rows, target, weight)
    else:
        ignored, index = _ignored_rows(target, ignore_index)
        src = (-_times_target_weight(grad_rows, index, weight)).masked_fill(ignored, 0.0)
    grad = grad_rows.new_zeros((target.shape[0], classes))
    return grad.scatter(1, index.unsqueeze(1), src.unsqueeze(1))


class NLLLossFunction(Function):
    """Per-row negative log-likelihood ``ℓ_i = -w_{y_i} logp_{i, y_i}`` of ``(M, C)``
    log-probabilities and ``(M,)`` class indices; backward scatters ``-w_{y_i} g_i`` to
    the target column. ``ignore_index=None`` promises that every target is a class index
    in ``[0, C)`` (the wrapper checks it), which skips the masks. Saves the target and
    weight (and the (M,) loss rows, for double backward: do not modify them in place;
    ``nll_loss(reduction='none')`` hands out a copy), never ``logp`` (native saves it).
    The class weights are not differentiable, as native's: a backward or jvp asked for
    their gradient raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logp, target, weight, ignore_index):
        # ℓ_i = -w_{y_i} logp_{i, y_i}
        return nll_rows(logp, target, weight, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logp, target, weight, ignore_index = inputs
        # The gradient does not depend on logp's values: save only the target (and weight),
        # and the loss rows, which attach a double backward's gradient to logp's graph.
        save_split(ctx, inputs, (target, weight, output), (target, weight, None))
        ctx.ignore_index = ignore_index
        ctx.classes = logp.shape[1]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_rows):
        if ctx.needs_input_grad[2]:
            # class weights that torch.func wraps (vmap, jvp) below a grad transform: the
            # wrapper's refusal reads their requires_grad as False; None would be a 0
            raise class_weight_not_differentiable("nll_loss")
        if grad_rows is None:
            return None, None, None, None
        target, weight, rows = ctx.saved_tensors
        options = (target, weight, ctx.ignore_index, ctx.classes)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            grad = NLLGradFunction.apply(grad_rows, rows, *options)
        else:
            grad = nll_grad(grad_rows, *options)
        return grad, None, None, None

    @staticmethod
    def jvp(ctx, logp_t, _target_t, weight_t, _ignore):
        if weight_t is not None:
            raise class_weight_not_differentiable("nll_loss", forward_mode=True)
        if logp_t is None:
            return None
        target, weight, _ = ctx.saved_tensors
        # dℓ_i = -w_{y_i} dlogp_{i, y_i}: the same gather
        return nll_rows(logp_t, target, weight, ctx.ignore_index)


class NLLGradFunction(Function):
    """NLL's backward ``∂ℓ/∂logp = scatter(-w_y g)`` as a Function of ``(g, rows)``, where
    the loss rows ``rows`` stand in for ``logp`` (as ``self`` does in native's
    ``nll_loss_backward``): a gradient computed with ``create_graph=True`` is then attached
    to logp's graph, and differentiating it w.r.t. logp gives zeros, as native, not an
    error.

    Backward (``gg`` (M, C)): ``∂/∂g_i = -w_{y_i} gg_{i, y_i}`` (the NLL gather again),
    ``∂/∂rows = 0`` (the gradient does not depend on logp's values). Forward-mode: the
    scatter of ``dg``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_rows, rows, target, weight, ignore_index, classes):
        return nll_grad(grad_rows, target, weight, ignore_index, classes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, target, weight, ctx.ignore_index, ctx.classes = inputs
        ctx.save_for_backward(target, weight)
        ctx.save_for_forward(target, weight)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gg):
        if gg is None:
            return (None,) * 6
        target, weight = ctx.saved_tensors
        needs_g, needs_rows = ctx.needs_input_grad[:2]
        # ∂(scatter -w_y g)/∂g_i = -w_{y_i} [c = y_i]: gather gg at the target column
        grad_g = nll_rows(gg, target, weight, ctx.ignore_index) if needs_g else None
        # ∂/∂rows = 0: logp's values never enter the gradient
        grad_rows = gg.new_zeros(target.shape[0]) if needs_rows else None
        return grad_g, grad_rows, None, None, None, None

    @staticmethod
    def jvp(ctx, g_t, rows_t, *_):
        target, weight = ctx.saved_tensors
        if g_t is None:
            # d(grad) = 0 · drows: a zero tangent (None here trips autograd's checks)
            return None if rows_t is None else rows_t.new_zeros((target.shape[0], ctx.classes))
        return nll_grad(g_t, target, weight, ctx.ignore_index, ctx.classes)


# --------------------------------------------------------------------------- cross-entropy
def ce_forward(logits, target, weight, ignore_index, smoothing, inplace) -> CERows:
    """``(ℓ, ∂ℓ/∂z, lse)`` of ``(M, C)`` logits and class-index (M,) or probability (M, C)
    targets: ``ℓ`` and ``lse`` (M,) in the accumulation dtype, ``∂ℓ/∂z`` in the logits'
    dtype (``logits`` itself with ``inplace``). The first path that applies runs:

    ======================================  ===========================================
    inputs                                  path
    ======================================  ===========================================
    ``inplace=True``                        reference rows block by block, ``∂ℓ/∂z``
                                            written over the logits (cpu_ce.blocked_rows)
    ``TORCHBP_TRITON=1``, Triton applies    one Triton kernel (triton_ce)
    eager, float32 / float64, class         one softmax (cpu_ce.plain_rows)
    indices, no weight, no smoothing
    the same with class weights of the      one softmax, scaled by ``w_y``
    logits' dtype                           (cpu_ce.weighted_rows)
    eager, float16 / bfloat16               reference rows block by block into a new
                                            buffer (cpu_ce.blocked_rows)
    anything else (smoothing,               reference rows in one block (ce_rows)
    probabilities; torch.compile,
    torch.func)
    ======================================  ===========================================

    Blocks of rows bound the float32 temporaries of half inputs; for full precision one
    block is as fast or faster (the gradient is built in place in the reference's buffer).
    """

    def reference(z, t, out=None):
        return ce_rows(z, t, weight, ignore_index, smoothing, out)

    rows, classes = logits.shape
    if classes == 0:
        return _no_classes(logits, target, smoothing, inplace)
    block = max(1, _CHUNK_ELEMENTS // classes)
    if inplace:
        return CERows(*cpu_ce.blocked_rows(reference, logits, target, block, logits))
    if _triton.requested() and triton_ce.available(logits, target, weight):
        ignore = NO_IGNORE if ignore_index is None else ignore_index
        return CERows(*triton_ce.ce_forward_rows(logits, target, weight, ignore, smoothing))
    # torch.func may batch the target or weights alone: the fast paths then step aside too
    # (plain ands, not all() of a generator, which costs more than the queries)
    eager = (
        values_inspectable(logits)
        and values_inspectable(target)
        and (weight is None or values_inspectable(weight))
    )
    full_precision = logits.dtype in (torch.float32, torch.float64)
    unsmoothed_indices = not smoothing and not target.is_floating_point()
    if eager and full_precision and unsmoothed_indices and rows:  # (C > 0: numel > 0)
        if weight is None:
            return CERows(*cpu_ce.plain_rows(logits, target, ignore_index))
        if weight.dtype == logits.dtype:
            return CERows(*cpu_ce.weighted_rows(logits, target, weight, ignore_index))
    if eager and not full_precision:
        grad = logits.new_empty((rows, classes))
        return CERows(*cpu_ce.blocked_rows(reference, logits, target, block, grad))
    loss, grad, lse = reference(logits, target)
    return CERows(loss, grad.to(logits.dtype), lse)


def _no_classes(logits, target, smoothing, inplace) -> CERows:
    """Rows of C = 0 logits (probability targets, or class indices that are all
    ignore_index: any other index is out of bounds): ``lse = log Σ ∅ = -inf``,
    ``ℓ = -Σ ∅ = 0`` as native (whose ``'mean'`` is then 0/0 = NaN: the wrapper's
    denominator), but NaN for class indices with label smoothing, as native: it adds the
    (masked, empty) smoothing sum times ``ε/C = ε/0 = inf``. An empty ``∂ℓ/∂z``, which
    with ``inplace`` is the logits themselves (the Function marked them dirty, so it must
    return them)."""
    acc = accumulation_dtype(logits.dtype)
    rows = logits.shape[0]
    smoothed_indices = smoothing and not target.is_floating_point()
    loss = logits.new_full((rows,), math.nan if smoothed_indices else 0.0, dtype=acc)
    lse = logits.new_full((rows,), -torch.inf, dtype=acc)
    return CERows(loss, logits if inplace else logits.new_empty((rows, 0)), lse)


def ce_backward(grad, logits, target, weight, ignore_index, smoothing, d_loss, d_grad, d_lse):
    """``(dz, dt)``: the gradients w.r.t. the logits and, for a probability target given
    its ``logits`` (M, C), the target, of the outputs ``(ℓ, ∂ℓ/∂z, lse)`` with upstream
    gradients ``d_loss`` (M,), ``d_grad`` (M, C), ``d_lse`` (M,) (None where unused).

    ``grad`` is the saved ``∂ℓ/∂z``; None when ``logits`` were saved instead (a
    probability target needs a gradient), and then it is recomputed from them. A saved
    ``grad`` is the forward's own buffer: a first-order backward that frees the graph
    scales it in place and returns it (no second logits-sized allocation).
    """
    options = (target, weight, ignore_index, smoothing)
    owned, p, d_target = grad is not None, None, None
    if not owned:
        grad, p, d_target = _recompute(logits, *options, d_loss)
    terms = []
    if d_grad is not None or d_lse is not None:
        # Reached only by double backward (through dz = g ⊙ ∂ℓ/∂z, or through lse in the
        # target's gradient).
        terms, cross = _second_order(grad, p, *options, d_grad, d_lse, logits is not None)
        d_target = _plus(d_target, cross)
    d_logits = None
    if d_loss is not None:
        if target.is_floating_point() or ignore_index is None:
            scale = d_loss
        else:
            # Ignored rows get exactly 0, even when the upstream scale is inf or NaN (mean
            # over no valid rows divides by 0: native leaves those rows 0 too).
            scale = d_loss.masked_fill(target == ignore_index, 0.0)
        # dz_i = g_i ∂ℓ_i/∂z_i
        scale = scale.unsqueeze(1)
        if scale.dtype != grad.dtype:  # (a same-dtype .to costs as much as a small op)
            scale = scale.to(grad.dtype)
        if owned and not terms and may_reuse_saved(grad, scale):
            # detached: the saved buffer is the Function's differentiable output, and a
            # first-order gradient must be a constant (no grad_fn), as native's is
            d_logits = grad.detach().mul_(scale)
        else:
            d_logits = grad * scale
    for term in terms:
        d_logits = _plus(d_logits, term)
    return d_logits, d_target


def _recompute(logits, target, weight, ignore_index, smoothing, d_loss):
    """``(∂ℓ/∂z, p, dt)`` from saved logits: ``∂ℓ/∂z`` in the logits' dtype, ``p`` and the
    probability target's gradient ``dt`` (None without ``d_loss``) in the accumulation
    dtype."""
    acc = accumulation_dtype(logits.dtype)
    coef = coefficients(target, weight, ignore_index, smoothing, logits.shape[1], acc)
    grad, p, logp = grad_from_logits(logits, coef)
    d_target = None
    if d_loss is not None:
        # ∂ℓ_i/∂t_ic = (∂B_ic/∂t_ic)(lse_i - z_ic) = -(1-ε) w_c logp_ic
        d_target = -coef.target_share * d_loss.to(acc).unsqueeze(1) * logp
        if coef.weight is not None:
            d_target = d_target * coef.weight
    return grad.to(logits.dtype), p, d_target


def _second_order(grad, p, target, weight, ignore_index, smoothing, d_grad, d_lse, soft_grad):
    """The logits-gradient terms (a list) and the target-gradient term (or None, unless
    ``soft_grad``) of the outputs ``∂ℓ/∂z`` and ``lse``, given ``p`` or recovering it from
    ``grad = a p - B``."""
    coef = coefficients(target, weight, ignore_index, smoothing, grad.shape[1], grad.dtype)
    p = softmax_from_grad(grad, coef) if p is None else p
    terms, cross = [], None
    if d_grad is not None:
        term, pv = grad_derivative(p, coef.a.unsqueeze(1), d_grad)
        terms.append(term)
        if soft_grad:
            # ∂(a_i p_ij - B_ij)/∂t_ik = (1-ε) w_k (p_ij - δ_jk)
            cross = coef.target_share * (pv - d_grad)
            if weight is not None:
                cross = cross * weight.to(cross.dtype)
    if d_lse is not None:
        # ∂lse_i/∂z_ij = p_ij
        terms.append(d_lse.unsqueeze(1).to(p.dtype) * p)
    return terms, cross


def _plus(total, term):
    """``total + term``, where None stands for nothing yet (or nothing to add)."""
    if term is None:
        return total
    return term if total is None else total + term


def ce_jvp(grad, target, weight, ignore_index, smoothing, d_logits) -> CERows:
    """Tangents of ``(ℓ, ∂ℓ/∂z, lse)`` along ``d_logits`` (M, C), from the saved ``∂ℓ/∂z``."""
    # dℓ_i = Σ_j ∂ℓ_i/∂z_ij dz_ij
    d_loss = (grad.to(d_logits.dtype) * d_logits).sum(1).to(accumulation_dtype(grad.dtype))
    coef = coefficients(target, weight, ignore_index, smoothing, grad.shape[1], grad.dtype)
    p = softmax_from_grad(grad, coef)
    d_grad, pv = grad_derivative(p, coef.a.unsqueeze(1), d_logits)
    return CERows(d_loss, d_grad, pv.squeeze(1).to(d_loss.dtype))


def ce_target_jvp(logits, weight, smoothing, d_target) -> CERows:
    """Tangents of ``(ℓ, ∂ℓ/∂z, lse)`` along ``d_target`` (M, C) of a probability target,
    from the logits (M, C). With ``B = w ⊙ ((1-ε) t + ε/C)``: ``dB = (1-ε) w ⊙ dt``."""
    acc = accumulation_dtype(logits.dtype)
    d_b = (1 - smoothing) * d_target.to(acc)
    if weight is not None:
        d_b = d_b * weight.to(acc)
    return _tangents_along_b(logits, d_b)


def ce_weight_jvp(logits, target, smoothing, d_weight) -> CERows:
    """Tangents of ``(ℓ, ∂ℓ/∂z, lse)`` along the class weights' ``d_weight`` (C,), for a
    probability target (M, C), from the logits (M, C). With ``B = w ⊙ t'``,
    ``t' = (1-ε) t + ε/C``: ``dB = dw ⊙ t'``."""
    acc = accumulation_dtype(logits.dtype)
    classes = logits.shape[1]
    # without classes (C = 0) there is nothing to share the smoothing among
    uniform_share = smoothing / classes if classes else 0.0
    smoothed = (1 - smoothing) * target.to(acc) + uniform_share
    return _tangents_along_b(logits, d_weight.to(acc) * smoothed)


def _tangents_along_b(logits, d_b) -> CERows:
    """Tangents of ``(ℓ, ∂ℓ/∂z, lse)`` along ``dB`` (M, C), the tangent of the target's
    coefficients ``B`` (``a = Σ_c B_c``, ``da = Σ_c dB_c``), from the logits (M, C)."""
    logp, _lse = log_softmax_rows(logits.to(d_b.dtype))
    # ℓ_i = a_i lse_i - Σ_c B_ic z_ic:  dℓ_i = Σ_c dB_ic (lse_i - z_ic) = -Σ_c dB_ic logp_ic
    d_loss = -(d_b * logp).sum(1)
    # ∂ℓ_i/∂z_i = a_i p_i - B_i:  its tangent da_i p_i - dB_i;  lse does not depend on B
    d_grad = d_b.sum(1, keepdim=True) * logp.exp() - d_b
    return CERows(d_loss, d_grad.to(logits.dtype), torch.zeros_like(d_loss))


class CrossEntropyFunction(Function):
    """Fused log-softmax + NLL over ``(M, C)`` logits, one loss per row.

    Forward (per row, max trick): ``lse = m + log Σ_c e^{z_c - m}``; class index ``y``:
    ``ℓ = (1-ε) w_y (lse - z_y) + (ε/C) Σ_c w_c (lse - z_c)``; probabilities ``t``:
    ``ℓ = -Σ_c w_c t'_c (z_c - lse)``. Backward: ``dz = g ⊙ (a p - B)`` — for plain
    cross-entropy ``g ⊙ (p - onehot(y))`` — computed in the forward pass from the one
    softmax evaluation and saved (one tensor the size of the logits; the logits
    themselves are not kept, except for a probability target that requires grad, whose
    gradient needs them: then the logits are saved instead and ``∂ℓ/∂z`` is recomputed
    from them in backward). Arguments: ``(logits, target, weight, ignore_index,
    label_smoothing, inplace)``; ``ignore_index=None`` promises that every target is a
    class index in ``[0, C)`` (the wrapper checks it), which skips the masks; with
    ``inplace=True`` the gradient is written over the logits (marked dirty) instead of
    into a new buffer. Returns ``(ℓ, ∂ℓ/∂z, lse)``; the wrappers expose ``ℓ``. The second
    output is the Function's own buffer: a backward that frees the graph scales it in
    place and hands it over as the logits' gradient, so do not keep it. The class
    weights have a tangent (jvp) with probabilities but no gradient: with class indices
    a backward or jvp asked for one raises, as native refuses them; with probabilities
    the wrapper computes native's formula instead where they need one.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, ignore_index, label_smoothing, inplace):
        # The gradient is computed here, where the softmax is at hand, so that e^z is
        # evaluated once per logit (native evaluates it again in backward).
        return tuple(ce_forward(logits, target, weight, ignore_index, label_smoothing, inplace))

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, label_smoothing, inplace = inputs
        if inplace:
            ctx.mark_dirty(logits)  # the gradient now lives in the logits' storage
        ctx.inplace = inplace
        ctx.ignore_index = ignore_index
        ctx.label_smoothing = label_smoothing
        # ∂ℓ/∂z is all the logits' gradient needs. A probability target that needs a
        # gradient, -(1-ε) w ⊙ logp, needs the logits instead; ∂ℓ/∂z is then recomputed
        # from them in backward, so that no more is kept than native keeps.
        grad = output[1]
        if ctx.needs_input_grad[1]:
            for_backward = (None, target, weight, logits)
        else:
            for_backward = (grad, target, weight, None)
        # jvp w.r.t. a probability target reads the logits (overwritten with inplace); what
        # is saved for forward is released right after forward when forward AD is off.
        for_forward = (grad, target, weight, None if inplace else logits)
        save_split(ctx, inputs, for_backward, for_forward)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, d_loss, d_grad, d_lse):
        grad, target, weight, logits = ctx.saved_tensors
        if ctx.needs_input_grad[2] and not target.is_floating_point():
            # class weights that torch.func wraps (vmap, jvp) below a grad transform: the
            # wrapper's refusal reads their requires_grad as False; None would be a 0
            raise class_weight_not_differentiable("cross_entropy")
        if ctx.needs_input_grad[1]:
            # the target's gradient is recomputed from the logits (under torch.func ∂ℓ/∂z
            # is saved as well, for jvp: see save_split)
            grad = None
        options = ctx.ignore_index, ctx.label_smoothing
        d_logits, d_target = ce_backward(
            grad, logits, target, weight, *options, d_loss, d_grad, d_lse
        )
        # A double backward forms a cross term for any target; one that needs no gradient
        # (class indices, say) gets None: vmap's rule would reduce it to the target's shape.
        return d_logits, d_target if ctx.needs_input_grad[1] else None, None, None, None, None

    @staticmethod
    def jvp(ctx, d_logits, d_target, d_weight, _ignore, _smoothing, _inplace):
        grad, target, weight, logits = ctx.saved_tensors
        if d_weight is not None and not target.is_floating_point():
            raise class_weight_not_differentiable("cross_entropy", forward_mode=True)
        if (d_target is not None or d_weight is not None) and ctx.inplace:
            raise NotImplementedError(
                "torchbp cross_entropy: forward-mode AD w.r.t. a probability target or "
                "class weights needs the logits, which inplace=True overwrote; use "
                "inplace=False"
            )
        tangents = []
        if d_logits is not None:
            tangents.append(
                ce_jvp(grad, target, weight, ctx.ignore_index, ctx.label_smoothing, d_logits)
            )
        if d_target is not None:
            tangents.append(ce_target_jvp(logits, weight, ctx.label_smoothing, d_target))
        if d_weight is not None:
            tangents.append(ce_weight_jvp(logits, target, ctx.label_smoothing, d_weight))
        if not tangents:
            return None, None, None
        # the tangents along the logits and along the target add up
        d_loss, d_grad, d_lse = (sum(parts[1:], parts[0]) for parts in zip(*tangents))
        if ctx.inplace:  # the gradient output is the logits, modified in place
            d_grad = d_logits.copy_(d_grad)
        return d_loss, d_grad, d_lse


# --------------------------------------------------------------------------- K-dim rows
def class_last_rows(t: torch.Tensor, class_dim: int) -> torch.Tensor:
    """``(N, C, d1, ..., dK)`` -> ``(N·d1·...·dK, C)``: the class dim moved last, flattened
    into rows (a copy, counted rows: with C = 0 a ``-1`` could be any count)."""
    moved = t.movedim(class_dim, -1).contiguous()
    return moved.view(moved.numel() // max(moved.shape[-1], 1), moved.shape[-1])


def rows_to_input_layout(g: torch.Tensor, shape, class_dim: int) -> torch.Tensor:
    """The inverse of :func:`class_last_rows` for a gradient ``g`` ``(M, C)``: back to
    ``shape`` with the class dim in place, copied to a contiguous tensor (the permuted view
    alone would hand the input a class-last gradient)."""
    moved_shape = (*shape[:class_dim], *shape[class_dim + 1 :], shape[class_dim])
    return g.reshape(moved_shape).movedim(-1, class_dim).contiguous()


class ClassLastRowsFunction(Function):
    """``rows = x.movedim(class_dim, -1).reshape(M, C)`` for K-dim loss inputs that are
    not class-last already (so the rows are a copy), whose gradient comes back contiguous,
    as native's K-dim losses return it, instead of as the permuted view autograd's
    ``movedim`` would give. Saves only ``x``'s shape."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, class_dim):
        return class_last_rows(x, class_dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.class_dim = inputs
        ctx.shape = tuple(x.shape)

    @staticmethod
    def backward(ctx, g):
        # ∂rows/∂x is the permutation itself: dx = the rows' gradient put back in place
        return rows_to_input_layout(g, ctx.shape, ctx.class_dim), None

    @staticmethod
    def jvp(ctx, x_t, _class_dim):
        # rows is linear in x: d(rows) = the same permutation of the tangent
        return class_last_rows(x_t, ctx.class_dim)
