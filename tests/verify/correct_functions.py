"""Correct autograd Functions in every style a user is likely to write, each with the
native computation it re-implements. ``check_function`` must pass every one of them
(``report.ok``): what a style does not offer comes out ``unsupported``, never ``fail``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class TextbookTanh(torch.autograd.Function):
    """PyTorch tutorial style: forward(ctx, x), no setup_context, no jvp, no vmap rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # d tanh(x)/dx = 1 - tanh(x)^2
        return g * (1 - y * y)


class SetupContextTanh(torch.autograd.Function):
    """forward(*args) + setup_context + generate_vmap_rule; no jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # d tanh(x)/dx = 1 - tanh(x)^2
        return g * (1 - y * y)


class JvpTanh(SetupContextTanh):
    """Adds forward-mode AD: torch.compile then cannot capture it in one graph."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        # tangent of tanh(x): (1 - tanh(x)^2) t
        return t * (1 - y * y)


class CustomVmapTanh(torch.autograd.Function):
    """A hand-written vmap staticmethod instead of generate_vmap_rule."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # d tanh(x)/dx = 1 - tanh(x)^2
        return g * (1 - y * y)

    @staticmethod
    def vmap(info, in_dims, x):
        # element-wise: the batched call is the op itself, batch dim where it was
        return CustomVmapTanh.apply(x), in_dims[0]


class InplaceDoubleTextbook(torch.autograd.Function):
    """In place, ctx style: x *= 2, declared with mark_dirty."""

    @staticmethod
    def forward(ctx, x):
        x.mul_(2)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        # d(2x)/dx = 2
        return 2 * g


class InplaceDouble(torch.autograd.Function):
    """In place, setup_context style with a jvp (in place on the tangent) and a vmap rule."""

    @staticmethod
    def forward(x):
        return x.mul_(2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_dirty(inputs[0])

    @staticmethod
    def backward(ctx, g):
        # d(2x)/dx = 2
        return 2 * g

    @staticmethod
    def jvp(ctx, t):
        # the tangent of an in-place output is updated in place too
        return t.mul_(2)

    @staticmethod
    def vmap(info, in_dims, x):
        return InplaceDouble.apply(x), in_dims[0]


class SquareWithMask(torch.autograd.Function):
    """Two outputs: x^2 and a float mask (x > 0) marked non-differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x, (x > 0).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g_square, g_mask):
        (x,) = ctx.saved_tensors
        # d(x^2)/dx = 2x; the mask has no gradient
        return 2 * x * g_square

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        # no tangent for the non-differentiable mask
        return 2 * x * t, None


class TopValues(torch.autograd.Function):
    """Multiple outputs of mixed kinds: the k largest values and their (integer) indices."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, k):
        return torch.topk(x, k, dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _ = inputs
        _, indices = output
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.x_shape = x.shape

    @staticmethod
    def backward(ctx, g_values, g_indices):
        (indices,) = ctx.saved_tensors
        # each value is one input element: scatter its gradient back there
        dx = g_values.new_zeros(ctx.x_shape)
        return dx.scatter(-1, indices, g_values), None


class PickedLoss(torch.autograd.Function):
    """Integer and ignored inputs: -mean over rows of x[row, target[row]] * scale, with an
    ``ignore_index`` and a Python ``scale``; returns None for every non-tensor input."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, target, ignore_index, scale):
        keep = target != ignore_index
        safe = torch.where(keep, target, 0)
        picked = x.gather(1, safe.unsqueeze(1)).squeeze(1) * keep
        return -(picked.sum() * scale) / keep.sum().clamp(min=1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, ignore_index, scale = inputs
        keep = target != ignore_index
        ctx.save_for_backward(torch.where(keep, target, 0), keep)
        ctx.scale, ctx.x_shape = scale, x.shape

    @staticmethod
    def backward(ctx, g):
        safe, keep = ctx.saved_tensors
        # d loss / d x[i, t_i] = -scale / n_kept for kept rows, 0 elsewhere
        coef = (-ctx.scale / keep.sum().clamp(min=1).to(g.dtype)) * keep * g
        dx = coef.new_zeros(ctx.x_shape).scatter(1, safe.unsqueeze(1), coef.unsqueeze(1))
        return dx, None, None, None


def picked_loss_reference(x, target, ignore_index, scale):
    return F.nll_loss(x, target, ignore_index=ignore_index) * scale


class OnceDifferentiableMSE(torch.autograd.Function):
    """A loss computing its gradient in forward; backward only scales it and declares
    ``once_differentiable``."""

    @staticmethod
    def forward(ctx, x, y):
        diff = x - y
        # d mean((x - y)^2)/dx = 2 (x - y) / n
        ctx.save_for_backward(2 * diff / diff.numel())
        return (diff * diff).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (dx,) = ctx.saved_tensors
        return dx * g, -dx * g


class MaterializeFalseSplit(torch.autograd.Function):
    """Two outputs, ``set_materialize_grads(False)``: backward handles None grads."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 2, x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g_double, g_sin):
        (x,) = ctx.saved_tensors
        dx = None
        if g_double is not None:
            dx = 2 * g_double
        if g_sin is not None:
            # d sin(x)/dx = cos(x)
            dx = x.cos() * g_sin if dx is None else dx + x.cos() * g_sin
        return dx


class NeedsInputGradLinear(torch.autograd.Function):
    """y = x Wᵀ + b, saving only what the needed gradients use (ctx.needs_input_grad)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b):
        return x @ w.t() + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dL/dx = g W
            dx = g @ w
        if ctx.needs_input_grad[1]:
            # dL/dW = gᵀ x over every leading dim
            dw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            # dL/db = g summed over every leading dim
            db = g.reshape(-1, g.shape[-1]).sum(0)
        return dx, dw, db


class SinCos(torch.autograd.Function):
    """``(sin x, cos x)``: two outputs, with materialised grads (the default), so backward
    reads both grad_outputs even when the caller uses only one output."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.sin(), x.cos()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g_sin, g_cos):
        (x,) = ctx.saved_tensors
        # d sin(x)/dx = cos(x), d cos(x)/dx = -sin(x)
        return g_sin * x.cos() - g_cos * x.sin()


def sine_of_sincos(x):
    """Only the first output of :class:`SinCos`: its cos output gets no gradient, which
    autograd hands to backward as zeros."""
    return SinCos.apply(x)[0]


class RowMaxWithIndices(torch.autograd.Function):
    """``torch.max(x, dim=-1)``: the values and their integer indices, as torch returns
    them (a named tuple), the indices non-differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.max(x, dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, indices = output
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.x_shape = inputs[0].shape

    @staticmethod
    def backward(ctx, g_values, g_indices):
        (indices,) = ctx.saved_tensors
        # each max is one input element: its gradient goes back there
        return g_values.new_zeros(ctx.x_shape).scatter(
            -1, indices.unsqueeze(-1), g_values[..., None]
        )


class TransposeView(torch.autograd.Function):
    """An output that is a view of the input (``x.t()``, sharing its memory)."""

    @staticmethod
    def forward(ctx, x):
        return x.t()

    @staticmethod
    def backward(ctx, g):
        # the transpose of the gradient
        return g.t()


class OptionalBiasLinear(torch.autograd.Function):
    """y = x Wᵀ (+ b): ``b`` is an optional tensor input, None when there is no bias."""

    @staticmethod
    def forward(ctx, x, w, b=None):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        y = x @ w.t()
        return y if b is None else y + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        # dL/dx = g W, dL/dW = gᵀ x, dL/db = g summed over rows (None without a bias)
        return g @ w, g.t() @ x, g.sum(0) if ctx.has_bias else None


class NoGradForwardTanh(TextbookTanh):
    """Computes forward under ``torch.no_grad()`` (a kernel call, say) and saves the result."""

    @staticmethod
    def forward(ctx, x):
        with torch.no_grad():
            y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y


class Multiply(torch.autograd.Function):
    """a * b, itself twice differentiable."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        # d(ab)/da = b, d(ab)/db = a
        return Multiply.apply(g, b), Multiply.apply(g, a)


class CubeThroughMultiply(torch.autograd.Function):
    """x³ whose backward calls another custom Function (:class:`Multiply`): double backward
    goes through that Function's backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d(x³)/dx = 3 x²
        return Multiply.apply(g, Multiply.apply(3 * x, x))


class FlatView(torch.autograd.Function):
    """``x.view(-1)``: a view of the input that, like torch's ``view``, refuses a
    non-contiguous ``x``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.view(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.x_shape = inputs[0].shape

    @staticmethod
    def backward(ctx, g):
        # the gradient of a reshape is the gradient reshaped back
        return g.reshape(ctx.x_shape)


class NarrowView(torch.autograd.Function):
    """Returns a view of its input (``x.narrow``), setup_context style, with a jvp (the
    same view of the tangent, as forward AD requires of a view output) and a generated
    vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, k):
        return x.narrow(-1, 0, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, k = inputs
        ctx.k, ctx.n = k, x.shape[-1]

    @staticmethod
    def backward(ctx, g):
        # d x[..., :k] / dx: g in the first k columns, zeros after
        return F.pad(g, (0, ctx.n - ctx.k)), None

    @staticmethod
    def jvp(ctx, t, _):
        return t.narrow(-1, 0, ctx.k)


class InplaceScale(torch.autograd.Function):
    """x *= s in place (mark_dirty in setup_context) for a Python float s, with a
    generated vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, s):
        return x.mul_(s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_dirty(inputs[0])
        ctx.s = inputs[1]

    @staticmethod
    def backward(ctx, g):
        # d(x * s)/dx = s
        return g * ctx.s, None


class CopyAndSquaredNorm(torch.autograd.Function):
    """Three outputs: a copy of x, the 0-d ``sum(x^2)``, and the row argmax marked
    non-differentiable."""

    @staticmethod
    def forward(ctx, x):
        index = x.argmax(-1)
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(x)
        return x.clone(), (x * x).sum(), index

    @staticmethod
    def backward(ctx, g_copy, g_norm, _):
        (x,) = ctx.saved_tensors
        # d x/dx = I, d sum(x^2)/dx = 2x
        return g_copy + 2 * x * g_norm


def copy_and_squared_norm_reference(x):
    return x.clone(), (x * x).sum(), x.argmax(-1)


class ExpCosOnce(torch.autograd.Function):
    """Two outputs, ``set_materialize_grads(False)`` (an unused output's gradient is None)
    and a ``once_differentiable`` backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return x.exp(), x.cos()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_exp, g_cos):
        (x,) = ctx.saved_tensors
        grad = torch.zeros_like(x)
        # d exp(x)/dx = exp(x), d cos(x)/dx = -sin(x)
        if g_exp is not None:
            grad = grad + g_exp * x.exp()
        if g_cos is not None:
            grad = grad - g_cos * x.sin()
        return grad


class TransposedSquare(torch.autograd.Function):
    """Returns ``(x * x).t()``, a non-contiguous output."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x * x).t()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d (x^2)^T / dx: 2x times the transposed-back grad_output
        return 2 * x * g.t()


class BroadcastAdd(torch.autograd.Function):
    """x + b with b of shape (n,) broadcast over x's rows; generated vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, b):
        return x + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.b_shape = inputs[1].shape

    @staticmethod
    def backward(ctx, g):
        # d(x + b)/dx = 1; d/db sums g over the broadcast rows
        return g, g.sum_to_size(ctx.b_shape)


def identity(t):
    return t


def square_function(backward_of_g=None, jvp_of_t=None):
    """x^2 as a setup_context Function (d x^2/dx = 2x) whose backward gives
    ``2x * backward_of_g(g)`` and jvp ``2x * jvp_of_t(t)`` (correct with the defaults, the
    identity; other maps make the buggy twins of the linearity tests)."""
    backward_of_g = backward_of_g or identity
    jvp_of_t = jvp_of_t or identity

    class Square(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x * x

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * backward_of_g(g)

        @staticmethod
        def jvp(ctx, t):
            (x,) = ctx.saved_tensors
            return 2 * x * jvp_of_t(t)

    return Square


class FloorWithZeroGradient(torch.autograd.Function):
    """floor: a step function, whose derivative is zero wherever it has one; backward
    returns zeros, not connected to any graph (as torch.floor's), and so is its double
    backward: zero, and right."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.floor(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        # d floor(x)/dx = 0 (away from the integers, where it jumps)
        return torch.zeros_like(grad)
