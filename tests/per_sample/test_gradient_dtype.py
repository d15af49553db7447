"""``p.grad_dtype`` (torch's option to keep, say, float32 gradients of a bfloat16
parameter, as mixed-precision training's main gradients): autograd forms ``p.grad`` in it
and refuses any other dtype. The context cast its gradients to ``p.dtype`` and assigning
them raised torch's grad_dtype error (after writing the parameters before it, had some
no grad_dtype); ``add_noise`` made a zero ``p.grad`` of ``p.dtype`` for an unreached
parameter, refused too. Both now follow ``p.grad_dtype``, as autograd does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchbp
from torchbp.per_sample import per_sample_grads

pytestmark = pytest.mark.skipif(
    not hasattr(nn.Parameter(torch.zeros(1)), "grad_dtype"),
    reason="this torch has no Tensor.grad_dtype",
)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))
    return model.bfloat16()


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).float(), y, reduction="sum")


@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_gradients_formed_in_the_parameters_grad_dtype(mode):
    x, y = torch.randn(8, 4).bfloat16(), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    max_norm = 0.5 if mode == "clip" else None
    plain, main = _model(), _model()
    for p in main[0].parameters():  # the first layer's only, whose p.grad is written last
        p.grad_dtype = torch.float32
    with per_sample_grads(plain, mode, max_norm):
        _loss(plain, x, y).backward()
    with per_sample_grads(main, mode, max_norm):
        _loss(main, x, y).backward()
    for p, q in zip(plain.parameters(), main.parameters()):
        assert q.grad.dtype == (q.grad_dtype or q.dtype)
        torch.testing.assert_close(q.grad.to(p.dtype), p.grad, atol=0.02, rtol=0.02)


def test_add_noise_makes_a_missing_gradient_in_the_grad_dtype():
    model, x = _model(), torch.randn(8, 4).bfloat16()
    for p in model.parameters():
        p.grad_dtype = torch.float32
    with per_sample_grads(model, "clip", 0.5) as ps:
        # the backward reaches the last layer only: the first one gets the noise alone
        _loss(model, x, torch.zeros(8, dtype=torch.long)).backward(
            inputs=list(model[2].parameters())
        )
        ps.add_noise(1.0, generator=torch.Generator().manual_seed(0))
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(bool(p.grad.ne(0).any()) for p in model[0].parameters())


def test_noise_std_checked_against_the_gradients_dtype_not_the_parameters():
    """A float16 parameter with float32 gradients takes noise of std 1e5, beyond float16's
    largest number (65504) but not float32's: it was refused by the parameter's dtype."""
    model = _model().half()
    for p in model.parameters():
        p.grad_dtype = torch.float32
    with per_sample_grads(model, "clip", 1.0) as ps:
        _loss(model, torch.randn(8, 4).half(), torch.zeros(8, dtype=torch.long)).backward()
        ps.add_noise(1e5, generator=torch.Generator().manual_seed(0))
    assert all(bool(p.grad.isfinite().all()) for p in model.parameters())
    assert max(float(p.grad.abs().max()) for p in model.parameters()) > 65504


@pytest.mark.parametrize("mode", ["norms", "clip"])
def test_a_weight_stored_transposed_gets_its_gradient_in_the_grad_dtype(mode):
    """A new p.grad takes the strides of a weight stored transposed, as autograd's does;
    that copy was made in p.dtype, so a float32 grad_dtype of a bfloat16 weight raised
    torch's grad_dtype error (after writing the later layers' p.grad)."""
    x, y = torch.randn(8, 4).bfloat16(), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model = _model()
    model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())
    for p in model.parameters():
        p.grad_dtype = torch.float32
    _loss(model, x, y).backward()
    expected = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with per_sample_grads(model, mode, 1e6 if mode == "clip" else None):
        _loss(model, x, y).backward()
    weight = model[0].weight
    assert (weight.grad.dtype, weight.grad.stride()) == (torch.float32, weight.stride())
    for p, grad in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, grad, atol=0.02, rtol=0.02)
