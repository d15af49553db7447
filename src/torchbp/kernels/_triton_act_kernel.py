"""The Triton activation-backward kernel; the design and the contract are described in
:mod:`torchbp.kernels.triton_act`, which imports this module on first use.

Triton is imported at the top here, as Triton expects of a kernel's module (it looks
``triton.language`` up in the kernel's globals): nothing else may import this module
unconditionally, so that CPU-only installs never need Triton.
"""

import triton
import triton.language as tl

# The activations the kernel computes, and the value of its OP constexpr for each.
OPS = {
    "sigmoid": 0,
    "tanh": 1,
    "relu": 2,
    "leaky_relu": 3,
    "gelu": 4,
    "gelu_tanh": 5,
    "silu": 6,
}
SIGMOID: tl.constexpr = tl.constexpr(OPS["sigmoid"])
TANH: tl.constexpr = tl.constexpr(OPS["tanh"])
RELU: tl.constexpr = tl.constexpr(OPS["relu"])
LEAKY_RELU: tl.constexpr = tl.constexpr(OPS["leaky_relu"])
GELU: tl.constexpr = tl.constexpr(OPS["gelu"])
GELU_TANH: tl.constexpr = tl.constexpr(OPS["gelu_tanh"])
SILU: tl.constexpr = tl.constexpr(OPS["silu"])

INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)  # 1/√2
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)  # 1/√(2π)
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)  # √(2/π)
GELU_TANH_C: tl.constexpr = tl.constexpr(0.044715)


@triton.jit
def act_backward_kernel(
    g_ptr,
    s_ptr,
    out_ptr,
    n,
    slope,
    OP: tl.constexpr,
    BLOCK: tl.constexpr,
    LARGE: tl.constexpr,
):
    pid = tl.program_id(0)
    if LARGE:  # offsets past int32
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if OP == SIGMOID:  # s = y: g y (1 - y)
        dx = g * (s * (1.0 - s))
    elif OP == TANH:  # s = y: g (1 - y²)
        dx = g * (1.0 - s * s)
    elif OP == RELU:  # s = y: 0 where y <= 0, else g (a NaN y passes g)
        dx = tl.where(s <= 0.0, 0.0, g)
    elif OP == LEAKY_RELU:  # s = x, or y if slope >= 0: g where s > 0, else slope g
        dx = tl.where(s > 0.0, g, g * slope)
    elif OP == GELU:  # s = x: g (Φ(x) + x φ(x)), Φ(x) = ½(1 + erf(x/√2)), φ = e^{-x²/2}/√(2π)
        cdf = 0.5 * (1.0 + tl.erf(s * INV_SQRT_2))
        pdf = tl.exp(-0.5 * s * s) * INV_SQRT_2PI
        dx = g * (cdf + s * pdf)
    elif OP == GELU_TANH:  # s = x
        # u = √(2/π)(x + c x³), t = tanh u: y' = ½(1 + t) + ½x (1 - t²) √(2/π)(1 + 3c x²),
        # with ½(1 + t) = σ(2u) and ½(1 - t) = σ(-2u) from one exp of -2|u| <= 0 (never
        # overflows, and neither half cancels as t -> ±1): ½(1 - t²) = 2 σ(2u) σ(-2u).
        x2 = s * s
        u = SQRT_2_OVER_PI * (s + GELU_TANH_C * s * x2)
        inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * x2)
        e = tl.exp(-2.0 * tl.abs(u))
        r = 1.0 / (1.0 + e)  # σ(2|u|)
        pos = u >= 0.0
        plus = tl.where(pos, r, e * r)  # ½(1 + t)
        minus = tl.where(pos, e * r, r)  # ½(1 - t)
        dx = g * (plus + s * (2.0 * plus * minus) * inner)
    else:  # SILU, s = x: g σ(x)(1 + x (1 - σ(x)))
        sig = 1.0 / (1.0 + tl.exp(-s))  # e^{-x} -> inf for x << 0 gives σ = 0
        dx = g * (sig * (1.0 + s * (1.0 - sig)))
    tl.store(out_ptr + offs, dx.to(out_ptr.dtype.element_ty), mask=mask)
