"""Functions with a restricted domain (log, sqrt, acos, one refusing non-positive inputs):
a correct one passes on inputs inside its domain, and gets a usage error saying how to give
such inputs - never a failed check - on inputs outside it; from the command line a range
after the shape (``4,5[0.1,2]``) draws them inside."""

from __future__ import annotations

import pytest
import torch
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function, cli
from torchbp.verify.target import TargetError, parse_inputs

FAST_CHECKS = ["forward", "gradcheck", "reference", "extreme_values"]


class Log(torch.autograd.Function):
    """Correct: d log(x)/dx = 1/x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.log()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / x


class Acos(torch.autograd.Function):
    """Correct: d acos(x)/dx = -1/sqrt(1 - x^2)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.acos()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return -g / (1 - x * x).sqrt()


class StrictSqrt(torch.autograd.Function):
    """Correct, refusing non-positive inputs with a ValueError: d sqrt(x)/dx = 1/(2 sqrt(x))."""

    @staticmethod
    def forward(ctx, x):
        if bool((x <= 0).any()):
            raise ValueError("StrictSqrt: x must be positive")
        y = x.sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g / (2 * y)


class HalfStrictSqrt(StrictSqrt):
    """Wrong: the 2 of 1/(2 sqrt(x)) missing."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g / y


class NanLog(torch.autograd.Function):
    """Wrong: log(x) computed as log(x - 1) + log1p(1/(x - 1)), NaN for x < 1 where the
    reference is finite."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x - 1).log() + torch.log1p(1 / (x - 1))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / x


def positive(*shape: int) -> torch.Tensor:
    return seeded(*shape).abs() + 0.1


@pytest.mark.parametrize(
    ("fn", "reference", "x"),
    [
        (Log, torch.log, positive(3, 4)),
        (Acos, torch.acos, seeded(3, 4).clamp(-0.9, 0.9)),
        (StrictSqrt, torch.sqrt, positive(3, 4)),
    ],
)
def test_a_correct_restricted_domain_function_passes_inside_its_domain(fn, reference, x):
    # before: StrictSqrt failed extreme_values ("fn failed on inputs set to zero, where the
    # reference works"): its ValueError for a probe outside its domain was taken for a crash
    report = check_function(fn, x, reference=reference, checks=FAST_CHECKS)
    assert report.ok, report


def test_a_probe_refused_with_a_value_error_is_named_in_the_note():
    report = check_function(StrictSqrt, positive(3, 4), reference=torch.sqrt, checks=FAST_CHECKS)
    assert "fn refused inputs set to zero" in report["extreme_values"].message, report


@pytest.mark.parametrize(
    ("fn", "reference"), [(Log, torch.log), (Acos, torch.acos), (Log, None), (StrictSqrt, None)]
)
def test_inputs_outside_the_domain_are_a_usage_error_saying_how_to_give_others(fn, reference):
    # before: gradcheck failed against NaN central differences (log, acos), or forward
    # failed with the Function's own ValueError (StrictSqrt): FAILED for a right backward
    with pytest.raises(ValueError, match="domain") as info:
        check_function(fn, seeded(3, 4, scale=2.0), reference=reference, checks=FAST_CHECKS)
    assert "x.abs() + 0.1" in str(info.value)


def test_a_wrong_backward_of_a_restricted_domain_function_still_fails():
    report = check_function(HalfStrictSqrt, positive(3, 4), checks=["gradcheck"])
    assert report["gradcheck"].failed, report


def test_nan_where_the_reference_is_finite_is_fns_fault_not_the_domains():
    report = check_function(NanLog, positive(3, 4), reference=torch.log, checks=FAST_CHECKS)
    assert not report.ok, report


def test_a_range_after_the_shape_draws_uniform_values_inside_it():
    x, y = parse_inputs("200[0.5,2];float32:3,4[-0.9,0.9]")
    assert bool((x >= 0.5).all()) and bool((x <= 2).all()) and x.std() > 0.3
    assert y.dtype == torch.float32 and tuple(y.shape) == (3, 4) and bool((y.abs() <= 0.9).all())


@pytest.mark.parametrize("item", ["3[1,0]", "3[a,2]", "3[1,2", "3[1,2]x", "3[1]", "3[nan,1]"])
def test_a_malformed_range_is_a_usage_error(item):
    with pytest.raises(TargetError, match=r"SHAPE\[LO,HI\]"):
        parse_inputs(item)


def test_the_command_line_checks_a_restricted_domain_function_on_a_range(capsys):
    argv = [f"{__name__}:StrictSqrt", "--inputs", "3,4[0.1,2]", "--reference", "torch:sqrt"]
    assert cli.main([*argv, "--no-compile"]) == 0, capsys.readouterr()


def test_the_command_line_advises_a_range_when_fn_refuses_drawn_inputs(capsys):
    code = cli.main([f"{__name__}:StrictSqrt", "--inputs", "3,4", "--no-compile"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--inputs '4,5[0.1,2]'" in err


class StrictLogWithVmapRule(torch.autograd.Function):
    """Correct, refusing non-positive inputs, with setup_context and a generated vmap rule:
    d log(x)/dx = 1/x."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        if bool((x <= 0).any()):
            raise ValueError("StrictLogWithVmapRule: x must be positive")
        return x.log()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / x


def test_a_domain_check_vmap_cannot_run_fails_vmap_saying_how_to_write_it():
    # before: PyTorch's bare "data-dependent control flow" error; fn offers vmap
    # (generate_vmap_rule) and vmap of it raises, a failure of fn's, now with the fix
    report = check_function(StrictLogWithVmapRule, positive(3, 4), checks=["vmap"])
    assert report["vmap"].failed, report
    assert "torch.where" in report["vmap"].message, report["vmap"].message


def _one_near_zero(*shape: int) -> torch.Tensor:
    x = positive(*shape)
    x[0, 0] = 3e-7  # within gradcheck's eps (1e-6) of 0, the edge of a log's domain
    return x


@pytest.mark.parametrize("fn", [Log, StrictSqrt])
def test_an_input_within_eps_of_the_domain_edge_is_a_usage_error_naming_eps(fn):
    # before: gradcheck failed with fn's ValueError at the input shifted by -eps
    # (StrictSqrt) or against a NaN numerical gradient (Log): FAILED for a right backward
    with pytest.raises(ValueError, match="within eps of the edge of fn's domain") as info:
        check_function(fn, _one_near_zero(3, 4), checks=["gradcheck"])
    assert "shifted by -1e-06" in str(info.value) and "eps=1e-08" in str(info.value)
    report = check_function(fn, _one_near_zero(3, 4), checks=["gradcheck"], eps=1e-8)
    assert report.ok, report


def test_a_wrong_backward_near_the_domain_edge_still_fails():
    report = check_function(HalfStrictSqrt, _one_near_zero(3, 4), checks=["gradcheck"], eps=1e-8)
    assert report["gradcheck"].failed, report


class MaxNormalized(torch.autograd.Function):
    """x / max|x|, the max read as a Python number (a quantizer's scale) and taken for a
    constant by backward (a surrogate: d(x / s)/dx = 1/s with s fixed)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x / x.abs().max().item()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[0].abs().max().item()

    @staticmethod
    def backward(ctx, g):
        return g / ctx.scale


def test_an_item_call_vmap_cannot_run_fails_vmap_saying_how_to_write_it():
    # before: PyTorch's bare "calling .item() on a Tensor" error
    report = check_function(MaxNormalized, seeded(3, 4), checks=["vmap"])
    assert report["vmap"].failed, report
    assert "amax()" in report["vmap"].message, report["vmap"].message
