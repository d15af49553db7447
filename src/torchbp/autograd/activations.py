"""Element-wise activations with hand-written backward (and jvp).

Each derivative is written as ``dL/dx = g * f'(x)`` with ``f'`` expressed through
whatever is cheapest to keep: the output ``y`` where the formula allows (sigmoid, tanh,
ReLU, LeakyReLU with slope >= 0: the next Linear keeps ``y`` alive anyway, so saving it
costs nothing), otherwise the input ``x`` (GELU, SiLU, LeakyReLU with slope < 0).
Backward formulas are torch ops, so double backward works; jvp applies the same
derivative to the tangent.
"""

from __future__ import annotations

import math

import torch
from torch.autograd import Function

from torchbp._checks import values_inspectable
from torchbp.autograd._compile import register_twins

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


def _derivative(fast):
    """Decorate a derivative formula ``(g, saved, *args) -> g * f'`` written in
    differentiable torch ops with ``fast``, an equivalent that builds the result in one
    fresh buffer with in-place ops: fewer passes over memory and fewer page-faulting
    allocations. ``fast`` runs for first-order backward in eager mode (grad mode off, no
    torch.func wrapper, not compiling); double backward, torch.func and torch.compile get
    the differentiable formula. Half-precision tensors are computed in float32 and rounded
    once, as native kernels do (``1 - y²`` in bfloat16 loses every digit as ``y -> 1``).
    """

    def decorate(formula):
        def wrapped(g: torch.Tensor, saved: torch.Tensor, *args) -> torch.Tensor:
            dtype = g.dtype
            half = dtype in (torch.float16, torch.bfloat16)
            if half:
                g, saved = g.float(), saved.float()
            if torch.is_grad_enabled() or not values_inspectable(g):
                out = formula(g, saved, *args)
            else:
                out = fast(g, saved, *args)
            return out.to(dtype) if half else out

        wrapped.formula, wrapped.fast = formula, fast
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
def _sigmoid_grad_fast(g, y):
    d = torch.mul(g, y)
    return d.addcmul_(d, y, value=-1)  # g y - g y y


@_derivative(_sigmoid_grad_fast)
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
def _tanh_grad_fast(g, y):
    d = torch.mul(g, y).mul_(y)
    return torch.sub(g, d, out=d)  # g - g y²


@_derivative(_tanh_grad_fast)
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
def _relu_grad_fast(g, y):
    # y = relu(x) is >= 0 or NaN, so y != 0 exactly when native passes g (y > 0, or NaN).
    # The mask is written straight into a float buffer: two passes, no bool tensor. (An
    # infinite upstream gradient at an inactive unit gives 0·inf = NaN here, not 0.)
    d = torch.empty_like(g)
    return torch.ne(y, 0, out=d).mul_(g)


@_derivative(_relu_grad_fast)
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
def _leaky_relu_grad_fast(g, saved, slope):
    # f' = slope + (1 - slope) [saved > 0], built in one float buffer, times g
    d = torch.empty_like(g)
    return torch.gt(saved, 0, out=d).mul_(1 - slope).add_(slope).mul_(g)


@_derivative(_leaky_relu_grad_fast)
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
def _gelu_grad_fast(g, x, approximate):
    if approximate == "tanh":
        c = _SQRT_2_OVER_PI
        inner = torch.mul(x, x)  # x²
        half_dinner = torch.mul(inner, 3 * _GELU_TANH_C * c).add_(c).mul_(x).mul_(0.5)
        t = inner.mul_(_GELU_TANH_C).add_(1).mul_(x).mul_(c).tanh_()  # tanh u
        d = torch.mul(t, t).neg_().add_(1).mul_(half_dinner)  # ½x(1 - tanh²u) du/dx
        return d.add_(t.add_(1).mul_(0.5)).mul_(g)
    d = torch.mul(x, x).mul_(-0.5).exp_().mul_(x).mul_(_INV_SQRT_2PI)  # x φ(x)
    return d.add_(torch.special.ndtr(x)).mul_(g)  # (Φ(x) + x φ(x)) g


@_derivative(_gelu_grad_fast)
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
def _silu_grad_fast(g, x):
    s = torch.sigmoid(x)
    d = torch.mul(x, s)
    return d.addcmul_(d, s, value=-1).add_(s).mul_(g)  # (s + x s (1 - s)) g


@_derivative(_silu_grad_fast)
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
