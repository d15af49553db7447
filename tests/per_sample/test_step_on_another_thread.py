"""Clip mode and a step run on a thread other than the one that entered the context.

Clip mode watches for trainable parameters outside the model with a torch function mode,
which is active on the entering thread only: a step whose loss used such a parameter
(a learnable temperature) on another thread gave it its ordinary, unclipped gradient,
silently, while the model's gradients were clipped (a DP leak). Refused now: the model's
forward on another thread whose output can join a graph (with grad, or inside a reentrant
checkpoint's forward), as it ends; an evaluation forward without grad there is let be; a
backward through the model's Linears
on another thread (CPU, where the backward runs on the thread that calls it), before any
of the model's gradients is formed. The same step on the entering thread is served, and
so is a reentrant checkpoint's recomputation on another thread (as on a device's
autograd thread) in the other modes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tests._support import run_on_another_thread
from torch import nn
from torch.overrides import TorchFunctionMode

import torchbp
from torchbp.per_sample import per_sample_grads

from ._truth import per_sample_truth

REFUSAL = r"mode='clip' %s ran on a thread other than the one that entered the context"


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])


def _loss(out: torch.Tensor, temperature: nn.Parameter, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out / temperature, y, reduction="sum")


def _step_on_this_thread(x: torch.Tensor, y: torch.Tensor):
    """The step alone, on this thread: a fresh model and its clip context (for ``norms``)."""
    reference = _model()
    with per_sample_grads(reference, mode="clip", max_norm=0.1) as expected:
        nn.functional.cross_entropy(reference(x), y, reduction="sum").backward()
    return reference, expected


def _assert_served_as(ps, model: nn.Module, expected, reference: nn.Module) -> None:
    """The step gave the norms and clipped gradients of the step alone."""
    torch.testing.assert_close(ps.norms, expected.norms)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def _on_a_thread_of_its_own(work: Callable[[], None]) -> None:
    """Run ``work`` on a new thread; re-raise its error here."""
    run_on_another_thread(work)


def test_forward_loss_and_backward_on_another_thread_refused_at_the_forward():
    model, temperature, (x, y) = _model(), nn.Parameter(torch.tensor(2.0)), _data()
    with pytest.raises(RuntimeError, match=REFUSAL % "the model's forward"):
        with per_sample_grads(model, mode="clip", max_norm=0.1):
            _on_a_thread_of_its_own(lambda: _loss(model(x), temperature, y).backward())
    assert all(p.grad is None for p in [*model.parameters(), temperature])


def test_loss_and_backward_on_another_thread_refused_before_the_models_gradients():
    """The forward on the entering thread, the loss and its backward on a worker: the
    temperature, reached before the model's Linears, cannot be kept from its gradient,
    but the step is refused before any of the model's is formed, and nothing is formed
    after it."""
    model, temperature, (x, y) = _model(), nn.Parameter(torch.tensor(2.0)), _data()
    with pytest.raises(RuntimeError, match=REFUSAL % "a backward through Linear '2'"):
        with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
            out = model(x)
            _on_a_thread_of_its_own(lambda: _loss(out, temperature, y).backward())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_the_same_step_on_the_entering_thread_refuses_the_temperature_and_serves_the_model():
    model, temperature, (x, y) = _model(), nn.Parameter(torch.tensor(2.0)), _data()
    with pytest.raises(RuntimeError, match=r"shape \(\) that is not one of the model's"):
        with per_sample_grads(model, mode="clip", max_norm=0.1):
            _loss(model(x), temperature, y).backward()
    temperature.requires_grad_(False)
    truth = per_sample_truth(nn.Sequential(model, _Divide(temperature)), x, y)
    with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
        _loss(model(x), temperature, y).backward()
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in truth.values()]).norm(dim=0)
    torch.testing.assert_close(ps.norms, norms)


@pytest.mark.parametrize("mode", ["norms", "grads"])
def test_other_modes_serve_a_step_on_another_thread(mode):
    """Norms and grads modes watch no parameter outside the model: a step on a worker
    thread is recorded as on the entering one."""
    model, (x, y) = _model(), _data()
    truth = per_sample_truth(model, x, y)
    with per_sample_grads(model, mode) as ps:
        _on_a_thread_of_its_own(
            lambda: nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        )
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in truth.values()]).norm(dim=0)
    torch.testing.assert_close(ps.norms, norms)


class _Divide(nn.Module):
    def __init__(self, by: torch.Tensor) -> None:
        super().__init__()
        self.by = by

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out / self.by


class _BackwardOnAWorker(TorchFunctionMode):
    """Runs each ``Tensor.backward`` it receives on a thread of its own, as CUDA's engine
    runs a backward on the device's thread after the caller's modes have seen it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.backward:
            _on_a_thread_of_its_own(lambda: func(*args, **(kwargs or {})))
            return None
        return func(*args, **(kwargs or {}))


def test_a_backward_seen_starting_on_the_entering_thread_may_run_on_another():
    """Entered below the context's watch, the mode hands it the backward first: seen
    starting (its graph walked), it is served wherever the engine runs it."""
    model, (x, y) = _model(), _data()
    reference, expected = _step_on_this_thread(x, y)
    with _BackwardOnAWorker():
        with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    _assert_served_as(ps, model, expected, reference)


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_checkpoint_recomputing_the_model_in_a_backward_on_another_thread_served(reentrant):
    """An activation checkpoint of the whole model recomputes its forward in the backward
    (from the checkpoint's backward, or a saved tensor's unpack hook without reentrancy),
    which CUDA's engine runs on the device's thread: that forward is not refused as one
    on another thread."""
    from torch.utils.checkpoint import checkpoint

    model, (x, y) = _model(), _data()
    reference, expected = _step_on_this_thread(x, y)
    with _BackwardOnAWorker():
        with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
            out = checkpoint(model, x.requires_grad_(), use_reentrant=reentrant)
            nn.functional.cross_entropy(out, y, reduction="sum").backward()
    _assert_served_as(ps, model, expected, reference)


@pytest.mark.parametrize("without_grad", [torch.no_grad, torch.inference_mode])
def test_an_evaluation_forward_without_grad_on_another_thread_let_be(without_grad):
    """An evaluation thread running the model without grad while a step's context is open
    (its output joins no graph, so no loss built there can reach a parameter through it)
    was refused; the step is served as without it."""
    model, (x, y) = _model(), _data()
    reference, expected = _step_on_this_thread(x, y)
    evaluated = []
    with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:

        def evaluate() -> None:
            with without_grad():
                evaluated.append(model(x))

        _on_a_thread_of_its_own(evaluate)
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    torch.testing.assert_close(evaluated[0], reference(x))
    _assert_served_as(ps, model, expected, reference)


class _CheckpointingInside(nn.Module):
    """A model whose forward runs its layers as one reentrant checkpoint segment."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, x, use_reentrant=True)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_an_evaluation_forward_of_a_model_checkpointing_inside_on_another_thread_let_be():
    """Its Linears run inside the checkpoint's segment, whose output could join a graph;
    the model's call as a whole, under ``torch.no_grad()``, cannot: judged by the model's
    own hook as it ends, it is let be (its Linears' guards, added for calls made without
    the model's, refused it)."""
    model, (x, y) = _CheckpointingInside(_model()), _data()
    reference, expected = _step_on_this_thread(x, y)
    evaluated = []
    with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:

        def evaluate() -> None:
            with torch.no_grad():
                evaluated.append(model(x))

        _on_a_thread_of_its_own(evaluate)
        out = model(x.detach().requires_grad_())
        nn.functional.cross_entropy(out, y, reduction="sum").backward()
    torch.testing.assert_close(evaluated[0], reference(x))
    _assert_served_as(ps, model, expected, reference)


def test_a_reentrant_checkpoint_of_the_model_on_another_thread_refused():
    """Its forward runs the model with grad mode off, and its output joins a graph."""
    from torch.utils.checkpoint import checkpoint

    model, (x, _) = _model(), _data()
    with pytest.raises(RuntimeError, match=REFUSAL % "the model's forward"):
        with per_sample_grads(model, mode="clip", max_norm=0.1):
            _on_a_thread_of_its_own(
                lambda: checkpoint(model, x.requires_grad_(), use_reentrant=True)
            )


class _GradInside(nn.Module):
    """A model whose forward turns grad mode on (a caller's no_grad does not hold)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return self.inner(x)


def test_a_forward_without_grad_whose_output_joins_a_graph_on_another_thread_refused():
    model, (x, _) = _GradInside(_model()), _data()
    with pytest.raises(RuntimeError, match=REFUSAL % "the model's forward"):
        with per_sample_grads(model, mode="clip", max_norm=0.1):

            def evaluate() -> None:
                with torch.no_grad():
                    model(x)

            _on_a_thread_of_its_own(evaluate)


class _Box:
    """A model output class of no kind the context looks into (not a tuple, mapping or
    dataclass)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _BoxedOutput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> _Box:
        return _Box(self.inner(x))


def test_a_forward_with_grad_on_another_thread_refused_whatever_its_output_holds():
    model, temperature, (x, y) = _BoxedOutput(_model()), nn.Parameter(torch.tensor(2.0)), _data()
    with pytest.raises(RuntimeError, match=REFUSAL % "the model's forward"):
        with per_sample_grads(model, mode="clip", max_norm=0.1):
            _on_a_thread_of_its_own(lambda: _loss(model(x).logits, temperature, y).backward())
    assert all(p.grad is None for p in [*model.parameters(), temperature])


def _run_the_model(model: nn.Module, x: torch.Tensor, reentrant_checkpoint: bool) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    if reentrant_checkpoint:
        return checkpoint(model, x.detach().requires_grad_(), use_reentrant=True)
    return model(x)


@pytest.mark.parametrize("worker_checkpoints", [False, True], ids=["worker", "worker-checkpoint"])
@pytest.mark.parametrize("step_checkpoints", [False, True], ids=["step", "step-checkpoint"])
def test_a_refused_forward_on_another_thread_leaves_the_step_on_the_entering_thread_as_it_was(
    worker_checkpoints, step_checkpoints
):
    """The refusal comes as the worker's forward ends, after its Linear calls were filed:
    with its error kept (as a ``concurrent.futures.Future`` keeps it, its traceback holding
    the forward's graph or its checkpoint's node), the correct step that follows on the
    entering thread was refused as one whose Linears are split across reentrant checkpoint
    segments (the worker's calls taken as the step's). It is served as without it."""
    model, reference, (x, y) = _model(), _model(), _data()
    with per_sample_grads(reference, mode="clip", max_norm=0.1) as expected:
        out = _run_the_model(reference, x, step_checkpoints)
        nn.functional.cross_entropy(out, y, reduction="sum").backward()
    kept: list[BaseException] = []

    def forward_on_a_worker() -> None:
        try:
            _run_the_model(model, 3 * x, worker_checkpoints)
        except RuntimeError as error:
            kept.append(error)

    with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
        _on_a_thread_of_its_own(forward_on_a_worker)
        out = _run_the_model(model, x, step_checkpoints)
        nn.functional.cross_entropy(out, y, reduction="sum").backward()
    assert len(kept) == 1 and "ran on a thread other than" in str(kept[0])
    _assert_served_as(ps, model, expected, reference)


@pytest.mark.parametrize("call", ["forward-method", "submodules"])
def test_the_models_linears_run_on_another_thread_without_its_call_refused_at_their_forward(call):
    """``model.forward(x)``, or the model's submodules called one by one, on a worker skip
    the model's own forward hook: the loss built there gave the temperature its unclipped
    gradient before the backward through the Linears was refused (on CPU; on a GPU, whose
    backward runs on the device's thread, that backward was not refused at all). Each of
    the model's Linears refuses its own call there, before any loss exists."""
    model, temperature, (x, y) = _model(), nn.Parameter(torch.tensor(2.0)), _data()

    def step_on_a_worker() -> None:
        out = model.forward(x) if call == "forward-method" else model[2](model[1](model[0](x)))
        _loss(out, temperature, y).backward()

    with pytest.raises(RuntimeError, match=REFUSAL % "the model's forward"):
        with per_sample_grads(model, mode="clip", max_norm=0.1):
            _on_a_thread_of_its_own(step_on_a_worker)
    assert all(p.grad is None for p in [*model.parameters(), temperature])
