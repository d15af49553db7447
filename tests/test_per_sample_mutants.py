"""per_sample_grads: checks that kill mutants the rest of the suite let through (see
experiments/results/mutation_per_sample.md): chunk sizes at the memory budget, float16
norms beyond float16's range, noise on every element, a variance that cannot go below 0;
clip factors at an infinite norm, and backwards after one failed or cut short (M81..)."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from tests.test_per_sample_errors import _HookError, _raise_hook_error

import torchbp
from torchbp.per_sample import formulas, per_sample_grads


def _bmm_batches(monkeypatch) -> list[int]:
    """The batch sizes (samples per chunk) of every ``torch.bmm`` called from now on."""
    batches = []
    bmm = torch.bmm

    def measured_bmm(*args, **kwargs):
        batches.append(args[0].shape[0])
        return bmm(*args, **kwargs)

    monkeypatch.setattr(torch, "bmm", measured_bmm)
    return batches


@pytest.mark.parametrize(
    ("in_features", "out_features", "per_sample"),
    [(9, 8, 2 * 4 * 4), (3, 5, 3 * 5)],
    ids=["gram", "materialise"],
)
def test_norm_chunks_hold_as_many_samples_as_the_budget_allows(
    monkeypatch, in_features, out_features, per_sample
):
    """Each chunk of the (B, T, in) norm paths holds ⌊budget / per-sample elements⌋
    samples, the last one the rest: the Gram path forms two T×T matrices a sample
    (2·T² elements), the materialising path one out×in gradient. One sample more per
    chunk would exceed the budget by that sample's elements."""
    t, batch = 4, 7
    assert formulas.gram_is_cheaper(t, in_features, out_features) == (per_sample == 2 * t * t)
    a = torch.randn(batch, t, in_features, dtype=torch.float64)
    g = torch.randn(batch, t, out_features, dtype=torch.float64)
    monkeypatch.setattr(formulas, "_CHUNK_ELEMENTS", 2 * per_sample + 1)
    batches = _bmm_batches(monkeypatch)
    formulas.weight_norms(a, g)
    per_bmm = 2 if per_sample == 2 * t * t else 1
    assert batches == [n for n in (2, 2, 2, 1) for _ in range(per_bmm)]


@pytest.mark.parametrize("mode", ["norms", "clip"])
def test_float16_2d_norms_of_inputs_beyond_float16s_range(mode):
    """‖a_i‖ of a float16 (B, in) input can exceed float16's 65504 while every element,
    and the layer's output, fits (8 features of 30000: ‖a_i‖ ≈ 84853). The row norms are
    formed in float32; formed in float16 they are inf, and so are ps.norms, which makes
    clip mode drop every sample (c_i = C/inf = 0)."""
    layer = torchbp.nn.Linear(8, 1, bias=False).to(torch.float16)
    x = torch.full((3, 8), 30000.0, dtype=torch.float16)
    w = torch.full((3, 1), 1e-4, dtype=torch.float16)  # g = dL/dy = w exactly
    max_norm = 1.0 if mode == "clip" else None
    with per_sample_grads(layer, mode, max_norm) as ps:
        (layer(x) * w).sum().backward()
    # ‖G_i‖ = ‖g_i‖·‖a_i‖ = 1e-4 (as float16 rounds it) · 30000·√8
    norm = w[0, 0].item() * 30000.0 * 8**0.5
    torch.testing.assert_close(ps.norms, torch.full((3,), norm), rtol=1e-4, atol=0)
    if mode == "clip":
        # Σ_i c_i G_i with c_i = 1/norm: 3 · (1e-4 · 30000) / norm in each element
        expected = torch.full((1, 8), 3 * w[0, 0].item() * 30000.0 / norm, dtype=torch.float16)
        torch.testing.assert_close(layer.weight.grad, expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize("sigma", [0.0, 1e-3])
def test_add_noise_adds_to_the_clipped_gradient(sigma):
    """The noise is added to the clipped sum, which stays in p.grad: σ = 0 leaves it as it
    was, and σ > 0 moves it by the noise alone (drawn again here from the same seed). A
    p.grad replaced by the noise passed the statistical checks of the noise, whose clipped
    sums are tiny next to σC."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(5, 3)).double()
    x, target = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with per_sample_grads(model, mode="clip", max_norm=0.5) as ps:
        torchbp.functional.cross_entropy(model(x), target, reduction="sum").backward()
        clipped = [p.grad.clone() for p in ps.parameters]
        assert all(c.abs().max() > 0.01 for c in clipped)
        ps.add_noise(sigma, generator=torch.Generator().manual_seed(3))
    for p, c in zip(ps.parameters, clipped):
        noise = p.grad - c
        if sigma == 0.0:
            assert torch.equal(p.grad, c)
        else:
            # (σC = 5e-4: the noise, not the clipped sum, is what remains)
            assert noise.abs().max() < 20 * sigma * 0.5
            assert (noise != 0).all()


def test_add_noise_reaches_every_element_of_a_large_parameter():
    """Every element gets its own noise, across the CPU chunks (300,500 weight elements:
    two chunks, the last one partial). An element left out of the chunks would keep its
    clipped value, unprotected."""
    from torchbp.per_sample.noise import CHUNK

    torch.manual_seed(0)
    layer = torchbp.nn.Linear(600, 501)
    assert CHUNK < layer.weight.numel() < 2 * CHUNK
    with per_sample_grads(layer, mode="clip", max_norm=1.0) as ps:
        layer(torch.randn(0, 600)).sum().backward()  # empty batch: zero clipped grads
        ps.add_noise(1.0, generator=torch.Generator().manual_seed(0))
    for p in ps.parameters:
        assert (p.grad != 0).all()


def test_variance_of_identical_samples_is_never_negative():
    """Identical samples have no spread: p.grad_variance is 0. Formed as
    Σ_i G_i²/B − (Σ_i G_i/B)², float32 rounding leaves some elements slightly below 0
    (about −1e-6 here), whose square root, the standard deviation an optimizer reads, is
    nan: the difference is clamped at 0."""
    torch.manual_seed(0)
    layer = torchbp.nn.Linear(16, 8)
    x = torch.randn(1, 16).expand(10, 16).contiguous()
    w = torch.randn(1, 8).expand(10, 8).contiguous()  # g = dL/dy = w exactly
    with per_sample_grads(layer, mode="norms", statistics=True):
        (layer(x) * w).sum().backward()
    for p in (layer.weight, layer.bias):
        assert (p.grad_variance >= 0).all()
        assert p.grad_variance.sqrt().isfinite().all()
        torch.testing.assert_close(p.grad_variance, torch.zeros_like(p), rtol=0, atol=1e-4)


def test_second_backward_through_a_one_layer_model_after_an_input_only_backward_refused():
    """torch.autograd.grad w.r.t. the input passes the layer but reaches no parameter, so
    nothing marks the end of that backward; the training step's forward, made after it, is
    a second backward through the layer and is refused (with one layer, the earlier
    backward's filing is the latest one: its count equals the new call's). Summed with the
    first, both samples' gradients would be counted twice, silently."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(4, 3))
    x, target = torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2, 0, 1])
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        loss = torchbp.functional.cross_entropy(model(x), target)
        (grad_x,) = torch.autograd.grad(loss, x)
        adversarial = x.detach() + grad_x.sign()
        with pytest.raises(RuntimeError, match="second backward"):
            torchbp.functional.cross_entropy(model(adversarial), target).backward()
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("shared", ["weight", "bias"])
def test_trainable_parameter_shared_by_two_linears_refused_by_name(shared):
    """A trainable parameter tied between two Linears gets the sum of both layers'
    contributions, G_i = G_i¹ + G_i², whose norm is not the two layers' norms combined
    (‖G_i¹‖² + ‖G_i²‖² leaves out the cross term): refused before any forward, naming
    both modules."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torchbp.nn.Linear(4, 4), torchbp.nn.Tanh(), torchbp.nn.Linear(4, 4)
    ).double()
    setattr(model[2], shared, getattr(model[0], shared))
    with pytest.raises(
        ValueError, match=r"'2' \(Linear\) shares a trainable parameter with '0' \(Linear\)"
    ):
        per_sample_grads(model)


def test_add_noise_to_the_gradient_of_a_weight_stored_transposed():
    """The p.grad of a weight stored transposed is laid out like it (not contiguous), so
    it cannot be flattened into chunks: it gets its noise drawn whole. Flattened with
    view(-1), add_noise failed midway, after noising the parameters before it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(4, 3), torchbp.nn.Tanh(), torchbp.nn.Linear(3, 2))
    model[2].weight = torch.nn.Parameter(model[2].weight.detach().t().contiguous().t())
    x, target = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        torchbp.functional.cross_entropy(model(x), target, reduction="sum").backward()
        assert not model[2].weight.grad.is_contiguous()
        clipped = [p.grad.clone() for p in ps.parameters]
        ps.add_noise(1.0, generator=torch.Generator().manual_seed(0))
    for p, c in zip(ps.parameters, clipped):
        assert (p.grad != c).all()


def test_reentrant_split_after_an_input_only_backward_refused_naming_the_checkpoint():
    """An input-only backward through the first layer comes first (so the split is not
    caught at the first Linear backward), then a reentrant checkpoint of the head: its
    inner backward, a second backward, is refused at the recomputed head, naming the layer
    the earlier backward passed, the reentrant checkpoint and use_reentrant=False, not
    only as a 'second backward' to be fixed by a new context per step."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(4, 6), torchbp.nn.Tanh(), torchbp.nn.Linear(6, 3))
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model):
        torch.autograd.grad(model[0](x).sum(), x)
        out = checkpoint(model[2:], model[:2](x), use_reentrant=True)
        with pytest.raises(
            RuntimeError, match=r"Linear '0'.*reentrant activation checkpoint.*use_reentrant=False"
        ):
            out.sum().backward()


# --------------------------------------------------------------- M81..: fresh code
def _mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(torchbp.nn.Linear(4, 6), torchbp.nn.Tanh(), torchbp.nn.Linear(6, 3))


def _fail_input_grad_of(monkeypatch, layer: torch.nn.Module, error: BaseException) -> None:
    """Make ``g @ W``, the input gradient of ``layer``'s linear backward, raise ``error``."""
    matmul = torch.Tensor.__matmul__

    def failing_at_the_layer(a, b):
        if isinstance(b, torch.Tensor) and b.data_ptr() == layer.weight.data_ptr():
            raise error
        return matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", failing_at_the_layer)


def test_clip_factors_at_their_boundaries():
    """min(1, C/‖g_i‖): 1 at and below C (0 included), C/‖g_i‖ above, 0 for an infinite
    norm (not C/finfo.max, a tiny factor that keeps part of the sample), NaN for NaN."""
    norms = torch.tensor([0.0, 0.5, 1.0, 2.0, float("inf"), float("nan")])
    factors = formulas.clip_factors(norms, 1.0)
    assert factors[:5].tolist() == [1.0, 1.0, 1.0, 0.5, 0.0]
    assert factors[5].isnan()


def test_linear_whose_input_gradient_failed_keeps_no_recording(monkeypatch):
    """A Linear backward whose ``g @ W`` runs out of memory (caught) files nothing: its
    gradient is not held by the context until the with block ends (the memory the caller
    wants back; an LM head's is the step's largest)."""
    model = _mlp()
    seen = []
    with per_sample_grads(model):
        out = model(torch.randn(5, 4))
        out.register_hook(lambda grad: seen.append(weakref.ref(grad)))
        with monkeypatch.context() as patched:
            _fail_input_grad_of(patched, model[2], torch.OutOfMemoryError("simulated"))
            try:
                (out * torch.randn(5, 3)).sum().backward()
            except torch.OutOfMemoryError:
                pass
        gc.collect()
        assert seen[0]() is None


def test_backward_after_a_keyboard_interrupt_in_an_input_gradient_refused(monkeypatch):
    """A KeyboardInterrupt (not an Exception) while the head's second call forms ``g @ W``,
    its first call filed, caught: the context is told as for an error, and the backward of
    a forward made before it is refused, not formed with the half step's recording."""
    model = _mlp()
    x = torch.randn(5, 4)
    with per_sample_grads(model):
        made_before = model(x).sum()
        hidden = model[:2](x)
        failing = (model[2](hidden) + model[2](hidden * 2)).sum()
        with monkeypatch.context() as patched:
            _fail_input_grad_of(patched, model[2], KeyboardInterrupt())
            with pytest.raises(KeyboardInterrupt):
                failing.backward()
        with pytest.raises(RuntimeError, match="cut short"):
            made_before.backward()
        assert all(p.grad is None for p in model.parameters())


def test_input_gradient_error_outside_a_context_raised_as_it_is(monkeypatch):
    """Outside any per-sample context, an error forming ``g @ W`` reaches the caller
    unchanged (no AttributeError from telling a context that is not there)."""
    model = _mlp()
    loss = model(torch.randn(5, 4)).sum()
    _fail_input_grad_of(monkeypatch, model[2], torch.OutOfMemoryError("simulated"))
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        loss.backward()


def test_backward_after_a_stray_linear_whose_input_gradient_failed_refused(monkeypatch):
    """A Linear outside the model, called on its output, whose ``g @ W`` runs out of
    memory (caught): the context refuses any later backward, one of a forward made before
    included, as it does for the model's own Linears, and forms nothing."""
    model = _mlp()
    outside = torchbp.nn.Linear(3, 2)
    x = torch.randn(5, 4)
    with per_sample_grads(model) as ps:
        made_before = model(x).sum()
        failing = outside(model(x)).sum()
        with monkeypatch.context() as patched:
            _fail_input_grad_of(patched, outside, torch.OutOfMemoryError("simulated"))
            with pytest.raises(torch.OutOfMemoryError):
                failing.backward()
        with pytest.raises(RuntimeError, match="cut short"):
            made_before.backward()
        assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_model_trains_as_before_after_a_context_without_a_backward():
    """A context in which only an evaluation forward ran leaves no hook behind: two
    ordinary backwards after it accumulate as autograd's do (the hook that refuses a
    backward after one cut short would take the first for one)."""
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(5, 4)
    with per_sample_grads(model), torch.no_grad():
        model(x)
    model(x).sum().backward()
    once = [p.grad.clone() for p in model.parameters()]
    model(x).sum().backward()
    assert all(torch.equal(p.grad, 2 * g) for p, g in zip(model.parameters(), once))


def test_model_with_every_parameter_frozen_named_as_such():
    """A model whose parameters are all frozen: the refusal says 'every one frozen' (a
    model with none at all says it has no parameters)."""
    model = _mlp().requires_grad_(False)
    x = torch.randn(5, 4, requires_grad=True)
    with per_sample_grads(model) as ps:
        model(x).sum().backward()
        with pytest.raises(RuntimeError, match="every one frozen"):
            _ = ps.norms


def _cut_short_backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    """A backward through ``model`` cut short (caught) by a hook on the activation before
    the head, after the head's backward filed its recording."""
    hidden = model[:2](x)
    hidden.register_hook(_raise_hook_error)
    with pytest.raises(_HookError):
        model[2](hidden).sum().backward()


def test_results_after_leaving_a_context_whose_backward_was_cut_short_refused():
    """A backward cut short (caught) and the with block left without reading anything:
    the norms are refused after it, not formed on exit from the head's recording alone
    (silently partial norms)."""
    model = _mlp()
    with per_sample_grads(model) as ps:
        _cut_short_backward(model, torch.randn(5, 4))
    with pytest.raises(RuntimeError, match="nothing was formed"):
        _ = ps.norms


def test_every_backward_after_one_cut_short_refused_at_its_first_linear():
    """After a backward cut short (caught) and a later one refused for it, a third one is
    refused at its first Linear, naming it, before it files anything, not at the first
    parameter it reaches."""
    model = _mlp()
    x = torch.randn(5, 4)
    with per_sample_grads(model):
        first, second = model(x).sum(), model(x).sum()
        _cut_short_backward(model, x)
        with pytest.raises(RuntimeError, match="cut short"):
            first.backward()
        with pytest.raises(RuntimeError, match="through Linear '2'.*cut short"):
            second.backward()
        assert all(p.grad is None for p in model.parameters())


def test_every_backward_after_the_recorded_one_refused_as_a_second():
    """After the context's recorded backward, each later one is refused as a second
    backward, the results formed kept; a third is not told that the context 'forms
    nothing' because the second was refused."""
    model = _mlp()
    x = torch.randn(5, 4)
    with per_sample_grads(model) as ps:
        model(x).sum().backward()
        norms = ps.norms.clone()
        for _ in range(2):
            with pytest.raises(RuntimeError, match="second backward") as refused:
                model(x).sum().backward()
            assert "forms nothing" not in str(refused.value)
    assert torch.equal(ps.norms, norms)


@pytest.mark.parametrize("t", [1, 3], ids=["2d", "3d"])
def test_scaled_norms_of_negative_and_infinite_activations(t):
    """The scaled norms divide by each position's largest magnitude: of a sample whose
    activations are all negative (-1e25; its largest *value* is negative) as of a positive
    one, so that ‖a_i‖² cannot overflow (a scale of 1 gave inf); and not by an infinite
    one, which makes inf/inf = NaN where torch.func's norm of G_i (g_i nonzero) is inf."""
    a = torch.full((3, t, 4), -1e25)
    a[1] = 1.0
    a[2, :, 0] = torch.inf
    g = torch.full((3, t, 2), 1e-10)
    norms = formulas.layer_norms(a, g, weight=True, bias=False, scaled=True)
    # G_i = Σ_t g_it a_itᵀ: every element t·1e-10·a, over 2·4 elements
    expected = torch.tensor([t * 1e15, t * 1e-10, math.inf]) * math.sqrt(8)
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0)
