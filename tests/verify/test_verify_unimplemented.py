"""Inputs whose gradient fn does not offer (``checks/unimplemented.py``): a backward that
raises ``NotImplementedError`` when one input requires grad is a usage error naming the
``grad_inputs`` to give, never a run of failed checks."""

from __future__ import annotations

import pytest
import torch
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function, cli


class SquaredErrorWithoutTargetGradient(torch.autograd.Function):
    """Correct: sum((x - t)^2), d/dx = 2 (x - t); the target's gradient is not offered."""

    @staticmethod
    def forward(ctx, x, t):
        ctx.save_for_backward(x, t)
        return ((x - t) ** 2).sum()

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            raise NotImplementedError("SquaredError: no gradient for the target")
        return 2 * g * (x - t), None


class HalfSquaredErrorWithoutTargetGradient(SquaredErrorWithoutTargetGradient):
    """Wrong: the 2 of the square forgotten."""

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            raise NotImplementedError("SquaredError: no gradient for the target")
        return g * (x - t), None


class SquaredErrorTargetGradientOnlyWithInputs(SquaredErrorWithoutTargetGradient):
    """Wrong: the target's gradient is computed from the input's, so backward raises
    NotImplementedError when the target alone requires grad, though it gives it when
    both do (a bug of its ctx.needs_input_grad paths)."""

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        dx = 2 * g * (x - t) if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return dx, None
        if dx is None:
            raise NotImplementedError("SquaredError: the target's gradient needs the input's")
        return dx, -dx


def _reference(x, t):
    return ((x - t) ** 2).sum()


def test_a_gradient_backward_does_not_offer_is_a_usage_error_naming_grad_inputs():
    # before: FAILED in 8 checks, each "NotImplementedError: SquaredError: no gradient
    # for the target", with no word on leaving the target out
    inputs = (seeded(3, 4), seeded(3, 4, seed=1))
    with pytest.raises(ValueError, match="when input 1 requires grad") as info:
        check_function(SquaredErrorWithoutTargetGradient, *inputs, skip=["compile"])
    assert "leave it out with grad_inputs=(0,)" in str(info.value), info.value
    report = check_function(
        SquaredErrorWithoutTargetGradient,
        *inputs,
        reference=_reference,
        grad_inputs=(0,),
        skip=["compile"],
    )
    assert report.ok, report


def test_a_wrong_backward_for_the_inputs_it_offers_still_fails():
    inputs = (seeded(3, 4), seeded(3, 4, seed=1))
    report = check_function(
        HalfSquaredErrorWithoutTargetGradient, *inputs, grad_inputs=(0,), checks=["gradcheck"]
    )
    assert report["gradcheck"].failed, report


def test_a_gradient_refused_only_alone_is_a_failure_not_a_usage_error():
    # before: a usage error advising grad_inputs=(0,), under which the run passes,
    # though backward gives the target's gradient when both inputs require grad
    inputs = (seeded(3, 4), seeded(3, 4, seed=1))
    report = check_function(
        SquaredErrorTargetGradientOnlyWithInputs, *inputs, checks=["needs_input_grad"]
    )
    message = report["needs_input_grad"].message
    assert report["needs_input_grad"].failed and "only input 1 requires grad" in message, report


def test_the_command_line_spells_the_inputs_to_give(tmp_path, capsys, monkeypatch):
    (tmp_path / "losses.py").write_text(
        "from tests.verify.test_verify_unimplemented import SquaredErrorWithoutTargetGradient\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    status = cli.main(
        ["losses:SquaredErrorWithoutTargetGradient", "--inputs", "3,4;3,4", "--no-compile"]
    )
    assert status == 2
    assert "--grad-inputs 0" in capsys.readouterr().err
