"""Fewer-pass CPU kernels for the first-order backward of the element-wise activations.

Each kernel computes what a derivative formula of :mod:`torchbp.autograd.activations`
computes, ``dx = g · f'`` from the upstream gradient ``g`` and the tensor the Function
saved, but with in-place and multi-input torch ops (``lerp``, ``addcmul``, ``out=``) into
one preallocated buffer: two to eight passes over memory and no full-size temporaries,
where the formula makes one temporary per op. They are not differentiable; the Functions
call them only for a first-order eager backward (see
:func:`torchbp.autograd._derivative.derivative`), and ``tests/kernels/test_cpu_act.py``
checks each against its formula.

Kernels with scratch (GELU, SiLU, ELU) and half-precision tensors run block by block of
:data:`BLOCK` elements so that a block's later passes read data still in cache
(``experiments/results/cpu_act_block.md`` says how the size was chosen).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from torchbp import _native

__all__ = ["BLOCK", "KERNELS", "backward"]

# Elements per block of the blocked kernels (see experiments/results/cpu_act_block.md).
BLOCK = 1 << 20
_HALF = (torch.float16, torch.bfloat16)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715
# τ of the exact GELU kernel, per dtype it computes in (half precision: float32): normal,
# and so small that where x + τ != x, y'(x) rounds to ½ (float32: |x| < 2^-36)
_TINY = {torch.float32: 2.0**-60, torch.float64: 2.0**-500}


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 0-dim constant: ``lerp`` takes no Python number for ``end``, and
    ``addcmul(c, a, b)`` makes ``c + a b`` one pass. (Cached by sign too: ``-0.0 == 0.0``
    would share a cache entry, and ``-0.0 + 0.0`` is ``+0.0``.)"""
    return _constant(value, math.copysign(1.0, value) < 0, dtype, device)


@functools.lru_cache(maxsize=64)
def _constant(value: float, negative: bool, dtype: torch.dtype, device: torch.device):
    return torch.full((), value, dtype=dtype, device=device)


def sigmoid(g, y, *, out, tmp):
    # σ' = y (1 - y) = lerp(y, 0, y) in one pass (y - y·y below ½, (1 - y)·y above), times g
    return torch.lerp(y, _scalar(0.0, y.dtype, y.device), y, out=out).mul_(g)


def tanh(g, y, *, out, tmp):
    # (1 - y²) g, with 1 - y·y in one addcmul (as native computes it, where g - g y² would
    # cancel as y -> ±1); two passes
    return torch.addcmul(_scalar(1.0, y.dtype, y.device), y, y, value=-1, out=out).mul_(g)


def relu(g, y, *, out, tmp):
    # [y != 0] g: y = relu(x) is >= 0 or NaN, so y != 0 exactly when native passes g (y > 0,
    # or NaN). The mask is written straight into the float result: two passes, no bool
    # tensor (torch.where on one is several times slower). An infinite (or NaN) g at an
    # inactive unit would give 0·g = NaN where native selects 0 (sqrt(relu(x)) meets
    # g = inf at y = 0): a third, read-only pass (a sum: NaN or inf iff some product is not
    # finite) finds any, and then the selection runs instead.
    torch.ne(y, 0, out=out).mul_(g)
    if not math.isfinite(out.sum()):
        torch.where(y == 0, _scalar(0.0, g.dtype, g.device), g, out=out)
    return out


def leaky_relu(g, saved, slope, *, out, tmp):
    # f' = 1 if saved > 0 else slope: the mask [saved > 0] written straight into the float
    # result, its zeros replaced by the slope (threshold_: exactly 1 or slope, where
    # slope + (1 - slope) [saved > 0] may round), then times g: three passes, no bool tensor.
    torch.gt(saved, 0, out=out)
    return torch.nn.functional.threshold_(out, 0.5, slope).mul_(g)


def gelu(g, x, approximate, *, out, tmp):
    if approximate == "tanh":
        # With s = σ(2u) = ½(1 + tanh u), ½(1 - tanh²u) = 2 s (1 - s), so
        # y' = s + x · v s (1 - s) with v = 2k + 6kc x² (2 du/dx), u = x (k + kc x²):
        # v s (1 - s) = lerp(v s, 0, s) ((1 - s) exact where s -> 1), s + x · that in one
        # addcmul, times g: eight passes (the formula's tanh is a slower kernel than
        # sigmoid). x multiplies last, as in native's ½x · (1 - tanh²u) k (1 + 3c x²): where
        # x³ overflows (float32 |x| > 7e12) the saturated s (1 - s) = 0 has zeroed v s
        # first, so y' = 1 or 0, where (x v s)(1 - s) was inf · 0 = NaN. (Native is NaN
        # where x² overflows, float32 |x| > 1.8e19; here only where v does, |x| > 5.6e19.)
        k, c, (s,), v = _SQRT_2_OVER_PI, _GELU_TANH_C, tmp, out
        two_k = _scalar(2 * k, x.dtype, x.device)
        torch.addcmul(two_k, x, x, value=2 * k * c, out=s).mul_(x).sigmoid_()  # σ(2u)
        torch.addcmul(two_k, x, x, value=6 * k * c, out=v).mul_(s)  # v s
        torch.lerp(v, _scalar(0.0, x.dtype, x.device), s, out=v)  # v s (1 - s)
        return torch.addcmul(s, x, v, out=out).mul_(g)
    # y' = Φ(x) + x φ(x), times g. Φ(x) = gelu(x) / x: the forward's own kernel evaluates
    # erf about four times as fast as torch.erf (MKL's; torch.special.ndtr is slower still),
    # and x Φ(x) rounded once, divided by x, is Φ(x) within an ulp or two. It is taken at
    # x̂ = x + copysign(τ, x), never 0 nor subnormal (gelu(x) / x would be 0/0 at 0, and
    # wrong where x · ½ rounds), and x itself wherever τ is below half its ulp; elsewhere
    # |x| < 2^24 τ and y'(x̂) = ½ + O(τ) rounds as y'(x) = ½ + O(|x|). φ(x̂) = e^{-x̂²/2}/√(2π)
    # = 2^{-x̂²/(2 ln 2) - log2 √(2π)} (exp2 is a faster CPU kernel than exp). Nine passes.
    log2_norm = _scalar(-0.5 * math.log2(2 * math.pi), x.dtype, x.device)
    (xh,) = tmp
    torch.copysign(_scalar(_TINY[x.dtype], x.dtype, x.device), x, out=xh).add_(x)  # x̂
    gelu_xh = _native.gelu(xh)  # x̂ Φ(x̂)
    torch.addcmul(log2_norm, xh, xh, value=-0.5 * math.log2(math.e), out=out).exp2_()
    torch.addcdiv(out.mul_(xh), gelu_xh, xh, out=out)  # x̂ φ(x̂) + Φ(x̂)
    # gelu(x̂) overflows where |x̂| nears the dtype's max (float32: x > 1.7e38), and
    # Φ(x̂) = inf / x̂ = inf there, where Φ = 1: y' <= 1.13 anywhere, so +inf is only that
    # (±inf x is NaN already: x̂ φ(x̂) = inf · 0); one more pass
    out.nan_to_num_(nan=math.nan, posinf=1.0, neginf=-math.inf)
    return out.mul_(g)


def silu(g, x, *, out, tmp):
    # y' = s (1 + x (1 - s)) = s + (x s)(1 - s) = lerp(s, 1, x s), s = σ(x) (lerp takes
    # (1 - s) exactly where s -> 1, and x s is small where s -> 0); times g: four passes
    s = _native.sigmoid(x, out=tmp[0])
    w = torch.mul(x, s, out=out)
    return torch.lerp(s, _scalar(1.0, x.dtype, x.device), w, out=out).mul_(g)


def elu(g, saved, alpha, *, out, tmp):
    # f' = 1 where saved > 0 or is NaN, else v = saved + alpha (alpha >= 0: saved is y) or
    # v = alpha e^saved (alpha < 0: saved is x). The 0/1 mask m = [saved <= 0] (0 at NaN)
    # divides v: v / 1 = v on the negative branch, and on the other an infinity of the
    # sign the positive branch alone gives (alpha + y / 0 = +inf, alpha e^x / 0 = -inf) or
    # NaN (a NaN saved), which nan_to_num writes as exactly 1; times g. The negative
    # branch's v is finite, but for y = -inf (alpha (e^x - 1) overflowed y's dtype, as in
    # float16 for alpha beyond 65504), whose v = -inf is kept, as the formula keeps it. The
    # formula's own ops on the same values, so bit for bit (an infinite g stays g, where a
    # 0/1 mask times g would give NaN). alpha >= 0: alpha + y / m in one addcdiv, four
    # passes; alpha < 0: e^x into the output and m into the scratch, then
    # -0 + alpha e^x / m (-0 adds nothing, so alpha e^x keeps its sign of zero): five passes.
    if alpha >= 0:
        torch.le(saved, 0, out=out)
        torch.addcdiv(_scalar(alpha, out.dtype, out.device), saved, out, out=out)
        out.nan_to_num_(nan=1.0, posinf=1.0, neginf=-math.inf)
    else:
        (m,) = tmp
        torch.exp(saved, out=out)
        torch.le(saved, 0, out=m)
        torch.addcdiv(_scalar(-0.0, out.dtype, out.device), out, m, value=alpha, out=out)
        out.nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0)
    return out.mul_(g)


@functools.lru_cache(maxsize=64)
def _saturates(threshold: float, dtype: torch.dtype) -> bool:
    """Whether ``torch.sigmoid`` is exactly 1 above ``threshold`` in ``dtype``: it computes
    ``1 / (1 + e^{-u})``, and ``1 + e^{-u}`` rounds to 1 once ``e^{-u} < eps / 4``
    (float32: u > 17.3, float64: u > 37.4; a factor 2 to spare for exp's rounding)."""
    return threshold >= math.log(4 / torch.finfo(dtype).eps)


@functools.lru_cache(maxsize=64)
def _above(threshold: float, dtype: torch.dtype) -> float:
    """The least ``dtype`` value above ``threshold`` (rounded to ``dtype``, as ``u >
    threshold`` compares), so that ``u > threshold`` is ``-u <= -_above(...)``."""
    t = torch.tensor(threshold, dtype=dtype)
    return torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)).item()


def softplus(g, x, beta, threshold, *, out, tmp):
    # f' = 1 where u = beta x > threshold, else sigmoid(u); the same sigmoid on the same u as
    # the formula, so bit for bit. Where sigmoid is already exactly 1 above the threshold
    # (float32 and half, computed in float32, at the default threshold 20) that is the
    # whole derivative: sigmoid(u) g in two passes (three with the product beta x).
    # Otherwise (float64, or a low threshold) u > threshold is set to inf first, where
    # sigmoid is 1: threshold_ replaces values <= a bound, so on -u: -u <= -(the next value
    # above the threshold) becomes -inf, then negated back; five passes. (Above a threshold
    # of 0 that value is subnormal: exact unless torch.set_flush_denormal(True).)
    dtype = x.dtype
    if _saturates(threshold, dtype):
        u = x if beta == 1 else torch.mul(x, beta, out=out)
    else:
        torch.mul(x, -beta, out=out)  # -(x beta) exactly
        torch.nn.functional.threshold_(out, -_above(threshold, dtype), -math.inf)
        u = out.neg_()
    return _native.sigmoid(u, out=out).mul_(g)


def _blockable(g: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether :func:`backward` may run block by block over ``g`` and ``saved``: both
    contiguous, of one shape, on the CPU and at least two blocks long. (Asked only of the
    kernels that block: the small first-order backward of every other pays none of it.)"""
    contiguous = g.shape == saved.shape and g.is_contiguous() and saved.is_contiguous()
    return contiguous and g.device.type == "cpu" and g.numel() >= 2 * BLOCK


class Kernel(NamedTuple):
    """An in-place kernel ``fn(g, saved, *args, out=, tmp=)`` that writes ``g · f'`` into
    ``out`` using ``scratch`` buffers ``tmp`` shaped like ``out``, and returns ``out``."""

    fn: Callable[..., torch.Tensor]
    scratch: int = 0


#: activation name -> its kernel (the name of its Function's derivative formula)
KERNELS: dict[str, Kernel] = {
    "sigmoid": Kernel(sigmoid),
    "tanh": Kernel(tanh),
    "relu": Kernel(relu),
    "leaky_relu": Kernel(leaky_relu),
    "gelu": Kernel(gelu, scratch=1),
    "silu": Kernel(silu, scratch=1),
    # alpha >= 0 leaves the scratch untouched (so never faulted in); its four passes run
    # faster blocked too (29 vs 31 ms at 2^24 float32)
    "elu": Kernel(elu, scratch=1),
    "softplus": Kernel(softplus),
}


def backward(name: str, g: torch.Tensor, saved: torch.Tensor, *args) -> torch.Tensor:
    """``g · f'`` of activation ``name`` (a key of :data:`KERNELS`) in a new tensor.

    A kernel makes a few passes over memory where native makes one fused pass, and a
    fresh full-size buffer costs more to fault in than a pass over it (64 MiB: ~26 ms of
    page faults, ~8 ms a pass). So kernels with scratch, and all half-precision tensors,
    run block by block over the flattened tensors when ``g`` and ``saved`` are contiguous,
    on the CPU and at least two blocks long (cache blocking): a block's passes after its
    first read data still in cache, the scratch is a block (allocated once, reused), and
    the result is written into slices of one preallocated buffer. Kernels without scratch
    run in one call: blocked they measure no faster. So do small or non-contiguous tensors
    (an expanded ``g``: copying it would cost more than it saves) and GPU tensors. Half
    precision is computed in float32 and rounded once, as native kernels do (``1 - y²`` in
    bfloat16 loses every digit as ``y -> 1``); blocked, its float32 copies are a block each.
    """
    fn, scratch = KERNELS[name]
    dtype = g.dtype
    half = dtype in _HALF
    if not ((scratch or half) and _blockable(g, saved)):
        if half:
            g, saved = g.float(), saved.float()
        out = torch.empty_like(saved)
        tmp = [torch.empty_like(out) for _ in range(scratch)]
        out = fn(g, saved, *args, out=out, tmp=tmp)
        return out.to(dtype) if half else out
    out = torch.empty_like(saved)
    rows = scratch + 3 * half  # half: float32 blocks of g, saved and the result too
    buffers = torch.empty(rows, BLOCK, dtype=torch.float32 if half else dtype, device=g.device)
    for o, gb, sb in zip(*(t.view(-1).split(BLOCK) for t in (out, g, saved))):
        tmp = [row[: o.numel()] for row in buffers]
        if half:
            of, gf, sf, *tmp = tmp
            o.copy_(fn(gf.copy_(gb), sf.copy_(sb), *args, out=of, tmp=tmp))
        else:
            fn(gb, sb, *args, out=o, tmp=tmp)
    return out
