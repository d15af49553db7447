"""The checks are no weaker than they say: each test plants a bug just outside a check's
tolerance, or where only one part of a check looks, that a weakened check (a tolerance
loosened, a comparison left out) would pass. Found by mutation testing of the checks
(experiments/results/mutation_verify.md)."""

from __future__ import annotations

import torch

from torchbp.verify import check_function


def _x(*shape, dtype=torch.float64):
    return torch.linspace(-2.0, 3.0, int(torch.Size(shape).numel()), dtype=dtype).reshape(shape)


class SigmoidWithBackwardError(torch.autograd.Function):
    """sigmoid whose backward is off: relatively by ``REL`` and absolutely by ``ABS`` in
    every Jacobian entry (the off-diagonal zeros too)."""

    REL = 0.0
    ABS = 0.0

    @staticmethod
    def forward(ctx, x):
        y = torch.sigmoid(x)
        ctx.save_for_backward(y)
        return y

    @classmethod
    def backward(cls, ctx, g):
        (y,) = ctx.saved_tensors
        return g * y * (1 - y) * (1 + cls.REL) + cls.ABS * g.sum()


class RelativeBackwardError(SigmoidWithBackwardError):
    REL = 3e-3  # gradcheck's rtol is 1e-3


class AbsoluteBackwardError(SigmoidWithBackwardError):
    ABS = 5e-5  # gradcheck's atol is 1e-5


def test_gradcheck_fails_a_relative_backward_error_of_three_times_rtol():
    result = check_function(RelativeBackwardError.apply, _x(5), checks="gradcheck")
    assert result["gradcheck"].failed, result


def test_gradcheck_fails_an_absolute_error_of_five_times_atol_in_a_zero_entry():
    result = check_function(AbsoluteBackwardError.apply, _x(5), checks="gradcheck")
    assert result["gradcheck"].failed, result


def test_reference_check_fails_a_float64_output_relatively_off_by_3e_7():
    x = torch.full((4,), 3.0, dtype=torch.float64)  # tanh(3) ~ 1: tolerance ~ 2e-7
    result = check_function(
        lambda t: torch.tanh(t) * (1 + 3e-7), x, reference=torch.tanh, checks="reference"
    )
    assert result["reference"].failed, result


def test_reference_check_fails_a_float32_output_relatively_off_by_3e_5():
    x = torch.full((4,), 3.0)
    result = check_function(
        lambda t: torch.tanh(t) * (1 + 3e-5),
        x,
        reference=torch.tanh,
        checks="reference",
        dtype=torch.float32,
    )
    assert result["reference"].failed, result


def test_reference_check_compares_every_output():
    def second_output_off(t):
        return torch.sin(t), torch.cos(t) * 1.01

    def sin_cos(t):
        return torch.sin(t), torch.cos(t)

    result = check_function(second_output_off, _x(4), reference=sin_cos, checks="reference")
    assert result["reference"].failed and "output 1" in result["reference"].message, result


class SquareCountingBackwards(torch.autograd.Function):
    """x ** 2 whose backward keeps a count on ctx and scales by it: right the first time
    through a graph, doubled the second (retain_graph=True)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.backwards = 0
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ctx.backwards += 1
        return g * 2 * x * ctx.backwards


def test_mutation_compares_a_second_backward_through_the_same_graph():
    result = check_function(SquareCountingBackwards.apply, _x(4), checks="mutation")
    assert result["mutation"].failed, result
    assert "a second backward through the same graph" in result["mutation"].message


class MulBatchingEveryInput(torch.autograd.Function):
    """x * y whose vmap rule assumes every input is batched: vmap with a shared (unbatched,
    ``in_dims=None``) y raises."""

    @staticmethod
    def forward(x, y):
        return x * y

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return g * y, g * x

    @staticmethod
    def vmap(info, in_dims, x, y):
        dx, dy = in_dims
        return MulBatchingEveryInput.apply(x.movedim(dx, 0), y.movedim(dy, 0)), 0


def test_vmap_in_dims_tries_an_unbatched_input():
    report = check_function(
        MulBatchingEveryInput.apply, _x(3, 4), _x(3, 4) + 1, checks=["vmap", "vmap_in_dims"]
    )
    assert report["vmap"].passed and report["vmap_in_dims"].failed, report
    assert "in_dims=None" in report["vmap_in_dims"].message


class MulUnderTheWrongFlag(torch.autograd.Function):
    """x * y whose gradient of x is computed under y's needs_input_grad flag: None when only
    x requires grad (a frozen y)."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return x * y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        gx = g * y if ctx.needs_input_grad[1] else None
        gy = g * x if ctx.needs_input_grad[1] else None
        return gx, gy


def test_needs_input_grad_tries_each_of_two_inputs_alone():
    report = check_function(MulUnderTheWrongFlag.apply, _x(4), _x(4) + 1, checks="needs_input_grad")
    result = report["needs_input_grad"]
    assert result.failed and "only input 0 requires grad" in result.message, report


class SquareWithAFlagFlippedByBackward(torch.autograd.Function):
    """x ** 2 whose forward reads a class flag into ctx that each backward flips: each call
    followed by its backward sees the flag its predecessor left, but of two calls made
    before either backward the second sees the flag the first saw - wrong only for the
    second call."""

    flag = 0

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.flag = SquareWithAFlagFlippedByBackward.flag
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        SquareWithAFlagFlippedByBackward.flag ^= 1
        return g * 2 * x * (1 + ctx.flag)


def test_interleave_compares_the_gradients_of_the_second_call():
    SquareWithAFlagFlippedByBackward.flag = 0
    report = check_function(SquareWithAFlagFlippedByBackward.apply, _x(4), checks="interleave")
    result = report["interleave"]
    assert result.failed and "of the second of two calls" in result.message, report


class FlatCatSplittingAtAFixedOffset(torch.autograd.Function):
    """``cat`` of two flattened inputs whose backward splits grad_output without a copy,
    assuming it starts its storage (offset 0): input 1's gradient is read from storage
    offset ``x.numel()``, wrong for a grad_output that is a slice of a larger buffer (the
    loop over a batch of grad_outputs hands ``v[b]``); input 0's keeps grad_output's own
    offset and is right."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.shapes = (x.shape, y.shape)
        return torch.cat([x.reshape(-1), y.reshape(-1)])

    @staticmethod
    def backward(ctx, g):
        x_shape, y_shape = ctx.shapes
        n = x_shape.numel()
        g = g.contiguous()  # a copy of a strided grad_output starts its storage; a slice not
        gx = g.as_strided((n,), (1,)).view(x_shape)
        gy = g.as_strided((y_shape.numel(),), (1,), n).view(y_shape)
        return gx, gy


def test_batched_grad_compares_the_gradient_of_every_input():
    report = check_function(FlatCatSplittingAtAFixedOffset, _x(3, 4), _x(2, 5))
    result = report["batched_grad"]
    assert result.status == "fail"
    assert "input 1" in result.message
