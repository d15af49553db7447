"""Trainable parameters that clip mode's walk of the model's output graph cannot see: one
used after the model, in the loss (a learnable temperature, a class bias, a torch
Linear head), one used inside a reentrant checkpoint in front of the model whose output
reaches it through an attribute, and one the model's own reentrant checkpoint uses
without registering it. Each received its ordinary, unclipped gradient into ``p.grad``,
silently (a DP leak when stepped). Refused at the backward, before that gradient or any
other is written; served when frozen or detached, and in the other modes."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

import torchbp
from torchbp.per_sample import per_sample_grads

REFUSAL = r"nn.Parameter of shape \(%s\) that is not one of the model's.*clip.*unclipped"
CHECKPOINT_REFUSAL = (
    r"nn.Parameter of shape \(%s\) that is not one of the model's is used inside a "
    r"reentrant activation checkpoint.*unclipped.*use_reentrant=False"
)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1]), reduction="sum")


def _temperature(out, temperature):
    return out / temperature


def _class_bias(out, bias):
    return torch.add(out, bias)


def _stacked(out, bias):
    return torch.cat((out, bias.expand(5, 3)), dim=1)


def _torch_linear_head(out, head):
    return head(out)


def _stacked_by_keyword(out, bias):
    # the parameter only inside a keyword's sequence: torch.cat(tensors=...)
    return torch.cat(tensors=(out, bias), dim=0)[:5]


LOSS_SIDE = [
    (_temperature, lambda: nn.Parameter(torch.tensor(2.0)), ""),
    (_class_bias, lambda: nn.Parameter(torch.zeros(3)), "3,"),
    (_stacked, lambda: nn.Parameter(torch.zeros(1, 3)), "1, 3"),
    (_torch_linear_head, lambda: nn.Linear(3, 3), r"3,?[ \d]*"),
    (_stacked_by_keyword, lambda: nn.Parameter(torch.zeros(1, 3)), "1, 3"),
]


def _trainable(thing) -> list[torch.Tensor]:
    return list(thing.parameters()) if isinstance(thing, nn.Module) else [thing]


@pytest.mark.parametrize(("apply", "make", "shape"), LOSS_SIDE)
def test_a_parameter_used_in_the_loss_refused_before_any_gradient(apply, make, shape):
    model, extra = _model(), make()
    with pytest.raises(RuntimeError, match=REFUSAL % shape):
        with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
            _loss(apply(model(torch.randn(5, 4)), extra)).backward()
    assert all(p.grad is None for p in [*model.parameters(), *_trainable(extra)])
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def _autograd_backward_reaches_modes() -> bool:
    """Whether ``torch.autograd.backward`` is a torch function (a mode sees it) on this
    torch, as ``Tensor.backward`` is (2.13's is)."""
    seen = []

    class Probe(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    loss = (torch.ones(1, requires_grad=True) * 2.0).sum()
    with Probe():
        torch.autograd.backward(loss)
    return torch.autograd.backward in seen


@pytest.mark.parametrize(
    "backward",
    [
        torch.Tensor.backward,
        pytest.param(
            torch.autograd.backward,
            marks=pytest.mark.skipif(
                not _autograd_backward_reaches_modes(),
                reason="torch.autograd.backward is not a torch function on this torch",
            ),
        ),
    ],
    ids=["method", "function"],
)
def test_a_loss_term_whose_gradient_comes_after_the_models_refused_before_any_gradient(
    backward,
):
    """A term of the loss made from the parameter before the model's forward, not
    through the model: its gradient came after the model's, once the clipped p.grad
    were written (refused, but with p.grad set); the results now wait for it."""
    model, scale = _model(), nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match=REFUSAL % "3,"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            penalty = (scale * 2.0).sum()
            backward(_loss(model(torch.randn(5, 4))) + penalty)
    assert all(p.grad is None for p in [*model.parameters(), scale])


@pytest.mark.parametrize(("apply", "make", "shape"), LOSS_SIDE)
def test_the_same_parameter_frozen_or_detached_is_served(apply, make, shape):
    model, extra, x = _model(), make(), torch.randn(5, 4)
    frozen = extra.requires_grad_(False)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        _loss(apply(model(x), frozen)).backward()
    assert ps.clip_factors.shape == (5,)
    extra.requires_grad_(True)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        (_loss(model(x)) + apply(model(x), extra).detach().sum()).backward()
    assert ps.clip_factors.shape == (5,)


@pytest.mark.parametrize("mode", ["norms", "grads"])
def test_other_modes_give_a_loss_parameter_its_ordinary_gradient(mode):
    model, temperature, x = _model(), nn.Parameter(torch.tensor(2.0)), torch.randn(5, 4)
    _loss(model(x) / temperature).backward()
    expected = temperature.grad.clone()
    temperature.grad = None
    with per_sample_grads(model, mode=mode):
        _loss(model(x) / temperature).backward()
    torch.testing.assert_close(temperature.grad, expected)


def test_a_parameter_used_in_the_context_but_not_in_its_backward_is_served():
    """A second, trainable model evaluated inside the context (with or without grad) whose
    output the loss does not use: its parameters get no gradient, nothing to refuse; and
    after the context its own backward runs as without it."""
    model, other, x = _model(), nn.Linear(4, 3), torch.randn(5, 4)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        unused = other(x)
        with torch.no_grad():
            other(x)
        _loss(model(x)).backward()
    assert ps.clip_factors.shape == (5,)
    unused.sum().backward()
    assert other.weight.grad is not None


class ReadsAnAttribute(nn.Module):
    """A model whose input arrives through an attribute, not its forward's arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _model()
        self.features: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        return self.inner(self.features)


def test_a_reentrant_checkpoint_in_front_reaching_the_model_through_an_attribute_refused():
    """The checkpoint's output reached the model through an attribute, not its arguments,
    so the forward's walk took the checkpoint for one of the model's own; its backward
    gave the front Linear an unclipped p.grad."""

    model, front = ReadsAnAttribute(), nn.Linear(4, 4)
    x = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=CHECKPOINT_REFUSAL % r"4,?[ \d]*"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            model.features = checkpoint(front, x, use_reentrant=True)
            _loss(model()).backward()
    assert all(p.grad is None for p in [*model.parameters(), *front.parameters()])


def test_an_unregistered_parameter_in_the_models_own_reentrant_checkpoint_refused():
    """The model's own reentrant checkpoint (served) with a parameter its segment uses
    without registering it: the checkpoint's backward gave it an unclipped p.grad."""
    inner, scale = _model(), [nn.Parameter(torch.ones(4))]
    model = nn.Module()
    model.inner = inner
    model.forward = lambda t: checkpoint(lambda u: inner(u * scale[0]), t, use_reentrant=True)
    x = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match=CHECKPOINT_REFUSAL % "4,"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            _loss(model(x)).backward()
    assert all(p.grad is None for p in [*inner.parameters(), scale[0]])


def test_no_hook_is_left_on_the_outside_parameter_after_the_context():
    """The refusing gradient hook goes with the context (served or refused): the
    parameter's own backward after it runs as without it."""
    model, temperature, x = _model(), nn.Parameter(torch.tensor(2.0)), torch.randn(5, 4)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        _loss(model(x) / temperature.detach()).backward()
    assert ps.clip_factors.shape == (5,)
    with pytest.raises(RuntimeError, match="not one of the model's"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            _loss(model(x) / temperature).backward()
    (temperature * 3.0).backward()
    assert temperature.grad == 3.0


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_a_trainable_reentrant_checkpoint_whose_output_keeps_no_graph_is_served():
    """A trainable Linear checkpointed in front, reaching the model through an attribute,
    on an input that needs no gradient (or under no_grad): the checkpoint keeps no node,
    no backward can reach its parameters, nothing to refuse."""

    model, front = ReadsAnAttribute(), nn.Linear(4, 4)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        with torch.no_grad():
            checkpoint(front, torch.randn(5, 4, requires_grad=True), use_reentrant=True)
        model.features = checkpoint(front, torch.randn(5, 4), use_reentrant=True)
        _loss(model()).backward()
    assert ps.clip_factors.shape == (5,)
    assert front.weight.grad is None


def test_a_loss_parameter_left_out_by_backward_inputs_is_served():
    """backward(inputs=the model's parameters) does not reach the temperature: no
    unclipped gradient is written, nothing to refuse."""
    model, temperature = _model(), nn.Parameter(torch.tensor(2.0))
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        loss = _loss(model(torch.randn(5, 4)) / temperature)
        loss.backward(inputs=list(model.parameters()))
    assert ps.clip_factors.shape == (5,)
    assert temperature.grad is None and model[0].weight.grad is not None


@pytest.mark.parametrize("grad_enabled", [False, True], ids=["no_grad", "grad"])
def test_a_trainable_teacher_served_with_one_hook_registration_per_backward(
    grad_enabled, monkeypatch
):
    """A trainable teacher of 40 parameters run inside the context (under no_grad, or with
    grad and its output detached): the results' multi-gradient hook (registered anew on
    every parameter held) was registered once per teacher parameter, at its first use
    (O(N²): 0.3 s a step for a teacher of 300); now once at the backward, for the
    parameters used with grad enabled."""
    model, x = _model(), torch.randn(5, 4)
    teacher = nn.Sequential(*(nn.Linear(4, 4) for _ in range(19)), nn.Linear(4, 3))
    registered = []
    register = torch.autograd.graph.register_multi_grad_hook

    def counting(tensors, fn, **kwargs):
        registered.append(len(tensors))
        return register(tensors, fn, **kwargs)

    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        monkeypatch.setattr(torch.autograd.graph, "register_multi_grad_hook", counting)
        with torch.set_grad_enabled(grad_enabled):
            soft = teacher(x).softmax(-1)
        out = model(x)
        (_loss(out) + (out.log_softmax(-1) * soft.detach()).sum()).backward()
    assert ps.clip_factors.shape == (5,)
    assert registered == ([4 + 40] if grad_enabled else [])
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(("apply", "make", "shape"), LOSS_SIDE)
def test_a_backward_after_the_with_block_refused_before_the_loss_parameter_gets_a_gradient(
    apply, make, shape
):
    """The loss built inside the context, its backward after the with block: the model's
    Linears refused it, but the loss parameter, which the backward reaches first, had
    its unclipped gradient written by then."""
    model, extra = _model(), make()
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        loss = _loss(apply(model(torch.randn(5, 4)), extra))
    with pytest.raises(RuntimeError, match=r"after the with block.*unclipped"):
        loss.backward()
    assert all(p.grad is None for p in [*model.parameters(), *_trainable(extra)])


class _ScaleWithoutTorchCalls(torch.autograd.Function):
    """``out * scale`` whose forward passes ``scale`` to no torch function (a kernel of an
    extension would not either): the watch never sees it."""

    @staticmethod
    def forward(ctx, out, scale):
        ctx.save_for_backward(out, scale)
        return out.clone()  # (scale is ones: out * scale)

    @staticmethod
    def backward(ctx, grad):
        out, scale = ctx.saved_tensors
        return grad * scale, (grad * out).sum(0)


def _used_before_the_context(out, scale, made_before):
    return out * made_before


def _in_a_custom_function(out, scale, made_before):
    return _ScaleWithoutTorchCalls.apply(out, scale)


def _on_another_thread(out, scale, made_before):
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("scaled", out * scale))
    worker.start()
    worker.join()
    return result["scaled"]


@pytest.mark.parametrize(
    "apply", [_used_before_the_context, _in_a_custom_function, _on_another_thread]
)
def test_a_parameter_the_watch_never_sees_used_is_refused_from_the_backwards_graph(apply):
    """Used only before the context, through a custom Function whose forward passes it to
    no torch function, or on another thread (torch function modes are per thread): no
    torch call the watch saw was given it, and it got an unclipped gradient. The graph
    of loss.backward() shows it, refused before the backward runs."""
    model, scale = _model(), nn.Parameter(torch.ones(3))
    made_before = scale * 1.0
    with pytest.raises(RuntimeError, match=REFUSAL % "3,"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            _loss(apply(model(torch.randn(5, 4)), scale, made_before)).backward()
    assert all(p.grad is None for p in [*model.parameters(), scale])


class _PassingMode(TorchFunctionMode):
    """A user's torch function mode that runs every call as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_a_watch_left_active_by_modes_exited_out_of_order_watches_nothing_after_the_context():
    """A user's mode entered inside the context and exited after it (``__enter__`` and
    ``__exit__`` in separate hooks, as a training loop's callbacks may): torch pops the
    top mode at each exit, so the context's exit pops the user's mode and leaves the
    watch active. Closed, it must watch nothing: it hooked the loss parameter of a
    later, ordinary step and refused its gradient, on every step after."""
    model, temperature, x = _model(), nn.Parameter(torch.tensor(2.0)), torch.randn(5, 4)
    ps = per_sample_grads(model, mode="clip", max_norm=1.0).__enter__()
    user_mode = _PassingMode().__enter__()
    _loss(model(x)).backward()
    ps.__exit__(None, None, None)
    try:
        _loss(model(x) / temperature).backward()  # an ordinary step, no context
    finally:
        user_mode.__exit__(None, None, None)  # (pops what is left on top: the watch)
    assert temperature.grad is not None
    (temperature * 3.0).backward()  # no hook left on it either
    assert temperature.grad is not None


@pytest.mark.parametrize("before_the_models_backward", [True, False])
def test_a_second_model_trained_by_its_own_step_inside_the_context_is_refused_naming_the_way_out(
    before_the_models_backward,
):
    """A second model trained by a step of its own, not private (its own loss, backward
    and optimizer), inside the with block: refused like a loss parameter, but freezing it
    or detaching what it produces is no way out for a model meant to train; its step
    after the with block is, and is served as without the context."""
    model, second, x = _model(), nn.Linear(4, 1), torch.randn(5, 4)

    def second_step() -> None:
        second(x).pow(2).mean().backward()

    with pytest.raises(RuntimeError, match=r"not one of the model's.*its step outside the with"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            if before_the_models_backward:
                second_step()
            _loss(model(x)).backward()
            second_step()
    assert all(p.grad is None for p in second.parameters())
    model.zero_grad(set_to_none=True)
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        _loss(model(x)).backward()
    second_step()
    assert all(p.grad is not None for p in [*model.parameters(), *second.parameters()])


@pytest.mark.parametrize("only_the_parameter", [False, True])
def test_a_second_loss_through_the_model_after_a_done_step_refused_after_the_with_block(
    only_the_parameter,
):
    """The step done inside the context, a second loss through the model's output and a
    loss parameter built inside it, its backward after the with block: the parameter,
    reached first, had its unclipped gradient written before the model's Linears
    refused the backward; with ``inputs=[temperature]`` nothing refused it."""
    model, temperature, x = _model(), nn.Parameter(torch.tensor(2.0)), torch.randn(5, 4)
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        out = model(x)
        _loss(out).backward(retain_graph=True)
        second = _loss(out / temperature)
    with pytest.raises(RuntimeError, match=r"after the with block.*shape \(\).*unclipped"):
        second.backward(inputs=[temperature] if only_the_parameter else None)
    assert temperature.grad is None


def test_a_second_models_graph_built_after_a_done_step_is_served_after_the_with_block():
    """The step done inside the context, a second model's loss (not through the model)
    built inside it and its backward after the with block: served, as without the
    context; the same on the model's detached output."""
    model, second, x = _model(), nn.Linear(4, 3), torch.randn(5, 4)
    with per_sample_grads(model, mode="clip", max_norm=1.0):
        out = model(x)
        _loss(out).backward()
        second_loss = _loss(second(x) + out.detach())
    second_loss.backward()
    assert all(p.grad is not None for p in second.parameters())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_loss_parameter_inside_a_compiled_loss_is_refused_before_any_gradient(backend):
    """A learnable temperature inside a ``torch.compile``'d loss function (the watch skips
    what Dynamo traces): refused before any gradient is written, by its gradient hook and
    by the graph of loss.backward() (each alone refuses it)."""
    torch.compiler.reset()  # (a fresh compile per backend)
    model, temperature, x = _model(), nn.Parameter(torch.tensor(2.0)), torch.randn(5, 4)
    compiled_loss = torch.compile(lambda out, t: _loss(out / t), backend=backend)
    with pytest.raises(RuntimeError, match=REFUSAL % ""):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            compiled_loss(model(x), temperature).backward()
    assert all(p.grad is None for p in [*model.parameters(), temperature])
