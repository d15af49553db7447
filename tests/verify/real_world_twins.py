"""More autograd Functions as people write them (fused bias + GELU, RMSNorm and LayerNorm
with a hand backward, rotary embedding, softmax with a temperature, Huber loss, a clamp
with its gradient mask, a checkpointed block, ``mark_non_differentiable``,
``set_materialize_grads(False)``, ``once_differentiable``, ``setup_context`` with a
``vmap`` staticmethod or ``generate_vmap_rule`` and a ``jvp``, a non-tensor output,
keyword-only options through a wrapper, a variable number of tensors, an in-place
update with ``mark_dirty``), each beside a subtly wrong twin: a factor off, a transpose,
a missing term, a gradient in the wrong dtype. ``check_function`` must pass every correct
one and fail every twin (``tests/verify/test_verify_real_world_twins.py``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

# --- fused bias + GELU (tanh approximation), bias gradient reduced over the batch ----

_GELU_C = math.sqrt(2 / math.pi)


def _gelu_tanh_grad(z: torch.Tensor, half_term: float = 0.5) -> torch.Tensor:
    """d/dz of 0.5 z (1 + tanh(c (z + 0.044715 z^3))):
    0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 * 0.044715 z^2), with ``half_term`` the first 0.5."""
    t = torch.tanh(_GELU_C * (z + 0.044715 * z**3))
    return half_term * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * z * z)


class FusedBiasGeluTanh(Function):
    @staticmethod
    def forward(ctx, x, bias):
        # inputs saved, not x + bias: double backward must see z's dependence on them
        ctx.save_for_backward(x, bias)
        return F.gelu(x + bias, approximate="tanh")

    @staticmethod
    def backward(ctx, g):
        x, bias = ctx.saved_tensors
        z = x + bias
        gz = g * _gelu_tanh_grad(z)
        # the bias is broadcast over every leading dim: sum them out
        return gz, gz.reshape(-1, z.shape[-1]).sum(0)


class FusedBiasGeluTanhHalfTerm(FusedBiasGeluTanh):
    """Wrong: the 0.5 (1 + t) term taken as (1 + t)."""

    @staticmethod
    def backward(ctx, g):
        x, bias = ctx.saved_tensors
        z = x + bias
        gz = g * _gelu_tanh_grad(z, half_term=1.0)
        return gz, gz.reshape(-1, z.shape[-1]).sum(0)


def bias_gelu_reference(x, bias):
    return F.gelu(x + bias, approximate="tanh")


# --- RMSNorm with a weight --------------------------------------------------------


class RMSNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, eps=1e-6):
        # the normalizer is recomputed in backward, for double backward to see its inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)
        xhat = x * inv
        gw = g * weight
        # dx = inv (gw - xhat mean(gw xhat)); dweight = sum over rows of g xhat
        gx = inv * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        return gx, (g * xhat).reshape(-1, x.shape[-1]).sum(0), None


class RMSNormNoProjection(RMSNorm):
    """Wrong: the normalizer taken for a constant (the mean(gw xhat) term missing)."""

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ctx.eps)
        xhat = x * inv
        return inv * g * weight, (g * xhat).reshape(-1, x.shape[-1]).sum(0), None


class RMSNormFloat32WeightGrad(RMSNorm):
    """Wrong: the weight gradient returned in float32 whatever the weight's dtype."""

    @staticmethod
    def backward(ctx, g):
        gx, gw, _ = RMSNorm.backward(ctx, g)
        return gx, gw.float(), None


def rms_norm_reference(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# --- LayerNorm with a hand backward (statistics recomputed in backward) -----------


def _layer_norm_grads(ctx, g, unbiased: bool):
    """LayerNormRecompute's gradients, its statistics recomputed from the saved input
    (``unbiased``: the variance over n - 1, the twin's mistake)."""
    x, weight = ctx.saved_tensors
    mean = x.mean(-1, keepdim=True)
    inv = torch.rsqrt(x.var(-1, unbiased=unbiased, keepdim=True) + ctx.eps)
    xhat = (x - mean) * inv
    gxhat = g * weight
    # dx = inv (gxhat - mean(gxhat) - xhat mean(gxhat xhat))
    gx = inv * (gxhat - gxhat.mean(-1, keepdim=True) - xhat * (gxhat * xhat).mean(-1, keepdim=True))
    rows = g.reshape(-1, x.shape[-1])
    return gx, (rows * xhat.reshape(rows.shape)).sum(0), rows.sum(0), None


class LayerNormRecompute(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps=1e-5):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    def backward(ctx, g):
        return _layer_norm_grads(ctx, g, unbiased=False)


class LayerNormUnbiasedInBackward(LayerNormRecompute):
    """Wrong: backward recomputes the variance unbiased (n - 1), forward used biased."""

    @staticmethod
    def backward(ctx, g):
        return _layer_norm_grads(ctx, g, unbiased=True)


def layer_norm_reference(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


# --- rotary embedding (rotate_half), tables not differentiated ---------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotate_half_back(x: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`_rotate_half` (a rotation by -90 degrees)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((second, -first), dim=-1)


class Rotary(Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return x * cos + _rotate_half(x) * sin

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        # the transpose of x -> x cos + R x sin is g -> g cos + R^T (g sin)
        return g * cos + _rotate_half_back(g * sin), None, None


class RotaryUntransposed(Rotary):
    """Wrong: R applied instead of its transpose (the sign of the rotation)."""

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return g * cos + _rotate_half(g * sin), None, None


def rotary_tables(positions: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotary_reference(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


# --- softmax with a temperature ----------------------------------------------------


class TemperatureSoftmax(Function):
    @staticmethod
    def forward(ctx, x, temperature):
        y = torch.softmax(x / temperature, dim=-1)
        ctx.save_for_backward(y)
        ctx.temperature = temperature
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # dx = y (g - sum(g y)) / T
        return y * (g - (g * y).sum(-1, keepdim=True)) / ctx.temperature, None


class TemperatureSoftmaxNoScale(TemperatureSoftmax):
    """Wrong: the 1/T of the chain rule forgotten."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True)), None


def temperature_softmax_reference(x, temperature):
    return torch.softmax(x / temperature, dim=-1)


# --- Huber loss, mean reduction ----------------------------------------------------


class HuberLoss(Function):
    @staticmethod
    def forward(ctx, pred, target, delta=1.0):
        ctx.save_for_backward(pred, target)
        ctx.delta = delta
        return F.huber_loss(pred, target, delta=delta)

    @staticmethod
    def backward(ctx, g):
        pred, target = ctx.saved_tensors
        diff = pred - target
        # d/dpred mean(huber) = clamp(diff, -delta, delta) / n
        grad = g * diff.clamp(-ctx.delta, ctx.delta) / diff.numel()
        return grad, -grad, None


class HuberLossSummed(HuberLoss):
    """Wrong: the 1/n of the mean forgotten."""

    @staticmethod
    def backward(ctx, g):
        pred, target = ctx.saved_tensors
        grad = g * (pred - target).clamp(-ctx.delta, ctx.delta)
        return grad, -grad, None


def huber_reference(pred, target, delta=1.0):
    return F.huber_loss(pred, target, delta=delta)


# --- clamp with its gradient mask ----------------------------------------------------


class MaskedClamp(Function):
    @staticmethod
    def forward(ctx, x, low, high):
        ctx.save_for_backward((x >= low) & (x <= high))
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        # d clamp(x)/dx = 1 inside [low, high], 0 outside
        return g * inside, None, None


class MaskedClampUpperOnly(Function):
    """Wrong: only the upper bound masks the gradient."""

    @staticmethod
    def forward(ctx, x, low, high):
        ctx.save_for_backward(x <= high)
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, g):
        (below_high,) = ctx.saved_tensors
        return g * below_high, None, None


# --- a checkpointed block: forward without a graph, backward recomputing ------------


def mlp_block(x, w1, w2):
    return torch.tanh(x @ w1) @ w2


class CheckpointedBlock(Function):
    @staticmethod
    def forward(ctx, x, w1, w2):
        ctx.save_for_backward(x, w1, w2)
        with torch.no_grad():
            return mlp_block(x, w1, w2)

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        with torch.enable_grad():
            out = mlp_block(*saved)
        # recomputed from the inputs themselves (not detached copies) and with a graph of
        # the gradients when double backward asks for one (create_graph)
        wanted = [t for t, need in zip(saved, ctx.needs_input_grad) if need]
        grads = iter(torch.autograd.grad(out, wanted, g, create_graph=torch.is_grad_enabled()))
        return tuple(next(grads) if need else None for need in ctx.needs_input_grad)


class CheckpointedBlockSwapped(CheckpointedBlock):
    """Wrong: the two weights' gradients returned in each other's place (both square)."""

    @staticmethod
    def backward(ctx, g):
        gx, gw1, gw2 = CheckpointedBlock.backward(ctx, g)
        return gx, gw2, gw1


# --- mark_non_differentiable: max values and their indices ---------------------------


class MaxWithIndex(Function):
    @staticmethod
    def forward(ctx, x):
        values, index = x.max(dim=-1)
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return values, index

    @staticmethod
    def backward(ctx, g, _g_index):
        (index,) = ctx.saved_tensors
        # the gradient flows to the maximum's position only
        grad = g.new_zeros(ctx.shape)
        return grad.scatter(-1, index.unsqueeze(-1), g.unsqueeze(-1))


class MaxWithIndexShifted(MaxWithIndex):
    """Wrong: the gradient sent to the next position (off by one)."""

    @staticmethod
    def backward(ctx, g, _g_index):
        (index,) = ctx.saved_tensors
        grad = g.new_zeros(ctx.shape)
        shifted = (index + 1) % ctx.shape[-1]
        return grad.scatter(-1, shifted.unsqueeze(-1), g.unsqueeze(-1))


def max_reference(x):
    return x.max(dim=-1)


# --- set_materialize_grads(False): None for an output not used -----------------------


class ScaleAndExp(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        y = x.exp()
        ctx.save_for_backward(y)
        return 3 * x, y

    @staticmethod
    def backward(ctx, g_scaled, g_exp):
        (y,) = ctx.saved_tensors
        grad = None
        # d(3x)/dx = 3; d exp(x)/dx = exp(x); an unused output's gradient is None
        if g_scaled is not None:
            grad = 3 * g_scaled
        if g_exp is not None:
            grad = g_exp * y if grad is None else grad + g_exp * y
        return grad


class ScaleAndExpDropsExp(ScaleAndExp):
    """Wrong: the exp term dropped when both gradients are given (an elif)."""

    @staticmethod
    def backward(ctx, g_scaled, g_exp):
        (y,) = ctx.saved_tensors
        if g_scaled is not None:
            return 3 * g_scaled
        if g_exp is not None:
            return g_exp * y
        return None


def scale_and_exp_reference(x):
    return 3 * x, x.exp()


# --- once_differentiable: a Mish --------------------------------------------------


class Mish(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.tanh(F.softplus(x))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(F.softplus(x))
        # d/dx x tanh(sp(x)) = t + x (1 - t^2) sigmoid(x)
        return g * (t + x * (1 - t * t) * torch.sigmoid(x))


class MishWrongSign(Function):
    """Wrong: (t^2 - 1) for (1 - t^2)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.tanh(F.softplus(x))

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(F.softplus(x))
        return g * (t + x * (t * t - 1) * torch.sigmoid(x))


# --- setup_context with its own vmap staticmethod ---------------------------------


class RowScale(Function):
    """x (B, D) times a per-row scale s (B,)."""

    @staticmethod
    def forward(x, s):
        return x * s.unsqueeze(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        # d/dx = s; d/ds = sum over D of g x
        return g * s.unsqueeze(-1), (g * x).sum(-1)

    @staticmethod
    def vmap(info, in_dims, x, s):
        x_dim, s_dim = in_dims
        x = x.movedim(x_dim, 0) if x_dim is not None else x.expand(info.batch_size, *x.shape)
        s = s.movedim(s_dim, 0) if s_dim is not None else s.expand(info.batch_size, *s.shape)
        return RowScale.apply(x, s), 0


class RowScaleVmapIgnoringInDims(RowScale):
    """Wrong: the vmap rule takes the batch dim to be 0 whatever in_dims says."""

    @staticmethod
    def vmap(info, in_dims, x, s):
        if in_dims[0] is None or in_dims[1] is None:
            return RowScale.vmap(info, in_dims, x, s)
        return RowScaleVmapIgnoringInDims.apply(x, s), 0


def row_scale_reference(x, s):
    return x * s.unsqueeze(-1)


# --- setup_context with generate_vmap_rule and a jvp ---------------------------------


class Cube(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d x^3/dx = 3 x^2
        return 3 * g * x * x

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * t * x * x


class CubeJvpMissingThree(Cube):
    """Wrong: the jvp forgets the 3."""

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return t * x * x


# --- a non-tensor output: the count of clipped elements ------------------------------


class ClipWithCount(Function):
    @staticmethod
    def forward(ctx, x, bound):
        inside = x.abs() <= bound
        ctx.save_for_backward(inside)
        return x.clamp(-bound, bound), int((~inside).sum())

    @staticmethod
    def backward(ctx, g, _g_count):
        (inside,) = ctx.saved_tensors
        return g * inside, None


class ClipWithCountDoubled(ClipWithCount):
    """Wrong: twice the gradient."""

    @staticmethod
    def backward(ctx, g, _g_count):
        (inside,) = ctx.saved_tensors
        return 2 * g * inside, None


def clamp_passing_bounds(x, low, high):
    """x.clamp(low, high) whose gradient is 1 on the bounds too, as the Functions here
    choose: torch's clamp chose so up to 2.13 and chooses 0 from 2.14 (a kink, where
    either is valid), and extreme_values's integer probe lands on the bounds."""
    inside = (x >= low) & (x <= high)
    return torch.where(inside, x, x.clamp(low, high).detach())


def clip_with_count_reference(x, bound):
    return clamp_passing_bounds(x, -bound, bound), int((x.abs() > bound).sum())


# --- keyword-only options, through the wrapper people export --------------------------


class _ScaledSoftplus(Function):
    @staticmethod
    def forward(ctx, x, beta, scale):
        ctx.save_for_backward(x)
        ctx.beta, ctx.scale = beta, scale
        return scale * F.softplus(x, beta=beta)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d/dx scale softplus(x, beta) = scale sigmoid(beta x)
        return g * ctx.scale * torch.sigmoid(ctx.beta * x), None, None


class _ScaledSoftplusNoScale(_ScaledSoftplus):
    """Wrong: the scale forgotten in backward."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(ctx.beta * x), None, None


def scaled_softplus(x, *, beta=1.0, scale=1.0):
    return _ScaledSoftplus.apply(x, beta, scale)


def scaled_softplus_no_scale(x, *, beta=1.0, scale=1.0):
    return _ScaledSoftplusNoScale.apply(x, beta, scale)


def scaled_softplus_reference(x, *, beta=1.0, scale=1.0):
    return scale * F.softplus(x, beta=beta)


# --- a variable number of tensors: a weighted sum ----------------------------------


class WeightedSum(Function):
    """sum_i w_i x_i over the tensors given (``apply(weights, *xs)``)."""

    @staticmethod
    def forward(ctx, weights, *xs):
        ctx.save_for_backward(weights, *xs)
        return sum(w * x for w, x in zip(weights, xs))

    @staticmethod
    def backward(ctx, g):
        weights, *xs = ctx.saved_tensors
        # d/dx_i = w_i g; d/dw_i = sum(g x_i)
        gw = torch.stack([(g * x).sum() for x in xs])
        return (gw, *(w * g for w in weights))


class WeightedSumLastDropped(WeightedSum):
    """Wrong: the last tensor's gradient left out (a range(len - 1) loop)."""

    @staticmethod
    def backward(ctx, g):
        weights, *xs = ctx.saved_tensors
        gw = torch.stack([(g * x).sum() for x in xs])
        grads = [w * g for w in weights[:-1]]
        return (gw, *grads, torch.zeros_like(g))


def weighted_sum(weights, *xs):
    return WeightedSum.apply(weights, *xs)


def weighted_sum_reference(weights, *xs):
    return sum(w * x for w, x in zip(weights, xs))


# --- in place on an input, with mark_dirty ----------------------------------------


class AddScaledInPlace(Function):
    """x += alpha * y, written into x."""

    @staticmethod
    def forward(ctx, x, y, alpha):
        ctx.alpha = alpha
        x.add_(y, alpha=alpha)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        # d/dx = 1; d/dy = alpha
        return g, ctx.alpha * g, None


class AddScaledInPlaceNoAlpha(AddScaledInPlace):
    """Wrong: y's gradient without alpha."""

    @staticmethod
    def backward(ctx, g):
        return g, g, None


def add_scaled_reference(x, y, alpha):
    return x + alpha * y


# --- a fused linear + ReLU, square weight --------------------------------------------


class LinearRelu(Function):
    @staticmethod
    def forward(ctx, x, weight):
        out = torch.relu(x @ weight.t())
        ctx.save_for_backward(x, weight, out)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, out = ctx.saved_tensors
        gz = g * (out > 0)
        # z = x W^T: dx = gz W, dW = gz^T x
        return gz @ weight, gz.t() @ x


class LinearReluWrongTranspose(LinearRelu):
    """Wrong: dW = x^T gz, the transpose (silent for a square weight)."""

    @staticmethod
    def backward(ctx, g):
        x, weight, out = ctx.saved_tensors
        gz = g * (out > 0)
        return gz @ weight, x.t() @ gz


def linear_relu_reference(x, weight):
    return torch.relu(x @ weight.t())


# --- binary cross-entropy of probabilities, torch's own forward (it refuses values ----
# --- outside [0, 1]) and a hand backward, generate_vmap_rule ----------------------------


class BinaryCrossEntropy(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(p, t):
        return F.binary_cross_entropy(p, t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        p, t = ctx.saved_tensors
        n = p.numel()
        # mean of -(t log p + (1 - t) log(1 - p)): d/dp = (p - t) / (p (1 - p)) / n, the
        # denominator kept from 0 as native's is; d/dt = (log(1 - p) - log p) / n = -logit(p) / n
        gp = g * (p - t) / (p * (1 - p)).clamp_min(1e-12) / n
        return gp, -g * torch.logit(p) / n


class BinaryCrossEntropyTargetSign(BinaryCrossEntropy):
    """Wrong: the target's gradient as logit(p) / n, its sign flipped."""

    @staticmethod
    def backward(ctx, g):
        gp, gt = BinaryCrossEntropy.backward(ctx, g)
        return gp, -gt


class BinaryCrossEntropyUnclamped(BinaryCrossEntropy):
    """Right inside (0, 1); at p = 0 or 1, where native's forward is finite, its gradient
    is NaN (0/0) or infinite: no clamp of the denominator."""

    @staticmethod
    def backward(ctx, g):
        p, t = ctx.saved_tensors
        n = p.numel()
        return g * (p - t) / (p * (1 - p)) / n, -g * torch.logit(p) / n


def probabilities_and_targets() -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities in [0.1, 0.9] (some above 0.8: scaled by 1.25, out of [0, 1]) and
    targets in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.8 + 0.1
    return p, torch.rand(3, 4, generator=g, dtype=torch.float64)


# --- causal attention scores, -inf above the diagonal (masked_fill or an added mask) --


def _causal_mask(scores: torch.Tensor) -> torch.Tensor:
    return torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)


class CausalScores(Function):
    """``q k^T / sqrt(d)`` with -inf above the diagonal, as attention masks its scores
    before the softmax; setup_context, generate_vmap_rule and a jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return scores.masked_fill(_causal_mask(scores), float("-inf"))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, g):
        q, k = ctx.saved_tensors
        # s = q k^T / sqrt(d) where unmasked: dq = gs k / sqrt(d), dk = gs^T q / sqrt(d)
        gs = g.masked_fill(_causal_mask(g), 0.0) / math.sqrt(q.shape[-1])
        return gs @ k, gs.transpose(-2, -1) @ q

    @staticmethod
    def jvp(ctx, tq, tk):
        q, k = ctx.saved_tensors
        t = (tq @ k.transpose(-2, -1) + q @ tk.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return t.masked_fill(_causal_mask(t), 0.0)


class CausalScoresUnscaled(CausalScores):
    """Wrong: the 1/sqrt(d) of the forward left out of backward."""

    @staticmethod
    def backward(ctx, g):
        q, k = ctx.saved_tensors
        gs = g.masked_fill(_causal_mask(g), 0.0)
        return gs @ k, gs.transpose(-2, -1) @ q


def _unmasked_scores_backward(ctx, g):
    """The gradient of ``s = q k^T / sqrt(d)`` (+ a mask passing it through):
    ``dq = g k / sqrt(d)``, ``dk = g^T q / sqrt(d)``."""
    q, k = ctx.saved_tensors
    gs = g / math.sqrt(q.shape[-1])
    return gs @ k, gs.transpose(-2, -1) @ q


def _unmasked_scores_jvp(ctx, tq, tk):
    """The tangent of ``s = q k^T / sqrt(d)``: ``(tq k^T + q tk^T) / sqrt(d)``."""
    q, k = ctx.saved_tensors
    return (tq @ k.transpose(-2, -1) + q @ tk.transpose(-2, -1)) / math.sqrt(q.shape[-1])


class CausalScoresUnmaskedGradient(CausalScores):
    """Wrong against a masked_fill reference: backward and jvp leave the mask forward
    applies with masked_fill out, giving the masked scores (-inf, derivative 0 there) the
    gradient of unmasked ones. Only a reference can tell: the same Function, its forward
    adding a -inf mask, is :class:`CausalScoresAdditiveMask`, which is right."""

    backward = staticmethod(_unmasked_scores_backward)
    jvp = staticmethod(_unmasked_scores_jvp)


class CausalScoresUnmaskedTangent(CausalScores):
    """Wrong: jvp leaves out the mask backward applies, giving the masked scores the
    tangent of unmasked ones (jvp and backward are no longer one Jacobian)."""

    jvp = CausalScoresUnmaskedGradient.jvp


def _additive_causal_mask(scores: torch.Tensor) -> torch.Tensor:
    """0 on and below the diagonal, -inf above: the mask attention adds to its scores."""
    zeros = torch.zeros(scores.shape[-2:], dtype=scores.dtype, device=scores.device)
    return zeros.masked_fill(_causal_mask(scores), float("-inf"))


class CausalScoresAdditiveMask(CausalScores):
    """``q k^T / sqrt(d)`` plus a mask of -inf above the diagonal: the add passes the
    gradient through to the masked scores too (derivative 1 there, as autograd's add
    gives), which a softmax after them turns into 0."""

    @staticmethod
    def forward(q, k):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        return scores + _additive_causal_mask(scores)

    backward = staticmethod(_unmasked_scores_backward)
    jvp = staticmethod(_unmasked_scores_jvp)


class _AdditiveScoresBackward(Function):
    """CausalScoresAdditiveMask's backward as a Function of its own, ``(dq, dk)`` from
    ``(g, q, k)``, whose backward (fn's double backward) masks the grad_output's
    derivative: wrong at the masked scores only, whose gradient passes the add."""

    @staticmethod
    def forward(g, q, k):
        gs = g / math.sqrt(q.shape[-1])
        return gs @ k, gs.transpose(-2, -1) @ q

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, gdq, gdk):
        g, q, k = ctx.saved_tensors
        scale = math.sqrt(q.shape[-1])
        # dq = g k / sqrt(d), dk = g^T q / sqrt(d): d/dg = (gdq k^T + q gdk^T) / sqrt(d)
        # (wrongly masked), d/dq = g gdk / sqrt(d), d/dk = g^T gdq / sqrt(d)
        gg = (gdq @ k.transpose(-2, -1) + q @ gdk.transpose(-2, -1)) / scale
        return (
            gg.masked_fill(_causal_mask(gg), 0.0),
            g @ gdk / scale,
            g.transpose(-2, -1) @ gdq / scale,
        )


class CausalScoresAdditiveMaskedDoubleBackward(CausalScoresAdditiveMask):
    """Wrong: its double backward gives the grad_output at the masked scores no
    derivative, though backward passes it on (the add's 1)."""

    @staticmethod
    def backward(ctx, g):
        q, k = ctx.saved_tensors
        return _AdditiveScoresBackward.apply(g, q, k)


class LogSumExpUnshifted(Function):
    """Wrong: logsumexp without subtracting the max, so forward overflows to inf for
    inputs above ~710 (float64), while backward gives the softmax of a finite one."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.exp().sum(-1).log()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d logsumexp(x) / dx = softmax(x)
        return g.unsqueeze(-1) * torch.softmax(x, -1)


def causal_scores_reference(q, k):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores.masked_fill(_causal_mask(scores), float("-inf"))


def additive_causal_scores_reference(q, k):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return scores + _additive_causal_mask(scores)
