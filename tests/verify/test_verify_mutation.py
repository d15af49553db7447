"""The ``mutation`` check (``checks/mutation.py``) beyond what the zoo shows: a tensor
backward reads from a ctx attribute instead of ``ctx.save_for_backward``, written into in
place between forward and backward, gives a silently wrong gradient."""

from __future__ import annotations

import pytest
import torch
from tests.verify.correct_functions import TextbookTanh, TopValues
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function


class SquareKeepingInputOnCtx(torch.autograd.Function):
    """x * x keeping x as ``ctx.x``: ``y = f(h); h.add_(1); y.backward()`` silently
    differentiates at h + 1 (saved with save_for_backward, autograd would raise)."""

    @staticmethod
    def forward(ctx, x):
        ctx.x = x
        return x * x

    @staticmethod
    def backward(ctx, g):
        return 2 * ctx.x * g


class TanhKeepingOutputOnCtx(torch.autograd.Function):
    """tanh keeping its output as ``ctx.y``: an in-place op on the output before backward
    (a following ``relu_``) silently changes the gradient."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.y = y
        return y

    @staticmethod
    def backward(ctx, g):
        return g * (1 - ctx.y * ctx.y)


class TopValuesKeepingIndicesOnCtx(TopValues):
    """:class:`TopValues` keeping its integer indices output as ``ctx.indices``."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _ = inputs
        _, indices = output
        ctx.mark_non_differentiable(indices)
        ctx.indices, ctx.x_shape = indices, x.shape

    @staticmethod
    def backward(ctx, g_values, g_indices):
        dx = g_values.new_zeros(ctx.x_shape)
        return dx.scatter(-1, ctx.indices, g_values), None


@pytest.mark.parametrize(
    ("fn", "inputs", "written"),
    [
        (SquareKeepingInputOnCtx, (seeded(3, 4),), "input 0"),
        (TanhKeepingOutputOnCtx, (seeded(3, 4),), "output 0"),
        (TopValuesKeepingIndicesOnCtx, (seeded(3, 5), 2), "output 1"),
    ],
)
def test_a_tensor_backward_reads_from_a_ctx_attribute_fails_mutation(fn, inputs, written):
    result = check_function(fn, *inputs, checks="mutation")["mutation"]
    assert result.failed, result
    assert f"when {written} is written into in place after forward" in result.message, result
    assert "ctx.save_for_backward" in result.message


@pytest.mark.parametrize(
    ("fn", "inputs"), [(TextbookTanh, (seeded(3, 4),)), (TopValues, (seeded(3, 5), 2))]
)
def test_tensors_saved_with_save_for_backward_pass_mutation(fn, inputs):
    result = check_function(fn, *inputs, checks="mutation")["mutation"]
    assert result.passed, result
    assert "writes after forward seen" in result.message


class ReturningItsScale(torch.nn.Module):
    """``(scale, x * scale)`` with ``scale`` a buffer: a correct module whose first output is
    its own state, which the next call reads again."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((4,), 2.0, dtype=torch.float64))

    def forward(self, x):
        return self.scale, x * self.scale


def test_a_write_into_an_output_fn_keeps_does_not_leak_into_the_next_calls():
    # the write into output 0 (the buffer itself) must be undone before fn is called again
    # to write into output 1, or the gradient of x = scale looks changed by that write
    module = ReturningItsScale()
    result = check_function(module, seeded(3, 4), checks="mutation")["mutation"]
    assert result.passed, result
    assert torch.equal(module.scale, torch.full((4,), 2.0, dtype=torch.float64))
