"""The Triton cross-entropy forward kernel; the design and the contract are described in
:mod:`torchbp.kernels.triton_ce`, which imports this module on first use.

Triton is imported at the top here, as Triton expects of a kernel's module (it looks
``triton.language`` up in the kernel's globals): nothing else may import this module
unconditionally, so that CPU-only installs never need Triton.
"""

import triton
import triton.language as tl


@triton.jit
def ce_forward_kernel(
    z_ptr,
    z_stride_row,
    y_ptr,
    y_stride,
    w_ptr,
    grad_ptr,
    loss_ptr,
    lse_ptr,
    classes,
    ignore_index,
    smoothing,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride_row
    g_row = grad_ptr + row * classes
    cols = tl.arange(0, BLOCK)

    y = tl.load(y_ptr + row * y_stride).to(tl.int64)
    valid = y != ignore_index
    safe = tl.where(valid, y, 0)

    # ---- pass 1: online softmax (running max m, s = Σ e^{z - m}), fp32 accumulation
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w_sum = tl.zeros((), tl.float32)  # Σ_c w_c so far (label smoothing with weights only)
    for start in range(0, classes, BLOCK):
        c = start + cols
        mask = c < classes
        z = tl.load(z_row + c, mask=mask, other=float("-inf"))
        z = z.to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every logit seen is -inf, shift by 0 instead (-inf - -inf is NaN).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
        if SMOOTH and HAS_WEIGHT:
            w_sum += tl.sum(tl.load(w_ptr + c, mask=mask, other=0.0), axis=0)

    # ---- per-row scalars: lse, a_i and, without label smoothing, ℓ_i
    log_s = tl.log(s)
    if HAS_WEIGHT:
        w_y = tl.where(valid, tl.load(w_ptr + safe).to(tl.float32), 0.0)
    else:
        w_y = tl.where(valid, 1.0, 0.0)
    # -log p_y = log s - (z_y - m), weighted after it is formed (term by term, as native's
    # -Σ B log p): a·log s - Σ B (z - m) would meet inf · 0 for an infinite class weight
    # (log s = 0 where one logit dominates the row, z - m = 0 at the row max)
    target_term = tl.where(valid, log_s - (tl.load(z_row + safe).to(tl.float32) - m), 0.0)
    if SMOOTH:
        if not HAS_WEIGHT:
            w_sum = tl.zeros((), tl.float32) + classes  # (classes may be a constexpr 1)
        eps_c = tl.where(valid, smoothing / classes, 0.0)  # ε/C on kept rows, else 0
        coef_y = (1.0 - smoothing) * w_y
        a = coef_y + eps_c * w_sum
    else:
        coef_y = w_y
        a = w_y
        tl.store(loss_ptr + row, tl.where(valid, coef_y * target_term, 0.0))
    tl.store(lse_ptr + row, m + log_s)

    # ---- pass 2: ∂ℓ/∂z = a p - B in fp32, rounded once into the new buffer; with label
    # smoothing also Σ_c w_c (log s - (z_c - m)) from the logits and weights it loads
    scale = a / s
    smooth_sum = tl.zeros((), tl.float32)
    for start in range(0, classes, BLOCK):
        c = start + cols
        mask = c < classes
        z = tl.load(z_row + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(z - m) * scale
        if SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + c, mask=mask, other=0.0)
                g -= eps_c * w
                neg_logp = w * (log_s - (z - m))
            else:
                g -= eps_c
                neg_logp = log_s - (z - m)
            smooth_sum += tl.sum(tl.where(mask, neg_logp, 0.0), axis=0)
        g = tl.where(c == safe, g - coef_y, g)
        tl.store(g_row + c, g.to(grad_ptr.dtype.element_ty), mask=mask)
    if SMOOTH:
        loss = coef_y * target_term + eps_c * smooth_sum
        tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
