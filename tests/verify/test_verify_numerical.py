"""The numerical checks (``checks/numerical.py``) beyond what the zoo shows: a backward that
is right for each output alone but wrong when several outputs get a gradient at once."""

from __future__ import annotations

import torch
from tests.verify.correct_functions import MaterializeFalseSplit
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function


class SplitForgetsFactorWhenBothGrads(torch.autograd.Function):
    """``(2x, sin x)`` with ``set_materialize_grads(False)``, as the tutorial handles None
    grads; the branch for both gradients defined forgets the 2. Each output alone (what
    torch's gradcheck differentiates, the other grad None) gets the right gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return x * 2, x.sin()

    @staticmethod
    def backward(ctx, g_double, g_sin):
        (x,) = ctx.saved_tensors
        if g_double is None and g_sin is None:
            return None
        if g_sin is None:
            return 2 * g_double
        if g_double is None:
            return x.cos() * g_sin
        return g_double + x.cos() * g_sin  # bug: 2 * g_double


def test_backward_wrong_only_when_all_outputs_get_a_gradient_fails_gradcheck():
    report = check_function(SplitForgetsFactorWhenBothGrads, seeded(3, 4), checks="gradcheck")
    result = report["gradcheck"]
    assert result.failed, report
    assert "all 2 outputs at once" in result.message
    assert "input 0" in result.message


def test_correct_multi_output_backward_passes_the_joint_comparison():
    report = check_function(MaterializeFalseSplit, seeded(3, 4), checks="gradcheck")
    assert report["gradcheck"].passed, report
