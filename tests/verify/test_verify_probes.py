"""The ``extreme_values`` check (``checks/probes.py``): a reference that itself overflows on
a probe cannot judge fn there."""

from __future__ import annotations

import torch
from tests.verify.test_verify_numerical import NormalizeRecomputingTheNorm
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function


class StableLogSumExp(torch.autograd.Function):
    """logsumexp over the last dim with the max trick; dx = g * exp(x - y)."""

    @staticmethod
    def forward(ctx, x):
        m = x.amax(-1, keepdim=True)
        y = m.squeeze(-1) + (x - m).exp().sum(-1).log()
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g.unsqueeze(-1) * (x - y.unsqueeze(-1)).exp()


def naive_logsumexp(x):
    """The textbook formula: exp overflows to inf for large x."""
    return x.exp().sum(-1).log()


def test_reference_that_overflows_does_not_fail_a_stable_fn():
    # the reference gives inf (and nan gradients) on the 1e3-scaled probe, where the stable
    # Function is right: before, extreme_values failed it with 'max abs error inf'
    report = check_function(
        StableLogSumExp, seeded(3, 4), reference=naive_logsumexp, checks="extreme_values"
    )
    result = report["extreme_values"]
    assert result.passed, report
    assert "the reference overflowed" in result.message
    # the other way round, the naive formula against a stable reference still fails
    report = check_function(
        naive_logsumexp,
        seeded(3, 4),
        reference=lambda x: torch.logsumexp(x, -1),
        checks="extreme_values",
    )
    assert report["extreme_values"].failed, report
    assert "inputs scaled by 1e3" in report["extreme_values"].message


def test_reference_infinite_on_the_zero_probe_is_still_compared():
    # log(0) = -inf is the reference's exact value, not an overflow: an fn that returns a
    # finite value there differs from it (only the scaled-up probe excuses the reference)
    def log_abs_floored(x):
        return torch.log(x.abs()).clamp(min=-1e3)

    def log_abs(x):
        return torch.log(x.abs())

    result = check_function(
        log_abs_floored, seeded(3, 4), reference=log_abs, checks="extreme_values"
    )["extreme_values"]
    assert result.failed and "inputs set to zero" in result.message, result


class ExpSoftmax(torch.autograd.Function):
    """softmax without the max trick: exp overflows to inf for large inputs."""

    @staticmethod
    def forward(ctx, x):
        e = x.exp()
        y = e / e.sum(-1, keepdim=True)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))


class ReLUPassingGradientAtZero(torch.autograd.Function):
    """relu whose gradient at 0 is 1 (native's is 0): finite everywhere, off at the kink."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x >= 0).to(g.dtype)


def test_the_hint_follows_what_fn_got_wrong():
    # every failure said "overflow or underflow - e.g. exp without the max trick - or
    # another value or gradient at a kink?", a 0/0 in a normalisation included
    import torch.nn.functional as F

    cases = [
        (
            NormalizeRecomputingTheNorm,
            F.normalize,
            "fn gives NaN where the reference is finite: a 0/0",
        ),
        (ExpSoftmax, lambda x: torch.softmax(x, -1), "exp without the max trick"),
        (ReLUPassingGradientAtZero, torch.relu, "gradient at a kink"),
    ]
    for fn, reference, hint in cases:
        report = check_function(fn, seeded(3, 4), reference=reference, checks="extreme_values")
        result = report["extreme_values"]
        assert result.failed, report
        assert hint in result.message, (fn.__name__, result.message)


class ExpMinusOne(torch.autograd.Function):
    """expm1 written as exp(x) - 1: right in float64 for moderate x, but for x near zero in
    float32 the subtraction cancels (x = 1e-6 comes out about 5 % off)."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp() - 1
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (y + 1)


def test_near_zero_probe_compares_small_values_relative_to_their_size():
    # the near-zero probe's outputs are about 1e-6: the float32 absolute tolerance 1e-5
    # accepted any value there, so exp(x) - 1 passed against expm1
    result = check_function(
        ExpMinusOne,
        seeded(3, 4),
        reference=torch.expm1,
        dtype=torch.float32,
        checks="extreme_values",
    )["extreme_values"]
    assert result.failed, result
    assert "inputs scaled by 1e-6" in result.message and "output 0" in result.message, result
    # the accurate formula passes (in float32 too), and so does the cancelling one in
    # float64, where it is accurate to about 1e-10
    assert check_function(torch.expm1, seeded(3, 4), reference=torch.expm1, dtype=torch.float32).ok
    assert check_function(ExpMinusOne, seeded(3, 4), reference=torch.expm1).ok


class ExpReturnedTwice(torch.autograd.Function):
    """(exp(x), exp(x)), one tensor for both outputs; dx = (g1 + g2) * exp(x)."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y, y

    @staticmethod
    def backward(ctx, g1, g2):
        (y,) = ctx.saved_tensors
        return (g1 + g2) * y


def test_a_reference_nan_from_inf_minus_inf_does_not_fail_an_infinite_fn_value():
    # on the 1e3-scaled probe exp overflows: the reference's g1 * inf + g2 * inf is NaN
    # where g1, g2 differ in sign, fn's (g1 + g2) * inf is infinite; before, that failed
    # extreme_values with 'max abs error nan'
    report = check_function(
        ExpReturnedTwice,
        seeded(4, 5),
        reference=lambda x: (x.exp(), x.exp()),
        checks="extreme_values",
    )
    assert report["extreme_values"].passed, report
    assert "the reference overflowed" in report["extreme_values"].message
