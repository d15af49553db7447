"""per_sample_grads with a Linear whose weight or bias is a tensor but not an nn.Parameter.

Such a tensor is left in a module by ``torch.func.functional_call`` (a module listed twice
in the model, torch 2.13) or assigned by a user after ``del lin.weight``. It used to fail
deep inside ``torch.autograd.graph.register_multi_grad_hook`` (a dead functorch wrapper),
or to run with the gradient of a computed tensor silently dropped (the Linear backward
forms no ``dW`` inside the context): now it is refused at creation, naming the module and
the attribute. A frozen one (``requires_grad=False``) has nothing to account for and works.
"""

from __future__ import annotations

import pytest
import torch
from tests.per_sample._truth import assert_matches_truth, per_sample_truth, summed_cross_entropy
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parametrize

import torchbp
from torchbp.autograd.linear import per_sample_recording
from torchbp.per_sample import per_sample_grads


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))


def _assigned_leaf(model: nn.Sequential, what: str) -> None:
    tensor = getattr(model[2], what).detach().clone().requires_grad_()
    delattr(model[2], what)
    setattr(model[2], what, tensor)


def _assigned_computed(model: nn.Sequential, what: str) -> None:
    original = getattr(model[2], what)
    delattr(model[2], what)
    setattr(model[2], what, original * 2)


@pytest.mark.parametrize("what", ["weight", "bias"])
@pytest.mark.parametrize("assign", [_assigned_leaf, _assigned_computed], ids=["leaf", "computed"])
def test_trainable_plain_tensor_refused_at_creation_by_name(assign, what):
    model = _model()
    assign(model, what)
    assert not isinstance(getattr(model[2], what), nn.Parameter)
    with pytest.raises(TypeError, match=rf"'2' \(Linear\)'s {what} is a Tensor .*not an nn.Param"):
        per_sample_grads(model, mode="clip", max_norm=1.0)
    assert getattr(per_sample_recording, "recorder", None) is None


def test_functional_call_leftover_refused_by_name():
    """vmap(grad) of functional_call on ``Sequential(lin, tanh, lin)``: torch 2.13 leaves
    ``lin`` holding the (dead) tensors it was called with, where register_multi_grad_hook
    failed with an AttributeError. Other versions put the Parameters back (skipped)."""
    lin = torchbp.nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 3)

    def sample_output(p, xi):
        return functional_call(model, p, (xi[None],)).sum()

    vmap(grad(sample_output), in_dims=(None, 0))(params, x)
    if isinstance(lin.weight, nn.Parameter):
        pytest.skip("this torch version's functional_call puts the Parameters back")
    with pytest.raises(TypeError, match=r"'0' \(Linear\)'s weight is a Tensor .*functional_call"):
        per_sample_grads(model)


def test_frozen_plain_tensor_weight_works():
    """A frozen weight that is a plain tensor (a buffer-like constant) with a trainable
    bias: only the bias is accounted for, its per-sample gradients as torch.func's."""
    model = _model().double()
    _assigned_leaf(model, "weight")
    model[2].weight.requires_grad_(False)
    x, y = torch.randn(5, 4, dtype=torch.double), torch.tensor([0, 1, 2, 0, 1])
    truth = per_sample_truth(model, x, y)
    with per_sample_grads(model, mode="grads") as ps:
        summed_cross_entropy(model, x, y).backward()
    assert model[2].weight.grad is None
    assert_matches_truth(model, ps, truth)


def test_trainable_parametrized_weight_still_refused_as_its_parametrization():
    """A parametrized weight is a computed tensor too; it keeps its refusal by the
    parametrization's own trainable parameter ('original')."""

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    model = _model()
    parametrize.register_parametrization(model[0], "weight", Doubled())
    with pytest.raises(TypeError, match=r"'0.parametrizations.weight'.*\(original\)"):
        per_sample_grads(model)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hook_based_weight_norm_refused_by_its_trainable_parameters():
    """The deprecated torch.nn.utils.weight_norm sets the Linear's weight, a plain tensor,
    from its trainable weight_g and weight_v in a forward pre-hook: those are named (a
    parametrization's, not the weight's not being a Parameter)."""
    weight_norm = getattr(nn.utils, "weight_norm", None)
    if weight_norm is None:
        pytest.skip("this torch version has no hook-based weight_norm")
    model = _model()
    weight_norm(model[2])
    with pytest.raises(TypeError, match=r"'2' \(Linear\) has trainable parameters \(weight_g, w"):
        per_sample_grads(model)
