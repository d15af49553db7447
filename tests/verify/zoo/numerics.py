"""Numerics: right formulas that overflow, cancel or round away precision, and the
gradient at a kink."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tests.verify.zoo.entry import ZooEntry, seeded
from tests.verify.zoo.formulas import LogSoftmax, Softmax, Tanh


class NoMaxTrickSoftmax(Softmax):
    @staticmethod
    def forward(x):
        e = x.exp()  # no max subtracted: exp overflows for large logits
        return e / e.sum(-1, keepdim=True)


class NoMaxTrickLogSoftmax(LogSoftmax):
    @staticmethod
    def forward(x):
        return x - x.exp().sum(-1, keepdim=True).log()  # log(sum(exp)) without the max


class LogSigmoid(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return F.logsigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d log(sigmoid(x))/dx = 1 - sigmoid(x) = sigmoid(-x)
        return g * torch.sigmoid(-x)


class NaiveLogSigmoid(LogSigmoid):
    @staticmethod
    def forward(x):
        return torch.sigmoid(x).log()  # sigmoid underflows to 0 for very negative x: -inf


class Bf16SquareTanh(Tanh):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        y2 = (y * y).to(torch.bfloat16).to(y.dtype)  # y^2 rounded to bfloat16
        return g * (1 - y2)


class Float32GradTanh(Tanh):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # computed in float32 "for speed" and returned so: autograd casts it back silently
        return g.float() * (1 - y.float() ** 2)


class Sigmoid(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # d sigmoid/dx = y (1 - y)
        return g * y * (1 - y)


class HalfGradSigmoid(Sigmoid):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        gh, yh = g.half(), y.half()  # "saves memory": the gradient computed in float16
        return (gh * yh * (1 - yh)).to(g.dtype)


EPS = 1e-5


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: float32 for half-precision inputs (as native kernels do)."""
    return torch.promote_types(dtype, torch.float32)


class Standardize(torch.autograd.Function):
    """layer_norm over the last dim without affine (eps 1e-5); textbook ctx style."""

    @staticmethod
    def forward(ctx, x):
        xf = x.to(_opmath(x.dtype))
        mu = xf.mean(-1, keepdim=True)
        var = ((xf - mu) ** 2).mean(-1, keepdim=True)
        rstd = torch.rsqrt(var + EPS)
        xhat = (xf - mu) * rstd
        ctx.save_for_backward(xhat, rstd)
        return xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        xhat, rstd = ctx.saved_tensors
        gf = g.to(xhat.dtype)
        # dL/dx = rstd (g - mean(g) - xhat mean(g xhat))
        dx = rstd * (gf - gf.mean(-1, keepdim=True) - xhat * (gf * xhat).mean(-1, keepdim=True))
        return dx.to(g.dtype)


class HalfVarianceStandardize(Standardize):
    @staticmethod
    def forward(ctx, x):
        mu = x.mean(-1, keepdim=True)
        var = (x * x).mean(-1, keepdim=True) - mu * mu  # E[x^2] - E[x]^2 in x's own dtype
        rstd = torch.rsqrt(var + EPS)
        xhat = (x - mu) * rstd
        ctx.save_for_backward(xhat.to(_opmath(x.dtype)), rstd.to(_opmath(x.dtype)))
        return xhat


def _layer_norm_in_float64(x):
    return F.layer_norm(x.double(), x.shape[-1:], eps=EPS).to(x.dtype)


class ReLU(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # slope 1 where x > 0, 0 elsewhere (0 at the kink, as native)
        return g * (x > 0).to(g.dtype)


class KinkReLU(ReLU):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x >= 0).to(g.dtype)  # slope 1 at x = 0, native has 0


class Hardtanh(torch.autograd.Function):
    """hardtanh(x) = clamp(x, -1, 1), with native's gradient: 0 at x = +-1."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clamp(-1.0, 1.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # slope 1 strictly inside (-1, 1), 0 elsewhere (native's convention at the kinks)
        return g * (x.abs() < 1).to(g.dtype)


class InclusiveHardtanh(Hardtanh):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)  # slope 1 at x = +-1, native's hardtanh has 0


class RowMax(torch.autograd.Function):
    """The max of each row, its gradient going to the index torch.max picks (also at a
    tie, where the max has no derivative)."""

    @staticmethod
    def forward(ctx, x):
        values, index = x.max(1)
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return values

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        return grad.scatter(1, index.unsqueeze(1), g.unsqueeze(1))


class MaskRowMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        values = x.amax(1)
        ctx.save_for_backward(x, values)
        return values

    @staticmethod
    def backward(ctx, g):
        x, values = ctx.saved_tensors
        # every entry equal to the max gets the whole gradient: twice it at a tie
        return (x == values.unsqueeze(1)).to(g.dtype) * g.unsqueeze(1)


def _rows_with_ties():
    return (torch.tensor([[1.0, 1.0, 0.0], [2.0, 3.0, 3.0], [0.5, -1.0, 2.0]]),)


ENTRIES = [
    ZooEntry(
        "softmax_without_max_trick",
        "numerics",
        "softmax as exp(x)/sum(exp(x)): inf/inf = nan for large logits",
        NoMaxTrickSoftmax,
        Softmax,
        lambda: (seeded(3, 5),),
        lambda x: torch.softmax(x, -1),
        frozenset({"extreme_values"}),
    ),
    ZooEntry(
        "log_softmax_without_max_trick",
        "numerics",
        "log_softmax as x - log(sum(exp(x))): overflows for large logits",
        NoMaxTrickLogSoftmax,
        LogSoftmax,
        lambda: (seeded(3, 5),),
        lambda x: torch.log_softmax(x, -1),
        frozenset({"extreme_values"}),
    ),
    ZooEntry(
        "log_sigmoid_as_log_of_sigmoid",
        "numerics",
        "log(sigmoid(x)): sigmoid underflows to 0 and the log to -inf for very negative x",
        NaiveLogSigmoid,
        LogSigmoid,
        lambda: (seeded(3, 4),),
        F.logsigmoid,
        frozenset({"extreme_values"}),
    ),
    ZooEntry(
        "tanh_one_minus_y2_in_bf16",
        "numerics",
        "tanh backward evaluates y^2 in bfloat16 before 1 - y^2",
        Bf16SquareTanh,
        Tanh,
        lambda: (seeded(3, 4),),
        torch.tanh,
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "tanh_grad_returned_in_float32",
        "numerics",
        "tanh backward computes and returns a float32 gradient for a float64 input",
        Float32GradTanh,
        Tanh,
        lambda: (seeded(3, 4),),
        torch.tanh,
        frozenset({"grad_shapes"}),
    ),
    ZooEntry(
        "sigmoid_grad_in_half",
        "numerics",
        "sigmoid backward computed in float16 (error ~5e-4, inside gradcheck's rtol 1e-3)",
        HalfGradSigmoid,
        Sigmoid,
        lambda: (seeded(3, 4),),
        torch.sigmoid,
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "layer_norm_half_path_cancellation",
        "numerics",
        "float16 path: variance as E[x^2] - E[x]^2 in float16 (vs a float64 reference)",
        HalfVarianceStandardize,
        Standardize,
        lambda: (seeded(4, 16, shift=50.0),),
        _layer_norm_in_float64,
        frozenset({"reference", "extreme_values"}),
        kwargs={"dtype": torch.float16},
    ),
    ZooEntry(
        "relu_grad_one_at_kink",
        "numerics",
        "relu backward uses x >= 0: gradient 1 at x = 0 where native gives 0",
        KinkReLU,
        ReLU,
        lambda: (seeded(3, 4),),
        torch.relu,
        frozenset({"extreme_values"}),
    ),
    ZooEntry(
        "hardtanh_grad_one_at_boundary",
        "numerics",
        "hardtanh backward uses |x| <= 1: gradient 1 at x = +-1 where native gives 0",
        InclusiveHardtanh,
        Hardtanh,
        lambda: (seeded(3, 4),),
        F.hardtanh,
        frozenset({"extreme_values"}),
    ),
    ZooEntry(
        "max_grad_to_every_tie",
        "numerics",
        "row max backward masks x == max: every tied entry gets the whole gradient",
        MaskRowMax,
        RowMax,
        _rows_with_ties,
        lambda x: x.max(1).values,
        frozenset({"reference"}),
    ),
]
