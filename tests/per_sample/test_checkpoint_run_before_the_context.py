"""Clip mode and a reentrant activation checkpoint (``use_reentrant=True``) run before
the context was entered, whose output joins the loss inside it.

Its forward keeps no graph, so nothing inside the context saw the parameters its
segment uses; its backward recomputes the segment and gave a trainable one (a head
outside the model) its ordinary, unclipped gradient, silently (a DP leak). The graph of
``loss.backward()`` shows the checkpoint's node, whose segment the context never saw
run: refused as the backward starts, before any gradient is written; so is one made on
another thread, on the model's output (the graph below it reaching the model's
parameters does not make it seen). One run inside the context on its thread (after the
model, in the loss; a frozen segment in front of the trainable layers) whose segment uses
no trainable parameter outside the model stays served, and so is the same step without a
checkpoint or with ``use_reentrant=False``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchbp
from torchbp.per_sample import per_sample_grads

REFUSAL = r"reentrant activation checkpoint.*not seen run inside the context.*unclipped"


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))


def _loss(out: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 0, 1]), reduction="sum")


def _head_and_input() -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(2)
    return nn.Linear(2, 3), torch.randn(5, 2, requires_grad=True)


def test_a_checkpoint_run_before_the_context_refused_before_any_gradient():
    model, (head, z) = _model(), _head_and_input()
    extra = checkpoint(head, z, use_reentrant=True)
    with pytest.raises(RuntimeError, match=REFUSAL):
        with per_sample_grads(model, mode="clip", max_norm=0.1):
            _loss(model(torch.randn(5, 4)) + extra).backward()
    assert all(p.grad is None for p in [*model.parameters(), *head.parameters()])
    assert z.grad is None


def test_a_parameter_free_checkpoint_in_the_loss_inside_the_context_served():
    model, x = _model(), torch.randn(5, 4)
    reference = _model()
    with per_sample_grads(reference, mode="clip", max_norm=0.1) as expected:
        _loss(torch.tanh(reference(x))).backward()
    with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
        _loss(checkpoint(torch.tanh, model(x), use_reentrant=True)).backward()
    torch.testing.assert_close(ps.norms, expected.norms)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("preserve_rng_state", [True, False])
def test_an_identity_checkpoint_in_the_loss_inside_the_context_served(preserve_rng_state):
    """A segment returning its input makes no torch call of its own: it is seen run by
    the checkpoint's own calls made with grad mode off around it (its ``no_grad`` block,
    the reads of its inputs' properties), without the random state's save too."""
    model, x = _model(), torch.randn(5, 4)
    reference = _model()
    with per_sample_grads(reference, mode="clip", max_norm=0.1) as expected:
        _loss(reference(x)).backward()
    with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
        out = checkpoint(
            lambda t: t, model(x), use_reentrant=True, preserve_rng_state=preserve_rng_state
        )
        _loss(out).backward()
    torch.testing.assert_close(ps.norms, expected.norms)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_the_model_run_inside_a_checkpoint_of_its_own_inside_the_context_served():
    """``checkpoint(model, x)`` inside the context: the segment that ran the model's
    Linears is seen run, and served as without the checkpoint."""
    model, reference = _model(), _model()
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(reference, mode="clip", max_norm=0.1) as expected:
        _loss(reference(x)).backward()
    with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
        _loss(checkpoint(model, x, use_reentrant=True)).backward()
    torch.testing.assert_close(ps.norms, expected.norms)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("mode", ["norms", "grads"])
def test_other_modes_give_the_head_its_ordinary_gradient(mode):
    """Norms and grads modes leave parameters outside the model to autograd."""
    model, (head, z) = _model(), _head_and_input()
    extra = checkpoint(head, z, use_reentrant=True)
    with per_sample_grads(model, mode) as ps:
        _loss(model(torch.randn(5, 4)) + extra).backward()
    assert ps.norms.shape == (5,)
    assert head.weight.grad is not None


def test_a_parameter_free_checkpoint_after_a_checkpoint_of_the_model_served():
    """A reentrant checkpoint run inside the context on the output of another one (the
    model's): the graph below it shows no parameter of the model (the model's own
    checkpoint keeps no graph), but the context saw its segment run (was refused as
    unseen)."""
    model, reference = _model(), _model()
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(reference, mode="clip", max_norm=0.1) as expected:
        _loss(torch.tanh(reference(x))).backward()
    with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
        out = checkpoint(model, x, use_reentrant=True)
        _loss(checkpoint(torch.tanh, out, use_reentrant=True)).backward()
    torch.testing.assert_close(ps.norms, expected.norms)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_frozen_checkpoint_segments_in_front_of_the_trainable_layer_served():
    """``checkpoint_sequential`` over a frozen backbone with a trainable last Linear (DP
    fine-tuning): the frozen segments, run inside the context, were refused as unseen."""
    from torch.utils.checkpoint import checkpoint_sequential

    def backbone_and_head() -> nn.Sequential:
        torch.manual_seed(0)
        layers = [torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 6), nn.Tanh()]
        return nn.Sequential(*layers, torchbp.nn.Linear(6, 3)).requires_grad_(False)

    model, reference = backbone_and_head(), backbone_and_head()
    for m in (model, reference):
        m[4].requires_grad_(True)
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(reference, mode="clip", max_norm=0.1) as expected:
        _loss(reference(x)).backward()
    with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
        _loss(checkpoint_sequential(model, 3, x, use_reentrant=True)).backward()
    torch.testing.assert_close(ps.norms, expected.norms)
    torch.testing.assert_close(model[4].weight.grad, reference[4].weight.grad)


def test_a_checkpoint_of_a_head_run_on_another_thread_refused_before_any_gradient():
    """The head's checkpoint run on a worker thread, on the model's output made inside
    the context: the graph below it reaches the model's parameters, which let it be, and
    its recomputation gave the head an unclipped gradient, silently."""
    import threading

    model, head = _model(), nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match=REFUSAL):
        with per_sample_grads(model, mode="clip", max_norm=0.1):
            out, made = model(torch.randn(5, 4)), []
            worker = threading.Thread(
                target=lambda: made.append(checkpoint(head, out, use_reentrant=True))
            )
            worker.start()
            worker.join()
            _loss(made[0]).backward()
    assert all(p.grad is None for p in [*model.parameters(), *head.parameters()])


def test_a_checkpoint_of_a_head_on_the_models_output_both_run_before_the_context_refused():
    """The model's forward and the head's checkpoint on its output both run before the
    context: the head got an unclipped gradient from the recomputation before the model's
    Linear refused its unrecorded call."""
    model, head = _model(), nn.Linear(3, 3)
    out = checkpoint(head, model(torch.randn(5, 4)), use_reentrant=True)
    with pytest.raises(RuntimeError, match=REFUSAL):
        with per_sample_grads(model, mode="clip", max_norm=0.1):
            _loss(out).backward()
    assert all(p.grad is None for p in [*model.parameters(), *head.parameters()])
