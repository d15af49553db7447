"""per_sample_grads and ``backward(create_graph=True)``.

The context forms ``p.grad`` after the backward, without a graph: a backward with
``create_graph=True`` used to run, leaving ``p.grad`` not differentiable, so that a
gradient penalty built from it silently contributed no gradient. It is refused at its
first Linear backward, before any ``p.grad`` is written.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchbp
from torchbp.per_sample import per_sample_grads

# torch's own warning about backward(create_graph=True)'s reference cycle
pytestmark = pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))


def _loss(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    return nn.functional.cross_entropy(model(x), y, reduction="sum")


@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_create_graph_refused_before_any_gradient_is_written(mode):
    model = _model()
    kwargs = {"max_norm": 1.0} if mode == "clip" else {}
    with pytest.raises(RuntimeError, match=r"create_graph=True through Linear '2'"):
        with per_sample_grads(model, mode, **kwargs):
            _loss(model).backward(create_graph=True)
    assert all(p.grad is None for p in model.parameters())


def test_refused_create_graph_fails_the_context():
    """Caught inside the with block, the refusal still leaves the context failed: a later
    backward in it forms nothing."""
    model = _model()
    with pytest.raises(RuntimeError, match="refused an earlier backward"):
        with per_sample_grads(model) as ps:
            with pytest.raises(RuntimeError, match="create_graph=True"):
                _loss(model).backward(create_graph=True)
            _loss(model).backward()
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_backward_called_with_grad_mode_on_is_not_create_graph():
    """Grad mode at the call (torch.enable_grad around backward) is not create_graph:
    the backward runs with grad mode off, and is recorded as usual."""
    model, reference = _model(), _model()
    with per_sample_grads(model, mode="grads"):
        loss = _loss(model)
        with torch.enable_grad():
            loss.backward()
    _loss(reference).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
        torch.testing.assert_close(p.grad_sample.sum(0), q.grad)


def test_gradient_penalty_refused_naming_the_way_out():
    """A gradient penalty (the input gradient taken with create_graph=True, its norm added
    to the loss): its parameter gradient runs through the Linear backward's own graph,
    which the context does not record, so it is refused at that first backward, naming
    torch.func as the way to clip such a loss per sample; nothing is written."""
    model = _model()
    x, y = torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(RuntimeError, match=r"gradient penalty.*torch\.func.*vmap\(grad"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            (loss + 0.1 * g.norm(dim=1).sum()).backward()
    assert all(p.grad is None for p in model.parameters())


def test_the_named_way_out_clips_a_penalised_loss_per_sample():
    """The way out the refusal names, on the model's torchbp Linears: torch.func's
    per-sample gradients of a loss holding each sample's own input-gradient penalty match
    a loop over the samples, so they can be clipped and summed by hand."""
    from torch.func import functional_call, grad, vmap

    model = _model().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    params = {name: p.detach() for name, p in model.named_parameters()}

    def penalised(params, xi, yi):
        def loss_of(inp):
            out = functional_call(model, params, (inp[None],))
            return nn.functional.cross_entropy(out, yi[None], reduction="sum")

        return loss_of(xi) + 0.1 * grad(loss_of)(xi).norm()

    per_sample = vmap(grad(penalised), in_dims=(None, 0, 0))(params, x, y)
    for i in range(5):
        xi = x[i : i + 1].clone().requires_grad_()
        loss = nn.functional.cross_entropy(model(xi), y[i : i + 1], reduction="sum")
        (g,) = torch.autograd.grad(loss, xi, create_graph=True)
        expected = torch.autograd.grad(loss + 0.1 * g.norm(), list(model.parameters()))
        for (name, _), e in zip(model.named_parameters(), expected):
            torch.testing.assert_close(per_sample[name][i], e)
