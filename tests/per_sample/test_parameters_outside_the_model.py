"""A trainable parameter outside the model given to ``per_sample_grads`` (a second model
run before it, an unregistered parameter its forward uses) that feeds the model's output:
in clip mode it received an ordinary, unclipped gradient into its ``p.grad``, silently,
so an optimizer stepping it trained it outside DP-SGD. Refused at the model's forward,
by shape, with the ways out; other modes serve it, as without the context."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import torchbp
from torchbp.per_sample import per_sample_grads


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))


class _Scaled(nn.Module):
    """Multiplies by a parameter it does not register (held in a plain list)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.unregistered = [nn.Parameter(torch.tensor(2.0))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.unregistered[0]


def _loss(out: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1]), reduction="sum")


@pytest.mark.parametrize("front", [nn.Linear(4, 4), nn.Conv1d(1, 1, 1), torchbp.nn.Linear(4, 4)])
def test_a_trainable_model_in_front_refused_in_clip_mode_before_any_gradient(front):
    model, x = _model(), torch.randn(5, 4)
    refusal = (
        r"nn.Parameter of shape \([\d, ]*\) that is not one of the model's.*unclipped"
        r".*one module holding both.*requires_grad_\(False\).*detach"
    )
    with pytest.raises(RuntimeError, match=refusal):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            h = front(x.unsqueeze(1)).squeeze(1) if isinstance(front, nn.Conv1d) else front(x)
            _loss(model(h)).backward()
    assert all(p.grad is None for p in [*model.parameters(), *front.parameters()])


def test_an_unregistered_parameter_of_the_forward_refused_in_clip_mode():
    wrapped = _Scaled(_model())
    with pytest.raises(RuntimeError, match=r"shape \(\) that is not one of the model's"):
        with per_sample_grads(wrapped, mode="clip", max_norm=1.0):
            _loss(wrapped(torch.randn(5, 4))).backward()
    assert wrapped.unregistered[0].grad is None


def test_a_tuple_or_dict_output_is_looked_through():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _model()

        def forward(self, x):
            return {"logits": (x.sum(1, keepdim=True), self.body(x))}

    model, front = TwoHeads(), nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="not one of the model's"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            model(front(torch.randn(5, 4)))


@dataclasses.dataclass
class _Output:
    """A model output as a dataclass (not a tuple or dict), with the logits nested."""

    aux: torch.Tensor
    heads: dict


def test_a_dataclass_output_is_looked_through():
    """The walk looked into tuples, lists and dicts only: behind a dataclass output, the
    trainable model in front got an unclipped p.grad, silently."""

    class DataclassOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _model()

        def forward(self, x):
            return _Output(aux=x.detach().sum(1), heads={"logits": self.body(x)})

    model, front = DataclassOut(), nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match=r"shape \(4, 4\) that is not one of the model's"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            _loss(model(front(torch.randn(5, 4))).heads["logits"]).backward()
    assert front.weight.grad is None


@pytest.mark.parametrize("mode", ["norms", "grads"])
def test_other_modes_give_the_outside_model_its_ordinary_gradient(mode):
    model, front, x = _model(), nn.Linear(4, 4), torch.randn(5, 4)
    _loss(model(front(x))).backward()
    expected = [p.grad.clone() for p in front.parameters()]
    for p in [*model.parameters(), *front.parameters()]:
        p.grad = None
    with per_sample_grads(model, mode=mode) as ps:
        _loss(model(front(x))).backward()
    assert ps.norms.shape == (5,)
    for p, grad in zip(front.parameters(), expected):
        torch.testing.assert_close(p.grad, grad)


def test_frozen_model_in_front_and_an_input_needing_its_gradient_served_in_clip_mode():
    """Frozen parameters and a plain leaf input (an adversarial example's) get no
    unclipped parameter gradient: served."""
    model, front = _model(), nn.Linear(4, 4).requires_grad_(False)
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        _loss(model(front(x))).backward()
    assert ps.clip_factors.shape == (5,)
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


def test_one_module_holding_both_is_the_way_out():
    front = torchbp.nn.Linear(4, 4)
    both = nn.Sequential(front, _model())
    with per_sample_grads(both, mode="clip", max_norm=1.0) as ps:
        _loss(both(torch.randn(5, 4))).backward()
    assert len(ps.parameters) == 6 and front.weight.grad is not None


def test_a_copy_of_the_model_made_inside_the_context_runs():
    """deepcopy copies the forward hook with the model: on the copy, whose parameters are
    its own, it does not act."""
    model, x = _model(), torch.randn(5, 4)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        ema = copy.deepcopy(model)
        ema(x)
        _loss(model(x)).backward()
    assert ps.norms.shape == (5,)
    assert ema(x).shape == (5, 3)


@pytest.mark.parametrize("mode", ["norms", "clip"])
def test_a_second_torchbp_model_in_the_loss_refused_with_the_way_out(mode):
    """A second model of torchbp Linears whose output joins the loss (not in front of the
    model: the forward cannot see it) is refused at its backward, saying what to do."""
    model, second, x = _model(), torchbp.nn.Linear(4, 3), torch.randn(5, 4)
    max_norm = 1.0 if mode == "clip" else None
    refusal = r"shape \(3, 4\) is not a torchbp.nn.Linear of the model.*one module holding"
    with pytest.raises(RuntimeError, match=refusal):
        with per_sample_grads(model, mode, max_norm):
            _loss(model(x) + second(x)).backward()
    assert all(p.grad is None for p in [*model.parameters(), *second.parameters()])


@pytest.mark.parametrize("mode", ["norms", "clip"])
def test_a_model_compiled_with_fullgraph_refused_by_the_context_not_by_dynamo(mode):
    """Under torch.compile the context's forward hooks were traced: with fullgraph=True,
    Dynamo raised its own Unsupported error from inside them (clip mode's walk reads
    grad_fn; on torch 2.11 the Linear modules' autocast query, in every mode) in place of
    the context's refusal of torch.compile at the backward. Both are skipped while
    compiling, as that refusal stands."""
    model, x = _model(), torch.randn(5, 4)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with per_sample_grads(model, mode, 1.0 if mode == "clip" else None):
        out = compiled(x)
        with pytest.raises(RuntimeError, match="received a gradient .* torch.compile"):
            _loss(out).backward()


class _KeywordInput(nn.Module):
    """The model of :func:`_model`, its input passed by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _model()

    def forward(self, *, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("segment", ["module", "function"])
@pytest.mark.parametrize("passed", ["by_position", "by_keyword"])
def test_a_reentrant_checkpoint_in_front_refused_in_clip_mode_before_any_gradient(segment, passed):
    """A trainable parameter inside a reentrant checkpoint (use_reentrant=True) before the
    model: the checkpoint's forward keeps no graph, so the graph walk did not see it, and
    the checkpoint's own backward gave it an unclipped p.grad, silently (a DP leak).
    Refused at the model's forward, naming the checkpoint, before any gradient."""
    from torch.utils.checkpoint import checkpoint

    front = nn.Linear(4, 4)
    model = _model() if passed == "by_position" else _KeywordInput()
    x = torch.randn(5, 4, requires_grad=True)  # (without, the checkpoint has no backward)
    with pytest.raises(RuntimeError, match=r"reentrant activation checkpoint.*unclipped"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            run = front if segment == "module" else (lambda t: torch.tanh(front(t)))
            h = checkpoint(run, x, use_reentrant=True)
            out = model(h) if passed == "by_position" else model(x=h)
            _loss(out).backward()
    assert all(p.grad is None for p in [*model.parameters(), *front.parameters()])


def test_a_reentrant_checkpoint_inside_the_model_after_one_in_front_still_served():
    """A reentrant checkpoint inside the model (around every trainable Linear) is not one
    in front of it: served, with an input that needs its gradient."""
    from torch.utils.checkpoint import checkpoint

    inner = _model()
    model = nn.Module()
    model.inner = inner
    model.forward = lambda t: checkpoint(inner, t, use_reentrant=True)
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        _loss(model(torch.tanh(x))).backward()
    assert ps.clip_factors.shape == (5,)
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_a_frozen_reentrant_checkpoint_in_front_of_an_input_without_grad_is_served():
    """A frozen segment checkpointed in front (use_reentrant=True) of an input that
    needs no gradient: the checkpoint's output has no node, nothing can leak; served."""
    from torch.utils.checkpoint import checkpoint

    model, front = _model(), nn.Linear(4, 4).requires_grad_(False)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        h = checkpoint(front, torch.randn(5, 4), use_reentrant=True)
        _loss(model(h)).backward()
    assert ps.clip_factors.shape == (5,)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_a_frozen_reentrant_checkpoint_in_front_of_an_input_with_grad_names_what_works():
    """The same frozen segment of an input that requires grad keeps its node, and is
    refused (what its function trains cannot be seen). The refusal offered "freeze what
    it trains", which this segment already is: it says to detach its input or output
    instead, and each way out it names is served."""
    from torch.utils.checkpoint import checkpoint

    model, front = _model(), nn.Linear(4, 4).requires_grad_(False)
    x = torch.randn(5, 4, requires_grad=True)
    refusal = r"freezing what it trains is not enough while its input requires grad.*detach"
    with pytest.raises(RuntimeError, match=refusal):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            model(checkpoint(front, x, use_reentrant=True))
    for way_out in ("detach_input", "detach_output", "non_reentrant"):
        with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
            if way_out == "detach_input":
                h = checkpoint(front, x.detach(), use_reentrant=True)
            elif way_out == "detach_output":
                h = checkpoint(front, x, use_reentrant=True).detach()
            else:
                h = checkpoint(front, x, use_reentrant=False)
            _loss(model(h)).backward()
        assert ps.clip_factors.shape == (5,)


def test_the_models_own_reentrant_checkpoint_in_a_later_calls_input_is_not_one_in_front():
    """The model, holding a reentrant checkpoint of its own, applied to its own output
    (model(model(x))): the second call's input comes from the model's own checkpoint,
    whose parameters are the model's, recorded. It was refused at the forward as a
    checkpoint in front whose parameters cannot be seen; it is now refused where the
    docs say, at the first Linear backward, as Linear calls split across reentrant
    segments, naming them, before any gradient."""
    from torch.utils.checkpoint import checkpoint

    inner = nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 4))
    model = nn.Module()
    model.inner = inner
    model.forward = lambda t: checkpoint(inner, t, use_reentrant=True)
    x = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"split across reentrant .* in segment 2: Linear"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            model(model(x)).square().sum().backward()
    assert all(p.grad is None for p in model.parameters())
