"""Cross-entropy, the reference formulation: per-row coefficients, then the max trick.

Per row ``i`` of ``(m, C)`` logits ``z``, with ``p = softmax(z_i)`` and
``lse_i = log Σ_c e^{z_ic}``, every cross-entropy variant has the form

    ℓ_i = a_i lse_i - Σ_c B_ic z_ic   with  a_i = Σ_c B_ic,   so   ∂ℓ_i/∂z_i = a_i p_i - B_i,

where ``B = w ⊙ t'``: the class weights ``w`` (1 if absent) times the smoothed target
``t' = (1-ε) t + ε/C`` (``t`` the one-hot of a class index, or given probabilities). For
plain cross-entropy ``a = 1`` and ``B = onehot(y)``: ``∂ℓ/∂z = p - onehot(y)``.
:func:`coefficients` is the one place that turns a target, class weights, ignore_index
and label smoothing into ``a`` and ``B``; everything else here reads them from it.

:func:`ce_rows` evaluates ``(ℓ, ∂ℓ/∂z, lse)`` of a block of rows in differentiable torch
ops; the fast paths of :mod:`torchbp.kernels.cpu_ce` and :mod:`torchbp.kernels.triton_ce`
compute the same numbers and are tested against it. The second-order helpers serve
double backward and jvp, which recover ``p`` from the saved ``∂ℓ/∂z``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from torchbp._execution import compiling_or_tracing, has_storage, values_inspectable

# What ignore_index None (no row is ignored) stands for where a value is needed: no class
# index is negative, so this matches no target.
NO_IGNORE = -1


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, half) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class CERows(NamedTuple):
    """Cross-entropy of a block of ``m`` rows: ``loss`` ``ℓ`` (m,), ``grad`` ``∂ℓ/∂z``
    (m, C) and ``lse`` (m,)."""

    loss: torch.Tensor
    grad: torch.Tensor
    lse: torch.Tensor


class HardTarget(NamedTuple):
    """Class-index targets ``y`` (m,): ``valid`` rows (not ignored), ``index`` (``y``, 0 on
    ignored rows: safe to gather with) and ``w_y`` (``w_{y_i}``, 0 on ignored rows)."""

    valid: torch.Tensor
    index: torch.Tensor
    w_y: torch.Tensor


def hard_target(target, weight, ignore_index, dtype) -> HardTarget:
    """:class:`HardTarget` of class indices ``target`` (m,); ``ignore_index`` None: none
    ignored. ``w_y`` is in ``dtype`` (1 on kept rows without class weights)."""
    valid = target != (NO_IGNORE if ignore_index is None else ignore_index)
    index = torch.where(valid, target, 0)
    if weight is None:
        return HardTarget(valid, index, valid.to(dtype))
    return HardTarget(valid, index, torch.where(valid, weight.to(dtype)[index], 0.0))


class Coefficients(NamedTuple):
    """``a`` (m,) and ``B = w ⊙ ((1-ε) t + ε/C)`` of ``ℓ_i = a_i lse_i - Σ_c B_ic z_ic``.

    ``B`` is stored in the form its target gives: ``dense`` (m, C) for probability targets;
    for class indices ``B_ic = b_y_i [c = y_i] + uniform_share · w_c`` on kept rows (0 on
    ignored ones), with ``b_y = (1-ε) w_y`` (m,). ``target_share = 1-ε`` and
    ``uniform_share = ε/C`` are the shares of the given target and of the uniform
    distribution in ``t'``, ``weight`` the class weights ``w`` (C,) or None.
    """

    a: torch.Tensor
    dense: torch.Tensor | None
    hard: HardTarget | None
    b_y: torch.Tensor | None
    uniform_share: float
    target_share: float
    weight: torch.Tensor | None


def coefficients(target, weight, ignore_index, smoothing, classes, dtype) -> Coefficients:
    """The :class:`Coefficients` of class-index (m,) or probability (m, C) targets, class
    weights ``weight`` (C,) or None, ``ignore_index`` (None: no row ignored) and label
    smoothing ``ε``, in ``dtype``: the one place that knows about label smoothing."""
    w = None if weight is None else weight.to(dtype)
    # without classes (C = 0) there is nothing to share the smoothing among
    target_share, uniform_share = 1 - smoothing, smoothing / classes if classes else 0.0
    if target.is_floating_point():
        # B = w ⊙ ((1-ε) t + ε/C),  a_i = Σ_c B_ic
        b = target.to(dtype)
        if smoothing:
            b = b * target_share + uniform_share
        if w is not None:
            b = b * w
        return Coefficients(b.sum(1), b, None, None, uniform_share, target_share, w)
    hard = hard_target(target, weight, ignore_index, dtype)
    if not smoothing:  # B = w_y onehot(y),  a = w_y
        return Coefficients(hard.w_y, None, hard, hard.w_y, uniform_share, target_share, w)
    # a_i = (1-ε) w_{y_i} + (ε/C) Σ_c w_c on kept rows
    w_sum = classes if w is None else w.sum()
    a = target_share * hard.w_y + hard.valid.to(dtype) * uniform_share * w_sum
    b_y = target_share * hard.w_y
    return Coefficients(a, None, hard, b_y, uniform_share, target_share, w)


def keeps_shifted(coef: Coefficients) -> bool:
    """Whether the loss is formed term by term from every ``s_ic = z_ic - m_i`` (so that
    ``s`` must outlive ``e = exp(s)``): where a weight ``B_ic`` that multiplies a term per
    class (a probability, or a class weight with label smoothing) is infinite or NaN, seen
    as ``a_i = Σ_c B_ic`` not finite. Looked at only where values may be inspected (the
    CPU, eagerly), where it costs no sync; elsewhere (other devices, torch.compile,
    torch.func) the split of :func:`split_loss` takes every row, one pass and one (m, C)
    buffer fewer."""
    if coef.dense is None and not (coef.uniform_share and coef.weight is not None):
        return False
    if coef.a.device.type != "cpu" or not values_inspectable(coef.a):
        return False
    return not math.isfinite(coef.a.sum().item())  # (a sum is finite iff every term is,
    # unless it overflows: then term by term too)


def early_terms(coef: Coefficients, s: torch.Tensor, keep: bool):
    """What the loss reads of ``s`` (m, C) before ``exp(s)`` may overwrite it: ``s_iy``
    (m,) of class indices (None for a probability target) and, unless ``keep``, the rest
    of ``Σ_c B_ic s_ic`` (m,): all of it for a probability target, ``(ε/C) Σ_c w_c s_ic``
    with label smoothing (None without)."""
    if coef.dense is not None:
        return None, None if keep else (coef.dense * s).sum(1)
    picked = s.gather(1, coef.hard.index.unsqueeze(1)).squeeze(1)
    if keep or not coef.uniform_share:
        return picked, None
    s_w = s.sum(1) if coef.weight is None else s @ coef.weight
    return picked, coef.uniform_share * s_w


def split_loss(mass, log_total, shifted) -> torch.Tensor:
    """``Σ_c B_ic (L_i - s_ic)`` (m,) from row values only: ``mass = Σ_c B_ic``, ``L``
    (m,) and ``shifted = Σ_c B_ic s_ic``, as ``mass·L - shifted`` where ``mass`` is
    finite. Where it is not (an infinite ``B_ic``), that split meets ``inf · 0`` for the
    term by term's infinity; there instead (``L - s_ic >= 0``, ``s_ic <= 0``):

    * ``L = 0`` (one logit dominates the row): every term is ``-B_ic s_ic``: ``-shifted``
      (NaN where an infinite ``B_ic`` sits on that logit, ``inf · 0``, as native's);
    * ``L > 0`` and ``shifted`` NaN: an infinite ``B_ic`` on a row max (``s_ic = 0``),
      whose term ``B_ic L`` is infinite: the loss is ``mass`` (``±inf``, NaN where
      infinities of both signs or a NaN weight meet);
    * otherwise ``mass·L - shifted`` has the term by term's infinities already.

    Not from row values: a row that also has a ``-inf`` logit under a zero (or
    opposite-signed) ``B_ic`` in the second case, where native's ``0 · inf`` is NaN and
    this is ``mass``; and ``mass`` overflowing from finite weights. The CPU forms such
    rows term by term (:func:`keeps_shifted`)."""
    split = mass * log_total - shifted
    dominated = log_total == 0
    on_max = shifted.isnan() & (log_total > 0)
    fixed = torch.where(dominated, -shifted, torch.where(on_max, mass, split))
    return torch.where(mass.isfinite(), split, fixed)


def loss_rows(coef: Coefficients, log_total, early, s=None) -> torch.Tensor:
    """``ℓ_i = Σ_c B_ic (L_i - s_ic)`` (m,) with ``s = z - m`` (m, C) and ``L = log Σ_c
    e^{s_ic}`` (m, 1); ``early`` is :func:`early_terms`'s.

    Given ``s`` (where :func:`keeps_shifted` holds), term by term as native's ``-Σ_c B_ic
    logp_ic``: ``-logp_ic = L_i - s_ic`` first, then weighted. Otherwise as ``a_i L_i - Σ_c
    B_ic s_ic`` (:func:`split_loss`), one pass fewer, the target's column always term by
    term (``w_y (L_i - s_iy)``). Ignored rows: masked later by the caller."""
    if s is not None:
        neg_logp = log_total - s  # (out of place: torch.func cannot batch out=)
        if coef.dense is not None:
            return torch.linalg.vecdot(coef.dense, neg_logp)
    picked, rest = early
    log_total = log_total.squeeze(1)
    if picked is None:  # a probability target
        return split_loss(coef.a, log_total, rest)
    loss = coef.b_y * (log_total - picked)
    if s is not None:  # label smoothing with class weights: (ε/C) Σ_c w_c (L_i - s_ic)
        return loss + coef.uniform_share * (neg_logp @ coef.weight)
    if rest is None:  # no label smoothing
        return loss
    # (ε/C) Σ_c w_c (L_i - s_ic) = (ε/C) Σ_c w_c L_i - (ε/C) Σ_c w_c s_ic
    return loss + split_loss(uniform_mass(coef), log_total, rest)


def uniform_mass(coef: Coefficients) -> torch.Tensor:
    """``(ε/C) Σ_c w_c`` (m,) on kept rows (0 on ignored ones): ``a - b_y``, formed apart
    where that is ``inf - inf`` (``w_y`` infinite)."""
    mass = coef.a - coef.b_y
    if coef.weight is None:
        return mass  # (finite: no class weight)
    apart = coef.hard.valid.to(mass.dtype) * (coef.uniform_share * coef.weight.sum())
    return torch.where(mass.isnan(), apart, mass)


def subtract_b(coef: Coefficients, g: torch.Tensor) -> torch.Tensor:
    """``g - B``, written into ``g`` (m, C), which is returned."""
    if coef.dense is not None:
        return g.sub_(coef.dense)
    if coef.uniform_share:
        w_row = g.new_ones(g.shape[1]) if coef.weight is None else coef.weight
        g.sub_(torch.outer(coef.hard.valid.to(g.dtype), w_row), alpha=coef.uniform_share)
    return g.scatter_add_(1, coef.hard.index.unsqueeze(1), coef.b_y.neg().unsqueeze(1))


def dense_b(coef: Coefficients, classes: int) -> torch.Tensor:
    """``B`` as an (m, C) tensor."""
    if coef.dense is not None:
        return coef.dense
    b = coef.a.new_zeros((coef.a.shape[0], classes))
    b = b.scatter(1, coef.hard.index.unsqueeze(1), coef.b_y.unsqueeze(1))
    if coef.uniform_share:
        w_row = b.new_ones(classes) if coef.weight is None else coef.weight
        b = b + torch.outer(coef.hard.valid.to(b.dtype), w_row) * coef.uniform_share
    return b


def masked(coef: Coefficients, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (m,) with ignored rows set to exactly 0 (even where they are inf or NaN)."""
    return rows if coef.hard is None else torch.where(coef.hard.valid, rows, 0.0)


def ce_rows(z, target, weight, ignore_index, smoothing, out=None) -> CERows:
    """:class:`CERows` of a block of logits ``z`` (m, C), all in the accumulation dtype
    (float32 for half inputs, so that ``p_y - 1`` of a confident row keeps its precision;
    the caller rounds the gradient once). ``∂ℓ/∂z`` is built in ``out`` when given (a
    buffer of the accumulation dtype, possibly ``z`` itself), else in a new tensor; no
    other tensor is written."""
    acc = accumulation_dtype(z.dtype)
    coef = coefficients(target, weight, ignore_index, smoothing, z.shape[1], acc)
    # s = z - m with m the row max: every exponent is <= 0 (log-sum-exp trick)
    m = z.amax(1, keepdim=True).to(acc)
    keep = keeps_shifted(coef)
    s = z.to(acc) - m if out is None or keep else torch.sub(z, m, out=out)
    early = early_terms(coef, s, keep)  # taken before s may be overwritten by e = exp(s)
    # exp(s) over s, and ∂ℓ/∂z in e's buffer, only eagerly: torch.compile, tracing the
    # forward under torch.func.grad, records these ops for autograd (gather's backward, in
    # early_terms, keeps s), and its compiled graph needs no buffer reuse anyway; make_fx
    # (torch.func.linearize) folds s into a constant that may not be written in place
    in_place = not compiling_or_tracing()
    # e = exp(s), evaluated once per logit; Σ e >= 1 because the max contributes e^0
    e = (s.exp() if out is None else torch.exp(s, out=out)) if keep or not in_place else s.exp_()
    total = e.sum(1, keepdim=True)
    log_total = total.log()
    # ℓ_i = Σ_c B_ic (lse_i - z_ic) = Σ_c B_ic (log Σ_c e_ic - s_ic)
    loss = masked(coef, loss_rows(coef, log_total, early, s if keep else None))
    # ∂ℓ_i/∂z_i = a_i p_i - B_i with p_i = e_i / Σ_c e_ic
    scale = coef.a.unsqueeze(1) / total
    if in_place and all(has_storage(t) for t in (target, weight) if t is not None):
        grad = subtract_b(coef, e.mul_(scale))  # built in e's buffer
    else:
        # torch.func batches the target or weights (maybe not the logits): an in-place op
        # cannot add a batch dim to e; or compiling: the same formula out of place
        grad = e * scale - dense_b(coef, z.shape[1])
    return CERows(loss, grad, (m + log_total).squeeze(1))


# --------------------------------------------------------------------------- second order
def log_softmax_rows(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, lse)`` of rows ``z`` (m, C): ``lse`` (m, 1) and ``logp = z - lse``, formed
    as :func:`ce_rows` and native form them, so that a row with a ``+inf`` logit is NaN
    throughout (``inf - inf``), as its loss is (``torch.logsumexp`` gives ``inf`` there,
    which would leave ``logp = -inf`` and finite gradients in a NaN row)."""
    if z.shape[1] == 0:  # no class: lse = log Σ ∅ = -inf
        return z.clone(), z.new_full((z.shape[0], 1), -torch.inf)
    # lse = m + log Σ_c e^{z_c - m} with m the row max (log-sum-exp trick)
    m = z.amax(1, keepdim=True)
    s = z - m
    log_total = s.exp().sum(1, keepdim=True).log()
    return s - log_total, m + log_total


def grad_from_logits(logits, coef: Coefficients):
    """``(∂ℓ/∂z, p, logp)`` recomputed from saved logits (m, C), in ``coef``'s dtype.
    ``logp = (z - m) - log Σ e^{z - m}``, not ``z - lse``: for large logits ``lse``'s
    rounding (e.g. 0.06 at 1e6 in float32) would swamp it."""
    logp, _lse = log_softmax_rows(logits.to(coef.a.dtype))
    p = torch.exp(logp)
    # ∂ℓ_i/∂z_i = a_i p_i - B_i
    return coef.a.unsqueeze(1) * p - dense_b(coef, p.shape[1]), p, logp


def softmax_from_grad(grad, coef: Coefficients) -> torch.Tensor:
    """``p`` (m, C) recovered from ``∂ℓ/∂z = a p - B``: ``p = (∂ℓ/∂z + B) / a`` (rows with
    ``a = 0``, the ignored ones, divide by 1: their gradient is 0)."""
    a = coef.a.unsqueeze(1)
    return (grad + dense_b(coef, grad.shape[1])) / torch.where(a == 0, torch.ones_like(a), a)


def grad_derivative(p, a, v):
    """``(J v, ⟨p, v⟩)`` for the Jacobian ``J`` of ``∂ℓ/∂z`` w.r.t. ``z`` and ``v`` (m, C);
    ``J`` is symmetric, so ``J v`` is both the jvp and the vjp. ``⟨p_i, v_i⟩`` (m, 1) is
    the derivative of ``lse_i`` along ``v_i`` (``∂lse_i/∂z_ij = p_ij``)."""
    pv = (p * v).sum(1, keepdim=True)
    # ∂(a_i p_ij - B_ij)/∂z_ik = a_i p_ij (δ_jk - p_ik)
    return a * p * (v - pv), pv
