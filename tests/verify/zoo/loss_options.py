"""Loss options handled in forward but not (or wrongly) in backward: ignore_index, label
smoothing, class weights, reduction='none'."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tests.verify.zoo.entry import ZooEntry, seeded

IGNORE = -100


def _targets(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


class NLLLossIgnoreIndex(torch.autograd.Function):
    """nll_loss(logp, t, ignore_index=-100), mean over the rows that are not ignored."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logp, t):
        keep = t != IGNORE
        picked = logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
        return -(picked * keep).sum() / keep.sum()

    @staticmethod
    def setup_context(ctx, inputs, output):
        logp, t = inputs
        ctx.save_for_backward(t)
        ctx.shape = logp.shape

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        keep = t != IGNORE
        # dL/dlogp[i, t_i] = -g / n_kept for kept rows, 0 elsewhere
        onehot = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        onehot.scatter_(1, t.clamp(min=0).unsqueeze(1), 1.0)
        return -g * onehot * keep.unsqueeze(1) / keep.sum(), None


class IgnoredRowsGetGradNLLLoss(NLLLossIgnoreIndex):
    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        keep = t != IGNORE
        onehot = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        onehot.scatter_(1, t.clamp(min=0).unsqueeze(1), 1.0)
        return -g * onehot / keep.sum(), None  # ignored rows get gradient at class 0


class DividedByAllRowsNLLLoss(NLLLossIgnoreIndex):
    """Forward and backward consistent, but the mean divides by all rows, ignored ones too."""

    @staticmethod
    def forward(logp, t):
        keep = t != IGNORE
        picked = logp.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
        return -(picked * keep).sum() / t.numel()

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        keep = t != IGNORE
        onehot = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        onehot.scatter_(1, t.clamp(min=0).unsqueeze(1), 1.0)
        return -g * onehot * keep.unsqueeze(1) / t.numel(), None


SMOOTHING = 0.1


class SmoothedCrossEntropy(torch.autograd.Function):
    """cross_entropy(x, t, label_smoothing=0.1), mean over rows."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, t):
        logp = torch.log_softmax(x, -1)
        n_classes = x.shape[-1]
        target = F.one_hot(t, n_classes).to(x.dtype) * (1 - SMOOTHING) + SMOOTHING / n_classes
        return -(target * logp).sum() / x.shape[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t = inputs
        ctx.save_for_backward(x, t)

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        n_classes = x.shape[-1]
        # dL/dx = (softmax(x) - smoothed one-hot) / N
        target = F.one_hot(t, n_classes).to(x.dtype) * (1 - SMOOTHING) + SMOOTHING / n_classes
        return g * (torch.softmax(x, -1) - target) / x.shape[0], None


class SmoothingForgottenCrossEntropy(SmoothedCrossEntropy):
    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        target = F.one_hot(t, x.shape[-1]).to(x.dtype)  # the plain one-hot: smoothing forgotten
        return g * (torch.softmax(x, -1) - target) / x.shape[0], None


class WeightedCrossEntropy(torch.autograd.Function):
    """cross_entropy(x, t, weight=w), mean = sum of w_t * loss / sum of w_t."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, t, w):
        logp = torch.log_softmax(x, -1)
        wt = w[t]
        return -(wt * logp.gather(1, t.unsqueeze(1)).squeeze(1)).sum() / wt.sum()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, w = inputs
        ctx.save_for_backward(x, t, w)

    @staticmethod
    def backward(ctx, g):
        x, t, w = ctx.saved_tensors
        wt = w[t]
        # dL/dx_i = w_{t_i} (softmax(x_i) - onehot(t_i)) / sum of w_t
        delta = torch.softmax(x, -1) - F.one_hot(t, x.shape[-1]).to(x.dtype)
        return g * wt.unsqueeze(1) * delta / wt.sum(), None, None


class WeightsForgottenCrossEntropy(WeightedCrossEntropy):
    @staticmethod
    def backward(ctx, g):
        x, t, w = ctx.saved_tensors
        delta = torch.softmax(x, -1) - F.one_hot(t, x.shape[-1]).to(x.dtype)
        return g * delta / x.shape[0], None, None  # unweighted mean's gradient


class NLLLossNoReduction(torch.autograd.Function):
    """nll_loss(logp, t, reduction='none'): one loss per row."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logp, t):
        return -logp.gather(1, t.unsqueeze(1)).squeeze(1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logp, t = inputs
        ctx.save_for_backward(t)
        ctx.shape = logp.shape

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        # dL_i/dlogp[i, t_i] = -g_i
        onehot = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        onehot.scatter_(1, t.unsqueeze(1), 1.0)
        return -g.unsqueeze(1) * onehot, None


class CollapsedGradNLLLoss(NLLLossNoReduction):
    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        onehot = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        onehot.scatter_(1, t.unsqueeze(1), 1.0)
        return -g.mean() * onehot, None  # per-row grad_output collapsed (right for all-ones)


def _logp():
    return torch.log_softmax(seeded(5, 4), -1)


ENTRIES = [
    ZooEntry(
        "nll_ignored_rows_get_grad",
        "loss_options",
        "nll_loss backward gives ignore_index rows a gradient (mask forgotten)",
        IgnoredRowsGetGradNLLLoss,
        NLLLossIgnoreIndex,
        lambda: (_logp(), _targets(1, IGNORE, 3, 0, IGNORE)),
        lambda logp, t: F.nll_loss(logp, t, ignore_index=IGNORE),
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "nll_mean_counts_ignored_rows",
        "loss_options",
        "nll_loss mean divides by all rows, ignored ones included (forward and backward)",
        DividedByAllRowsNLLLoss,
        NLLLossIgnoreIndex,
        lambda: (_logp(), _targets(1, IGNORE, 3, 0, IGNORE)),
        lambda logp, t: F.nll_loss(logp, t, ignore_index=IGNORE),
        frozenset({"reference", "extreme_values"}),
    ),
    ZooEntry(
        "ce_label_smoothing_forgotten_in_backward",
        "loss_options",
        "cross_entropy backward uses the plain one-hot, not the smoothed target",
        SmoothingForgottenCrossEntropy,
        SmoothedCrossEntropy,
        lambda: (seeded(5, 4), _targets(1, 2, 3, 0, 1)),
        lambda x, t: F.cross_entropy(x, t, label_smoothing=SMOOTHING),
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "ce_class_weights_forgotten_in_backward",
        "loss_options",
        "cross_entropy backward ignores the class weights",
        WeightsForgottenCrossEntropy,
        WeightedCrossEntropy,
        lambda: (
            seeded(5, 4),
            _targets(1, 2, 3, 0, 1),
            torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64),
        ),
        lambda x, t, w: F.cross_entropy(x, t, weight=w),
        frozenset({"gradcheck", "reference"}),
        kwargs={"grad_inputs": [0]},
    ),
    ZooEntry(
        "nll_reduction_none_collapses_grad_output",
        "loss_options",
        "reduction='none' backward uses grad_output.mean() for every row",
        CollapsedGradNLLLoss,
        NLLLossNoReduction,
        lambda: (_logp(), _targets(1, 2, 3, 0, 1)),
        lambda logp, t: F.nll_loss(logp, t, reduction="none"),
        frozenset({"gradcheck", "reference"}),
    ),
]
