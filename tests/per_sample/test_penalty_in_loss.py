"""A penalty on a trainable parameter in the loss (an L2 regularizer) sends it a gradient
that is no sample's: refused, naming the parameter, with the optimizer's weight decay as
the way out; nothing is written to p.grad."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchbp
from torchbp.per_sample import per_sample_grads


def test_l2_penalty_in_the_loss_refused_with_weight_decay_as_the_fix():
    torch.manual_seed(0)
    model = nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(
        RuntimeError, match=r"parameter 2\.(weight|bias) .*penalty term.*weight_decay"
    ):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            penalty = sum(p.square().sum() for p in model.parameters())
            (nn.functional.cross_entropy(model(x), y) + 1e-4 * penalty).backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["norms", "clip"])
def test_input_gradient_penalty_by_torch_func_refused_naming_the_way_out(mode):
    """An input-gradient penalty taken by torch.func.grad inside the context and added to
    the loss: its parameter gradient reaches the weights through ops other than their
    recorded calls, refused naming the gradient penalty and torch.func's per-sample
    gradients as the way to clip such a loss; nothing is written."""
    torch.manual_seed(0)
    model = nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])

    def loss_of(inputs: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(inputs), y, reduction="sum")

    with pytest.raises(RuntimeError, match=r"gradient penalty.*vmap\(grad"):
        with per_sample_grads(model, mode, max_norm=1.0 if mode == "clip" else None):
            (loss_of(x) + 0.1 * torch.func.grad(loss_of)(x).norm()).backward()
    assert all(p.grad is None for p in model.parameters())
