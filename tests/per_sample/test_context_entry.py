"""Entering a per_sample_grads context: no hook left behind by an entry that fails, entry
under ``torch.inference_mode()``, lazy Linear modules before their first forward, and
leaving it on the thread that entered it."""

from __future__ import annotations

import threading

import pytest
import torch
from tests.per_sample._truth import assert_matches_truth, per_sample_truth, summed_cross_entropy
from torch import nn

import torchbp
from torchbp.autograd.linear import per_sample_recorders_by_weight, per_sample_recording
from torchbp.per_sample import per_sample_grads


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(5, 4, dtype=torch.double), torch.tensor([0, 1, 2, 0, 1])


def _assert_plain_training_works(model: nn.Module) -> None:
    """Autograd's own gradients, as from a fresh copy of the model: no marker hook left
    on a parameter refuses them, no recorder is left registered."""
    x, y = _data()
    model.zero_grad(set_to_none=True)
    summed_cross_entropy(model, x, y).backward()
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    summed_cross_entropy(fresh, x, y).backward()
    for p, q in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert getattr(per_sample_recording, "recorder", None) is None
    assert not any(id(p) in per_sample_recorders_by_weight for p in model.parameters())


def test_an_entry_that_fails_leaves_no_hook_behind(monkeypatch):
    """An error while the hooks are registered (here the multi-gradient hook, which
    failed under inference mode) used to leave the parameters' marker hooks in place:
    every later backward outside the context was refused as a stray gradient."""
    model = _model()

    def failing(*args, **kwargs):
        raise RuntimeError("cannot hook")

    context = per_sample_grads(model)
    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd.graph, "register_multi_grad_hook", failing)
        with pytest.raises(RuntimeError, match="cannot hook"):
            context.__enter__()
    _assert_plain_training_works(model)


def test_entered_under_inference_mode():
    """Entering under torch.inference_mode() failed with an AttributeError inside
    register_multi_grad_hook (and left hooks behind); a step that turns inference mode
    off inside the context now gives torch.func's per-sample gradients."""
    model = _model()
    x, y = _data()
    truth = per_sample_truth(model, x, y)
    with torch.inference_mode():
        with per_sample_grads(model, mode="grads") as ps:
            with torch.inference_mode(False):
                summed_cross_entropy(model, x, y).backward()
    assert_matches_truth(model, ps, truth)
    _assert_plain_training_works(model)


def test_lazy_linear_refused_by_name_until_its_first_forward():
    """A converted nn.LazyLinear holds UninitializedParameters until its first forward:
    entering failed inside Tensor.register_hook, after the other parameters' hooks were
    registered. Now refused at creation, naming it; after a forward it works."""
    torch.manual_seed(0)
    model = torchbp.convert(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LazyLinear(3)))
    with pytest.raises(ValueError, match=r"'2' \(LazyLinear\) has uninitialized parameters"):
        per_sample_grads(model)
    model = model.double()
    x, y = _data()
    model(x)  # initializes the lazy parameters
    truth = per_sample_truth(model, x, y)
    with per_sample_grads(model, mode="grads") as ps:
        summed_cross_entropy(model, x, y).backward()
    assert_matches_truth(model, ps, truth)


@pytest.mark.parametrize("mode", ["norms", "clip"])
def test_leaving_on_another_thread_refused_and_the_context_stays_open_for_its_own(mode):
    """``__exit__`` on a thread other than the one that entered the context: the
    recording and clip mode's torch function mode are that thread's, so it unregistered
    nothing of the entering thread (every later context there was refused as nested) and
    clip mode's pop failed with torch's 'trying to pop from empty mode stack'. Refused by
    name, leaving the context open; its own thread then leaves it as usual."""
    model, (x, y) = _model(), _data()
    context = per_sample_grads(model, mode, max_norm=1.0 if mode == "clip" else None)
    context.__enter__()
    summed_cross_entropy(model, x, y).backward()
    raised: list[BaseException] = []

    def leave() -> None:
        try:
            context.__exit__(None, None, None)
        except RuntimeError as error:
            raised.append(error)

    worker = threading.Thread(target=leave)
    worker.start()
    worker.join()
    assert len(raised) == 1
    assert "left on the thread that entered it" in str(raised[0])
    context.__exit__(None, None, None)
    assert context.norms.shape == (5,)
    _assert_plain_training_works(model)
