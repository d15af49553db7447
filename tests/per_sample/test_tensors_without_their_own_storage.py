"""A Linear call whose tensors have no storage of their own is refused as one made inside
a ``torch.func`` transform (2f1b39c). These are the tensors and transforms the check
must let be: a transform differentiating only the input (adversarial examples,
saliency), an export of the model, a tensor subclass wrapping another (as DTensor
does), the model's own parameters through ``functional_call``, and a meta model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

import torchbp
from torchbp.per_sample import per_sample_grads


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))


def _clipped_step(model: nn.Module, x: torch.Tensor, before=None) -> torch.Tensor:
    """The norms of a clip-mode step on ``x``, after ``before(model, x)`` in the context."""
    model.zero_grad(set_to_none=True)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        if before is not None:
            before(model, x)
        model(x).square().sum().backward()
    return ps.norms


def _grad_wrt_input(model, x):
    return grad(lambda t: model(t).sum())(x)


def _vjp_wrt_input(model, x):
    out, pullback = vjp(model, x)
    return pullback(torch.ones_like(out))


def _jvp_wrt_input(model, x):
    return jvp(model, (x,), (torch.ones_like(x),))


def _export(model, x):
    return torch.export.export(model, (x,))


@pytest.mark.parametrize("before", [_grad_wrt_input, _vjp_wrt_input, _jvp_wrt_input, _export])
def test_a_transform_of_the_input_only_inside_the_context_is_let_be(before):
    """torch.func.grad / vjp / jvp with respect to the input (the parameters are not
    differentiated by the transform), or torch.export of the model, inside the context:
    no refusal, and the step's norms are those of a step without it."""
    model, x = _model(), torch.randn(5, 4)
    expected = _clipped_step(model, x)
    torch.testing.assert_close(_clipped_step(model, x, before), expected)


def test_functional_call_with_the_models_own_parameters_is_served():
    model, x = _model(), torch.randn(5, 4)
    expected = _clipped_step(model, x)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        functional_call(model, dict(model.named_parameters()), (x,)).square().sum().backward()
    torch.testing.assert_close(ps.norms, expected)


class _Wrapped(torch.Tensor):
    """A tensor subclass holding another tensor (as DTensor holds its local shard): it
    owns no memory of its own, but does have a storage."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> _Wrapped:
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), dtype=inner.dtype, device=inner.device
        )

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        out = func(*_map(_unwrap, args), **_map(_unwrap, kwargs or {}))
        return _map(_wrap, out)


def _map(fn, value):
    """``fn`` applied to each item of (nested) lists, tuples and dicts in ``value``."""
    if isinstance(value, (list, tuple)):
        return type(value)(_map(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: _map(fn, v) for k, v in value.items()}
    return fn(value)


def _unwrap(value):
    return value.inner if isinstance(value, _Wrapped) else value


def _wrap(value):
    return _Wrapped(value) if isinstance(value, torch.Tensor) else value


def test_a_wrapper_subclass_input_is_not_taken_for_a_transforms():
    model, x = _model(), torch.randn(5, 4)
    expected = _clipped_step(model, x)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        model(_Wrapped(x)).square().sum().backward()
    torch.testing.assert_close(ps.norms.inner, expected)


def test_a_meta_model_runs_the_whole_step():
    model, x = _model().to("meta"), torch.randn(5, 4, device="meta")
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        model(x).square().sum().backward()
    assert ps.norms.shape == (5,) and ps.norms.is_meta


@pytest.mark.parametrize("of", ["the_model", "a_linear_outside_it"])
def test_a_vmap_evaluation_outside_the_loss_holds_nothing_back(of):
    """vmap of the model (or of a trainable Linear outside it) in grad mode, for a metric
    the loss does not use: its calls are refused only at a backward through them, and
    the results, which wait for such a backward, are formed without it."""
    model, other, x = _model(), torchbp.nn.Linear(4, 3), torch.randn(5, 4)
    expected = _clipped_step(model, x)

    def evaluate(model, x):
        return torch.func.vmap(model if of == "the_model" else other)(x)

    torch.testing.assert_close(_clipped_step(model, x, evaluate), expected)


def test_an_adversarial_step_from_torch_func_grad_inside_the_context():
    """FGSM inside the context: torch.func.grad w.r.t. the input, its result detached,
    then the step on the perturbed input: the norms of a step on that input alone."""
    model, x = _model(), torch.randn(5, 4)
    perturbed = x + 0.1 * _grad_wrt_input(model, x).detach().sign()
    expected = _clipped_step(model, perturbed)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        adversarial = x + 0.1 * _grad_wrt_input(model, x).detach().sign()
        model(adversarial).square().sum().backward()
    torch.testing.assert_close(ps.norms, expected)
