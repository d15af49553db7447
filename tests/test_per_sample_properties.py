"""per_sample_grads on drawn models against torch.func.vmap(grad(...)) in float64.

Hypothesis draws small architectures from what the context supports (Linear with and
without bias, every activation, LayerNorm without affine or with a frozen one, Dropout(0),
Flatten, Identity, residual blocks, one Linear used twice, frozen weights, biases and
layers), 2-D and 3-D inputs, the cross-entropy options (reduction, label smoothing, class
weights, ignore_index with some samples ignored), ``loss.backward()`` or
``loss.backward(inputs=[...])`` naming some parameters, a gradient already in ``p.grad``,
and each mode; the norms, ``p.grad``
(plain or clipped), ``p.grad_sample`` and the statistics must match the oracle's to 1e-10
of their largest magnitude (of their terms' summed magnitudes, for sums that may cancel).

Profiles from ``tests/kernels/_hypothesis.py``, those of ``tests/test_properties.py``
(``TORCHBP_HYPOTHESIS_PROFILE=thorough``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._hypothesis import PROFILE
from tests._support import ACTIVATIONS
from torch import nn
from torch.func import functional_call, grad, vmap

import torchbp
from torchbp.per_sample import per_sample_grads

DT = torch.float64
RTOL = 1e-10
BLOCKS = ("plain", "residual", "twice", "layernorm", "frozen_layernorm", "dropout", "identity")
FREEZE = ("none", "weight", "bias", "layer")


def close(ours: torch.Tensor, ref: torch.Tensor, what: str, scale=None) -> None:
    """Max error relative to ``scale`` (default: the reference's largest magnitude) is at
    most RTOL."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if not ref.numel():
        return
    scale = ref.abs().max() if scale is None else scale
    err = ((ours - ref).abs().max() / scale.clamp(min=1e-300)).item()
    assert err <= RTOL, f"{what}: relative error {err:.3g}"


class Drawn(nn.Module):
    """``[Flatten] -> Linear -> act -> blocks... -> Linear`` as drawn."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        act = spec["activation"].modules()[0]
        hidden = spec["hidden"]
        self.flatten = nn.Flatten(start_dim=1) if spec["flatten"] else nn.Identity()
        self.inp = torchbp.nn.Linear(spec["in_features"], hidden, bias=spec["biases"][0])
        self.act = act()
        self.kinds = list(spec["blocks"])
        self.blocks = nn.ModuleList()
        biases = iter(spec["biases"][1:-1])
        for kind in self.kinds:
            if kind in ("plain", "residual", "twice"):
                block = torchbp.nn.Linear(hidden, hidden, bias=next(biases))
            elif kind == "layernorm":
                block = nn.LayerNorm(hidden, elementwise_affine=False)
            elif kind == "frozen_layernorm":
                block = nn.LayerNorm(hidden).requires_grad_(False)
            elif kind == "dropout":
                block = nn.Dropout(0.0)
            else:
                block = nn.Identity()
            self.blocks.append(block)
        self.head = torchbp.nn.Linear(hidden, spec["classes"], bias=spec["biases"][-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(self.flatten(x)))
        for kind, block in zip(self.kinds, self.blocks):
            if kind == "plain":
                h = self.act(block(h))
            elif kind == "residual":
                h = h + self.act(block(h))
            elif kind == "twice":
                h = self.act(block(self.act(block(h))))
            else:
                h = block(h)
        return self.head(h)

    def linears(self) -> list[torchbp.nn.Linear]:
        return [self.inp, *(b for b in self.blocks if isinstance(b, torchbp.nn.Linear)), self.head]


@st.composite
def specs(draw) -> dict:
    blocks = draw(st.lists(st.sampled_from(BLOCKS), max_size=3))
    n_linears = 2 + sum(kind in ("plain", "residual", "twice") for kind in blocks)
    three_d = draw(st.booleans())
    positions = draw(st.integers(1, 3)) if three_d else None
    flatten = three_d and draw(st.booleans())
    features = draw(st.integers(1, 5))
    return {
        "activation": draw(st.sampled_from(ACTIVATIONS)),
        "batch": draw(st.integers(1, 6)),
        "positions": positions,
        "flatten": flatten,
        "features": features,
        "in_features": features * positions if flatten else features,
        # LayerNorm of 1 or 2 features is constant (0, ±1): gradients of rounding noise
        "hidden": draw(st.integers(3 if {"layernorm", "frozen_layernorm"} & {*blocks} else 1, 6)),
        "classes": draw(st.integers(2, 4)),
        "blocks": blocks,
        "biases": draw(st.lists(st.booleans(), min_size=n_linears, max_size=n_linears)),
        "freeze": draw(st.lists(st.sampled_from(FREEZE), min_size=n_linears, max_size=n_linears)),
        "reduction": draw(st.sampled_from(["mean", "sum"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.2])),
        "weighted": draw(st.booleans()),
        "ignore": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(spec: dict) -> tuple[Drawn, torch.Tensor, torch.Tensor, dict]:
    """The model (float64, frozen as drawn), its input, targets and loss options."""
    torch.manual_seed(spec["seed"])
    model = Drawn(spec).to(DT)
    for linear, freeze in zip(model.linears(), spec["freeze"]):
        if freeze in ("weight", "layer"):
            linear.weight.requires_grad_(False)
        if freeze in ("bias", "layer") and linear.bias is not None:
            linear.bias.requires_grad_(False)
    batch, positions, classes = spec["batch"], spec["positions"], spec["classes"]
    rest = () if positions is None else (positions,)
    x = torch.randn(batch, *rest, spec["features"], dtype=DT)
    target_rest = () if positions is None or spec["flatten"] else (positions,)
    target = torch.randint(classes, (batch, *target_rest))
    options: dict = {"label_smoothing": spec["label_smoothing"]}
    if spec["weighted"]:
        options["weight"] = torch.rand(classes, dtype=DT) + 0.5
    if spec["ignore"]:
        options["ignore_index"] = -1
        ignored = torch.rand(target.shape) < 0.4
        ignored.view(-1)[0] = False  # at least one row counts (mean over nothing is nan)
        target = target.masked_fill(ignored, -1)
    return model, x, target, options


def per_sample_losses(logits, target, options) -> torch.Tensor:
    """ℓ_i, each sample's summed loss rows, shape ``(B,)``."""
    if logits.dim() == 3:
        rows = F.cross_entropy(logits.transpose(1, 2), target, reduction="none", **options)
        return rows.sum(1)
    return F.cross_entropy(logits, target, reduction="none", **options)


def normaliser(target, reduction, options) -> torch.Tensor | float:
    """The batch loss is Σ_i ℓ_i / this."""
    if reduction == "sum":
        return 1.0
    keep = target != options.get("ignore_index", -100)
    weight = options.get("weight")
    weights = keep.to(DT) if weight is None else weight[target.clamp(min=0)] * keep
    return weights.sum()


def batch_loss(model, x, target, reduction, options) -> torch.Tensor:
    logits = model(x)
    if logits.dim() == 3:
        logits = logits.transpose(1, 2)
    return torchbp.functional.cross_entropy(logits, target, reduction=reduction, **options)


def reference(model, x, target, reduction, options) -> dict[str, torch.Tensor]:
    """{name: (B, *p.shape)}: each sample's contribution to p.grad, by vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    scale = normaliser(target, reduction, options)

    def sample_loss(p, xi, ti):
        out = functional_call(model, p, (xi[None],))
        return per_sample_losses(out, ti[None], options).sum() / scale

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)


def expand(factors: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return factors.view(-1, *[1] * (like.dim() - 1))


@settings(PROFILE)
@given(spec=specs(), mode=st.sampled_from(["norms", "grads", "clip"]), data=st.data())
def test_drawn_models_match_vmap_grad(spec, mode, data):
    """One backward on a drawn model, ``loss.backward()`` or ``loss.backward(inputs=[...])``
    naming some parameters, onto a ``p.grad`` that may already hold a gradient: the norms,
    the (clipped) contribution added to p.grad, p.grad_sample and the statistics are those
    of the accounted parameters' per-sample gradients (the named ones, else every trainable
    one); the others keep their p.grad and get zeros elsewhere, whichever layers the
    backward runs through."""
    model, x, target, options = build(spec)
    reduction = spec["reduction"]
    ref = reference(model, x, target, reduction, options)
    if not ref:
        return  # every parameter frozen: nothing to account for
    names = sorted(ref)
    named = data.draw(
        st.one_of(st.none(), st.lists(st.sampled_from(names), min_size=1, unique=True))
    )
    accounted = names if named is None else named
    before = {}
    if data.draw(st.booleans(), label="existing p.grad"):
        before = {n: torch.randn_like(model.get_parameter(n)) for n in names}
        for n, g in before.items():
            model.get_parameter(n).grad = g.clone()
    norms = torch.sqrt(sum(ref[n].flatten(1).square().sum(1) for n in accounted))
    max_norm = max(norms.median().item(), 1e-3)  # some samples clipped, some not
    factors = (max_norm / norms).clamp(max=1) if mode == "clip" else torch.ones_like(norms)
    with per_sample_grads(
        model, mode=mode, max_norm=max_norm if mode == "clip" else None, statistics=True
    ) as ps:
        loss = batch_loss(model, x, target, reduction, options)
        loss.backward(inputs=None if named is None else [model.get_parameter(n) for n in named])
    close(ps.norms, norms, "norms")
    assert ps.batch_size == x.shape[0]
    if mode == "clip":
        close(ps.clip_factors, factors, "clip_factors")
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        g = ref[name]
        if name in accounted:
            scaled = g * expand(factors, g)
            expected = before.get(name, 0) + scaled.sum(0)
            # a sum's rounding is relative to its terms' magnitudes (they may cancel)
            terms = (before.get(name, torch.zeros_like(p)).abs() + scaled.abs().sum(0)).max()
            close(p.grad, expected, f"{name}.grad", terms)
        else:
            assert (p.grad is None) if name not in before else torch.equal(p.grad, before[name])
            g = torch.zeros_like(g)  # this backward contributes nothing to it
        if mode == "grads":
            close(p.grad_sample, g, f"{name}.grad_sample")
        close(p.sum_grad_squared, g.square().sum(0), f"{name}.sum_grad_squared")
        # E[G²] - E[G]²: rounding relative to E[G²], not to the (possibly 0) variance
        mean_square = g.square().mean(0).abs().max()
        close(p.grad_variance, g.var(0, correction=0), f"{name}.grad_variance", mean_square)
