"""per_sample_grads with Linear parameters of shapes linear accepts but the per-sample
formulas do not: a broadcast bias ((1,), 0-dim, (1, out)) and a 1-D weight.

A trainable broadcast bias used to crash while the results were written (torch's "a
gradient of size [3] to a tensor of size [1]", after other parameters' p.grad were
written), or inside the formulas, or to give ``p.grad_sample`` of the wrong shape; a 1-D
weight was refused at the backward as a weight "other than its own parameter". Both are
now refused at creation, naming the module and the shape; a frozen broadcast bias is fine.
"""

from __future__ import annotations

import pytest
import torch
from tests.per_sample._truth import assert_matches_truth, per_sample_truth, summed_cross_entropy
from torch import nn

import torchbp
from torchbp.per_sample import per_sample_grads


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3)).double()


@pytest.mark.parametrize("shape", [(1,), (), (1, 3)], ids=str)
def test_trainable_broadcast_bias_refused_at_creation(shape):
    model = _model()
    model[2].bias = nn.Parameter(torch.zeros(shape, dtype=torch.double))
    model(torch.randn(5, 4, dtype=torch.double))  # linear itself takes it
    shown = str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"'2' \(Linear\) has a trainable bias of shape {shown}"):
        per_sample_grads(model, mode="grads")


def test_one_dimensional_weight_refused_at_creation():
    model = _model()
    model[2] = torchbp.nn.Linear(6, 1, bias=False).double()
    model[2].weight = nn.Parameter(torch.randn(6, dtype=torch.double))
    with pytest.raises(ValueError, match=r"'2' \(Linear\) has a 1-D weight of shape \(6,\)"):
        per_sample_grads(model)


def test_frozen_broadcast_bias_works():
    """Only the weights and the first bias are accounted for, as torch.func gives them."""
    model = _model()
    model[2].bias = nn.Parameter(torch.randn(1, dtype=torch.double), requires_grad=False)
    x, y = torch.randn(5, 4, dtype=torch.double), torch.tensor([0, 1, 2, 0, 1])
    truth = per_sample_truth(model, x, y)
    with per_sample_grads(model, mode="grads") as ps:
        summed_cross_entropy(model, x, y).backward()
    assert_matches_truth(model, ps, truth)
    assert model[2].bias.grad is None
