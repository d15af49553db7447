"""A Linear whose weight is a frozen ``torch.nn.utils.parametrize`` parametrization and
whose bias is trainable (bias-only fine-tuning of a constrained layer). The weight is
formed anew by every forward, so the layer's calls cannot be matched by it; it was
refused at creation. The calls are matched by the trainable bias now, whose per-sample
gradient ``Σ_t g_it`` needs no weight."""

from __future__ import annotations

import threading

import pytest
import torch
from tests._support import run_on_another_thread
from tests.per_sample._truth import assert_matches_truth, per_sample_truth, summed_cross_entropy
from torch import nn
from torch.nn.utils import parametrize

import torchbp
from torchbp.autograd.linear import per_sample_recorders_by_weight
from torchbp.per_sample import per_sample_grads


class _Doubled(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))
    parametrize.register_parametrization(model[0], "weight", _Doubled())
    model[0].parametrizations.weight.original.requires_grad_(False)
    return model


def test_frozen_parametrized_weight_with_a_trainable_bias_served():
    model, x, y = _model(), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    truth = per_sample_truth(model, x, y)
    with per_sample_grads(model, mode="grads") as ps:
        summed_cross_entropy(model, x, y).backward()
    assert ps.parameters == [model[0].bias, model[2].weight, model[2].bias]
    assert_matches_truth(model, ps, truth)


def test_sequence_inputs_give_the_bias_its_positions_summed():
    """(B, T, in) inputs: the bias's per-sample gradient sums the sample's positions."""
    model, x = _model(), torch.randn(5, 3, 4)
    with per_sample_grads(model, mode="grads") as ps:
        model(x).square().sum().backward()
    bias = model[0].bias
    assert bias.grad_sample.shape == (5, 6)
    torch.testing.assert_close(bias.grad_sample.sum(0), bias.grad)
    each = torch.cat([p.grad_sample.flatten(1) for p in ps.parameters], 1)
    torch.testing.assert_close(ps.norms, each.norm(dim=1))


def test_clip_mode_clips_the_bias_with_the_rest():
    model, x, y = _model(), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    truth = per_sample_truth(model, x, y)
    with per_sample_grads(model, mode="clip", max_norm=0.1) as ps:
        summed_cross_entropy(model, x, y).backward()
    norms = torch.stack([g.flatten(1).square().sum(1) for g in truth.values()]).sum(0).sqrt()
    factors = (0.1 / norms).clamp(max=1)
    torch.testing.assert_close(ps.norms, norms)
    for name, per_sample in truth.items():
        clipped = (factors.view(-1, *[1] * (per_sample.dim() - 1)) * per_sample).sum(0)
        torch.testing.assert_close(model.get_parameter(name).grad, clipped)
    assert model[0].parametrizations.weight.original.grad is None


def test_frozen_parametrized_bias_still_refused():
    model = nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))
    parametrize.register_parametrization(model[0], "bias", _Doubled())
    model[0].parametrizations.bias.original.requires_grad_(False)
    with pytest.raises(TypeError, match=r"'0' \(ParametrizedLinear\) has a parametrized bias"):
        per_sample_grads(model, mode="clip", max_norm=1.0)


def test_frozen_weight_norm_of_two_originals_served_and_a_trainable_one_refused():
    """torch.nn.utils.parametrizations.weight_norm forms the weight from two originals
    (magnitude and direction): frozen, the layer's bias is served like any frozen
    parametrized weight's; either original trainable is refused by name."""
    model, x, y = _model(), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    nn.utils.parametrizations.weight_norm(model[2])
    model[2].parametrizations.weight.requires_grad_(False)
    truth = per_sample_truth(model, x, y)
    with per_sample_grads(model, mode="grads") as ps:
        summed_cross_entropy(model, x, y).backward()
    assert ps.parameters == [model[0].bias, model[2].bias]
    assert_matches_truth(model, ps, truth)
    model[2].parametrizations.weight.original1.requires_grad_(True)
    with pytest.raises(TypeError, match=r"'2.parametrizations.weight'.*\(original1\)"):
        per_sample_grads(model, mode="clip", max_norm=1.0)


def _backward_on_another_thread(loss: torch.Tensor) -> None:
    """``loss.backward()`` on a thread of its own, where no context is open: as a CUDA
    backward runs a reentrant checkpoint's recomputation on the device's autograd thread."""
    run_on_another_thread(loss.backward)


def test_a_reentrant_checkpoint_recomputed_on_another_thread_is_recorded():
    """A reentrant checkpoint around the model recomputes its segment in the backward, on
    a device's autograd thread on CUDA, where the Linear call finds its context by its
    weight's id: a parametrized weight, formed anew by the recomputation, was not found,
    so the call was not recorded and its bias's ordinary gradient was refused as one
    "from an op other than its recorded Linear call" (asking whether the forward ran
    before the context was entered). Each weight formed inside the context is filed
    now: the results are those of the same step on the calling thread."""
    from torch.utils.checkpoint import checkpoint

    model, x, y = _model(), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    truth = per_sample_truth(model, x, y)
    wrapped = nn.Module()
    wrapped.model = model
    wrapped.forward = lambda t: checkpoint(model, t, use_reentrant=True)
    filed = len(per_sample_recorders_by_weight)
    with per_sample_grads(wrapped, mode="grads") as ps:
        loss = summed_cross_entropy(wrapped, x.requires_grad_(), y)
        _backward_on_another_thread(loss)
    assert_matches_truth(model, ps, truth)
    assert len(per_sample_recorders_by_weight) == filed  # each formed weight's entry gone


def test_a_reentrant_checkpoint_around_the_layer_served_on_each_device(device):
    """The same step as above with the backward on the calling thread: on CUDA the
    engine recomputes the segment on the device's autograd thread (the case above
    stands in for it on CPU), on CPU on the calling thread."""
    from torch.utils.checkpoint import checkpoint

    model, x = _model().to(device), torch.randn(5, 4, device=device)
    y = torch.tensor([0, 1, 2, 0, 1], device=device)
    truth = per_sample_truth(model, x, y)
    wrapped = nn.Module()
    wrapped.model = model
    wrapped.forward = lambda t: checkpoint(model, t, use_reentrant=True)
    with per_sample_grads(wrapped, mode="grads") as ps:
        summed_cross_entropy(wrapped, x.requires_grad_(), y).backward()
    assert_matches_truth(model, ps, truth)


def _checkpointed(model: nn.Module) -> nn.Module:
    """``model`` behind a reentrant activation checkpoint of its whole forward."""
    from torch.utils.checkpoint import checkpoint

    wrapped = nn.Module()
    wrapped.model = model
    wrapped.forward = lambda t: checkpoint(model, t, use_reentrant=True)
    return wrapped


def test_formed_weights_are_unfiled_at_an_exit_by_an_exception_with_the_graph_alive():
    """An error inside the context while the forward's graph (and the weights it formed)
    lives on: their entries go at the exit, and a weight formed after it is not filed
    (the hook on the parametrization is gone)."""
    model, filed = _model(), len(per_sample_recorders_by_weight)
    with pytest.raises(KeyError, match="boom"):
        with per_sample_grads(model, mode="grads"):
            out = model(torch.randn(5, 4))
            formed = model[0].weight
            assert id(formed) in per_sample_recorders_by_weight
            raise KeyError("boom")
    assert out.grad_fn is not None and id(formed) not in per_sample_recorders_by_weight
    assert id(model[0].weight) not in per_sample_recorders_by_weight
    assert len(per_sample_recorders_by_weight) == filed


def test_a_freed_formed_weight_leaves_no_entry_for_a_tensor_reusing_its_id():
    """A formed weight's entry goes when it is freed, inside the context: a tensor that
    Python later places at its address (the same id) is not taken for the weight by a
    linear call on another thread."""
    model = _model()
    with per_sample_grads(model, mode="grads"):
        formed = model[0].weight
        key = id(formed)
        assert per_sample_recorders_by_weight.get(key) is not None
        del formed
        assert key not in per_sample_recorders_by_weight
        reusing = [torch.empty(6, 4) for _ in range(100)]
        assert all(id(t) not in per_sample_recorders_by_weight for t in reusing)


def test_one_model_in_two_contexts_in_turn_recomputed_on_another_thread():
    """Two steps of one model, each in its own context, its reentrant checkpoint
    recomputed on another thread: the second finds its own context, not a stale entry
    of the first, and each step matches its truth."""
    model, y = _model(), torch.tensor([0, 1, 2, 0, 1])
    wrapped, filed = _checkpointed(model), len(per_sample_recorders_by_weight)
    for _ in range(2):
        x = torch.randn(5, 4)
        truth = per_sample_truth(model, x, y)
        model.zero_grad(set_to_none=True)
        with per_sample_grads(wrapped, mode="grads") as ps:
            _backward_on_another_thread(summed_cross_entropy(wrapped, x.requires_grad_(), y))
        assert_matches_truth(model, ps, truth)
        assert len(per_sample_recorders_by_weight) == filed


def test_two_contexts_on_two_threads_each_recomputed_on_a_thread_of_its_own():
    """Two models, each stepped in its own context on its own thread while the other
    runs, each backward recomputing its checkpoint on a further thread: each call finds
    its own context among the entries filed and unfiled concurrently."""
    models = [_model(), _model()]
    y = torch.tensor([0, 1, 2, 0, 1])
    inputs = [torch.randn(5, 4) for _ in models]
    truths = [per_sample_truth(m, x, y) for m, x in zip(models, inputs)]
    results, errors = [None, None], []
    start = threading.Barrier(2)

    def step(i: int) -> None:
        try:
            wrapped = _checkpointed(models[i])
            start.wait()
            for _ in range(3):
                models[i].zero_grad(set_to_none=True)
                with per_sample_grads(wrapped, mode="grads") as ps:
                    loss = summed_cross_entropy(wrapped, inputs[i].clone().requires_grad_(), y)
                    _backward_on_another_thread(loss)
            results[i] = ps
        except Exception as error:  # re-raised on the calling thread
            errors.append(error)

    threads = [threading.Thread(target=step, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for model, ps, truth in zip(models, results, truths):
        assert_matches_truth(model, ps, truth)


@pytest.mark.parametrize("mode", ["norms", "clip"])
def test_a_compiled_model_with_a_formed_weight_is_refused_by_the_context_not_by_dynamo(mode):
    """torch.compile(fullgraph=True) traced the hook that files each formed weight, and
    Dynamo raised its own Unsupported error from inside it: for an evaluation under
    torch.no_grad() in the context, which ran before, and in place of the context's
    refusal of torch.compile at the backward. The hook is skipped while compiling, as the
    context's other hooks are."""
    # a fresh Dynamo cache: the compiled frames of torch's module call are shared by every
    # compiled model of the process, and fullgraph fails once their recompile limit is hit
    torch.compiler.reset()
    model, x = _model(), torch.randn(5, 4)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with per_sample_grads(model, mode, 1.0 if mode == "clip" else None):
        with torch.no_grad():
            assert compiled(x).shape == (5, 3)
        out = compiled(x)
        with pytest.raises(RuntimeError, match="received a gradient .* torch.compile"):
            out.sum().backward()
