"""Wrong formulas: the backward computes another derivative than the forward's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tests.verify.zoo.entry import ZooEntry, seeded


class Linear(torch.autograd.Function):
    """y = x W^T + b for x of shape (N, in)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b):
        return x @ w.t() + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        # dL/dx = g W, dL/dW = g^T x, dL/db = sum over rows of g
        return g @ w, g.t() @ x, g.sum(0)


class TransposedWeightGradLinear(Linear):
    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, x.t() @ g, g.sum(0)  # dW transposed: (in, out), square W hides the shape


class AveragedBiasGradLinear(Linear):
    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x, g.mean(0)  # bias gradient averaged instead of summed


class Softmax(torch.autograd.Function):
    """softmax over the last dim."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.softmax(x, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # dL/dx_i = y_i (g_i - sum_j g_j y_j)
        return y * (g - (g * y).sum(-1, keepdim=True))


class DiagonalOnlySoftmax(Softmax):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)  # the Jacobian's diagonal only: cross terms -y_i y_j missing


class LogSoftmax(torch.autograd.Function):
    """log_softmax over the last dim."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.log_softmax(x, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (logp,) = ctx.saved_tensors
        # dL/dx = g - softmax(x) * sum(g)
        return g - logp.exp() * g.sum(-1, keepdim=True)


class NoSumLogSoftmax(LogSoftmax):
    @staticmethod
    def backward(ctx, g):
        (logp,) = ctx.saved_tensors
        return g - logp.exp() * g  # the sum over the row is missing


class Tanh(torch.autograd.Function):
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
        # d tanh(x)/dx = 1 - y^2
        return g * (1 - y * y)


class UnsquaredTanh(Tanh):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y)  # 1 - y instead of 1 - y^2


class MSELoss(torch.autograd.Function):
    """mean((x - t)^2), both differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, t):
        return ((x - t) ** 2).mean()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t = inputs
        ctx.save_for_backward(x, t)

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        # dL/dx = 2 (x - t) / n = -dL/dt
        dx = g * 2 * (x - t) / x.numel()
        return dx, -dx


class MissingTwoMSELoss(MSELoss):
    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        dx = g * (x - t) / x.numel()  # the factor 2 of the square is missing
        return dx, -dx


class LeakyReLU(torch.autograd.Function):
    """leaky_relu with slope 0.1."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return F.leaky_relu(x, 0.1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # slope 1 where x > 0, 0.1 elsewhere
        return torch.where(x > 0, g, g * 0.1)


class ZeroSlopeLeakyReLU(LeakyReLU):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where(x > 0, g, torch.zeros_like(g))  # ReLU's backward, slope forgotten


def _square_linear():
    return seeded(3, 4), seeded(4, 4, seed=1), seeded(4, seed=2)


def _linear():
    return seeded(3, 4), seeded(5, 4, seed=1), seeded(5, seed=2)


ENTRIES = [
    ZooEntry(
        "linear_transposed_dW",
        "formulas",
        "linear backward returns x^T g (the transpose of dW); a square weight hides it",
        TransposedWeightGradLinear,
        Linear,
        _square_linear,
        F.linear,
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "linear_bias_grad_averaged",
        "formulas",
        "linear bias gradient averaged over rows instead of summed",
        AveragedBiasGradLinear,
        Linear,
        _linear,
        F.linear,
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "softmax_missing_cross_terms",
        "formulas",
        "softmax backward keeps only the Jacobian's diagonal y(1 - y)",
        DiagonalOnlySoftmax,
        Softmax,
        lambda: (seeded(3, 5),),
        lambda x: torch.softmax(x, -1),
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "log_softmax_backward_without_sum",
        "formulas",
        "log_softmax backward g - softmax * g (the row sum of g missing)",
        NoSumLogSoftmax,
        LogSoftmax,
        lambda: (seeded(3, 5),),
        lambda x: torch.log_softmax(x, -1),
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "tanh_derivative_unsquared",
        "formulas",
        "tanh backward 1 - y instead of 1 - y^2",
        UnsquaredTanh,
        Tanh,
        lambda: (seeded(3, 4),),
        torch.tanh,
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "mse_missing_factor_two",
        "formulas",
        "mse backward (x - t)/n instead of 2(x - t)/n",
        MissingTwoMSELoss,
        MSELoss,
        lambda: (seeded(4, 3), seeded(4, 3, seed=1)),
        F.mse_loss,
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "leaky_relu_slope_forgotten",
        "formulas",
        "leaky_relu backward with ReLU's zero slope for negative inputs",
        ZeroSlopeLeakyReLU,
        LeakyReLU,
        lambda: (seeded(3, 4),),
        lambda x: F.leaky_relu(x, 0.1),
        frozenset({"gradcheck", "reference"}),
    ),
]
