"""The ``'mean'`` of cross_entropy / nll_loss where every row counts 1: on the CPU one
reduction node (``rows.mean()``) above the loss Function, not a sum and a division, with
the bits of ``Σ ℓ_i / M`` and of its gradient unchanged; the weighted mean's bits
(``Σ ℓ_i / W``) and a reduced nll_loss's double backward, guards for any change to where
the reduction runs."""

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


@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("rows", [64, 4099])
@pytest.mark.parametrize("ignore_index", [3, -100], ids=["some-ignored", "none-ignored"])
def test_weighted_mean_has_the_bits_of_the_rows_summed_over_the_target_weights(
    op, rows, ignore_index
):
    # 'mean' = Σ_i ℓ_i / W with W = Σ_{kept i} w_{y_i}: the bits of the 'none' rows' sum
    # divided by W, and of its gradient (a guard for a reduction moved into the Function,
    # and for W summed without a mask where no target is ignored)
    weight = torch.linspace(0.5, 2.0, 7)
    loss, z = _call(op, rows, weight=weight, ignore_index=ignore_index)
    loss.backward()
    losses, z_rows = _call(op, rows, weight=weight, ignore_index=ignore_index, reduction="none")
    gen = torch.Generator().manual_seed(rows)  # _call's target again
    torch.randn(rows, 7, generator=gen)
    target = torch.randint(0, 7, (rows,), generator=gen)
    total = torch.where(target != ignore_index, weight[target], 0.0).sum()
    (losses.sum() / total).backward()
    torch.testing.assert_close(loss, losses.sum() / total, rtol=0, atol=0)
    torch.testing.assert_close(z.grad, z_rows.grad, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_nll_double_backward_of_a_reduced_loss_is_natives(reduction, dtype):
    # the gradient -w_y g / W is attached to logp's graph: its derivative w.r.t. logp is
    # zeros, in logp's dtype, as native's (loss, gradient and double gradient all match)
    weight = torch.linspace(0.5, 2.0, 4, dtype=dtype)
    target = torch.tensor([0, 3, 1, -100, 2])
    grads = []
    for fn in (TF.nll_loss, torch.nn.functional.nll_loss):
        logp = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
        logp.requires_grad_()
        loss = fn(logp, target, weight, reduction=reduction)
        (g,) = torch.autograd.grad(loss, logp, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), logp, allow_unused=True, materialize_grads=True)
        grads.append((loss, g, gg))
    for ours, native in zip(*grads, strict=True):
        assert ours.dtype == native.dtype
        torch.testing.assert_close(ours, native)
