"""The ``'mean'`` of cross_entropy / nll_loss where every row counts 1: on the CPU one
reduction node (``rows.mean()``) above the loss Function, not a sum and a division, with
the bits of ``Σ ℓ_i / M`` and of its gradient unchanged."""

from __future__ import annotations

import pytest
import torch

import torchbp.functional as TF
from torchbp.autograd import CrossEntropyFunction, NLLLossFunction


def _call(op: str, rows: int, **kwargs):
    """``(loss, input)`` of ``op`` on ``rows`` random float32 rows of 7 classes (CPU)."""
    gen = torch.Generator().manual_seed(rows)
    z = torch.randn(rows, 7, generator=gen, requires_grad=True)
    target = torch.randint(0, 7, (rows,), generator=gen)
    if op == "nll_loss":
        return TF.nll_loss(z.log_softmax(1), target, **kwargs), z
    return TF.cross_entropy(z, target, **kwargs), z


@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
def test_mean_is_one_node_above_the_loss_function(op):
    loss, _ = _call(op, 64)
    below = loss.grad_fn.next_functions[0][0]
    function = CrossEntropyFunction if op == "cross_entropy" else NLLLossFunction
    assert type(below).__name__ == f"{function.__name__}Backward"


@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("rows", [0, 1, 5, 64, 257, 4099])
def test_mean_has_the_bits_of_the_row_sum_over_the_row_count(op, rows):
    loss, z = _call(op, rows)
    loss.backward()
    summed, z_summed = _call(op, rows, reduction="sum")
    (summed / rows).backward()
    torch.testing.assert_close(loss, summed / rows, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(z.grad, z_summed.grad, rtol=0, atol=0)
