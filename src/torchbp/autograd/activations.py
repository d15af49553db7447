"""Element-wise activations with hand-written backward (and jvp).

Each derivative is written as ``dL/dx = g * f'(x)`` with ``f'`` expressed through
whatever is cheapest to keep: the output ``y`` where the formula allows (sigmoid, tanh,
ReLU, LeakyReLU with slope >= 0: the next Linear keeps ``y`` alive anyway, so saving it
costs nothing), otherwise the input ``x`` (GELU, SiLU, LeakyReLU with slope < 0).
Backward formulas are torch ops, so double backward works; jvp applies the same
derivative to the tangent.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.autograd import Function

from torchbp._checks import values_inspectable
from torchbp.autograd._compile import register_twins
from torchbp.kernels import _triton, triton_act

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


# Elements per block of the blocked first-order backward (see _evaluate_fast). Chosen by
# timing the backward at 2^24 float32 against native on a 2-core AMD EPYC (1 MiB L2 per
# core, 32 MiB L3), blocks of 2^16..2^21 and unblocked: smaller blocks lose to per-op
# dispatch and OpenMP fork/join (each block runs every op of the kernel), larger ones to
# cache misses. x native, 2^16 / 2^17 / 2^18 / 2^19 / 2^20 / 2^21 / unblocked: GELU 1.81
# 1.53 1.59 1.55 1.58 1.60 2.02, tanh-GELU 1.29 1.13 1.05 1.06 1.12 1.33 1.87, SiLU 1.48
# 1.28 1.24 1.21 1.26 1.38 2.00. Each block's ops are OpenMP parallel regions, and when
# other processes hold every core each region waits for a scheduler time slice: with two
# busy-looping processes beside it, GELU's backward took 28x native at 2^18, 14x at 2^19,
# 7x at 2^20, 2.4x unblocked. 2^20 keeps most of the gain and halves that risk.
BLOCK = 1 << 20
_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=64)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 0-dim constant: ``lerp`` takes no Python number for ``end``, and
    ``addcmul(c, a, b)`` makes ``c + a b`` one pass."""
    return torch.full((), value, dtype=dtype, device=device)


def _evaluate_fast(fast, scratch: int, g: torch.Tensor, saved: torch.Tensor, *args):
    """Evaluate ``fast(g, saved, *args, out=, tmp=)``, a kernel that writes ``g · f'`` into
    ``out`` with in-place ops, using the ``scratch`` buffers ``tmp`` shaped like ``out``,
    and returns ``out``.

    A kernel makes a few passes over memory where native makes one fused pass, and a
    fresh full-size buffer costs more to fault in than a pass over it (64 MiB: ~26 ms of
    page faults, ~8 ms a pass). So kernels with scratch, and all half-precision tensors,
    run block by block over the flattened tensors when ``g`` and ``saved`` are contiguous,
    on the CPU and at least two blocks long (cache blocking): a block's passes after its
    first read data still in cache, the scratch is a block (allocated once, reused), and
    the result is written into slices of one preallocated buffer. Kernels without scratch
    (two or three passes) run in one call: blocked they measure no faster (faulting the
    result in blocks costs a little more than in one sweep). So do small or non-contiguous
    tensors (an expanded ``g``: copying it would cost more than it saves) and GPU tensors
    (there a block's ops would only be more launches). Half precision is computed in
    float32 and rounded once, as native kernels do (``1 - y²`` in bfloat16 loses every
    digit as ``y -> 1``); blocked, its float32 copies are a block each.
    """
    dtype = g.dtype
    half = dtype in _HALF
    contiguous = g.shape == saved.shape and g.is_contiguous() and saved.is_contiguous()
    big = g.device.type == "cpu" and g.numel() >= 2 * BLOCK
    if not ((scratch or half) and contiguous and big):
        if half:
            g, saved = g.float(), saved.float()
        out = torch.empty_like(saved)
        tmp = [torch.empty_like(out) for _ in range(scratch)]
        out = fast(g, saved, *args, out=out, tmp=tmp)
        return out.to(dtype) if half else out
    out = torch.empty_like(saved)
    rows = scratch + 3 * half  # half: float32 blocks of g, saved and the result too
    buffers = torch.empty(rows, BLOCK, dtype=torch.float32 if half else dtype, device=g.device)
    for o, gb, sb in zip(*(t.view(-1).split(BLOCK) for t in (out, g, saved))):
        tmp = [row[: o.numel()] for row in buffers]
        if half:
            of, gf, sf, *tmp = tmp
            o.copy_(fast(gf.copy_(gb), sf.copy_(sb), *args, out=of, tmp=tmp))
        else:
            fast(gb, sb, *args, out=o, tmp=tmp)
    return out


def _derivative(fast, scratch: int = 0, triton: str | None = None):
    """Decorate a derivative formula ``(g, saved, *args) -> g * f'`` written in
    differentiable torch ops with ``fast``, an in-place kernel computing the same into a
    given buffer with ``scratch`` scratch buffers, evaluated by :func:`_evaluate_fast`:
    fewer passes over memory and no full-size temporaries. ``fast`` runs for first-order
    backward in eager mode (grad mode off, no torch.func wrapper, not compiling); double
    backward, torch.func and torch.compile get the differentiable formula. Half-precision
    tensors are computed in float32 and rounded once either way.
    With ``TORCHBP_TRITON=1``, where :func:`torchbp.kernels.triton_act.available` holds
    (contiguous CUDA tensors), the first-order path runs the Triton kernel of the
    activation named ``triton`` instead (one fused pass; ``args`` forwarded).
    ``wrapped.formula(g, saved, *args)`` and ``wrapped.fast(g, saved, *args)`` run one
    path each.
    """

    def decorate(formula):
        def differentiable(g: torch.Tensor, saved: torch.Tensor, *args) -> torch.Tensor:
            if g.dtype in _HALF:
                return formula(g.float(), saved.float(), *args).to(g.dtype)
            return formula(g, saved, *args)

        def evaluate_fast(g: torch.Tensor, saved: torch.Tensor, *args) -> torch.Tensor:
            if triton is not None and _triton.requested() and triton_act.available(g, saved):
                return triton_act.act_backward(triton, g, saved, *args)
            return _evaluate_fast(fast, scratch, g, saved, *args)

        def wrapped(g: torch.Tensor, saved: torch.Tensor, *args) -> torch.Tensor:
            if torch.is_grad_enabled() or not values_inspectable(g):
                return differentiable(g, saved, *args)
            return evaluate_fast(g, saved, *args)

        wrapped.formula, wrapped.fast = differentiable, evaluate_fast
        return wrapped

    return decorate


def _tangent_out(ctx, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An in-place forward must update its input's tangent in place too."""
    if ctx.inplace:
        return x_t.copy_(t)
    return t


def _save(ctx, tensor, for_forward: bool):
    ctx.save_for_backward(tensor)
    if for_forward:
        ctx.save_for_forward(tensor)
    ctx.set_materialize_grads(False)


# --------------------------------------------------------------------------- sigmoid
def _sigmoid_grad_fast(g, y, *, out, tmp):
    # y (1 - y) = lerp(y, 0, y) in one pass (y - y·y below ½, (1 - y)·y above), times g
    return torch.lerp(y, _scalar(0.0, y.dtype, y.device), y, out=out).mul_(g)


@_derivative(_sigmoid_grad_fast, triton="sigmoid")
def _sigmoid_grad(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # σ'(x) = σ(x)(1 - σ(x)) = y (1 - y)
    return g * (y * (1 - y))


class _Sigmoid(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        # σ(x) = 1 / (1 + e^{-x}); torch.sigmoid never overflows for large |x|.
        return torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, output, for_forward=False)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None
        (y,) = ctx.saved_tensors
        return _sigmoid_grad(grad_y, y)


class SigmoidFunction(_Sigmoid):
    """``y = σ(x) = 1 / (1 + e^{-x})``; backward ``dx = g · y (1 - y)`` (saves ``y``)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, output, for_forward=True)

    @staticmethod
    def jvp(ctx, x_t):
        (y,) = ctx.saved_tensors
        return None if x_t is None else _sigmoid_grad(x_t, y)


# --------------------------------------------------------------------------- tanh
def _tanh_grad_fast(g, y, *, out, tmp):
    # (1 - y²) g, with 1 - y·y in one addcmul (as native computes it, where g - g y² would
    # cancel as y -> ±1); two passes
    return torch.addcmul(_scalar(1.0, y.dtype, y.device), y, y, value=-1, out=out).mul_(g)


@_derivative(_tanh_grad_fast, triton="tanh")
def _tanh_grad(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # tanh'(x) = 1 - tanh²(x) = 1 - y²
    return g * (1 - y * y)


class _Tanh(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, output, for_forward=False)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None
        (y,) = ctx.saved_tensors
        return _tanh_grad(grad_y, y)


class TanhFunction(_Tanh):
    """``y = tanh(x)``; backward ``dx = g · (1 - y²)`` (saves ``y``)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, output, for_forward=True)

    @staticmethod
    def jvp(ctx, x_t):
        (y,) = ctx.saved_tensors
        return None if x_t is None else _tanh_grad(x_t, y)


# --------------------------------------------------------------------------- ReLU
def _relu_grad_fast(g, y, *, out, tmp):
    # [y != 0] g: y = relu(x) is >= 0 or NaN, so y != 0 exactly when native passes g (y > 0,
    # or NaN). The mask is written straight into the float result: two passes, no bool
    # tensor (torch.where on one is several times slower). (An infinite upstream gradient
    # at an inactive unit gives 0·inf = NaN here, not 0.)
    return torch.ne(y, 0, out=out).mul_(g)


@_derivative(_relu_grad_fast, triton="relu")
def _relu_grad(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # relu'(x) = 1 if x > 0 else 0, read off y = max(x, 0): y > 0 exactly when x > 0.
    # Written as "y <= 0 -> 0" so that a NaN input passes g through, as native does.
    return torch.where(y <= 0, 0.0, g)


class _ReLU(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, inplace):
        if inplace:
            x.clamp_min_(0)
            return x
        return torch.clamp_min(x, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, inplace = inputs
        ctx.inplace = inplace
        if inplace:
            ctx.mark_dirty(x)
        _save(ctx, output, for_forward=False)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None, None
        (y,) = ctx.saved_tensors
        return _relu_grad(grad_y, y), None


class ReLUFunction(_ReLU):
    """``y = max(x, 0)``; backward ``dx = g · [y > 0]`` (saves ``y``; 0 at the kink, as
    native). ``inplace=True`` overwrites ``x`` and marks it dirty."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _ReLU.setup_context(ctx, inputs, output)
        ctx.save_for_forward(output)

    @staticmethod
    def jvp(ctx, x_t, _inplace):
        (y,) = ctx.saved_tensors
        if x_t is None:
            return None
        return _tangent_out(ctx, x_t, _relu_grad(x_t, y))


# --------------------------------------------------------------------------- LeakyReLU
def _leaky_relu_grad_fast(g, saved, slope, *, out, tmp):
    # f' = 1 if saved > 0 else slope: the mask [saved > 0] written straight into the float
    # result, its zeros replaced by the slope (threshold_: exactly 1 or slope, where
    # slope + (1 - slope) [saved > 0] may round), then times g: three passes, no bool tensor.
    torch.gt(saved, 0, out=out)
    return torch.nn.functional.threshold_(out, 0.5, slope).mul_(g)


@_derivative(_leaky_relu_grad_fast, triton="leaky_relu")
def _leaky_relu_grad(g: torch.Tensor, saved: torch.Tensor, slope: float) -> torch.Tensor:
    # f'(x) = 1 if x > 0 else slope. For slope >= 0, y > 0 exactly when x > 0, so the
    # output can stand in for the input (native saves the input).
    return torch.where(saved > 0, g, g * slope)


def _leaky_relu_saved(x: torch.Tensor, negative_slope: float, y: torch.Tensor) -> torch.Tensor:
    # A negative slope flips the sign, so then only the input tells the branch.
    return y if negative_slope >= 0 else x


class _LeakyReLU(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, negative_slope, inplace):
        # f(x) = x for x > 0 (and at 0, where both branches agree), slope · x otherwise.
        if inplace:
            torch.nn.functional.leaky_relu_(x, negative_slope)
            return x
        return torch.nn.functional.leaky_relu(x, negative_slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, negative_slope, inplace = inputs
        ctx.inplace = inplace
        if inplace:
            ctx.mark_dirty(x)
        ctx.negative_slope = negative_slope
        _save(ctx, _leaky_relu_saved(x, negative_slope, output), for_forward=False)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None, None, None
        (saved,) = ctx.saved_tensors
        return _leaky_relu_grad(grad_y, saved, ctx.negative_slope), None, None


class LeakyReLUFunction(_LeakyReLU):
    """``y = x if x > 0 else α x``; backward ``dx = g · (1 if x > 0 else α)``.

    Saves the output for ``α >= 0`` (its sign equals the input's), the input otherwise.
    """

    @staticmethod
    def setup_context(ctx, inputs, output):
        _LeakyReLU.setup_context(ctx, inputs, output)
        x, negative_slope, _ = inputs
        ctx.save_for_forward(_leaky_relu_saved(x, negative_slope, output))

    @staticmethod
    def jvp(ctx, x_t, _slope, _inplace):
        (saved,) = ctx.saved_tensors
        if x_t is None:
            return None
        return _tangent_out(ctx, x_t, _leaky_relu_grad(x_t, saved, ctx.negative_slope))


# --------------------------------------------------------------------------- GELU
def _gelu_grad_fast(g, x, approximate, *, out, tmp):
    if approximate == "tanh":
        # With s = σ(2u) = ½(1 + tanh u), ½(1 - tanh²u) = 2 s (1 - s), so
        # y' = s + s (1 - s) w' with w' = 2x du/dx = x (2k + 6kc x²), u = x (k + kc x²), and
        # s + (s w')(1 - s) = lerp(s, 1, s w'), times g: eight passes (the formula's tanh
        # is a slower kernel than sigmoid).
        k, c, (s,), w = _SQRT_2_OVER_PI, _GELU_TANH_C, tmp, out
        two_k = _scalar(2 * k, x.dtype, x.device)
        torch.addcmul(two_k, x, x, value=2 * k * c, out=s).mul_(x).sigmoid_()  # σ(2u)
        torch.addcmul(two_k, x, x, value=6 * k * c, out=w).mul_(x).mul_(s)  # s w'
        return torch.lerp(s, _scalar(1.0, x.dtype, x.device), w, out=out).mul_(g)
    # y' = Φ(x) + x φ(x), Φ(x) = ½ + ½ erf(x/√2), φ(x) = e^{-x²/2}/√(2π) = 2^{-x²/(2 ln 2)
    # - log2 √(2π)} (exp2 is a faster CPU kernel than exp; torch.special.ndtr is not
    # vectorised, ~7x slower than erf), times g: seven passes.
    log2_norm = _scalar(-0.5 * math.log2(2 * math.pi), x.dtype, x.device)
    (pdf,) = tmp
    torch.addcmul(log2_norm, x, x, value=-0.5 * math.log2(math.e), out=pdf).exp2_()
    torch.mul(x, 1 / _SQRT_2, out=out).erf_()
    torch.add(_scalar(0.5, x.dtype, x.device), out, alpha=0.5, out=out)  # Φ(x)
    return out.addcmul_(x, pdf).mul_(g)


@_derivative(_gelu_grad_fast, scratch=1, triton="gelu")
def _gelu_grad(g: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        # y = ½x(1 + tanh u), u = √(2/π)(x + c x³)
        # y' = ½(1 + tanh u) + ½x (1 - tanh²u) √(2/π)(1 + 3c x²)
        x2 = x * x
        t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x2))
        inner = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * x2)
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner)
    # y = x Φ(x);  y' = Φ(x) + x φ(x),  Φ(x) = ½(1 + erf(x/√2)),  φ(x) = e^{-x²/2}/√(2π)
    cdf = 0.5 * (1 + torch.erf(x / _SQRT_2))
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return g * (cdf + x * pdf)


class _GELU(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, approximate):
        return torch.nn.functional.gelu(x, approximate=approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, approximate = inputs
        ctx.approximate = approximate
        _save(ctx, x, for_forward=False)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None, None
        (x,) = ctx.saved_tensors
        return _gelu_grad(grad_y, x, ctx.approximate), None


class GELUFunction(_GELU):
    """``y = x Φ(x)`` (``approximate='none'``) or ``½x(1 + tanh(√(2/π)(x + 0.044715x³)))``
    (``'tanh'``); backward ``dx = g · (Φ(x) + x φ(x))`` or the tanh form's derivative.
    Saves ``x``."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _GELU.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, x_t, _approximate):
        (x,) = ctx.saved_tensors
        return None if x_t is None else _gelu_grad(x_t, x, ctx.approximate)


# --------------------------------------------------------------------------- SiLU
def _silu_grad_fast(g, x, *, out, tmp):
    # y' = s (1 + x (1 - s)) = s + (x s)(1 - s) = lerp(s, 1, x s), s = σ(x) (lerp takes
    # (1 - s) exactly where s -> 1, and x s is small where s -> 0); times g: four passes
    s = torch.sigmoid(x, out=tmp[0])
    w = torch.mul(x, s, out=out)
    return torch.lerp(s, _scalar(1.0, x.dtype, x.device), w, out=out).mul_(g)


@_derivative(_silu_grad_fast, scratch=1, triton="silu")
def _silu_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # y = x σ(x);  y' = σ(x) (1 + x (1 - σ(x)))
    s = torch.sigmoid(x)
    return g * (s * (1 + x * (1 - s)))


class _SiLU(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.nn.functional.silu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs[0], for_forward=False)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None
        (x,) = ctx.saved_tensors
        return _silu_grad(grad_y, x)


class SiLUFunction(_SiLU):
    """``y = x σ(x)``; backward ``dx = g · σ(x)(1 + x(1 - σ(x)))``. Saves ``x``."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs[0], for_forward=True)

    @staticmethod
    def jvp(ctx, x_t):
        (x,) = ctx.saved_tensors
        return None if x_t is None else _silu_grad(x_t, x)


register_twins(globals())
