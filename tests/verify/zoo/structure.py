"""Autograd structure: double backward cut off, the wrong output non-differentiable, state
outside ctx, a gradient under the wrong needs_input_grad flag, a vmap rule that ignores
in_dims, a wrong jvp."""

from __future__ import annotations

import torch
from tests.verify.zoo.entry import ZooEntry, seeded
from tests.verify.zoo.formulas import Linear
from tests.verify.zoo.numerics import Sigmoid


class DetachingSigmoid(Sigmoid):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (y * (1 - y)).detach()  # the derivative w.r.t. x of backward is lost


class NoGradBackwardSigmoid(Sigmoid):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        with torch.no_grad():  # double backward sees a constant: silently zero
            return g * y * (1 - y)


class LogSoftmaxAndProbs(torch.autograd.Function):
    """(log_softmax(x), softmax(x)), both differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        logp = torch.log_softmax(x, -1)
        return logp, logp.exp()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, g_logp, g_p):
        (p,) = ctx.saved_tensors
        # through logp: g - p sum(g); through p: p (g_p - sum(g_p p))
        dx = g_logp - p * g_logp.sum(-1, keepdim=True)
        return dx + p * (g_p - (g_p * p).sum(-1, keepdim=True))


class ProbsMarkedNonDiff(LogSoftmaxAndProbs):
    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])  # meant for logged metrics, but used in losses


class LogSoftmaxAndProbsNoneGrads(torch.autograd.Function):
    """(log_softmax(x), softmax(x)) with ``set_materialize_grads(False)``: backward skips
    the work of an output that got no gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        logp = torch.log_softmax(x, -1)
        return logp, logp.exp()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, g_logp, g_p):
        (p,) = ctx.saved_tensors
        if g_logp is None and g_p is None:
            return None
        # dp = p dlogp: fold g_p into a gradient of logp, then through log_softmax
        if g_p is None:
            g = g_logp
        elif g_logp is None:
            g = p * g_p
        else:
            g = g_logp + p * g_p
        return g - p * g.sum(-1, keepdim=True)


class BothGradsFoldedWithoutP(LogSoftmaxAndProbsNoneGrads):
    """Folds g_p into g_logp without the factor p, only when both outputs get gradients
    (the branches for one output alone, which gradcheck differentiates, are right)."""

    @staticmethod
    def backward(ctx, g_logp, g_p):
        (p,) = ctx.saved_tensors
        if g_logp is None and g_p is None:
            return None
        if g_p is None:
            g = g_logp
        elif g_logp is None:
            g = p * g_p
        else:
            g = g_logp + g_p  # bug: p * g_p
        return g - p * g.sum(-1, keepdim=True)


def _log_softmax_and_probs(x):
    return torch.log_softmax(x, -1), torch.softmax(x, -1)


class ClassStateLinear(Linear):
    """Keeps x and W on the class: a second call before backward replaces them."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ClassStateLinear.saved = (x.detach(), w.detach())

    @staticmethod
    def backward(ctx, g):
        x, w = ClassStateLinear.saved
        return g @ w, g.t() @ x, g.sum(0)


class RowSoftmax(torch.autograd.Function):
    """softmax(x, dim) with a hand-written vmap rule."""

    @staticmethod
    def forward(x, dim):
        return torch.softmax(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # dL/dx = y (g - sum(g y)) along dim
        return y * (g - (g * y).sum(ctx.dim, keepdim=True)), None

    @staticmethod
    def vmap(info, in_dims, x, dim):
        # move the batch dim first: dim then counts one further
        x = x.movedim(in_dims[0], 0)
        return RowSoftmax.apply(x, dim % (x.dim() - 1) + 1), 0


class InDimsZeroSoftmax(RowSoftmax):
    @staticmethod
    def vmap(info, in_dims, x, dim):
        return InDimsZeroSoftmax.apply(x, dim % (x.dim() - 1) + 1), 0  # assumes in_dims 0


class JvpSigmoid(Sigmoid):
    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        # d sigmoid = y (1 - y) dx
        return t * y * (1 - y)


class WrongJvpSigmoid(JvpSigmoid):
    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y)  # the factor y is missing


class FlagCheckingLinear(Linear):
    """Computes only the gradients autograd asks for (``ctx.needs_input_grad``)."""

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dx = g @ w if ctx.needs_input_grad[0] else None
        dw = g.t() @ x if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


class BiasGradUnderWeightFlagLinear(Linear):
    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dx = g @ w if ctx.needs_input_grad[0] else None
        dw = g.t() @ x if ctx.needs_input_grad[1] else None
        db = g.sum(0) if ctx.needs_input_grad[1] else None  # the weight's flag: [2] meant
        return dx, dw, db


ENTRIES = [
    ZooEntry(
        "backward_detaches_derivative",
        "structure",
        "sigmoid backward detaches y(1 - y): double backward silently wrong",
        DetachingSigmoid,
        Sigmoid,
        lambda: (seeded(3, 4),),
        torch.sigmoid,
        frozenset({"gradgradcheck"}),
    ),
    ZooEntry(
        "backward_under_no_grad",
        "structure",
        "sigmoid backward runs under no_grad: double backward silently zero",
        NoGradBackwardSigmoid,
        Sigmoid,
        lambda: (seeded(3, 4),),
        torch.sigmoid,
        frozenset({"gradgradcheck"}),
    ),
    ZooEntry(
        "wrong_output_non_differentiable",
        "structure",
        "(log_softmax, softmax) marks the probabilities non-differentiable",
        ProbsMarkedNonDiff,
        LogSoftmaxAndProbs,
        lambda: (seeded(3, 5),),
        _log_softmax_and_probs,
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "both_grads_branch_wrong",
        "structure",
        "(log_softmax, softmax) with None grads handled: the branch for both grads drops p",
        BothGradsFoldedWithoutP,
        LogSoftmaxAndProbsNoneGrads,
        lambda: (seeded(3, 5),),
        None,  # without a reference: gradcheck alone must see it
        frozenset({"gradcheck"}),
    ),
    ZooEntry(
        "state_on_the_class",
        "structure",
        "linear keeps x and W on the class instead of ctx: two calls before backward mix up",
        ClassStateLinear,
        Linear,
        lambda: (seeded(3, 4), seeded(5, 4, seed=1), seeded(5, seed=2)),
        torch.nn.functional.linear,
        frozenset({"interleave"}),
    ),
    ZooEntry(
        "bias_grad_under_weight_flag",
        "structure",
        "linear computes db under needs_input_grad[1]: a frozen weight silently freezes the bias",
        BiasGradUnderWeightFlagLinear,
        FlagCheckingLinear,
        lambda: (seeded(3, 4), seeded(5, 4, seed=1), seeded(5, seed=2)),
        torch.nn.functional.linear,
        frozenset({"needs_input_grad"}),
    ),
    ZooEntry(
        "vmap_rule_ignores_in_dims",
        "structure",
        "softmax's vmap staticmethod assumes the batch dim is 0",
        InDimsZeroSoftmax,
        RowSoftmax,
        lambda: (seeded(3, 5), 1),
        torch.softmax,
        frozenset({"vmap_in_dims"}),
    ),
    ZooEntry(
        "wrong_jvp",
        "structure",
        "sigmoid jvp t(1 - y) instead of t y (1 - y)",
        WrongJvpSigmoid,
        JvpSigmoid,
        lambda: (seeded(3, 4),),
        torch.sigmoid,
        frozenset({"forward_ad"}),
    ),
]
