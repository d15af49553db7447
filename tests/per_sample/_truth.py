"""The ground truth of the tests in this folder: each sample's gradient of its summed
cross-entropy by ``torch.func.vmap(grad)``, and the comparison with a context's results."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def summed_cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction="sum")


def per_sample_truth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """{name: (B, *p.shape)} for the trainable parameters, by torch.func.vmap(grad) of the
    one-sample loss."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def sample_loss(p, xi, yi):
        call = lambda inp: functional_call(model, p, (inp,))  # noqa: E731
        return summed_cross_entropy(call, xi[None], yi[None])

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)


def assert_matches_truth(model: nn.Module, ps, truth: dict) -> None:
    """A ``mode="grads"`` context's norms, ``p.grad_sample`` and ``p.grad`` as ``truth``."""
    norms = torch.stack([g.flatten(1).square().sum(1) for g in truth.values()]).sum(0).sqrt()
    torch.testing.assert_close(ps.norms, norms)
    for name, per_sample in truth.items():
        p = model.get_parameter(name)
        torch.testing.assert_close(p.grad_sample, per_sample)
        torch.testing.assert_close(p.grad, per_sample.sum(0))
