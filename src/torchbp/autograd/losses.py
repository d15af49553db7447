"""Negative log-likelihood and the fused log-softmax + NLL cross-entropy.

Both Functions work on 2-D ``(M, C)`` inputs (class dim last) and return one loss per
row; :mod:`torchbp.functional` moves the class dim, flattens K-dim inputs and reduces
(``mean`` divides by the summed target weights, as native does).

Notation, per row ``i`` with target ``y_i``, class weights ``w`` (1 if absent), label
smoothing ``ε`` over ``C`` classes, ``p = softmax(z)``:

* NLL: ``ℓ_i = -w_{y_i} logp_{i, y_i}`` (0 for ``y_i == ignore_index``).
* Cross-entropy with class indices: ``ℓ_i = (1-ε) w_{y_i} (lse_i - z_{i,y_i})
  + (ε/C) Σ_c w_c (lse_i - z_{ic})``; with probability targets ``t``:
  ``ℓ_i = -Σ_c w_c t'_{ic} logp_{ic}``, ``t' = (1-ε) t + ε/C``.

  Both have the form ``ℓ_i = a_i lse_i - Σ_c B_{ic} z_{ic}`` with ``Σ_c B_{ic} = a_i``, so
  ``∂ℓ_i/∂z_i = a_i p_i - B_i`` — for plain cross-entropy the familiar ``p - onehot(y)``.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from torchbp._execution import may_reuse_saved, values_inspectable
from torchbp.kernels import _triton, triton_ce

# Rows are processed in blocks of about this many elements: large enough that the
# per-op overhead vanishes, small enough to bound the float32 temporaries of half inputs.
_CHUNK_ELEMENTS = 1 << 22

# What ignore_index None (no row ignored) stands for where a value is needed: no class
# index is negative, so this matches no target.
_NO_IGNORE = -1


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(rows: int, classes: int) -> int:
    if torch.compiler.is_compiling():
        return max(rows, 1)  # one block: Inductor fuses the passes itself
    return max(1, _CHUNK_ELEMENTS // max(classes, 1))


# --------------------------------------------------------------------------- NLL
class NLLLossFunction(Function):
    """Per-row negative log-likelihood ``ℓ_i = -w_{y_i} logp_{i, y_i}`` of ``(M, C)``
    log-probabilities; backward scatters ``-w_{y_i} g_i`` to the target column.
    Saves only the target and weight (native saves the whole input too)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logp, target, weight, ignore_index):
        # logp: (M, C), target: (M,) -> ℓ: (M,) with ℓ_i = -w_{y_i} logp_{i, y_i}
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)
        picked = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
        w = _target_weight(weight, safe, valid, logp.dtype)
        return torch.where(valid, -w * picked, 0.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logp, target, weight, ignore_index = inputs
        # The gradient does not depend on logp's values: save only the target (and weight).
        ctx.save_for_backward(target, weight)
        ctx.save_for_forward(target, weight)
        ctx.ignore_index = ignore_index
        ctx.classes = logp.shape[1]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_rows):
        if grad_rows is None:
            return None, None, None, None
        target, weight = ctx.saved_tensors
        valid = target != ctx.ignore_index
        safe = torch.where(valid, target, 0)
        w = _target_weight(weight, safe, valid, grad_rows.dtype)
        # ∂ℓ_i/∂logp_{ic} = -w_{y_i} [c = y_i]: scatter -w_{y_i} g_i into a zero (M, C) grad.
        src = torch.where(valid, -w * grad_rows, 0.0)
        shape = (target.shape[0], ctx.classes)
        grad = torch.zeros(shape, dtype=grad_rows.dtype, device=grad_rows.device)
        return grad.scatter(1, safe.unsqueeze(1), src.unsqueeze(1)), None, None, None

    @staticmethod
    def jvp(ctx, logp_t, _target_t, _weight_t, _ignore):
        if logp_t is None:
            return None
        target, weight = ctx.saved_tensors
        valid = target != ctx.ignore_index
        safe = torch.where(valid, target, 0)
        w = _target_weight(weight, safe, valid, logp_t.dtype)
        picked = logp_t.gather(1, safe.unsqueeze(1)).squeeze(1)
        return torch.where(valid, -w * picked, 0.0)


def _target_weight(weight, safe_target, valid, dtype) -> torch.Tensor:
    """``w_{y_i}`` per row (1 without class weights), 0 on ignored rows."""
    if weight is None:
        return valid.to(dtype)
    return torch.where(valid, weight.to(dtype)[safe_target], 0.0)


# --------------------------------------------------------------------------- cross-entropy
def _hard_coefficients(target, weight, ignore_index, smoothing, classes, dtype):
    """For class-index targets: ``valid`` rows, safe target indices, ``w_{y_i}`` and
    ``a_i = (1-ε) w_{y_i} + (ε/C) Σ_c w_c`` (0 on ignored rows)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    w_y = _target_weight(weight, safe, valid, dtype)
    if not smoothing:
        return valid, safe, w_y, w_y
    w_sum = classes if weight is None else weight.to(dtype).sum()
    a = (1 - smoothing) * w_y + valid.to(dtype) * (smoothing / classes) * w_sum
    return valid, safe, w_y, a


def _soft_b(target, weight, smoothing, classes, dtype):
    """For probability targets: ``B = w ⊙ ((1-ε) t + ε/C)``, shape ``(m, C)``."""
    b = target.to(dtype)
    if smoothing:
        b = b * (1 - smoothing) + smoothing / classes
    if weight is not None:
        b = b * weight.to(dtype)
    return b


def _ce_rows(z, target, weight, ignore_index, smoothing, out=None):
    """Cross-entropy forward of a block of rows ``z`` (m, C): the reference formulation.

    Returns ``ℓ`` (m,), ``∂ℓ/∂z`` (m, C) and ``lse`` (m,), all in the accumulation dtype
    (float32 for half inputs, so that ``p_y - 1`` of a confident row keeps its precision;
    the caller rounds the gradient once). ``∂ℓ/∂z`` is built in ``out`` when given (a
    buffer of the accumulation dtype), else in a fresh tensor; no other tensor is written.
    """
    acc = _acc_dtype(z.dtype)
    # s = z - m with m the row max: every exponent is <= 0 (log-sum-exp trick).
    m = z.amax(1, keepdim=True).to(acc)
    s = z.to(acc) - m if out is None else torch.sub(z, m, out=out)
    # The linear part Σ_c B_ic s_ic is taken before s is overwritten by e = exp(s).
    a, linear, b, hard = _ce_linear_part(s, None, target, weight, ignore_index, smoothing)
    # e = exp(s), evaluated once per logit; Σ e >= 1 because the max contributes e^0.
    e = s.exp_()
    total = e.sum(1, keepdim=True)
    log_total = total.log()
    # ∂ℓ_i/∂z_i = a_i p_i - B_i with p_i = e_i / Σ e_i
    grad = e.mul_(a.unsqueeze(1) / total)
    return _ce_finish(grad, log_total, m, a, linear, b, hard, smoothing)


def _ce_rows_fused(z, target, weight, ignore_index, smoothing):
    """The same for float32 / float64 rows in eager mode, with one fused softmax kernel
    (which also evaluates ``e^{z - m}`` once per logit) instead of separate passes."""
    m, p, log_total = _softmax_rows(z)
    if weight is None and not smoothing and not target.is_floating_point():
        return _ce_plain_finish(z, p, m, log_total, target, ignore_index)
    a, linear, b, hard = _ce_linear_part(z, m, target, weight, ignore_index, smoothing)
    p.mul_(a.unsqueeze(1))
    return _ce_finish(p, log_total, m, a, linear, b, hard, smoothing)


def _softmax_rows(z):
    """The row max ``m``, ``p = softmax(z)`` from one fused kernel, and ``log Σ e^{z-m}``:
    at the row max ``p = e^0 / Σ e^{z-m}``, so it is ``-log p_max`` (no second exp pass)."""
    m, argmax = z.max(1, keepdim=True)
    p = torch.softmax(z, 1)
    return m, p, p.gather(1, argmax).log_().neg_()


def _ce_rows_unmasked(z, target):
    """Plain cross-entropy of float32 / float64 rows whose targets are all class indices
    (none ignored): ``ℓ_i = lse_i - z_{i,y_i}`` and ``∂ℓ_i/∂z_i = p_i - onehot(y_i)``, with
    no masks. The common case of classifier training, so it runs the fewest ops."""
    m, p, log_total = _softmax_rows(z)
    lse = m.add_(log_total)
    t = target.unsqueeze(1)
    loss = lse - z.gather(1, t)
    p.scatter_add_(1, t, lse.new_full(t.shape, -1.0))
    return loss.squeeze(1), p, lse.squeeze(1)


def _ce_plain_finish(z, p, m, log_total, target, ignore_index):
    """Unweighted, unsmoothed class-index targets (the common case, with the fewest ops):
    ``ℓ_i = lse_i - z_{i,y_i}`` and ``∂ℓ_i/∂z_i = p_i - onehot(y_i)``, 0 on ignored rows."""
    valid = (target != ignore_index).unsqueeze(1)
    safe = torch.where(valid, target.unsqueeze(1), 0)
    lse = m + log_total
    loss = (lse - z.gather(1, safe)).masked_fill_(~valid, 0.0)
    p.scatter_add_(1, safe, valid.to(p.dtype).neg_())
    if z.device.type != "cpu" or not bool(valid.all()):  # (looking costs no sync on CPU)
        p.mul_(valid)
    return loss.squeeze(1), p, lse.squeeze(1)


def _ce_linear_part(x, shift, target, weight, ignore_index, smoothing):
    """``a_i`` and the linear part ``Σ_c B_ic (x_ic - shift_i)`` of the loss (``x`` already
    shifted when ``shift`` is None), plus what :func:`_ce_finish` needs to form ``B``."""
    acc = _acc_dtype(x.dtype)
    classes = x.shape[1]
    if target.is_floating_point():
        b = _soft_b(target, weight, smoothing, classes, acc)
        a = b.sum(1)
        linear = (b * x).sum(1)
        if shift is not None:
            linear = linear - a * shift.squeeze(1)
        return a, linear, b, None
    valid, safe, w_y, a = _hard_coefficients(target, weight, ignore_index, smoothing, classes, acc)
    picked = x.gather(1, safe.unsqueeze(1)).squeeze(1)
    if shift is not None:
        picked = picked - shift.squeeze(1)
    # (ignored rows are masked at the end, so the plain case needs no weight product)
    linear = picked if weight is None and not smoothing else (1 - smoothing) * w_y * picked
    if smoothing:
        x_w = x.sum(1) if weight is None else x @ weight.to(acc)
        if shift is not None:
            w_sum = classes if weight is None else weight.to(acc).sum()
            x_w = x_w - w_sum * shift.squeeze(1)
        linear = linear + (smoothing / classes) * x_w
    return a, linear, None, (valid, safe, w_y, weight)


def _ce_finish(grad, log_total, m, a, linear, b, hard, smoothing):
    """Subtract ``B`` from ``grad = a ⊙ p`` in place and assemble ``(ℓ, ∂ℓ/∂z, lse)``."""
    acc = grad.dtype
    classes = grad.shape[1]
    lse = (m + log_total).squeeze(1)
    # ℓ_i = a_i lse_i - Σ_c B_ic z_ic = a_i log Σ e - Σ_c B_ic s_ic   (m cancels: Σ B = a)
    if hard is None:
        return a * log_total.squeeze(1) - linear, grad.sub_(b), lse
    valid, safe, w_y, weight = hard
    plain = weight is None and not smoothing  # a_i = 1 on the rows that are kept
    loss = (log_total.squeeze(1) if plain else a * log_total.squeeze(1)) - linear
    loss = torch.where(valid, loss, 0.0)
    if smoothing:
        w_row = torch.ones(classes, dtype=acc, device=grad.device) if weight is None else weight
        grad.sub_(torch.outer(valid.to(acc), w_row.to(acc)), alpha=smoothing / classes)
    onehot_coef = w_y.neg() if not smoothing else -(1 - smoothing) * w_y
    grad.scatter_add_(1, safe.unsqueeze(1), onehot_coef.unsqueeze(1))
    return loss, grad, lse


def _ce_into_logits(logits, target, weight, ignore_index, smoothing):
    """``inplace=True``: ``∂ℓ/∂z`` is written over the logits, block by block of rows (in
    float32 for half inputs, rounded once), so no logits-sized buffer is allocated."""
    rows, classes = logits.shape
    acc = _acc_dtype(logits.dtype)
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    step = _rows_per_chunk(rows, classes)
    for start in range(0, rows, step):
        chunk = slice(start, start + step)
        z = logits[chunk]
        out = z if z.dtype == acc else None  # the max is taken before z is overwritten
        part_loss, part_grad, part_lse = _ce_rows(
            z, target[chunk], weight, ignore_index, smoothing, out
        )
        loss[chunk].copy_(part_loss)
        lse[chunk].copy_(part_lse)
        if part_grad is not z:
            z.copy_(part_grad)
    return loss, logits, lse


def _ce_b_dense(target, weight, ignore_index, smoothing, classes, dtype):
    """``B`` and ``a`` as dense tensors, for the second-order term (double backward)."""
    if target.is_floating_point():
        b = _soft_b(target, weight, smoothing, classes, dtype)
        return b, b.sum(1)
    valid, safe, w_y, a = _hard_coefficients(
        target, weight, ignore_index, smoothing, classes, dtype
    )
    b = torch.zeros((target.shape[0], classes), dtype=dtype, device=target.device)
    b = b.scatter(1, safe.unsqueeze(1), ((1 - smoothing) * w_y).unsqueeze(1))
    if smoothing:
        w_row = torch.ones(classes, dtype=dtype, device=target.device) if weight is None else weight
        b = b + torch.outer(valid.to(dtype), w_row.to(dtype)) * (smoothing / classes)
    return b, a


class CrossEntropyFunction(Function):
    """Fused log-softmax + NLL over ``(M, C)`` logits, one loss per row.

    Forward (per row, max trick): ``lse = m + log Σ_c e^{z_c - m}``; class index ``y``:
    ``ℓ = (1-ε) w_y (lse - z_y) + (ε/C) Σ_c w_c (lse - z_c)``; probabilities ``t``:
    ``ℓ = -Σ_c w_c t'_c (z_c - lse)``. Backward: ``dz = g ⊙ (a p - B)`` — for plain
    cross-entropy ``g ⊙ (p - onehot(y))`` — computed in the forward pass from the one
    softmax evaluation and saved (one tensor the size of the logits; the logits
    themselves are not kept). Arguments: ``(logits, target, weight, ignore_index,
    label_smoothing, inplace)``; ``ignore_index=None`` promises that every target is a
    class index in ``[0, C)`` (the wrapper checks it), which skips the masks; with
    ``inplace=True`` the gradient is written over the logits (marked dirty) instead of
    into a new buffer. Returns ``(ℓ, ∂ℓ/∂z, lse)``; the
    wrappers expose ``ℓ``. The second output is the Function's own buffer: a backward
    that frees the graph scales it in place and hands it over as the logits' gradient, so
    do not keep it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, weight, ignore_index, label_smoothing, inplace):
        # logits: (M, C); target: (M,) class indices or (M, C) probabilities.
        # Returns ℓ (M,) in the accumulation dtype, ∂ℓ/∂z (M, C) in the logits' dtype, and
        # lse (M,). The gradient is computed here, where the softmax is at hand, so that
        # e^z is evaluated once per logit (native evaluates it again in backward).
        # ignore_index None: the caller checked that every target is a class index.
        rows, classes = logits.shape
        eager = values_inspectable(logits)
        plain = weight is None and not label_smoothing and not target.is_floating_point()
        full_precision = logits.dtype == _acc_dtype(logits.dtype)
        if ignore_index is None:
            if plain and eager and full_precision and rows * classes and not inplace:
                return _ce_rows_unmasked(logits, target)
            ignore_index = _NO_IGNORE
        if inplace:
            return _ce_into_logits(logits, target, weight, ignore_index, label_smoothing)
        if _triton.requested() and triton_ce.available(logits, target, weight):
            return triton_ce.ce_forward_rows(logits, target, weight, ignore_index, label_smoothing)
        if eager and full_precision and rows * classes:
            return _ce_rows_fused(logits, target, weight, ignore_index, label_smoothing)
        step = _rows_per_chunk(rows, classes)
        if rows <= step or not eager:
            # One block (also under torch.func transforms, which forbid writes into
            # preallocated buffers).
            loss, grad, lse = _ce_rows(logits, target, weight, ignore_index, label_smoothing)
            return loss, grad.to(logits.dtype), lse
        acc = _acc_dtype(logits.dtype)
        loss = torch.empty(rows, dtype=acc, device=logits.device)
        lse = torch.empty(rows, dtype=acc, device=logits.device)
        grad = torch.empty((rows, classes), dtype=logits.dtype, device=logits.device)
        for start in range(0, rows, step):
            chunk = slice(start, start + step)
            # Full-precision logits build their gradient in place in the saved buffer.
            out = grad[chunk] if logits.dtype == acc else None
            parts = _ce_rows(
                logits[chunk], target[chunk], weight, ignore_index, label_smoothing, out
            )
            for buffer, part in zip((loss, grad, lse), parts):
                if part is not out:
                    buffer[chunk].copy_(part)
        return loss, grad, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, weight, ignore_index, label_smoothing, inplace = inputs
        _loss, grad, lse = output
        ctx.inplace = inplace
        if inplace:
            ctx.mark_dirty(logits)  # the gradient now lives in the logits' storage
        ctx.unmasked = ignore_index is None  # no row is ignored: no mask in backward
        ctx.ignore_index = _NO_IGNORE if ignore_index is None else ignore_index
        ctx.label_smoothing = label_smoothing
        ctx.soft = target.is_floating_point()
        # ∂ℓ/∂z is all the logits' gradient needs. A probability target that needs a
        # gradient, -(1-ε) w ⊙ logp, needs the logits instead; lse and ∂ℓ/∂z are then
        # recomputed from them in backward, so that no more is kept than native keeps.
        ctx.saved_grad = not ctx.needs_input_grad[1]
        if ctx.saved_grad:
            ctx.save_for_backward(grad, target, weight, None)
        else:
            ctx.save_for_backward(None, target, weight, logits)
        ctx.save_for_forward(grad, target, weight)  # jvp: dℓ = Σ_j ∂ℓ/∂z_j dz_j
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, grad_grad, grad_lse):
        grad, target, weight, logits = ctx.saved_tensors
        p = lse = None
        if grad is None:
            # ∂ℓ/∂z = a p - B with p = e^{z - lse}
            z = logits.to(_acc_dtype(logits.dtype))
            lse = torch.logsumexp(z, 1)
            b, a = _ce_b_dense(
                target, weight, ctx.ignore_index, ctx.label_smoothing, z.shape[1], z.dtype
            )
            p = torch.exp(z - lse.unsqueeze(1))
            grad = (a.unsqueeze(1) * p - b).to(logits.dtype)
        classes = grad.shape[1]
        grad_logits = grad_target = None
        if grad_loss is not None:
            if ctx.soft or ctx.unmasked:
                scale = grad_loss
            else:
                # Ignored rows get exactly 0, even when the upstream scale is inf or NaN
                # (mean over no valid rows divides by 0: native leaves those rows 0 too).
                scale = torch.where(target != ctx.ignore_index, grad_loss, 0)
            # dz_i = g_i ∂ℓ_i/∂z_i. The saved ∂ℓ/∂z is this Function's own buffer: when the
            # graph is freed after this backward, it is scaled in place and handed over
            # (no second logits-sized allocation); otherwise a new tensor is returned.
            scale = scale.unsqueeze(1).to(grad.dtype)
            if ctx.saved_grad and may_reuse_saved(grad, scale):
                grad_logits = grad.mul_(scale)
            else:
                grad_logits = grad * scale
            if ctx.needs_input_grad[1]:
                # ∂ℓ_i/∂t_ic = -(1-ε) w_c logp_ic
                logp = logits.to(lse.dtype) - lse.unsqueeze(1)
                coef = -(1 - ctx.label_smoothing) * grad_loss.to(lse.dtype).unsqueeze(1)
                grad_target = coef * logp
                if weight is not None:
                    grad_target = grad_target * weight.to(lse.dtype)
        if grad_grad is not None or grad_lse is not None:
            # Reached only by double backward (through dz = g ⊙ ∂ℓ/∂z, or through lse in
            # the soft target's gradient). Recover p = (∂ℓ/∂z + B) / a from the saved grad.
            b, a = _ce_b_dense(
                target, weight, ctx.ignore_index, ctx.label_smoothing, classes, grad.dtype
            )
            a = a.unsqueeze(1)
            if p is None:
                p = (grad + b) / torch.where(a == 0, torch.ones((), dtype=a.dtype), a)
            terms = []
            if grad_grad is not None:
                v = grad_grad
                pv = (p * v).sum(1, keepdim=True)
                # ∂(a_i p_ij - B_ij)/∂z_ik = a_i p_ij (δ_jk - p_ik)
                terms.append(a * p * (v - pv))
                if ctx.needs_input_grad[1]:
                    # ∂(a_i p_ij - B_ij)/∂t_ik = (1-ε) w_k (p_ij - δ_jk)
                    cross = (1 - ctx.label_smoothing) * (pv - v)
                    if weight is not None:
                        cross = cross * weight.to(cross.dtype)
                    grad_target = cross if grad_target is None else grad_target + cross
            if grad_lse is not None:
                # ∂lse_i/∂z_ij = p_ij
                terms.append(grad_lse.unsqueeze(1).to(p.dtype) * p)
            for term in terms:
                grad_logits = term if grad_logits is None else grad_logits + term
        return grad_logits, grad_target, None, None, None, None

    @staticmethod
    def jvp(ctx, logits_t, target_t, _weight_t, _ignore, _smoothing, _inplace):
        grad, target, weight = ctx.saved_tensors
        if target_t is not None:
            raise NotImplementedError(
                "torchbp cross_entropy: forward-mode AD w.r.t. probability targets is not "
                "supported; detach the target"
            )
        if logits_t is None:
            return None, None, None
        classes = grad.shape[1]
        # dℓ_i = Σ_j ∂ℓ_i/∂z_ij dz_ij
        loss_t = (grad.to(logits_t.dtype) * logits_t).sum(1).to(_acc_dtype(grad.dtype))
        b, a = _ce_b_dense(
            target, weight, ctx.ignore_index, ctx.label_smoothing, classes, grad.dtype
        )
        a = a.unsqueeze(1)
        p = (grad + b) / torch.where(a == 0, torch.ones((), dtype=a.dtype), a)
        pv = (p * logits_t).sum(1, keepdim=True)
        grad_t = a * p * (logits_t - pv)
        lse_t = pv.squeeze(1).to(loss_t.dtype)
        if ctx.inplace:  # the gradient output is the logits, modified in place
            grad_t = logits_t.copy_(grad_t)
        return loss_t, grad_t, lse_t
