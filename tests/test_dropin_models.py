"""Realistic model code, written in plain torch, run natively, after ``torchbp.convert``
and under ``torchbp.enable()``.

Each model is the kind of code users port (a pre-LN transformer block, a GPT MLP, a timm
``Mlp``, a SwiGLU feed-forward, an MoE router, a label-smoothed classifier head, a ResNet
MLP with in-place ReLUs, weight tying, weight / spectral norm). The three runs start from
the same weights and seed and must give the same loss and every parameter's gradient
(float64: to rounding); the routed calls (``mode.counts``) and torchbp's backward nodes
after ``convert`` are what the model's code makes, so numbers equal because native's ops
silently ran would fail; and the model is left as it was (state_dict keys, classes after
``convert(to="torch")``, nothing routed after leaving ``enable()``). The tools users wrap
models in (autocast, ``torch.compile``, activation checkpointing,
``torch.func.functional_call``) are run on the same models.
"""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import torchbp

pytestmark = pytest.mark.usefixtures("seed")

DT = torch.float64
TOL = {"atol": 1e-11, "rtol": 1e-9}
D, HEADS, BATCH, SEQ, VOCAB = 16, 2, 3, 5, 20

#: whether enable() routes the calls inside MultiheadAttention's functional forward (it
#: re-dispatches F.multi_head_attention_forward on torch 2.13+; before, its body runs native)
_MHA_ROUTED = hasattr(torch.overrides, "redispatch_function")
_MHA_CALLS = Counter(linear=2, softmax=1) if _MHA_ROUTED else Counter()

#: the backward nodes of torchbp's Functions (``LinearFunctionBackward``, ...)
_TORCHBP_NODES = {op.function.__name__ + "Backward" for op in torchbp.ops.OPS.values()}


# -- the models, as users write them in plain torch ------------------------------------


class PreLNBlock(nn.Module):
    """A GPT-2 style pre-LN block: causal attention (fused SDPA, or nn.MultiheadAttention
    returning its weights) and an MLP with ``F.gelu(approximate="tanh")``."""

    def __init__(self, use_mha: bool = False) -> None:
        super().__init__()
        self.use_mha = use_mha
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        if use_mha:
            self.attn = nn.MultiheadAttention(D, HEADS, batch_first=True)
        else:
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def attention(self, y: torch.Tensor) -> torch.Tensor:
        if self.use_mha:
            return self.attn(y, y, y, need_weights=True)[0]
        b, t, c = y.shape
        q, k, v = (
            z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in self.qkv(y).split(c, -1)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(a.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class TimmMlp(nn.Module):
    """timm's ``Mlp``: Linear, nn.GELU, Dropout, Linear, Dropout."""

    def __init__(self, drop: float = 0.1) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(D, 2 * D), nn.GELU(), nn.Dropout(drop)
        self.fc2, self.drop2 = nn.Linear(2 * D, D), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SwiGLU(nn.Module):
    """LLaMA's feed-forward: ``w3(silu(x1) * x2)`` with one fused input projection."""

    def __init__(self) -> None:
        super().__init__()
        self.w12, self.w3 = nn.Linear(D, 4 * D, bias=False), nn.Linear(2 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(x1) * x2)


class MoE(nn.Module):
    """A top-2 mixture of SwiGLU experts; the router's softmax in ``dtype`` (Mixtral's
    ``F.softmax(logits, dim=-1, dtype=torch.float)``)."""

    def __init__(self, experts: int = 4, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.dtype = dtype
        self.router = nn.Linear(D, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU() for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(x), dim=-1, dtype=self.dtype)
        weights, chosen = probs.topk(2, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            gate = (weights * (chosen == i)).sum(-1, keepdim=True)
            out = out + gate * expert(x)
        return out


class ResMLP(nn.Module):
    """A ResNet-style block on features: in-place ReLUs and an in-place residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.relu1(self.a(x)))
        y += x
        return self.relu2(y)


class TiedLM(nn.Module):
    """A tiny language model whose head is the embedding's weight (``F.linear``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.block, self.ln = nn.Embedding(VOCAB, D), PreLNBlock(), nn.LayerNorm(D)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(self.ln(self.block(self.emb(idx))), self.emb.weight)


def _head() -> nn.Sequential:
    """A classifier head in ``nn.Sequential``, with ``nn.Identity`` and ``nn.Flatten``."""
    return nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(SEQ * D, 10), nn.Tanh())


def _normed_mlp() -> TimmMlp:
    model = TimmMlp(drop=0.0)
    weight_norm(model.fc1)
    spectral_norm(model.fc2)  # training mode: each forward runs a power iteration
    return model


def _features() -> torch.Tensor:
    return torch.randn(BATCH, SEQ, D, dtype=DT)


def _labels() -> torch.Tensor:
    return torch.randint(10, (BATCH,))


def _squares(model: nn.Module) -> torch.Tensor:
    return model(_features()).pow(2).mean()


def _smoothed_ce(model: nn.Module) -> torch.Tensor:
    return F.cross_entropy(model(_features()), _labels(), label_smoothing=0.1)


def _lm_loss(model: nn.Module) -> torch.Tensor:
    idx = torch.randint(VOCAB, (BATCH, SEQ))
    return F.cross_entropy(model(idx).flatten(0, 1), idx.flatten(), label_smoothing=0.1)


#: name -> (model factory, loss of a model (draws its own data from the seed),
#:          the calls enable() routes, the torchbp backward nodes after convert)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable, Counter, Counter]] = {
    "pre_ln_sdpa": (PreLNBlock, _squares, Counter(linear=4, gelu=1), Counter(Linear=4)),
    # MultiheadAttention: its F.linear (in_proj packed, out_proj) and softmax are routed
    "pre_ln_mha": (
        lambda: PreLNBlock(use_mha=True),
        _squares,
        Counter(linear=2, gelu=1) + _MHA_CALLS,
        Counter(Linear=2),
    ),
    "timm_mlp_dropout": (TimmMlp, _squares, Counter(linear=2, gelu=1), Counter(Linear=2, GELU=1)),
    "swiglu": (SwiGLU, _squares, Counter(linear=2, silu=1), Counter(Linear=2)),
    "moe_router": (MoE, _squares, Counter(linear=9, softmax=1, silu=4), Counter(Linear=9)),
    "resnet_mlp_in_place": (ResMLP, _squares, Counter(linear=2, relu=2), Counter(Linear=2, ReLU=2)),
    "sequential_head_smoothed_ce": (
        _head,
        _smoothed_ce,
        Counter(linear=1, tanh=1, cross_entropy=1),
        Counter(Linear=1, Tanh=1),
    ),
    "tied_lm": (TiedLM, _lm_loss, Counter(linear=5, gelu=1, cross_entropy=1), Counter(Linear=4)),
    "weight_and_spectral_norm": (
        _normed_mlp,
        _squares,
        Counter(linear=2, gelu=1),
        Counter(Linear=2, GELU=1),
    ),
}


# -- helpers ----------------------------------------------------------------------------


def _torchbp_nodes(out: torch.Tensor) -> Counter:
    """torchbp's Function nodes in ``out``'s backward graph, by op (``"Linear"``)."""
    found: Counter = Counter()
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name in _TORCHBP_NODES:
            found[name.removesuffix("FunctionBackward")] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _loss_and_grads(model: nn.Module, loss_fn: Callable) -> tuple[torch.Tensor, dict]:
    """The loss (data drawn from the same seed every time) and every parameter's grad."""
    torch.manual_seed(1)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_same(got: tuple, want: tuple, **tol) -> None:
    loss, grads = got
    torch.testing.assert_close(loss, want[0], **tol)
    assert grads.keys() == want[1].keys()
    for name, grad in want[1].items():
        if grad is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], grad, **tol, msg=lambda m, n=name: f"{n}: {m}")


def _classes(model: nn.Module) -> list[type]:
    """The modules' classes (a parametrized module's class is made for it: the one below)."""
    return [parametrize.type_before_parametrizations(m) for m in model.modules()]


# -- native vs convert vs enable() -------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_convert_matches_native_and_runs_torchbp(name):
    make, loss_fn, _, nodes = MODELS[name]
    native = make().to(DT)
    converted = torchbp.convert(native, inplace=False)
    want = _loss_and_grads(native, loss_fn)
    _assert_same(_loss_and_grads(converted, loss_fn), want, **TOL)
    torch.manual_seed(1)
    assert _torchbp_nodes(loss_fn(converted)) == nodes
    assert converted.state_dict().keys() == native.state_dict().keys()
    # back to torch: the very classes of the native model, nothing of torchbp's left
    torchbp.convert(converted, to="torch")
    assert _classes(converted) == _classes(native)
    torch.manual_seed(1)
    assert _torchbp_nodes(loss_fn(converted)) == Counter()


@pytest.mark.parametrize("name", MODELS)
def test_enable_matches_native_and_routes_the_model_calls(name):
    make, loss_fn, routed, _ = MODELS[name]
    native = make().to(DT)
    model = copy.deepcopy(native)
    classes, keys = _classes(model), model.state_dict().keys()
    want = _loss_and_grads(native, loss_fn)
    with torchbp.enable() as mode:
        torch.manual_seed(1)
        loss = loss_fn(model)
    loss.backward()
    got = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    _assert_same(got, want, **TOL)
    assert mode.counts == routed and not mode.native
    # left as it was: same classes and state, and nothing routed once the mode is left
    assert _classes(model) == classes and model.state_dict().keys() == keys
    torch.manual_seed(1)
    assert _torchbp_nodes(loss_fn(model)) == Counter()


def test_converted_model_under_enable_routes_only_the_functional_calls():
    """A converted model run under enable(): the modules run torchbp's functions
    themselves (their calls pass every torchbp mode uncounted), the mode routes the rest;
    the gradients are native's."""
    native = PreLNBlock(use_mha=True).to(DT)
    converted = torchbp.convert(native, inplace=False)
    want = _loss_and_grads(native, _squares)
    with torchbp.enable() as mode:
        got = _loss_and_grads(converted, _squares)
    _assert_same(got, want, **TOL)
    # the attention's two F.linear calls, its softmax and F.gelu: not fc / out (converted)
    assert mode.counts == Counter(gelu=1) + _MHA_CALLS


# -- the tools models are wrapped in ------------------------------------------------------


def _autocast_loss(model: nn.Module) -> torch.Tensor:
    with torch.autocast("cpu", torch.bfloat16):
        out = model(_features().float())
        return F.cross_entropy(out.mean(1), torch.randint(D, (BATCH,)), label_smoothing=0.1)


@pytest.mark.parametrize("name", ["pre_ln_mha", "moe_router_float_softmax", "swiglu"])
def test_autocast_bfloat16_matches_native(name):
    """Under autocast the routed ops take the dtypes native's do (linear in bfloat16, the
    softmax and the loss in float32) and the float32 gradients agree to bfloat16's
    precision."""
    make = {
        "pre_ln_mha": lambda: PreLNBlock(use_mha=True),
        "moe_router_float_softmax": lambda: MoE(dtype=torch.float32),
        "swiglu": SwiGLU,
    }[name]
    native = make()
    converted, enabled = torchbp.convert(native, inplace=False), copy.deepcopy(native)
    want = _loss_and_grads(native, _autocast_loss)
    assert want[0].dtype == torch.float32
    loose = {"atol": 2e-2, "rtol": 5e-2}
    _assert_same(_loss_and_grads(converted, _autocast_loss), want, **loose)
    with torchbp.enable() as mode:
        got = _loss_and_grads(enabled, _autocast_loss)
    _assert_same(got, want, **loose)
    assert mode.counts["linear"] > 0 and mode.counts["cross_entropy"] == 1
    assert not mode.native
    for grads in (want[1], got[1]):
        assert all(g.dtype == torch.float32 for g in grads.values())


def test_torch_compile_of_converted_and_enabled_model_matches_native():
    native = PreLNBlock(use_mha=False).to(DT)
    converted, enabled = torchbp.convert(native, inplace=False), copy.deepcopy(native)
    want = _loss_and_grads(native, _squares)
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    got = _loss_and_grads(compiled, _squares)
    _assert_same((got[0], {n.removeprefix("_orig_mod."): g for n, g in got[1].items()}), want)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x: torch.Tensor) -> torch.Tensor:
        return enabled(x).pow(2).mean()

    torch.manual_seed(1)
    with torchbp.enable():
        loss = step(_features())
    loss.backward()
    _assert_same((loss.detach(), {n: p.grad for n, p in enabled.named_parameters()}), want)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_matches_native(use_reentrant):
    """A converted model runs torchbp's forward in both the first pass and the
    recomputation; under enable() the non-reentrant recomputation takes the mode through
    context_fn (docs: torchbp.mode)."""
    native = PreLNBlock(use_mha=True).to(DT)
    want = _loss_and_grads(native, _squares)

    def checkpointed(model, **kwargs):
        def loss_fn(m):
            x = _features().requires_grad_()
            out = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=use_reentrant, **kwargs)
            return out.pow(2).mean()

        return loss_fn

    converted = torchbp.convert(native, inplace=False)
    _assert_same(_loss_and_grads(converted, checkpointed(converted)), want, **TOL)
    enabled = copy.deepcopy(native)
    extra = (
        {}
        if use_reentrant
        else {"context_fn": lambda: (contextlib.nullcontext(), torchbp.enable())}
    )
    with torchbp.enable():
        got = _loss_and_grads(enabled, checkpointed(enabled, **extra))
    _assert_same(got, want, **TOL)


def test_functional_call_with_tied_weights_matches_native():
    """torch.func.functional_call and grad on a weight-tied LM: the embedding's gradient
    sums its lookup and the head's F.linear, converted or under enable()."""
    native = TiedLM().to(DT)
    params = {n: p.detach() for n, p in native.named_parameters()}
    idx = torch.randint(VOCAB, (BATCH, SEQ))

    def loss(p, model):
        logits = torch.func.functional_call(model, p, (idx,))
        return F.cross_entropy(logits.flatten(0, 1), idx.flatten(), label_smoothing=0.1)

    want = torch.func.grad(loss)(params, native)
    converted = torchbp.convert(native, inplace=False)
    torch.testing.assert_close(torch.func.grad(loss)(params, converted), want, **TOL)
    with torchbp.enable() as mode:
        got = torch.func.grad(loss)(params, native)
    torch.testing.assert_close(got, want, **TOL)
    assert mode.counts == Counter(linear=5, gelu=1, cross_entropy=1)
