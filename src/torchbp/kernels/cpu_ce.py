"""Eager fast paths of the cross-entropy forward (any device; written for the CPU).

Each computes what the reference :func:`torchbp.autograd.cross_entropy.ce_rows` computes,
``(ℓ, ∂ℓ/∂z, lse)`` of ``(m, C)`` logits, and ``tests/kernels/test_cpu_ce.py`` checks it
against the reference on the same inputs:

* :func:`plain_rows`: plain cross-entropy (class indices, no class weights, no label
  smoothing) of float32 / float64 logits, ``e^{z-m}`` evaluated once per logit into the
  buffer that becomes ``∂ℓ/∂z = p - onehot(y)``: for many classes with one fused
  ``torch.softmax`` kernel (the fewest passes over the logits), for few classes with a
  handful of elementwise ops (the fused kernel's per-row cost dominates there).
* :func:`weighted_rows`: the same with class weights, ``ℓ_i`` and ``∂ℓ_i/∂z_i`` scaled by
  ``w_{y_i}`` (still no label smoothing: that stays the reference's).
* :func:`blocked_rows`: any row function (the reference) applied block by block of rows,
  each block's gradient written into a buffer of the logits' dtype, which may be the
  logits themselves (``inplace=True``): straight for full precision, through one reused
  float32 block buffer for half inputs. Bounds the float32 temporaries of half inputs,
  and with ``inplace`` allocates no logits-sized buffer at all.

They write into buffers of their own (or the logits, when asked) and inspect values, so
the host calls them only eagerly, never under torch.compile or torch.func.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchbp._execution import shares_storage

__all__ = [
    "FUSED_SOFTMAX_MIN_CLASSES",
    "blocked_rows",
    "composite_softmax_rows",
    "fused_softmax_rows",
    "plain_rows",
    "softmax_rows",
    "subtract_one_hot",
    "weighted_rows",
]

Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (ℓ (m,), ∂ℓ/∂z (m, C), lse (m,))


def softmax_rows(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row max ``m`` (m, 1), ``p = softmax(z)`` (m, C) from one fused kernel, and
    ``log Σ_c e^{z_c - m}`` (m, 1): at the row max ``p = e^0 / Σ e^{z-m}``, the largest
    ``p`` of the row, so it is ``-log max_c p_c`` (no second pass of exp; ``amax``, not
    ``max``, whose argmax costs on CPU as much as the softmax)."""
    m = z.amax(1, keepdim=True)
    p = torch.softmax(z, 1)
    return m, p, p.amax(1, keepdim=True).log_().neg_()


def composite_softmax_rows(z: torch.Tensor, y: torch.Tensor):
    """What :func:`softmax_rows` gives, from the reference's elementwise ops instead of
    the fused kernel, plus ``z_y - m`` (m, 1) of the class indices ``y`` (m, 1): the row
    max ``m``, ``s = z - m``, ``e = exp(s)`` in ``s``'s buffer, ``p = e / Σ e`` in it too.
    For few classes this is faster than ``torch.softmax``, whose CPU kernel costs about
    0.1 us per row however short the row (see ``FUSED_SOFTMAX_MIN_CLASSES``)."""
    m = z.amax(1, keepdim=True)
    s = z - m  # every exponent is <= 0 (log-sum-exp trick)
    shifted_y = s.gather(1, y)  # read before s becomes e
    e = s.exp_()
    total = e.sum(1, keepdim=True)
    return m, e.div_(total), total.log_(), shifted_y


def fused_softmax_rows(z: torch.Tensor, y: torch.Tensor):
    """:func:`softmax_rows` plus ``z_y - m`` (m, 1) of the class indices ``y`` (m, 1)."""
    m, p, log_total = softmax_rows(z)
    return m, p, log_total, z.gather(1, y).sub_(m)


# From this many classes on, plain_rows takes the fused torch.softmax; below it the
# composite of elementwise ops. Measured (torch 2.13, CPU, 1 thread, float32, 64 to 8192
# rows): at C = 10 the composite is 2-8x faster (the fused kernel's per-row cost), up to
# C = 64 still about 2x; at C = 100 they are even; at C = 1000 the fused kernel is faster
# (two passes over the logits instead of five).
FUSED_SOFTMAX_MIN_CLASSES = 128


def plain_rows(z: torch.Tensor, target: torch.Tensor, ignore_index: int | None) -> Rows:
    """Plain cross-entropy of float32 / float64 logits ``z`` (m, C), m·C > 0, with
    class-index targets (m,): ``ℓ_i = lse_i - z_{i,y_i}`` and ``∂ℓ_i/∂z_i = p_i -
    onehot(y_i)``, 0 on rows whose target is ``ignore_index`` (None: the caller checked
    that no row is; then no row is masked). The loss is formed relative to the row max,
    ``log Σ e^{z-m} - (z_y - m)``, as the reference forms it: ``lse - z_y`` would cancel
    the bits of ``|m|`` (float32 logits around 1e4: 1e-3 off a confident row's loss)."""
    y, ignored = kept_indices(target, ignore_index)
    m, p, log_total, shifted_y = target_softmax_rows(z, y)
    # ℓ_i = lse_i - z_{i,y_i} = log Σ_c e^{z_ic - m_i} - (z_{i,y_i} - m_i)
    loss = log_total - shifted_y
    # ∂ℓ_i/∂z_i = p_i - onehot(y_i)
    subtract_one_hot(p, y)
    if ignored is not None:  # ignored rows: 0 loss and gradient (NaN rows stay NaN, as
        loss.masked_fill_(ignored, 0.0)  # native's 0 - p · 0; their loss is exactly 0)
        p.mul_(ignored.logical_not())
    lse = m.add_(log_total)
    return loss.squeeze(1), p, lse.squeeze(1)


def weighted_rows(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, ignore_index: int | None
) -> Rows:
    """Cross-entropy with class weights ``weight`` (C,) of ``z``'s dtype (float32 /
    float64 logits (m, C), m·C > 0, class-index targets (m,), no label smoothing):
    :func:`plain_rows`' ``ℓ_i`` and ``∂ℓ_i/∂z_i`` scaled by ``w_{y_i}``, 0 on rows whose
    target is ``ignore_index`` (None: no row is). The gradient is formed as the reference
    forms ``a p - B``, ``w_y p`` first and then ``w_y`` taken from the target's column:
    ``w_y (p - onehot(y))`` would give ``-inf`` at the target of an infinite class weight
    where the reference and native give NaN (``inf - inf``)."""
    y, ignored = kept_indices(target, ignore_index)
    w_y = torch.take(weight, y)  # (m, 1): y is 0 on ignored rows, a class index elsewhere
    if ignored is not None:
        w_y.masked_fill_(ignored, 0.0)
    m, p, log_total, shifted_y = target_softmax_rows(z, y)
    # ℓ_i = w_{y_i} (lse_i - z_{i,y_i}) = w_{y_i} (log Σ_c e^{z_ic - m_i} - (z_{i,y_i} - m_i))
    loss = (log_total - shifted_y).mul_(w_y)
    if ignored is not None:  # ignored rows: exactly 0, even where their logits are inf or NaN
        loss.masked_fill_(ignored, 0.0)
    # ∂ℓ_i/∂z_i = w_{y_i} p_i - w_{y_i} onehot(y_i)  (0 on ignored rows: w_y = 0 there)
    p.mul_(w_y).scatter_add_(1, y, w_y.neg())
    lse = m.add_(log_total)
    return loss.squeeze(1), p, lse.squeeze(1)


def kept_indices(target: torch.Tensor, ignore_index: int | None):
    """``(y, ignored)`` of class indices ``target`` (m,): ``y`` (m, 1) the targets, 0 on
    rows whose target is ``ignore_index`` (safe to gather with), ``ignored`` (m, 1) those
    rows; for ``ignore_index`` None (no row ignored) the targets and None. (masked_fill,
    not ``where`` of a scalar: on the CPU ~1 us less per call at 64 rows.)"""
    y = target.unsqueeze(1)
    if ignore_index is None:
        return y, None
    ignored = y == ignore_index
    return y.masked_fill(ignored, 0), ignored


def target_softmax_rows(z: torch.Tensor, y: torch.Tensor):
    """``(m, p, log Σ e^{z-m}, z_y - m)`` of logits ``z`` (m, C) and class indices ``y``
    (m, 1): :func:`composite_softmax_rows` below ``FUSED_SOFTMAX_MIN_CLASSES`` classes,
    :func:`fused_softmax_rows` from it on."""
    small = z.shape[1] < FUSED_SOFTMAX_MIN_CLASSES
    return (composite_softmax_rows if small else fused_softmax_rows)(z, y)


def subtract_one_hot(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``p - onehot(y)`` written into ``p`` (m, C), for class indices ``y`` (m, 1) in
    ``[0, C)``: ``p[i, y_i] -= 1``. On the CPU one scatter of the scalar ``-1`` (no (m, 1)
    tensor of ``-1`` to build first: one ATen call fewer, ~0.7 us of a 64 x 10 forward's
    ~16); elsewhere ``scatter_add_`` of such a tensor, as before (scatter's ``reduce=``
    form is not checked on other devices, e.g. under CUDA's deterministic mode)."""
    if p.is_cpu:
        return p.scatter_(1, y, -1.0, reduce="add")
    return p.scatter_add_(1, y, p.new_full(y.shape, -1.0))


def blocked_rows(
    rows_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Rows],
    logits: torch.Tensor,
    target: torch.Tensor,
    block: int,
    grad: torch.Tensor,
) -> Rows:
    """``rows_fn(z, t, out)`` block by block of ``block`` rows of ``logits`` (M, C) and
    ``target`` (M,) or (M, C); each block's ``∂ℓ/∂z`` goes into ``grad`` (M, C) of the
    logits' dtype, which may be ``logits`` itself. ``rows_fn`` returns its block's
    ``(ℓ, ∂ℓ/∂z, lse)`` in the accumulation dtype and builds ``∂ℓ/∂z`` in ``out`` (after
    reading the block's max): for full-precision logits the block of ``grad`` itself,
    otherwise one float32 block buffer, reused for every block (no fresh allocation per
    block), whose gradient is rounded once into ``grad``. A ``target`` that shares
    ``grad``'s storage (``logits.detach()`` as a probability target, with ``grad`` the
    logits) is copied first, since ``grad`` is written before the target is read. Returns
    ``(ℓ, grad, lse)``."""
    if shares_storage(target, grad):
        target = target.clone()
    rows = logits.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    scratch = None
    if grad.dtype != acc:
        scratch = torch.empty((min(block, rows), logits.shape[1]), dtype=acc, device=grad.device)
    for start in range(0, rows, block):
        part = slice(start, start + block)
        z = logits[part]
        out = grad[part] if scratch is None else scratch[: z.shape[0]]
        part_loss, part_grad, part_lse = rows_fn(z, target[part], out)
        loss[part].copy_(part_loss)
        lse[part].copy_(part_lse)
        if scratch is not None:
            grad[part].copy_(part_grad)
    return loss, grad, lse
