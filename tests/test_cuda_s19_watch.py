"""Clip mode's outside-parameter watch with the backward on autograd's device thread.

On CUDA, ``loss.backward()`` is called on the caller's thread (the torch function modes
active there, clip mode's :class:`~torchbp.per_sample.outside_watch.OutsideParameterWatch`
among them, see the call and walk its graph), but the engine runs the graph's nodes, and
so every hook the watch and the context registered (the refusing gradient hooks, the
node pre-hooks refusing a backward after the ``with`` block, the multi-gradient hooks),
on the device's own thread, whose Python stack, ``threading.get_ident()`` and
``threading.local`` values are not the caller's. A refusal raised there must reach the
caller as the same exception, before any ``p.grad`` is written, and leave the context
closed and the next step served; a served step must not be refused there.

The CPU variants (``device="cpu"``) reproduce that split: :class:`EngineOnAnotherThread`,
entered before the context (so below the watch on the mode stack), receives each
backward after the watch has seen it and runs it on a thread of its own. The CUDA
variants (``device="cuda"``, ``pytest -m cuda``, run by ``scripts/cuda_checks.sh``'s
pytest_changed step) run the backward as it comes.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from tests._support import run_on_another_thread
from torch import nn
from torch.overrides import TorchFunctionMode, has_torch_function
from torch.utils.checkpoint import checkpoint

import torchbp
from torchbp.per_sample import per_sample_grads

DT = torch.float64
REFUSAL = r"nn.Parameter of shape \(%s\) that is not one of the model's.*clip.*unclipped"
CHECKPOINT_REFUSAL = r"nn.Parameter of shape \(4,\) .* reentrant activation checkpoint"
AFTER_THE_BLOCK = r"after the with block.*shape \(%s\).*unclipped"
_BACKWARDS = (torch.Tensor.backward, torch.autograd.backward)


class EngineOnAnotherThread(TorchFunctionMode):
    """Runs each ``Tensor.backward`` / ``torch.autograd.backward`` it receives on a new
    thread, where the CPU engine then runs every node and hook, as CUDA's engine runs a
    CUDA graph's on the device's thread; an exception raised there is raised again on the
    caller's thread. ``threads``: the idents of the threads that ran a backward."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _BACKWARDS:
            return func(*args, **kwargs)

        def run() -> None:
            self.threads.append(threading.get_ident())
            func(*args, **kwargs)

        run_on_another_thread(run)
        return None


@contextlib.contextmanager
def backward_on_the_device_thread(device: str):
    """On CPU, :class:`EngineOnAnotherThread` around the block (asserting on leaving that
    it ran a backward off this thread); on CUDA, nothing: the engine's device thread
    runs the graph. (On CPU a Linear backward on a thread other than the context's is
    refused unless the watch saw that backward start: here it did, as on CUDA.)"""
    if device != "cpu":
        yield
        return
    with EngineOnAnotherThread() as engine:
        yield
    assert engine.threads and threading.get_ident() not in engine.threads


def _model(device: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))
    return model.to(device, DT)


def _data(device: str, rows: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 4, generator=gen, dtype=DT)
    y = torch.randint(3, (rows,), generator=gen)
    return x.to(device), y.to(device)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torchbp.functional.cross_entropy(out, y, reduction="sum")


def _assert_no_mode_left() -> None:
    """The context's exit popped its watch: no torch function mode is active here."""
    assert not has_torch_function((torch.empty(0),))


def _assert_the_next_steps_served(model: nn.Module, device: str) -> None:
    """After a refused context: an ordinary step and a new clip-mode context run."""
    x, y = _data(device)
    model.zero_grad(set_to_none=True)
    _loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    with backward_on_the_device_thread(device):
        with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
            _loss(model(x), y).backward()
    assert ps.clip_factors.shape == (5,)
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------- refused
def _temperature(device: str) -> tuple[nn.Parameter, str]:
    return nn.Parameter(torch.tensor(2.0, dtype=DT, device=device)), ""


def _class_bias(device: str) -> tuple[nn.Parameter, str]:
    return nn.Parameter(torch.zeros(3, dtype=DT, device=device)), "3,"


@pytest.mark.parametrize("make", [_temperature, _class_bias], ids=["temperature", "bias"])
def test_a_loss_parameter_refused_on_the_device_thread_before_any_gradient(device, make):
    """The watch's gradient hook refuses the loss parameter on the device thread: the
    caller gets the refusal's RuntimeError and message, no p.grad is written, the watch
    is gone from the mode stack, and the next steps are served."""
    model, (extra, shape) = _model(device), make(device)
    x, y = _data(device)
    with pytest.raises(RuntimeError, match=REFUSAL % shape):
        with backward_on_the_device_thread(device):
            with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
                _loss(model(x) / extra if shape == "" else model(x) + extra, y).backward()
    assert all(p.grad is None for p in [*model.parameters(), extra])
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms
    _assert_no_mode_left()
    _assert_the_next_steps_served(model, device)


def test_a_loss_term_whose_gradient_comes_after_the_models_refused_on_the_device_thread(
    device,
):
    """A term made before the model's forward: the results wait for its gradient (the
    watch holds them as the backward starts, on the caller's thread), which its hook
    refuses on the device thread before the clipped p.grad are written."""
    model, scale = _model(device), nn.Parameter(torch.ones(3, dtype=DT, device=device))
    x, y = _data(device)
    with pytest.raises(RuntimeError, match=REFUSAL % "3,"):
        with backward_on_the_device_thread(device):
            with per_sample_grads(model, mode="clip", max_norm=1.0):
                penalty = (scale * 2.0).sum()
                (_loss(model(x), y) + penalty).backward()
    assert all(p.grad is None for p in [*model.parameters(), scale])
    _assert_no_mode_left()


def test_a_parameter_used_before_the_context_refused_from_the_backwards_graph(device):
    """Never seen used inside the context: refused by the watch's graph walk as the
    backward starts (on the caller's thread), before the device thread runs a node."""
    model, scale = _model(device), nn.Parameter(torch.ones(3, dtype=DT, device=device))
    made_before = scale * 1.0
    x, y = _data(device)
    with pytest.raises(RuntimeError, match=REFUSAL % "3,"):
        with backward_on_the_device_thread(device):
            with per_sample_grads(model, mode="clip", max_norm=1.0):
                _loss(model(x) * made_before, y).backward()
    assert all(p.grad is None for p in [*model.parameters(), scale])


def test_an_unregistered_parameter_in_a_reentrant_checkpoint_refused_on_the_device_thread(
    device,
):
    """The model's own reentrant checkpoint using a parameter it does not register: the
    use is noted at the forward (caller's thread), the refusal raised from the
    multi-gradient hook at the first parameter the backward reaches (device thread)."""
    inner, scale = _model(device), [nn.Parameter(torch.ones(4, dtype=DT, device=device))]
    model = nn.Module()
    model.inner = inner
    model.forward = lambda t: checkpoint(lambda u: inner(u * scale[0]), t, use_reentrant=True)
    x, y = _data(device)
    with pytest.raises(RuntimeError, match=CHECKPOINT_REFUSAL):
        with backward_on_the_device_thread(device):
            with per_sample_grads(model, mode="clip", max_norm=1.0):
                _loss(model(x.requires_grad_()), y).backward()
    assert all(p.grad is None for p in [*inner.parameters(), scale[0]])
    _assert_no_mode_left()


UNSEEN_CHECKPOINT = r"reentrant activation checkpoint.*not seen run inside the context"


def test_a_heads_checkpoint_made_on_a_worker_thread_refused_before_the_device_thread_runs(
    device,
):
    """A torch ``nn.Linear`` head's reentrant checkpoint made on a worker thread, on the
    model's output: the watch never saw its segment run, so the graph walk refuses it as
    the backward starts, before its recomputation (on the device thread) could give the
    head an unclipped gradient (4084f5d; the graph below it reaches the model's
    parameters, which let it be before)."""
    model, head = _model(device), nn.Linear(3, 3).to(device, DT)
    x, y = _data(device)
    with pytest.raises(RuntimeError, match=UNSEEN_CHECKPOINT):
        with backward_on_the_device_thread(device):
            with per_sample_grads(model, mode="clip", max_norm=1.0):
                out, made = model(x), []
                worker = threading.Thread(
                    target=lambda: made.append(checkpoint(head, out, use_reentrant=True))
                )
                worker.start()
                worker.join()
                _loss(made[0], y).backward()
    assert all(p.grad is None for p in [*model.parameters(), *head.parameters()])
    _assert_no_mode_left()


@pytest.mark.parametrize("call", ["forward-method", "submodules"])
def test_the_models_linears_run_on_a_worker_without_its_call_refused_before_any_gradient(
    device, call
):
    """``model.forward(x)`` (or its submodules one by one) on a worker thread skips the
    model's own forward hook; a loss with a temperature built there and its
    ``loss.backward()``, which CUDA's engine runs on the device thread, gave the
    temperature an unclipped gradient with nothing refused (the Linear backward's thread
    check is CPU's only). Each of the model's Linears refuses its call there, before any
    loss exists."""
    model, (temperature, _) = _model(device), _temperature(device)
    x, y = _data(device)

    def step_on_a_worker() -> None:
        out = model.forward(x) if call == "forward-method" else model[2](model[1](model[0](x)))
        _loss(out / temperature, y).backward()

    with pytest.raises(RuntimeError, match="the model's forward ran on a thread other than"):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            run_on_another_thread(step_on_a_worker)
    assert all(p.grad is None for p in [*model.parameters(), temperature])
    _assert_no_mode_left()
    _assert_the_next_steps_served(model, device)


def test_a_parameter_free_checkpoint_after_the_models_is_served_on_the_device_thread(device):
    """Two reentrant checkpoints run inside the context, the model's and a parameter-free
    one on its output (whose graph below shows no parameter): both seen run, served with
    the clipped gradients of the step without checkpoints."""
    x, y = _data(device)
    reference, model = _model(device), _model(device)
    with per_sample_grads(reference, mode="clip", max_norm=1.0) as expected:
        _loss(torch.tanh(reference(x)), y).backward()
    with backward_on_the_device_thread(device):
        with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
            out = checkpoint(model, x.clone().requires_grad_(), use_reentrant=True)
            _loss(checkpoint(torch.tanh, out, use_reentrant=True), y).backward()
    torch.testing.assert_close(ps.norms, expected.norms)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    _assert_no_mode_left()


@pytest.mark.parametrize("done_step", [False, True], ids=["no-step", "after-a-step"])
def test_a_backward_after_the_with_block_refused_on_the_device_thread(device, done_step):
    """The node pre-hooks armed when the context closes refuse, on the device thread, a
    backward after the with block through a loss parameter's use (after a done step:
    one whose graph reaches the model's parameters), before its gradient is written."""
    model, (temperature, _) = _model(device), _temperature(device)
    x, y = _data(device)
    with backward_on_the_device_thread(device):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            out = model(x)
            if done_step:
                _loss(out, y).backward(retain_graph=True)
            loss = _loss(out / temperature, y)
        with pytest.raises(RuntimeError, match=AFTER_THE_BLOCK % ""):
            loss.backward()
    assert temperature.grad is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_scalar_temperature_of_a_cuda_model_refused_before_any_gradient():
    """A 0-dim CPU parameter mixes with CUDA tensors: its gradient node runs on the
    caller's thread (CPU work) while the model's run on the device thread, in parallel.
    Its hook's refusal still stops the backward before any p.grad is written."""
    model, temperature = _model("cuda"), nn.Parameter(torch.tensor(2.0, dtype=DT))
    x, y = _data("cuda")
    with pytest.raises(RuntimeError, match=REFUSAL % ""):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            _loss(model(x) / temperature, y).backward()
    torch.cuda.synchronize()
    assert all(p.grad is None for p in [*model.parameters(), temperature])
    _assert_no_mode_left()
    _assert_the_next_steps_served(model, "cuda")


# -------------------------------------------------------------------------------- served
def _forward(model: nn.Module, x: torch.Tensor, checkpointed: str | None) -> torch.Tensor:
    """The model's output, or its activation checkpoint's (``"reentrant"``: one that
    recomputes the model in its backward, on the device thread; ``"non-reentrant"``:
    one whose saved tensors' unpack hook recomputes it there)."""
    if checkpointed is None:
        return model(x)
    return checkpoint(model, x, use_reentrant=checkpointed == "reentrant")


def _clipped(model: nn.Module, batches, device: str, checkpointed: str | None) -> list:
    """``p.grad`` after one clip-mode context per micro-batch of ``batches`` (noise of
    σ = 0 added, as a DP step adds its own), on the device thread."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        with backward_on_the_device_thread(device):
            with per_sample_grads(model, mode="clip", max_norm=0.5) as ps:
                _loss(_forward(model, x, checkpointed), y).backward()
                ps.add_noise(0.0)
    return [p.grad.detach().cpu().clone() for p in model.parameters()]


def _reference(batches, checkpointed: str | None) -> list:
    """The same step on the CPU, the backward on the caller's thread."""
    model = _model("cpu")
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        with per_sample_grads(model, mode="clip", max_norm=0.5) as ps:
            _loss(_forward(model, x, checkpointed), y).backward()
            ps.add_noise(0.0)
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize(
    "checkpointed",
    [
        None,
        "reentrant",
        "non-reentrant",
    ],
    ids=["plain", "reentrant-checkpoint", "non-reentrant-checkpoint"],
)
def test_a_dp_step_on_the_device_thread_is_served_with_the_callers_gradients(
    device, micro_batches, checkpointed
):
    """A DP step (a plain model, or an activation checkpoint of it, which recomputes the
    model on the device thread; one context per micro-batch, summed in p.grad) is not
    refused on the device thread and gives the clipped gradients of the step run on the
    caller's thread."""
    x, y = _data("cpu", rows=6)
    x.requires_grad_(checkpointed is not None)
    batches = list(zip(x.chunk(micro_batches), y.chunk(micro_batches)))
    want = _reference(batches, checkpointed)
    on_device = [
        (xb.detach().to(device).requires_grad_(checkpointed is not None), yb.to(device))
        for xb, yb in batches
    ]
    got = _clipped(_model(device), on_device, device, checkpointed)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    _assert_no_mode_left()


@pytest.mark.parametrize("how", ["frozen", "detached", "left-out-by-inputs"])
def test_a_loss_parameter_without_a_gradient_is_served_on_the_device_thread(device, how):
    """A frozen or detached temperature, or one the backward's ``inputs`` leave out, gets
    no gradient: nothing to refuse on the device thread."""
    model, (temperature, _) = _model(device), _temperature(device)
    x, y = _data(device)
    if how == "frozen":
        temperature.requires_grad_(False)
    scale = temperature.detach() if how == "detached" else temperature
    with backward_on_the_device_thread(device):
        with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
            loss = _loss(model(x) / scale, y)
            loss.backward(inputs=list(model.parameters()) if how == "left-out-by-inputs" else None)
    assert ps.clip_factors.shape == (5,)
    assert all(p.grad is not None for p in model.parameters()) and temperature.grad is None


def test_a_second_models_graph_after_a_done_step_is_served_on_the_device_thread(device):
    """A second model's loss built inside the context after the step, its backward after
    the with block: the node pre-hooks walk its graph on the device thread and let it
    be (it does not reach the model's parameters)."""
    model, x, y = _model(device), *_data(device)
    second = nn.Linear(4, 3).to(device, DT)
    with backward_on_the_device_thread(device):
        with per_sample_grads(model, mode="clip", max_norm=1.0):
            out = model(x)
            _loss(out, y).backward()
            second_loss = _loss(second(x) + out.detach(), y)
        second_loss.backward()
    assert all(p.grad is not None for p in [*model.parameters(), *second.parameters()])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_dp_step_with_the_watch_at_work_waits_for_no_host_sync(monkeypatch):
    """Two micro-batch contexts of a DP step whose loss (torchbp's cross-entropy with
    padded targets) divides by a trainable temperature the backward's ``inputs`` leave
    out: the watch scans every call, hooks the temperature and the nodes its use feeds,
    walks the graph as the backward starts; none of it may wait for the GPU. Under
    ``set_sync_debug_mode('error')``, with the class-index check (the loss's documented
    sync) patched out; the first pass, not checked, warms the libraries up."""
    from torchbp import _checks

    monkeypatch.setattr(_checks, "check_class_indices", lambda *args: False)
    model, (temperature, _) = _model("cuda"), _temperature("cuda")
    x, y = _data("cuda", rows=8)
    y[::3] = -100
    generator = torch.Generator("cuda").manual_seed(0)
    previous = torch.cuda.get_sync_debug_mode()
    try:
        for checked in ("default", "error"):
            model.zero_grad(set_to_none=True)
            torch.cuda.set_sync_debug_mode(checked)
            for xb, yb in zip(x.chunk(2), y.chunk(2)):
                with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
                    loss = _loss(model(xb) / temperature, yb)
                    loss.backward(inputs=list(model.parameters()))
                    ps.add_noise(1.0, generator=generator)
            torch.cuda.set_sync_debug_mode(previous)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert temperature.grad is None
    assert all(p.grad.isfinite().all() for p in model.parameters())
