"""A DP-SGD clip step in the forms a practitioner meets (a non-contiguous input, a batch
of one, gradients zeroed in place, a mix of tied and untied layers): each sample's
gradient clipped and summed as a loop of one-sample backwards gives it, added to what
``p.grad`` held."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchbp
from torchbp.per_sample import per_sample_grads

MAX_NORM = 0.3


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        torchbp.nn.Linear(4, 6),
        nn.Tanh(),
        torchbp.nn.Linear(6, 6),
        nn.Tanh(),
        torchbp.nn.Linear(6, 3),
    ).double()


def _tied() -> nn.Sequential:
    """The middle Linear called twice (one layer), the others once."""
    mlp = _mlp()
    return nn.Sequential(mlp[0], nn.Tanh(), mlp[2], nn.Tanh(), mlp[2], nn.Tanh(), mlp[4])


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction="sum")


def _clipped_sum_by_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list:
    """Σ_i min(1, C/‖g_i‖) g_i per trainable parameter, from one backward per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    sums = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(_loss(model, x[i : i + 1], y[i : i + 1]), params)
        norm = torch.cat([g.flatten() for g in grads]).norm()
        factor = (MAX_NORM / norm).clamp(max=1)
        for total, g in zip(sums, grads):
            total += factor * g
    return sums


_INPUTS = {
    "transposed": lambda: torch.randn(4, 5, dtype=torch.float64).T,
    "strided": lambda: torch.randn(5, 8, dtype=torch.float64)[:, ::2],
    "expanded": lambda: torch.randn(1, 4, dtype=torch.float64).expand(5, 4),
    "one_sample": lambda: torch.randn(1, 4, dtype=torch.float64),
}


@pytest.mark.parametrize("kind", list(_INPUTS))
def test_clip_step_of_an_unusual_input(kind):
    model, x = _mlp(), _INPUTS[kind]()
    y = torch.tensor([0, 1, 2, 0, 1])[: x.shape[0]]
    expected = _clipped_sum_by_loop(model, x, y)
    with per_sample_grads(model, mode="clip", max_norm=MAX_NORM) as ps:
        _loss(model, x, y).backward()
    assert ps.batch_size == x.shape[0]
    for p, clipped in zip(ps.parameters, expected, strict=True):
        torch.testing.assert_close(p.grad, clipped)


@pytest.mark.parametrize("build", [_mlp, _tied], ids=["untied", "tied_and_untied"])
def test_clip_step_adds_to_gradients_zeroed_in_place_or_held(build):
    """After zero_grad(set_to_none=False) and with gradients already there (a previous
    micro-batch's), the clipped sum is added to them, as autograd adds."""
    model = build()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    expected = _clipped_sum_by_loop(model, x, y)
    for held in (False, True):
        model.zero_grad(set_to_none=False)
        if held:
            for p in model.parameters():
                p.grad += 1.0
        with per_sample_grads(model, mode="clip", max_norm=MAX_NORM) as ps:
            _loss(model, x, y).backward()
        for p, clipped in zip(ps.parameters, expected, strict=True):
            torch.testing.assert_close(p.grad, clipped + float(held))
