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
    shift = tl.zeros((), tl.float32)  # m, or 0 while every logit seen is -inf
    s = tl.zeros((), tl.float32)
    zw = tl.zeros((), tl.float32)  # Σ_c w_c (z_c - shift) (label smoothing only)
    w_sum = tl.zeros((), tl.float32)  # Σ_c w_c so far (label smoothing only)
    for start in range(0, classes, BLOCK):
        c = start + cols
        mask = c < classes
        z = tl.load(z_row + c, mask=mask, other=float("-inf"))
        z = z.to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every logit seen is -inf, shift by 0 instead (-inf - -inf is NaN).
        shift_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift_new) + tl.sum(tl.exp(z - shift_new), axis=0)
        m = m_new
        if SMOOTH:
            # Kept relative to the shift (moved along with it), as the reference's
            # Σ w (z - m): Σ w z - m Σ w would cancel the bits of |m| (logits around 1e4).
            z0 = tl.where(mask, z - shift_new, 0.0)
            if HAS_WEIGHT:
                w = tl.load(w_ptr + c, mask=mask, other=0.0)
                zw = zw - w_sum * (shift_new - shift) + tl.sum(w * z0, axis=0)
                w_sum += tl.sum(w, axis=0)
            else:
                zw = zw - start * (shift_new - shift) + tl.sum(z0, axis=0)
        shift = shift_new

    # ---- per-row scalars: lse, a_i, the linear part Σ_c B_ic (z_ic - m) and ℓ_i
    log_s = tl.log(s)
    if HAS_WEIGHT:
        w_y = tl.where(valid, tl.load(w_ptr + safe).to(tl.float32), 0.0)
    else:
        w_y = tl.where(valid, 1.0, 0.0)
    z_y = tl.load(z_row + safe).to(tl.float32)
    if SMOOTH:
        if not HAS_WEIGHT:
            w_sum = tl.zeros((), tl.float32) + classes  # (classes may be a constexpr 1)
        eps_c = tl.where(valid, smoothing / classes, 0.0)  # ε/C on kept rows, else 0
        coef_y = (1.0 - smoothing) * w_y
        a = coef_y + eps_c * w_sum
        linear = coef_y * (z_y - m) + eps_c * zw
    else:
        coef_y = w_y
        a = w_y
        linear = w_y * (z_y - m)
    loss = tl.where(valid, a * log_s - linear, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, m + log_s)

    # ---- pass 2: ∂ℓ/∂z = a p - B in fp32, rounded once into the new buffer
    scale = a / s
    for start in range(0, classes, BLOCK):
        c = start + cols
        mask = c < classes
        z = tl.load(z_row + c, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(z - m) * scale
        if SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + c, mask=mask, other=0.0)
                g -= eps_c * w
            else:
                g -= eps_c
        g = tl.where(c == safe, g - coef_y, g)
        tl.store(g_row + c, g.to(grad_ptr.dtype.element_ty), mask=mask)
