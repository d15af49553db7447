"""The parity checks (``checks/parity.py``): ``reference`` and ``compile`` compare every
tensor fn returns, integer and boolean outputs exactly."""

from __future__ import annotations

import pytest
import torch
from tests.verify.correct_functions import SetupContextTanh, TopValues

from torchbp.verify import check_function


def _x():
    return torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _topk(x, k):
    return torch.topk(x, k, dim=-1)


class OffByOneIndices(TopValues):
    """The right values and gradients, but every index one place off."""

    @staticmethod
    def forward(x, k):
        values, indices = torch.topk(x, k, dim=-1)
        return values, (indices + 1) % x.shape[-1]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward((output[1] - 1) % x.shape[-1])
        ctx.x_shape = x.shape


def test_wrong_integer_output_fails_the_reference_check():
    report = check_function(OffByOneIndices, _x(), 2, reference=_topk, checks=["reference"])
    result = report["reference"]
    assert result.failed, str(report)
    assert result.message.startswith("integer output 0 (int64) differs from the reference"), (
        result.message
    )


def test_integer_outputs_missing_from_the_reference_fail():
    report = check_function(TopValues, _x(), 2, reference=lambda x, k: _topk(x, k)[0])
    result = report["reference"]
    assert result.failed and "1 integer or boolean output(s)" in result.message, str(report)


def test_boolean_output_is_compared_too():
    def positive_part(x):
        return x.clamp(min=0), x > 0

    def wrong_mask(x):
        return x.clamp(min=0), x >= 1

    report = check_function(wrong_mask, _x(), reference=positive_part, checks=["reference"])
    result = report["reference"]
    assert result.failed and "boolean output 0 (bool) differs" in result.message, str(report)
    report = check_function(positive_part, _x(), reference=positive_part, checks=["reference"])
    assert report.ok, str(report)


def test_batch_norm_in_training_mode_passes_compile():
    # the compiled call updates the running statistics in place, which eager BatchNorm
    # saved for its backward: taken after the compiled call, eager fn's gradients raised
    # "a tensor saved for backward was modified in place" and compile failed
    module = torch.nn.BatchNorm1d(5).double()
    result = check_function(module, _x(), checks="compile")["compile"]
    assert result.passed, result


class TanhSquaringItsOutputInBackward(SetupContextTanh):
    """tanh whose backward squares the saved output in place (``y.pow_(2)``): the caller's
    result changes when backward runs, but forward returned tanh."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y.pow_(2))


def test_outputs_are_compared_as_forward_returned_them_not_as_backward_left_them():
    # fn's gradients are taken before the other computation runs; its outputs must be
    # compared as forward returned them: the reference check blamed a right forward
    # ("output 0 differs"), and compile missed that its compiled forward returns tanh**2
    x = torch.linspace(-2, 2, 6, dtype=torch.float64)
    report = check_function(
        TanhSquaringItsOutputInBackward, x, reference=torch.tanh, checks=["compile", "reference"]
    )
    assert "output 0 differs" not in report["reference"].message, report
    assert report["compile"].failed, report
    assert "output 0 differs from torch.compile" in report["compile"].message


class SquareWrongInFloat32(torch.autograd.Function):
    """x², whose backward takes another branch for a float32 grad_output: right in float64."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        factor = 3 if g.dtype == torch.float32 else 2
        return factor * x * g


class SquareInOwnDtype(SquareWrongInFloat32):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_backward_wrong_only_in_float32_fails_reference_dtype_naming_it():
    x = _x().float()  # cast to float64 for every other check, where the backward is right
    report = check_function(SquareWrongInFloat32, x, reference=torch.square, skip=["compile"])
    result = report["reference_dtype"]
    assert not report.ok and [c.name for c in report.failures] == ["reference_dtype"], str(report)
    assert result.message.startswith(
        "in float32 (the inputs' own dtype): gradient of input 0 differs from the reference "
        "(run in float64, rounded)"
    ), result.message


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_correct_function_passes_reference_dtype_in_its_own_dtype(dtype):
    x = _x().to(dtype)
    report = check_function(SquareInOwnDtype, x, reference=torch.square, checks=["reference_dtype"])
    assert report["reference_dtype"].passed, str(report)
    assert report["reference_dtype"].message == f"in {str(dtype).removeprefix('torch.')}"


def test_reference_dtype_is_skipped_when_nothing_was_cast():
    report = check_function(
        SquareInOwnDtype, _x(), reference=torch.square, checks=["reference_dtype"]
    )
    assert report["reference_dtype"].skipped
    assert "no input was cast" in report["reference_dtype"].message


def test_a_deterministic_fn_with_a_nan_output_is_not_taken_for_a_random_one():
    # before: two runs' outputs compared with torch.equal, for which NaN differs from
    # NaN: log of a negative input was taken to draw random numbers, and reference_dtype
    # compared it with the reference run in float32 instead of float64
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    x[0, 0] = -1.0
    report = check_function(torch.log, x, reference=torch.log, checks=["reference_dtype"])
    assert report["reference_dtype"].passed, report
    assert "draws random numbers" not in report["reference_dtype"].caveat


def test_torch_reciprocal_against_itself_passes_reference_dtype_where_its_derivative_overflows():
    # torch.reciprocal's derivative at float16 0.0039 (65746) lies beyond float16's range:
    # its backward gives inf for every grad_output, and the reference run in float64 gives
    # 0.03 * 65746 = 1755 for a random normal grad_output of 0.03, rounded to float16 and
    # finite; before, reference_dtype FAILED torch.reciprocal against itself ('max abs
    # error inf'); grad_outputs of 1 or -1 keep such a gradient beyond the range in both
    x = torch.linspace(0.0036, 0.0039, 20).half()
    checks = ["reference", "reference_dtype"]
    report = check_function(torch.reciprocal, x, reference=torch.reciprocal, checks=checks)
    assert report.ok and report["reference_dtype"].passed, report
