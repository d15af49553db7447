"""per_sample_grads against torch.func.vmap(grad(...)) in float64 (relative error <= 1e-10):
every mode, both reductions, 2-D and 3-D inputs, every activation, the loss options."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from tests._support import ACTIVATIONS
from torch.func import functional_call, grad, vmap

import torchbp
from torchbp.per_sample import per_sample_grads

DT = torch.float64
RTOL = 1e-10


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Max error relative to the reference's largest magnitude is at most RTOL."""
    assert ours.shape == ref.shape
    scale = ref.abs().max().clamp(min=1e-300)
    err = ((ours - ref).abs().max() / scale).item()
    assert err <= RTOL, f"relative error {err:.3g}"


def mlp(act=torchbp.nn.Tanh, d_in=5, hidden=7, classes=4, seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torchbp.nn.Linear(d_in, hidden),
        act(),
        torchbp.nn.Linear(hidden, hidden),
        act(),
        torchbp.nn.Linear(hidden, classes),
    ).to(DT)


def loss_parts(logits, target, reduction, **options):
    """(per-sample losses, the normaliser of the batch loss): loss = Σ_i ℓ_i / normaliser.

    ``logits`` ``(B, C)`` or ``(B, T, C)`` (target ``(B,)`` / ``(B, T)``); ℓ_i sums its rows.
    """
    if logits.dim() == 3:
        per_row = F.cross_entropy(logits.transpose(1, 2), target, reduction="none", **options)
        per_sample = per_row.sum(1)
    else:
        per_sample = F.cross_entropy(logits, target, reduction="none", **options)
    if reduction == "sum":
        return per_sample, 1.0
    weight = options.get("weight")
    keep = target != options.get("ignore_index", -100)
    weights = keep.to(DT) if weight is None else weight[target.clamp(min=0)] * keep
    return per_sample, weights.sum()


def reference(model, x, target, reduction, **options):
    """{name: (B, *p.shape)}: each sample's contribution to p.grad, by vmap(grad).

    The model keeps its own Parameters (see :func:`parameters_restored`)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    _, normaliser = loss_parts(model(x).detach(), target, reduction, **options)

    def sample_loss(p, xi, ti):
        out = functional_call(model, p, (xi[None],))
        per_sample, _ = loss_parts(out, ti[None], "sum", **options)
        return per_sample.sum() / normaliser

    with parameters_restored(model):
        return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)


@contextlib.contextmanager
def parameters_restored(model):
    """Put every module's own Parameters back on leaving: functional_call (torch 2.13,
    tie_weights=True) leaves a module that appears twice in the model, such as ``lin`` in
    ``Sequential(lin, tanh, lin)``, holding the plain tensors it was called with."""
    owned = [
        (module, name, p)
        for module in model.modules()
        for name, p in module.named_parameters(recurse=False)
    ]
    try:
        yield
    finally:
        for module, name, p in owned:
            setattr(module, name, p)


def batch_loss(model, x, target, reduction, **options):
    logits = model(x)
    if logits.dim() == 3:
        logits = logits.transpose(1, 2)
    return torchbp.nn.CrossEntropyLoss(reduction=reduction, **options)(logits, target)


def check_all_modes(model, x, target, reduction="mean", **options):
    """Run norms, grads, clip (with statistics) and compare each with the reference."""
    ref = reference(model, x, target, reduction, **options)
    names = list(ref)
    params = dict(model.named_parameters())
    batch = x.shape[0]
    # the loss the context sees is the reference's Σ_i ℓ_i / normaliser
    per_sample, normaliser = loss_parts(model(x).detach(), target, reduction, **options)
    close(
        batch_loss(model, x, target, reduction, **options).detach(), per_sample.sum() / normaliser
    )
    ref_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    ref_sum = {n: g.sum(0) for n, g in ref.items()}
    max_norm = ref_norms.median().item()  # some samples clipped, some not
    factors = (max_norm / ref_norms).clamp(max=1)

    for mode in ("norms", "grads", "clip"):
        model.zero_grad(set_to_none=True)
        with per_sample_grads(
            model, mode=mode, max_norm=max_norm if mode == "clip" else None, statistics=True
        ) as ps:
            batch_loss(model, x, target, reduction, **options).backward()
            # ready right after backward, inside the context
            close(ps.norms, ref_norms)
            assert ps.batch_size == batch
            for n in names:
                p, g = params[n], ref[n]
                if mode == "clip":
                    clipped = (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0)
                    close(p.grad, clipped)
                else:
                    close(p.grad, ref_sum[n])
                if mode == "grads":
                    close(p.grad_sample, g)
                close(p.sum_grad_squared, g.square().sum(0))
                close(p.grad_variance, g.var(0, correction=0))
        if mode == "clip":
            close(ps.clip_factors, factors)
    return ref


def targets(batch, classes, *rest, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(classes, (batch, *rest), generator=gen)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_modes_2d(reduction):
    model = mlp()
    x = torch.randn(6, 5, dtype=DT)
    check_all_modes(model, x, targets(6, 4), reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "hidden", [3, 16], ids=["materialise", "gram"]
)  # T=5: 5(in+out) vs in·out picks the path
def test_modes_3d(reduction, hidden):
    model = mlp(d_in=4, hidden=hidden, classes=3)
    x = torch.randn(4, 5, 4, dtype=DT)
    check_all_modes(model, x, targets(4, 3, 5), reduction)


@pytest.mark.parametrize("variant", ACTIVATIONS, ids=str)
def test_every_activation(variant):
    ours, _ = variant.modules()
    model = mlp(act=ours)
    x = torch.randn(6, 5, dtype=DT)
    check_all_modes(model, x, targets(6, 4), "mean")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "options",
    [
        {"weight": torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)},
        {"label_smoothing": 0.2},
        {"ignore_index": 1},
        {
            "weight": torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT),
            "ignore_index": 1,
            "label_smoothing": 0.1,
        },
    ],
    ids=["weight", "label_smoothing", "ignore_index", "all"],
)
def test_loss_options(reduction, options):
    model = mlp()
    x = torch.randn(8, 5, dtype=DT)
    target = targets(8, 4)
    if "ignore_index" in options:
        assert (target == options["ignore_index"]).any()
    check_all_modes(model, x, target, reduction, **options)


def test_nll_after_log_softmax_module():
    model = torch.nn.Sequential(mlp(), torchbp.nn.LogSoftmax(dim=-1))
    x, target = torch.randn(6, 5, dtype=DT), targets(6, 4)
    ref = reference(model[0], x, target, "mean")
    with per_sample_grads(model, mode="grads") as ps:
        torchbp.nn.NLLLoss()(model(x), target).backward()
    for name, g in ref.items():
        close(model[0].get_parameter(name).grad_sample, g)
    close(ps.norms, torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values())))


class Reuse(torch.nn.Module):
    """The hidden layer runs twice per sample: its per-sample gradient sums both calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torchbp.nn.Linear(5, 6)
        self.hid = torchbp.nn.Linear(6, 6)
        self.out = torchbp.nn.Linear(6, 3)
        self.act = torchbp.nn.SiLU()

    def forward(self, x):
        h = self.act(self.inp(x))
        h = self.act(self.hid(h))
        return self.out(self.act(self.hid(h)))


def test_layer_used_twice():
    model = Reuse().to(DT)
    check_all_modes(model, torch.randn(5, 5, dtype=DT), targets(5, 3))


def _listed_twice() -> torch.nn.Sequential:
    """The hidden Linear appears twice in the Sequential (one module at '2' and '4')."""
    torch.manual_seed(0)
    hidden = torchbp.nn.Linear(6, 6)
    model = torch.nn.Sequential(
        torchbp.nn.Linear(5, 6), torchbp.nn.Tanh(), hidden, torchbp.nn.Tanh(), hidden
    )
    return model.append(torchbp.nn.Tanh()).append(torchbp.nn.Linear(6, 3)).to(DT)


def test_reference_leaves_a_module_listed_twice_its_parameters():
    """reference() (functional_call) leaves every module its own Parameters, unchanged;
    before, the module listed twice was left holding plain tensors, which the context
    then no longer found trainable."""
    model = _listed_twice()
    owned = {(id(m), n): p for m in model.modules() for n, p in m.named_parameters(recurse=False)}
    values = {key: p.detach().clone() for key, p in owned.items()}
    reference(model, torch.randn(4, 5, dtype=DT), targets(4, 3), "sum")
    for module in model.modules():
        for name in dict(module.named_parameters(recurse=False)):
            p = getattr(module, name)
            assert p is owned[id(module), name], f"{type(module).__name__}.{name} replaced"
            assert torch.equal(p, values[id(module), name])


def test_module_listed_twice():
    """One Linear module at two places of a Sequential: one layer called twice."""
    check_all_modes(_listed_twice(), torch.randn(5, 5, dtype=DT), targets(5, 3))


@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_evaluation_forward_before_the_training_forward(mode):
    """A forward under no_grad inside the context is a call whose backward never comes:
    the layers then wait for the end of the backward instead of being formed during it,
    with the same results."""
    model = mlp()
    x, target = torch.randn(6, 5, dtype=DT), targets(6, 4)
    ref = reference(model, x, target, "mean")
    ref_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    max_norm = ref_norms.median().item() if mode == "clip" else None
    factors = (ref_norms.median() / ref_norms).clamp(max=1)
    with per_sample_grads(model, mode=mode, max_norm=max_norm) as ps:
        with torch.no_grad():
            model(x[:2])
        batch_loss(model, x, target, "mean").backward()
        close(ps.norms, ref_norms)
    for name, g in ref.items():
        p = model.get_parameter(name)
        scale = factors.view(-1, *[1] * (g.dim() - 1)) if mode == "clip" else 1.0
        close(p.grad, (g * scale).sum(0))
        if mode == "grads":
            close(p.grad_sample, g)


def test_frozen_parameters_skipped():
    model = mlp()
    model[0].weight.requires_grad_(False)  # trainable bias, frozen weight
    model[2].requires_grad_(False)  # whole layer frozen
    ref = check_all_modes(model, torch.randn(6, 5, dtype=DT), targets(6, 4))
    assert set(ref) == {"0.bias", "4.weight", "4.bias"}
    assert model[0].weight.grad is None and model[2].weight.grad is None
    assert not hasattr(model[2].weight, "grad_sample")


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torchbp.nn.Linear(5, 6)
        self.head = torchbp.nn.Linear(6, 3)
        self.unused = torchbp.nn.Linear(6, 2)

    def forward(self, x):
        h = torchbp.functional.relu(self.body(x))
        return self.head(h), self.unused(h)


def test_unused_head_contributes_nothing():
    model = TwoHeads().to(DT)
    x, target = torch.randn(6, 5, dtype=DT), targets(6, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xi, ti):
        return F.cross_entropy(functional_call(model, p, (xi[None],))[0], ti[None]) / 6

    ref = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)
    for mode in ("grads", "clip"):
        model.zero_grad(set_to_none=True)
        with per_sample_grads(model, mode, 0.05 if mode == "clip" else None) as ps:
            torchbp.functional.cross_entropy(model(x)[0], target).backward()
            close(ps.norms, torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values())))
        assert model.unused.weight.grad is None
        if mode == "grads":
            assert not model.unused.weight.grad_sample.any()
            close(model.head.weight.grad_sample, ref["head.weight"])


def test_clip_adds_to_existing_grad():
    model = mlp()
    x, target = torch.randn(6, 5, dtype=DT), targets(6, 4)
    ref = reference(model, x, target, "sum")
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    factors = (0.3 / norms).clamp(max=1)
    before = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = before[n].clone()
    with per_sample_grads(model, mode="clip", max_norm=0.3):
        batch_loss(model, x, target, "sum").backward()
    for n, p in model.named_parameters():
        g = ref[n]
        close(p.grad, before[n] + (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0))


def _noise(seed, max_norm=0.5, sigma=2.0):
    """The noise add_noise puts on a 600 -> 500 layer (300,500 elements: two CPU chunks)."""
    torch.manual_seed(0)  # the same model and batch every time
    model = torch.nn.Sequential(torchbp.nn.Linear(600, 500))
    x, target = torch.randn(4, 600), targets(4, 500)
    with per_sample_grads(model, mode="clip", max_norm=max_norm) as ps:
        batch_loss(model, x, target, "sum").backward()
        clipped = [p.grad.clone() for p in ps.parameters]
        ps.add_noise(sigma, generator=torch.Generator().manual_seed(seed))
    return torch.cat([(p.grad - c).flatten() for p, c in zip(ps.parameters, clipped)])


def test_add_noise_is_gaussian_with_std_sigma_c():
    noise = _noise(3).double()
    std = 2.0 * 0.5
    assert noise.numel() == 300_500
    # 300k draws: the sample std is within ~0.3% of σC, the mean within ~0.006·σC
    assert abs(noise.std().item() / std - 1) < 0.01
    assert abs(noise.mean().item()) < 0.01 * std
    # Gaussian tails: P(|z| > 3) = 0.27%
    assert abs((noise.abs() > 3 * std).double().mean().item() - 0.0027) < 0.0006
    # the two chunks of the weight are independent draws
    from torchbp.per_sample.noise import CHUNK

    first, second = noise[:CHUNK][: 300_000 - CHUNK], noise[CHUNK:300_000]
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 0.02


def test_add_noise_is_reproducible_with_a_seeded_generator():
    a, b, c = _noise(7), _noise(7), _noise(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the same noise with one thread or several
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        # (equal up to float32 rounding of clipped + noise - clipped)
        torch.testing.assert_close(_noise(7), a, rtol=0, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_noise_of_successive_steps_never_repeats():
    """Each step's noise is fresh. torch's CPU generator keeps only the low 32 bits of a
    seed, so noise drawn by generators seeded from the caller's repeated itself once
    about 2**16 chunks had been drawn (a likely event over a long DP-SGD run): with
    generator seed 98, steps 6034 and 10652 got the same noise, which the difference of
    their updates cancels."""
    from torchbp.per_sample.noise import add_gaussian_noise_

    # (what ps.add_noise draws, step after step: it is called once per context)
    grad = torch.zeros(1, 4, dtype=DT)
    generator = torch.Generator().manual_seed(98)
    noise = []
    for _ in range(10_653):
        grad.zero_()
        add_gaussian_noise_([grad], 1.0, generator)
        noise.append(grad.clone())
    assert torch.unique(torch.cat(noise), dim=0).shape[0] == len(noise)


def test_chunked_materialisation_matches(monkeypatch):
    # tiny chunks: the 3-D materialising paths loop over several sample slices
    from torchbp.per_sample import formulas

    monkeypatch.setattr(formulas, "_CHUNK_ELEMENTS", 20)
    model = mlp(d_in=4, hidden=3, classes=3)
    check_all_modes(model, torch.randn(5, 5, 4, dtype=DT), targets(5, 3, 5))


def test_formulas_gram_and_materialised_agree():
    from torchbp.per_sample import formulas

    a, g = torch.randn(3, 4, 6, dtype=DT), torch.randn(3, 4, 5, dtype=DT)
    brute = torch.einsum("bto,bti->boi", g, a).flatten(1).square().sum(1)
    close(formulas.weight_norms(a, g).square(), brute)  # 4·11 <= 30? no: materialised
    a, g = torch.randn(3, 2, 6, dtype=DT), torch.randn(3, 2, 5, dtype=DT)
    assert formulas.gram_is_cheaper(2, 6, 5)
    close(
        formulas.weight_norms(a, g).square(),
        torch.einsum("bto,bti->boi", g, a).flatten(1).square().sum(1),
    )


def test_plain_training_unchanged_outside_the_context():
    model = mlp()
    twin = torchbp.convert(mlp(), to="torch")  # same seed: same parameters, native autograd
    x, target = torch.randn(6, 5, dtype=DT), targets(6, 4)
    with per_sample_grads(model, mode="clip", max_norm=0.1):
        batch_loss(model, x, target, "mean").backward()
    model.zero_grad(set_to_none=True)
    batch_loss(model, x, target, "mean").backward()  # after the context: plain again
    F.cross_entropy(twin(x), target).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        close(p.grad, q.grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    from torch.utils.checkpoint import checkpoint

    model = mlp()
    x, target = torch.randn(6, 5, dtype=DT, requires_grad=reentrant), targets(6, 4)
    ref = reference(model, x.detach(), target, "mean")
    with per_sample_grads(model, mode="grads") as ps:
        out = checkpoint(model, x, use_reentrant=reentrant)
        torchbp.functional.cross_entropy(out, target).backward()
    for name, g in ref.items():
        close(model.get_parameter(name).grad_sample, g)
        close(model.get_parameter(name).grad, g.sum(0))
    close(ps.norms, torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values())))


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5)], ids=["2d", "3d"])
def test_bias_free_and_bias_only_layers(shape):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torchbp.nn.Linear(5, 6, bias=False),
        torchbp.nn.GELU(),
        torchbp.nn.Linear(6, 6),
        torchbp.nn.Tanh(),
        torchbp.nn.Linear(6, 4),
    ).to(DT)
    model[2].bias.requires_grad_(False)  # weight only
    model[4].weight.requires_grad_(False)  # bias only
    check_all_modes(model, torch.randn(*shape, dtype=DT), targets(shape[0], 4, *shape[1:-1]))


@pytest.mark.parametrize("shape", [(4, 64), (4, 3, 64)], ids=["2d", "3d"])
def test_float16_norms_do_not_overflow(shape):
    """A half-precision model on raw pixel values (‖a_i‖ ~ 1000): ‖g_i‖²‖a_i‖² is far
    beyond float16's 65504, so the squared norms are summed in float32. Before, the
    norms came out inf or nan and clip mode zeroed or poisoned p.grad."""
    dtype = torch.float16
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torchbp.nn.Linear(64, 8), torchbp.nn.Tanh(), torchbp.nn.Linear(8, 3)
    ).to(dtype)
    x = (torch.rand(*shape) * 255).to(dtype)
    target = targets(shape[0], 3, *shape[1:-1])
    ref = reference(model.to(DT), x.to(DT), target, "sum")
    ref_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    model.to(dtype)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        batch_loss(model, x, target, "sum").backward()
    torch.testing.assert_close(ps.norms.to(DT), ref_norms, rtol=0.05, atol=0)
    for name, g in ref.items():
        factors = (1.0 / ref_norms).clamp(max=1).view(-1, *[1] * (g.dim() - 1))
        clipped = (g * factors).sum(0)
        grad = model.get_parameter(name).grad
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.to(DT), clipped, rtol=0.05, atol=0.02)


def test_add_noise_reaches_parameters_without_gradient():
    model = TwoHeads().to(DT)
    x, target = torch.randn(6, 5, dtype=DT), targets(6, 3)
    with per_sample_grads(model, mode="clip", max_norm=0.5) as ps:
        torchbp.functional.cross_entropy(model(x)[0], target).backward()
        assert model.unused.weight.grad is None
        ps.add_noise(1.0, generator=torch.Generator().manual_seed(0))
    noise = model.unused.weight.grad
    assert noise is not None and noise.shape == model.unused.weight.shape
    assert noise.dtype == DT and bool((noise != 0).all())


def test_empty_batch_clip_gives_noise_only():
    # Poisson sampling (DP-SGD) can draw an empty batch: the step is then pure noise
    model = mlp()
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        batch_loss(model, torch.randn(0, 5, dtype=DT), targets(0, 4), "sum").backward()
        assert ps.norms.shape == (0,) and ps.batch_size == 0
        assert all(not p.grad.any() for p in model.parameters())
        ps.add_noise(1.0)
    assert all(p.grad.any() for p in model.parameters())


def test_max_norm_below_the_norms_smallest_number_keeps_zero_gradients_finite():
    """A positive max_norm that rounds to 0 in the norms' float32 (1e-46): a sample with a
    zero gradient got the factor C/‖g_i‖ = 0/0 = NaN, which made every p.grad NaN; its
    factor is min(1, C/0) = 1, and the others are clipped to 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(5, 7), torchbp.nn.Tanh(), torchbp.nn.Linear(7, 4))
    x = torch.randn(3, 5)
    with per_sample_grads(model, mode="clip", max_norm=1e-46) as ps:
        model(x)[[0, 2]].sum().backward()  # sample 1 contributes nothing
    assert ps.norms[1] == 0 and bool((ps.norms[[0, 2]] > 0).all())
    assert ps.clip_factors.tolist() == [0.0, 1.0, 0.0]
    assert all(not p.grad.isnan().any() for p in model.parameters())


def test_nan_norm_is_not_taken_for_a_small_one():
    """A sample whose norm is NaN (here a NaN input; before the squares were summed in
    float64, also ‖g_i‖² rounding to 0 and ‖a_i‖² to inf in float32) got the clip factor
    1 (NaN > C is false) and entered p.grad unclipped, silently breaking the bound C;
    min(1, C/NaN) is NaN, as it was before and as Opacus' factor is, which makes the
    failure visible in p.grad."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(5, 4))
    x = torch.full((3, 5), math.nan)
    with per_sample_grads(model, mode="clip", max_norm=0.01) as ps:
        model(x).sum().backward()
    assert ps.norms.isnan().all()
    assert ps.clip_factors.isnan().all()
    assert model[0].weight.grad.isnan().all()


@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_empty_batch_statistics_are_zeros(mode):
    """An empty batch (a Poisson draw) has no spread to measure: every statistic is 0, not
    the 0/0 of Σ_i G_i²/B (NaN, which an optimizer reading it would spread)."""
    model = mlp()
    with per_sample_grads(
        model, mode=mode, max_norm=1.0 if mode == "clip" else None, statistics=True
    ):
        batch_loss(model, torch.randn(0, 5, dtype=DT), targets(0, 4), "sum").backward()
    for p in model.parameters():
        assert p.grad_variance.shape == p.shape and p.grad_variance.dtype == DT
        assert not p.grad_variance.any() and not p.sum_grad_squared.any()


def test_every_mode_on_each_device(device):
    """The same checks on every device (the CUDA variant runs in scripts/cuda_checks.sh)."""
    model = mlp(torchbp.nn.GELU).to(device)
    x2, t2 = torch.randn(6, 5, dtype=DT, device=device), targets(6, 4).to(device)
    check_all_modes(model, x2, t2)
    x3 = torch.randn(4, 3, 5, dtype=DT, device=device)
    check_all_modes(model, x3, targets(4, 4, 3).to(device), reduction="sum")
    model.zero_grad(set_to_none=True)
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        batch_loss(model, x2, t2, "sum").backward()
        ps.add_noise(1.0)
    assert all(p.grad.device == x2.device and p.grad.isfinite().all() for p in ps.parameters)


def test_float16_statistics_do_not_overflow_midway():
    """Σ_i G_i² fits float16 here (< 30000), but its factor a² (inputs up to 300) does
    not: the statistics are summed in float32 and stored in the parameter's dtype."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(64, 3)).to(torch.float16)
    x = (torch.rand(4, 64) * 300).to(torch.float16)
    target = targets(4, 3)
    ref = reference(model.to(DT), x.to(DT), target, "mean")
    model.to(torch.float16)
    with per_sample_grads(model, mode="norms", statistics=True):
        batch_loss(model, x, target, "mean").backward()
    for name, g in ref.items():
        p = model.get_parameter(name)
        assert p.sum_grad_squared.dtype == p.grad_variance.dtype == torch.float16
        torch.testing.assert_close(
            p.sum_grad_squared.to(DT), g.square().sum(0), rtol=0.01, atol=1e-3
        )
        torch.testing.assert_close(
            p.grad_variance.to(DT), g.var(0, correction=0), rtol=0.02, atol=1e-2
        )


def test_gram_norms_never_negative():
    """‖G_i‖² through the T×T Gram matrices sums terms of both signs: when a sample's
    positions nearly cancel (here the same input twice, output gradients w and -w + 1e-5 ε)
    rounding can leave it slightly below 0, whose square root was nan, and clip mode then
    put nan into p.grad."""
    torch.manual_seed(0)
    layer = torchbp.nn.Linear(8, 8, bias=False)
    x = torch.randn(64, 1, 8).expand(64, 2, 8)
    w = torch.randn(64, 8)
    w_opposite = -w + 1e-5 * torch.randn(64, 8)
    with per_sample_grads(layer, mode="clip", max_norm=1.0) as ps:
        y = layer(x)
        ((y[:, 0] * w).sum() + (y[:, 1] * w_opposite).sum()).backward()
    assert bool((ps.norms >= 0).all()) and bool(layer.weight.grad.isfinite().all())


def test_gram_norms_chunked_over_samples(monkeypatch):
    """The Gram path of ‖G_i‖² for (B, T, in) inputs forms its two (B_chunk, T, T) Gram
    matrices a chunk of samples at a time, under the same budget as the materialising
    path. Before, it formed both for the whole batch at once: 2 × 256 MiB (float32) at
    B = 256, T = 512, where the materialising path stays within 16 MiB."""
    from torchbp.per_sample import formulas

    a, g = torch.randn(7, 4, 9, dtype=DT), torch.randn(7, 4, 8, dtype=DT)
    assert formulas.gram_is_cheaper(4, 9, 8)
    whole = formulas.weight_norms(a, g)
    close(whole.square(), torch.einsum("bto,bti->boi", g, a).flatten(1).square().sum(1))
    budget = 2 * (2 * 4 * 4)  # two samples' two Gram matrices a chunk
    monkeypatch.setattr(formulas, "_CHUNK_ELEMENTS", budget)
    largest = []
    bmm = torch.bmm

    def measured_bmm(*args, **kwargs):
        out = bmm(*args, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch, "bmm", measured_bmm)
    chunked = formulas.weight_norms(a, g)
    assert largest and max(largest) <= budget
    close(chunked, whole)


@pytest.mark.parametrize("shape", [(32, 64), (8, 4, 64)], ids=["2d", "3d"])
def test_float16_clipping_keeps_small_scaled_gradients(shape):
    """Clip mode scales each sample's output gradient by c_i before the one matmul. With
    small output gradients (~1e-3, as reduction='mean' gives) and unnormalised inputs
    (~100), c_i g_i falls below float16's smallest normal number (6e-5), where it keeps
    a few bits, though p.grad (~5e-3) is well inside the normal range. The scaled sums
    are formed in float32 and stored in float16; before, they were formed in float16
    and p.grad was off by up to 1.2% of its largest element (float16 rounding: 0.05%)."""
    torch.manual_seed(0)
    layer = torchbp.nn.Linear(64, 16).to(torch.float16)
    x = (torch.randn(*shape) * 100).to(torch.float16)
    w = (torch.randn(*shape[:-1], 16) * 1e-3).to(torch.float16)  # g = dL/dy = w exactly
    max_norm = 1e-2
    with per_sample_grads(layer, mode="clip", max_norm=max_norm):
        (layer(x) * w).sum().backward()
    a, g = x.to(DT).reshape(shape[0], -1, 64), w.to(DT).reshape(shape[0], -1, 16)
    per_sample = {"weight": torch.einsum("bto,bti->boi", g, a), "bias": g.sum(1)}
    norms = torch.sqrt(sum(v.flatten(1).square().sum(1) for v in per_sample.values()))
    factors = (max_norm / norms).clamp(max=1)
    assert (factors[:, None, None] * g.abs()).max() < 6.1e-5  # c_i g_i: float16 subnormal
    for name, v in per_sample.items():
        clipped = (v * factors.view(-1, *[1] * (v.dim() - 1))).sum(0)
        grad = getattr(layer, name).grad
        assert grad.dtype == torch.float16
        # float16 rounds to 2**-11 of a value: a few roundings of the largest element
        torch.testing.assert_close(grad.to(DT), clipped, rtol=0, atol=2e-3 * clipped.abs().max())


@pytest.mark.parametrize("shape", [(128, 8), (128, 2, 8)], ids=["2d", "3d"])
def test_float16_variance_formed_in_float32(shape):
    """Each sample's G_i ≈ 30 ± 0.5 element-wise: Σ_i G_i² (~1e5) is beyond float16's
    65504, so p.sum_grad_squared is inf, but the variance (~0.25) is an ordinary float16
    number. It is formed from float32 sums and stored in float16; before, it was formed
    from the float16 ones: inf (and where they fit, E[G²] - E[G]² cancelled away
    float16's 11 bits)."""
    torch.manual_seed(0)
    layer = torchbp.nn.Linear(8, 4).to(torch.float16)
    batch, t = shape[0], math.prod(shape[1:-1])
    x = torch.ones(*shape, dtype=torch.float16)
    spread = torch.randn(*shape[:-1], 4) * 0.5 / t
    w = (30.0 / t + spread).to(torch.float16)  # g = dL/dy = w exactly
    with per_sample_grads(layer, mode="norms", statistics=True):
        (layer(x) * w).sum().backward()
    g = w.to(DT).reshape(batch, t, 4).sum(1)  # G_i = g_i 1ᵀ, β_i = g_i (summed over T)
    for p, per_sample in ((layer.weight, g[:, :, None].expand(-1, -1, 8)), (layer.bias, g)):
        assert p.grad_variance.dtype == torch.float16
        variance = per_sample.var(0, correction=0)
        torch.testing.assert_close(p.grad_variance.to(DT), variance, rtol=5e-3, atol=0)
        assert p.sum_grad_squared.isinf().all()  # does not fit float16: inf is right


def test_float16_materialised_norms_do_not_overflow():
    """‖G_i‖² by materialising G_i (chosen when T(in + out) > in·out): G_i's elements
    (4 positions × 200 × 100 = 80000) overflow float16 though the norms and the clipped
    sums fit float32 and float16. G_i is formed in float32; before, it was formed in
    float16: the norms were inf and clip mode dropped those samples (c_i = C/inf = 0)."""
    from torchbp.per_sample import formulas

    layer = torchbp.nn.Linear(4, 64, bias=False).to(torch.float16)
    assert not formulas.gram_is_cheaper(4, 4, 64)
    x = torch.full((3, 4, 4), 200.0, dtype=torch.float16)
    w = torch.full((3, 4, 64), 100.0, dtype=torch.float16)  # g = dL/dy = w exactly
    with per_sample_grads(layer, mode="clip", max_norm=1.0) as ps:
        (layer(x) * w).sum().backward()
    # G_i = 80000 in each of 4·64 elements: ‖G_i‖ = 80000·16
    torch.testing.assert_close(ps.norms, torch.full((3,), 1.28e6), rtol=1e-3, atol=0)
    expected = torch.full((64, 4), 3 / 16, dtype=torch.float16)  # Σ_i c_i G_i
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "features,shape", [((0, 3), (4, 0)), ((0, 3), (4, 2, 0)), ((5, 0), (4, 5)), ((5, 0), (4, 2, 5))]
)
@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_features(features, shape, mode):
    """A Linear with no input or no output features (torchbp's Linear supports both):
    with loss Σ y, sample i's bias gradient is T ones (out,), its weight gradient empty.
    Before, forming dL/dW failed inside torch ('cannot reshape tensor of 0 elements into
    shape [-1, 0]')."""
    layer = torchbp.nn.Linear(*features).to(DT)
    batch, t, out = shape[0], math.prod(shape[1:-1]), features[1]
    with per_sample_grads(layer, mode, 1.0 if mode == "clip" else None, statistics=True) as ps:
        layer(torch.randn(*shape, dtype=DT)).sum().backward()
    norms = torch.full((batch,), t * out**0.5, dtype=DT)
    close(ps.norms, norms)
    factor = (1.0 / norms).clamp(max=1) if mode == "clip" else torch.ones(batch, dtype=DT)
    assert layer.weight.grad.shape == layer.weight.shape
    expected = torch.full((out,), t * factor.sum().item(), dtype=DT)
    torch.testing.assert_close(layer.bias.grad, expected, rtol=RTOL, atol=0)
    assert not layer.bias.grad_variance.any()


def test_float16_bias_norms_do_not_overflow():
    """β_i = Σ_t g_it over 700 positions of 100 is 70000: beyond float16's 65504, though
    its norm fits float32 and the clipped sum fits float16. β_i is summed in float32;
    before, in float16: the norms were inf and clip mode dropped every sample."""
    layer = torchbp.nn.Linear(1, 1).to(torch.float16)
    x = torch.full((2, 700, 1), 1e-3, dtype=torch.float16)
    w = torch.full((2, 700, 1), 100.0, dtype=torch.float16)  # g = dL/dy = w exactly
    with per_sample_grads(layer, mode="clip", max_norm=1.0) as ps:
        (layer(x) * w).sum().backward()
    # G_i = 700 · 100 · 1e-3 = 70 (x rounds to 0.0010004 in float16), β_i = 70000
    norms = torch.full((2,), math.hypot(70.0 * 1.0004, 70000.0))
    torch.testing.assert_close(ps.norms, norms, rtol=1e-4, atol=0)
    clipped = (70000.0 / norms).sum(0, keepdim=True)  # Σ_i c_i β_i
    torch.testing.assert_close(layer.bias.grad.float(), clipped, rtol=1e-3, atol=0)


def test_norms_summed_in_the_widest_layer_dtype():
    """A float32 body with a float64 head: the norms are float64 (the head's squared norms
    are not rounded to float32). Before, they were summed in the dtype of the first layer,
    float32."""
    torch.manual_seed(0)
    body = torchbp.nn.Linear(5, 6)
    head = torchbp.nn.Linear(6, 3).to(DT)
    model = torch.nn.Sequential(body, torchbp.nn.Tanh(), _ToDouble(), head)
    x, target = torch.randn(4, 5), targets(4, 3)
    with per_sample_grads(model, mode="norms") as ps:
        batch_loss(model, x, target, "sum").backward()
    ref = reference(model, x, target, "sum")
    ref_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    assert ps.norms.dtype == DT
    torch.testing.assert_close(ps.norms, ref_norms, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "features,shape",
    [((8, 8), (4, 8)), ((8, 8), (4, 2, 8)), ((4, 3), (4, 2, 4))],
    ids=["2d", "3d-gram", "3d-materialised"],
)
def test_float32_huge_activations_do_not_overflow_the_norms(features, shape):
    """A float32 model fed one sample of huge activations (3e19: ‖a_i‖² overflows float32)
    whose every target is ignored (g_i = 0, so G_i = 0 and ‖G_i‖ = 0 in torch.func), and
    one of 1e19 (‖G_i‖ ~ 1e19 fits float32, ‖G_i‖² does not). The squares are now summed
    in float64 (2-D) and the Gram matrices / G_i formed from samples scaled to at most 1
    (3-D). Before, ‖g_i‖²·‖a_i‖² = 0·inf gave the ignored sample a NaN norm, and clip mode
    put NaN into every element of p.grad; the other sample's norm was inf and clipping
    dropped it (c_i = 0) instead of scaling it to max_norm."""
    torch.manual_seed(0)
    model = torchbp.nn.Linear(*features)
    x = torch.randn(*shape)
    x[0], x[1] = 3e19, 1e19
    target = targets(shape[0], features[1], *shape[1:-1])
    target[0] = -100  # every position of sample 0 ignored
    per_sample = {n: g.double() for n, g in reference(model, x, target, "sum").items()}
    ref_norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_sample.values()))
    assert ref_norms[0] == 0 and math.isfinite(ref_norms[1]) and ref_norms[1] > 1e19
    with per_sample_grads(model, mode="clip", max_norm=1.0) as ps:
        batch_loss(model, x, target, "sum").backward()
    torch.testing.assert_close(ps.norms.double(), ref_norms, rtol=1e-5, atol=0)
    factors = (1.0 / ref_norms).clamp(max=1)
    for name, g in per_sample.items():
        clipped = (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0)
        grad = model.get_parameter(name).grad
        torch.testing.assert_close(grad.double(), clipped, rtol=1e-4, atol=1e-5)


def test_float32_statistics_of_an_ignored_sample_with_huge_activations():
    """A float32 sample of activations 3e19 (a_i² overflows float32) whose target is
    ignored (g_i = 0): its G_i is 0 and adds nothing to Σ_i G_i². (g²)ᵀ(a²) made that
    0·inf = NaN in every element of p.sum_grad_squared and p.grad_variance; the squares
    are now of s_i g_i and a_i / s_i, s_i the sample's largest |a_i|."""
    torch.manual_seed(0)
    model = torchbp.nn.Linear(4, 3)
    x, target = torch.randn(5, 4), targets(5, 3)
    x[0], target[0] = 3e19, -100
    per_sample = {n: g.double() for n, g in reference(model, x, target, "sum").items()}
    with per_sample_grads(model, mode="norms", statistics=True):
        batch_loss(model, x, target, "sum").backward()
    for name, g in per_sample.items():
        p = model.get_parameter(name)
        variance = g.square().mean(0) - g.mean(0).square()
        torch.testing.assert_close(
            p.sum_grad_squared.double(), g.square().sum(0), atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(p.grad_variance.double(), variance, atol=1e-6, rtol=1e-5)


def test_float32_statistics_of_a_huge_activation_beside_small_ones():
    """Sample 0's activations are 1e30, 1e-20 and 0, its output gradient 1: G_0's first
    column is 1e30 (its square inf in float32, as in torch.func), the others 1e-20 and
    0. Squaring s_0 g_0 (s_0 = 1e30) gave inf, times (a_0 / s_0)² = 0: NaN in those
    columns of p.sum_grad_squared, where sample 1 makes them 4 and 9. The factors are now
    balanced, each at most (s_i r_i)^½ (the largest |G_i|)."""
    layer = torchbp.nn.Linear(3, 2)
    x = torch.tensor([[1e30, 1e-20, 0.0], [1.0, 2.0, 3.0]])
    upstream = torch.ones(2, 2)  # dL/dy
    with per_sample_grads(layer, mode="norms", statistics=True):
        (layer(x) * upstream).sum().backward()
    per_sample = torch.einsum("bo,bi->boi", upstream.double(), x.double())
    expected = per_sample.square().sum(0).float()  # inf in column 0, as torch.func's
    torch.testing.assert_close(layer.weight.sum_grad_squared, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize(
    "shape,features",
    [((5, 1, 6), (6, 4)), ((5, 3, 6), (6, 4)), ((5, 3, 2), (2, 3)), ((5, 0, 6), (6, 4))],
    ids=["2d", "3d-gram", "3d-materialised", "no-positions"],
)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_layer_norms_match_torch_func(shape, features, weight, bias, scaled):
    """The layer norms, plain or (the CPU's fallback where the plain ones overflow, the
    only ones off the CPU, so untested there by the CPU suite otherwise) formed from
    positions rescaled to at most 1 and combined as norms, equal in float64 the norms of
    torch.func's per-sample gradients, for all-zero samples (scale 1, not 0) and empty
    ones too."""
    from torchbp.per_sample import formulas

    torch.manual_seed(0)
    a = torch.randn(*shape[:2], features[0], dtype=DT)
    g = torch.randn(*shape[:2], features[1], dtype=DT)
    a[1], g[2] = 0.0, 0.0  # all-zero samples: their scale is 1, not 0
    norms = formulas.layer_norms(a, g, weight=weight, bias=bias, scaled=scaled)
    ref = torch.zeros(shape[0], dtype=DT)
    if weight:
        ref += torch.einsum("bto,bti->boi", g, a).square().sum((1, 2))
    if bias:
        ref += g.sum(1).square().sum(1)
    assert norms.dtype == DT
    torch.testing.assert_close(norms, ref.sqrt(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("features", [(1, 1), (4, 4)], ids=["materialised", "gram"])
def test_norm_of_positions_of_very_different_scales_in_float32(features):
    """Sample 1's two positions pair a 1e13 activation with a 1e-12 output gradient and
    the other way round: each element of G_1 is 10 + 10, ‖G_1‖ = 20 √(in·out). Sample 0
    (activations 1e19, gradients 1e10: ‖G_0‖² overflows float32) made the CPU form every
    norm again from samples scaled by their largest element (off the CPU, always so):
    Ĝ_1 = 2e-25, whose float32 square underflows to 0: norm 0, clip factor 1, and the
    sample entered p.grad unclipped (20 times max_norm). Each position is now scaled by
    its own size, and norms, not squares, are combined."""
    from torchbp.per_sample import formulas

    layer = torchbp.nn.Linear(*features, bias=False)
    assert formulas.gram_is_cheaper(2, *features) == (features[0] > 1)
    x = torch.full((2, 2, features[0]), 1e19)
    x[1, 0], x[1, 1] = 1e13, 1e-12
    upstream = torch.tensor([[1e10, 1e10], [1e-12, 1e13]])[..., None]  # dL/dy
    with torch.no_grad():
        layer.weight.fill_(1.0)
    with per_sample_grads(layer, mode="clip", max_norm=1.0) as ps:
        (layer(x) * upstream).sum().backward()
    root = math.sqrt(features[0] * features[1])
    expected = torch.tensor([2e29 * root, 20.0 * root])
    torch.testing.assert_close(ps.norms, expected, rtol=1e-5, atol=0)
    # both clipped to norm 1, and their G_i point the same way: ‖Σ_i c_i G_i‖ = 2
    assert layer.weight.grad.double().norm() == pytest.approx(2.0, rel=1e-5)


class _ToDouble(torch.nn.Module):
    def forward(self, x):
        return x.double()


@pytest.mark.parametrize("named", [["0.weight"], ["4.weight"], ["2.bias", "4.bias"]])
@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_backward_with_inputs_accounts_for_their_parameters_only(mode, named):
    """loss.backward(inputs=[...]) forms these parameters' gradients only: each sample's
    contribution to p.grad, whose norm ps.norms is and by which clip mode clips, is
    theirs. Before, the norms covered whatever Linear layers the backward happened to run
    through (every layer for the first layer's weight, the head's bias too for the head's
    weight), so clip mode scaled p.grad by factors of gradients formed nowhere, and
    p.grad_sample of an unnamed layer was set though its p.grad was not."""
    model = mlp()
    x, target = torch.randn(6, 5, dtype=DT), targets(6, 4)
    ref = reference(model, x, target, "sum")
    norms = torch.sqrt(sum(ref[n].flatten(1).square().sum(1) for n in named))
    max_norm = norms.median().item() if mode == "clip" else None
    factors = (norms.median() / norms).clamp(max=1) if mode == "clip" else torch.ones(6, dtype=DT)
    with per_sample_grads(model, mode=mode, max_norm=max_norm, statistics=True) as ps:
        batch_loss(model, x, target, "sum").backward(inputs=[model.get_parameter(n) for n in named])
    close(ps.norms, norms)
    for name, g in ref.items():
        p = model.get_parameter(name)
        if name in named:
            close(p.grad, (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0))
        else:
            assert p.grad is None, name
            g = torch.zeros_like(g)  # this backward contributes nothing to it
        if mode == "grads":
            close(p.grad_sample, g)
        close(p.sum_grad_squared, g.square().sum(0))


@pytest.mark.parametrize(
    ("first", "then", "stale"),
    [
        ({"mode": "grads"}, {"mode": "norms"}, ("grad_sample",)),
        ({"mode": "grads"}, {"mode": "clip", "max_norm": 1.0}, ("grad_sample",)),
        (
            {"mode": "norms", "statistics": True},
            {"mode": "norms"},
            ("sum_grad_squared", "grad_variance"),
        ),
    ],
)
def test_results_of_an_earlier_context_are_not_left_for_a_later_one(first, then, stale):
    """A later context that does not form ``p.grad_sample`` (or the statistics) leaves none:
    the earlier step's would be read as this step's (and keep B×|θ| alive)."""
    model = mlp()
    x, target = torch.randn(6, 5, dtype=DT), targets(6, 4)
    for options in (first, then):
        model.zero_grad()
        with per_sample_grads(model, **options):
            batch_loss(model, x, target, "sum").backward()
    for p in model.parameters():
        for name in stale:
            assert getattr(p, name) is None, name


def test_frozen_weight_shared_by_layers_with_their_own_trainable_biases():
    # tied weights, frozen, each Linear training its own bias: every trainable parameter
    # belongs to one Linear, so nothing is shared that per-sample gradients cannot attribute
    model = mlp(hidden=5, d_in=5)
    model[2].weight = model[0].weight
    model[0].weight.requires_grad_(False)
    ref = check_all_modes(model, torch.randn(6, 5, dtype=DT), targets(6, 4))
    assert set(ref) == {"0.bias", "2.bias", "4.weight", "4.bias"}


@pytest.mark.parametrize("mode", ["norms", "clip"])
def test_new_grad_of_a_transposed_weight_laid_out_like_it(mode):
    """Autograd lays a new p.grad out like its parameter (the gradient layout contract);
    for a weight stored transposed the context's p.grad was row-major, so the next plain
    backward warned 'grad and param do not obey the gradient layout contract' and
    accumulated slower. It now has the parameter's strides, as autograd's does."""
    model, plain = mlp(), mlp()
    for m in (model, plain):
        m[2].weight = torch.nn.Parameter(m[2].weight.detach().t().contiguous().t())
    x, target = torch.randn(6, 5, dtype=DT), targets(6, 4)
    with per_sample_grads(model, mode, max_norm=1e6 if mode == "clip" else None):
        batch_loss(model, x, target, "sum").backward()
    batch_loss(plain, x, target, "sum").backward()
    for p, ref in zip(model.parameters(), plain.parameters()):
        assert p.grad.stride() == ref.grad.stride() == p.stride()
        close(p.grad, ref.grad)
