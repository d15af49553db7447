"""Linear modules that share a trainable weight, inside the model passed to
``per_sample_grads`` or outside it: against ``torch.func`` ground truth
(``vmap(grad(...))`` of the one-sample loss), or refused with a message naming the fix."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import torchbp
from torchbp.per_sample import formulas, per_sample_grads

MAX_NORM = 0.5


def _tied_model(bias: bool) -> torch.nn.Sequential:
    """Linear '2' shares Linear '0''s weight (and its bias, with ``bias``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torchbp.nn.Linear(4, 4, bias=bias),
        torchbp.nn.Tanh(),
        torchbp.nn.Linear(4, 4, bias=bias),
        torchbp.nn.Tanh(),
        torchbp.nn.Linear(4, 3),
    ).double()
    model[2].weight = model[0].weight
    if bias:
        model[2].bias = model[0].bias
    return model


def _per_sample_truth(model, x, y) -> dict[str, torch.Tensor]:
    """``{name: (B, *p.shape)}``: each sample's gradient of its summed loss, by torch.func
    (a tied parameter appears once, with the sum of its uses' contributions)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),), tie_weights=True)
        return F.cross_entropy(out.flatten(0, -2), yi.reshape(-1), reduction="sum")

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("mode", ["norms", "clip", "grads"])
@pytest.mark.parametrize("tokens", [None, 3], ids=["2d", "3d"])
def test_linears_sharing_weight_and_bias_are_one_layer(bias, mode, tokens):
    """Two Linears with one weight and one bias (or none) are recorded as one layer, as
    one Linear called twice: the norms, clipped gradients and per-sample gradients are
    torch.func's. (Refused as 'shared' before: the recorder keys a call by its weight
    and bias, so the second module's calls were the first's all along.)"""
    model = _tied_model(bias)
    x = torch.randn(6, 4, dtype=torch.double) if tokens is None else torch.randn(6, tokens, 4)
    x = x.double()
    y = torch.randint(3, x.shape[:-1])
    truth = _per_sample_truth(model, x, y)
    truth_norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in truth.values()]).sum(0)
    truth_norms = truth_norms.sqrt()
    kwargs = {"max_norm": MAX_NORM} if mode == "clip" else {}
    with per_sample_grads(model, mode, **kwargs) as ps:
        logits = model(x)
        F.cross_entropy(logits.flatten(0, -2), y.reshape(-1), reduction="sum").backward()
    params = dict(model.named_parameters())
    assert len(ps.parameters) == len(params)
    torch.testing.assert_close(ps.norms, truth_norms)
    factors = (MAX_NORM / truth_norms).clamp(max=1.0) if mode == "clip" else None
    for name, per_sample in truth.items():
        p = params[name]
        if factors is not None:
            per_sample = per_sample * factors.view(-1, *[1] * p.dim())
        torch.testing.assert_close(p.grad, per_sample.sum(0))
        if mode == "grads":
            torch.testing.assert_close(p.grad_sample, per_sample)


@pytest.mark.parametrize("shared", ["weight", "bias"])
def test_linears_sharing_one_of_weight_and_bias_refused_naming_the_fix(shared):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(4, 4), torchbp.nn.Tanh(), torchbp.nn.Linear(4, 4))
    setattr(model[2], shared, getattr(model[0], shared))
    with pytest.raises(
        ValueError,
        match=r"'2' \(Linear\) shares a trainable parameter with '0' \(Linear\), but not both "
        r"its weight and its bias.*Share the other parameter too, or give each module its "
        r"own copy",
    ):
        per_sample_grads(model)


@pytest.mark.parametrize("mode", ["norms", "clip", "grads"])
def test_weight_tied_with_a_linear_outside_the_model(mode):
    """A Linear outside the model sharing a model Linear's weight: with the same (no) bias
    its calls are that layer's and the results are torch.func's; with a bias of its own
    the call is refused at its backward, naming the layer and the fix, before any
    ``p.grad`` is written."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(4, 4, bias=False), torchbp.nn.Tanh())
    model.append(torchbp.nn.Linear(4, 3)).double()
    outside = torchbp.nn.Linear(4, 4).double()
    outside.weight = model[0].weight
    x, y = torch.randn(5, 4, dtype=torch.double), torch.tensor([0, 1, 2, 0, 1])
    kwargs = {"max_norm": MAX_NORM} if mode == "clip" else {}
    with pytest.raises(
        RuntimeError,
        match=r"the weight of Linear '0' was passed to a linear call with a bias other than "
        r"its own \(a functional call, or a Linear outside the model that shares only the "
        r"weight: .*share the bias too, or use none in either, or give the other call its "
        r"own weight\)",
    ):
        with per_sample_grads(model, mode, **kwargs):
            F.cross_entropy(model(x) + model[2](outside(x)), y, reduction="sum").backward()
    assert all(p.grad is None for p in model.parameters())

    outside.bias = None  # now a call with the layer's own weight and (no) bias
    with per_sample_grads(model, mode, **kwargs) as ps:
        F.cross_entropy(model(x) + model[2](outside(x)), y, reduction="sum").backward()

    def sample_loss(p, xi, yi):
        xi = xi.unsqueeze(0)
        out = functional_call(model, p, (xi,)) + functional_call(
            model[2], {"weight": p["2.weight"], "bias": p["2.bias"]}, (xi @ p["0.weight"].T,)
        )
        return F.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    params = {k: v.detach() for k, v in model.named_parameters()}
    truth = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in truth.values()]).sum(0).sqrt()
    torch.testing.assert_close(ps.norms, norms)


@pytest.mark.parametrize("mode", ["norms", "clip", "grads"])
@pytest.mark.parametrize("tied", ["one-module", "two-modules"])
def test_calls_of_a_shared_layer_freed_once_joined(monkeypatch, mode, tied):
    """A layer called twice (one module, or two sharing weight and bias) joins its calls'
    ``(a, g)`` into one trace for the results; each call's own input and output gradient
    are freed by then, not held beside the copy until the layer's results are formed
    (twice the layer's recording: 2x the memory of an untied model of the same size)."""
    torch.manual_seed(0)
    first = torchbp.nn.Linear(4, 4)
    second = first if tied == "one-module" else torchbp.nn.Linear(4, 4)
    second.weight, second.bias = first.weight, first.bias
    head = torchbp.nn.Linear(4, 3)
    calls: list = []  # weakrefs to each call's input and output gradient

    def watched(module, x):
        y = module(torch.tanh(x))  # its input is referenced by the graph alone
        y.register_hook(lambda grad: calls.append(weakref.ref(grad)))
        return y

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second, self.head = first, second, head

        def forward(self, x):
            return self.head(watched(self.second, watched(self.first, x)))

    def first_inputs(module, args):
        calls.append(weakref.ref(args[0]))

    model = Model()
    for module in {id(first): first, id(second): second}.values():
        module.register_forward_pre_hook(first_inputs)
    alive_at_the_norms = []
    layer_norms = formulas.layer_norms

    def noting_alive(*args, **kwargs):
        gc.collect()
        alive_at_the_norms.append(sum(ref() is not None for ref in calls))
        return layer_norms(*args, **kwargs)

    monkeypatch.setattr(formulas, "layer_norms", noting_alive)
    kwargs = {"max_norm": MAX_NORM} if mode == "clip" else {}
    with per_sample_grads(model, mode, **kwargs) as ps:
        model(torch.randn(5, 2, 4)).square().sum().backward()
    assert len(calls) == 4 and alive_at_the_norms and ps.norms.shape == (5,)
    assert alive_at_the_norms == [0] * len(alive_at_the_norms)


class _TiedLanguageModel(torch.nn.Module):
    """An output layer whose weight is the token embedding's (as language models tie
    them), the embedding registered before or after it."""

    def __init__(self, head_first: bool):
        super().__init__()
        torch.manual_seed(0)
        if head_first:
            self.head = torchbp.nn.Linear(4, 7)
        self.embed = torch.nn.Embedding(7, 4)
        if not head_first:
            self.head = torchbp.nn.Linear(4, 7)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


@pytest.mark.parametrize("head_first", [False, True], ids=["embedding-first", "head-first"])
def test_linear_tied_to_an_embedding_refused_naming_the_tie(head_first):
    """The embedding's gradient cannot be attributed to samples: refused before the
    forward, whichever is registered first, and the message says that freezing the
    embedding (the fix it offers for other parameters) freezes the tied head too."""
    model = _TiedLanguageModel(head_first)
    with pytest.raises(
        TypeError,
        match=r"'embed' \(Embedding\) has trainable parameters \(weight\) whose per-sample "
        r"gradients torchbp cannot form; .*; weight is tied to 'head' \(Linear\)'s weight "
        r"\(the same Parameter\): freezing it freezes that too",
    ):
        per_sample_grads(model)


def test_linear_tied_to_a_frozen_embedding_trains_its_bias_alone():
    """Freezing the tied embedding freezes the head's weight (one Parameter): the head's
    bias is the only trainable parameter, and its results are torch.func's."""
    model = _TiedLanguageModel(head_first=False).double()
    model.embed.weight.requires_grad_(False)
    tokens, y = torch.randint(7, (5, 3)), torch.randint(7, (5, 3))
    truth = _per_sample_truth(model, tokens, y)
    with per_sample_grads(model, "grads") as ps:
        F.cross_entropy(model(tokens).flatten(0, 1), y.flatten(), reduction="sum").backward()
    assert ps.parameters == [model.head.bias] and model.embed.weight.grad is None
    torch.testing.assert_close(model.head.bias.grad_sample, truth["head.bias"])
    torch.testing.assert_close(ps.norms, truth["head.bias"].norm(dim=1))


def test_linear_tied_to_an_embedding_outside_the_model_refused_at_the_backward():
    """The tied weight's embedding gradient reaches it through an op other than its
    Linear: refused at the backward, naming the parameter, before p.grad is written."""
    model = _TiedLanguageModel(head_first=False)
    head = model.head
    tokens = torch.randint(7, (5, 3))
    with pytest.raises(RuntimeError, match=r"parameter weight received a gradient from an op"):
        with per_sample_grads(head):
            head(torch.tanh(model.embed(tokens))).square().sum().backward()
    assert head.weight.grad is None and head.bias.grad is None


class _SharedCalls(torch.nn.Module):
    """A Linear called once per entry of ``inputs`` (by one module object, or by one of
    several sharing its weight and bias), on inputs of those layouts: ``"2d"`` (B, 5),
    ``"3d"`` (B, 3, 5), ``"strided"`` (B, 4, 5) not contiguous, ``"4d"`` (B, 2, 3, 5),
    ``"empty"`` (B, 0, 5)."""

    def __init__(self, inputs: list[str], modules: str, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = torchbp.nn.Linear(4, 5), torchbp.nn.Linear(5, 3)
        self.shared = torch.nn.ModuleList([torchbp.nn.Linear(5, 5, bias=bias)])
        for _ in inputs[1:]:
            if modules == "tied":
                tied = torchbp.nn.Linear(5, 5, bias=bias)
                tied.weight, tied.bias = self.shared[0].weight, self.shared[0].bias
                self.shared.append(tied)
            else:  # the same module object, listed again
                self.shared.append(self.shared[0])
        self.inputs = inputs

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        total = 0
        for module, layout in zip(self.shared, self.inputs):
            y = torch.sin(module(_laid_out(h, layout)))
            y = y.flatten(1, -2).sum(1) if y.dim() > 2 else y
            total, h = total + y, h + 0.3 * y  # later calls see earlier ones
        return self.out(total)


def _laid_out(h: torch.Tensor, layout: str) -> torch.Tensor:
    """``(B, 5)`` ``h`` as the input ``layout`` of :class:`_SharedCalls`."""
    if layout == "2d":
        return h
    if layout == "3d":
        return h[:, None] * torch.linspace(-1, 2, 3, dtype=h.dtype)[:, None]
    if layout == "strided":
        return (h * torch.linspace(1, 2, 4, dtype=h.dtype)[:, None, None]).transpose(0, 1)
    if layout == "4d":
        return h[:, None, None] * torch.linspace(-1, 2, 6, dtype=h.dtype).view(2, 3, 1)
    return h[:, None][:, :0] if layout == "empty" else None


@pytest.mark.parametrize("modules", ["same", "tied"])
@pytest.mark.parametrize(
    "inputs",
    [["2d", "2d", "2d"], ["3d", "strided", "2d"], ["4d", "empty", "2d"]],
    ids=["three-2d", "T-3-4-1", "T-6-0-1"],
)
@pytest.mark.parametrize("frozen", [None, "weight"], ids=["trainable", "frozen-weight"])
def test_shared_layer_gets_the_norm_of_its_summed_calls(modules, inputs, frozen):
    """g_i = Σ_calls a_i,cᵀ δ_i,c: ‖g_i‖² has cross terms between the calls, and clipping
    scales the sum. Against torch.func (statistics too) for 3 calls of one module, or of
    three sharing its parameters, with different T per call (2-D, 3-D, 4-D, a strided
    and an empty one), the shared weight trainable or frozen (its bias trained)."""
    model = _SharedCalls(inputs, modules).double()
    if frozen:
        model.shared[0].weight.requires_grad_(False)
    x = torch.randn(6, 4, dtype=torch.double)
    y = torch.randint(3, (6,))
    # (of a copy: functional_call leaves a module listed twice holding plain tensors)
    truth = _per_sample_truth(copy.deepcopy(model), x, y)
    if frozen:
        del truth[f"shared.0.{frozen}"]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in truth.values()]).sum(0).sqrt()
    max_norm = norms.median().item()
    for mode in ("norms", "clip", "grads"):
        model.zero_grad(set_to_none=True)
        kwargs = {"max_norm": max_norm} if mode == "clip" else {}
        with per_sample_grads(model, mode, statistics=True, **kwargs) as ps:
            F.cross_entropy(model(x), y, reduction="sum").backward()
        torch.testing.assert_close(ps.norms, norms)
        factors = (max_norm / norms).clamp(max=1.0) if mode == "clip" else torch.ones(6)
        for name, per_sample in truth.items():
            p = model.get_parameter(name)
            scaled = per_sample * factors.view(-1, *[1] * p.dim()).double()
            torch.testing.assert_close(p.grad, scaled.sum(0))
            torch.testing.assert_close(p.sum_grad_squared, per_sample.square().sum(0))
            if mode == "grads":
                torch.testing.assert_close(p.grad_sample, per_sample)


def test_inputs_of_a_shared_layer_freed_before_its_gradients_are_joined(monkeypatch):
    """Joining a layer's calls copies their inputs first, then their output gradients:
    the inputs' own tensors are gone by the second copy, so that at most one side is
    held twice at a time."""
    torch.manual_seed(0)
    shared, head = torchbp.nn.Linear(4, 4), torchbp.nn.Linear(4, 3)
    inputs: list = []  # weakrefs to the shared layer's inputs
    shared.register_forward_pre_hook(lambda module, args: inputs.append(weakref.ref(args[0])))
    model = torch.nn.Sequential(shared, torchbp.nn.Tanh(), shared, torchbp.nn.Tanh(), head)
    inputs_alive_at_each_join = []
    cat = torch.cat

    def noting_alive(tensors, *args, **kwargs):
        gc.collect()
        inputs_alive_at_each_join.append(sum(ref() is not None for ref in inputs))
        return cat(tensors, *args, **kwargs)

    x = torch.randn(5, 2, 4)
    with per_sample_grads(model) as ps:
        loss = model(torch.tanh(x)).square().sum()
        monkeypatch.setattr(torch, "cat", noting_alive)
        loss.backward()
    monkeypatch.undo()
    assert ps.norms.shape == (5,) and len(inputs) == 2
    assert inputs_alive_at_each_join == [2, 0]  # the inputs' join, then the gradients'


def test_linears_tied_across_another_layer_are_one_layer():
    """An encoder Linear and a later one sharing its weight and bias, another trainable
    Linear between them (the tie is found among every earlier layer, not the last one):
    one layer, against torch.func."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torchbp.nn.Linear(4, 4), torchbp.nn.Tanh(), torchbp.nn.Linear(4, 4), torchbp.nn.Tanh()
    )
    model.append(torchbp.nn.Linear(4, 4)).append(torchbp.nn.Tanh()).append(torchbp.nn.Linear(4, 3))
    model[4].weight, model[4].bias = model[0].weight, model[0].bias
    model.double()
    x, y = torch.randn(5, 4, dtype=torch.double), torch.randint(3, (5,))
    truth = _per_sample_truth(model, x, y)
    with per_sample_grads(model, "grads") as ps:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    assert len(ps.parameters) == 6
    for name, per_sample in truth.items():
        torch.testing.assert_close(model.get_parameter(name).grad_sample, per_sample)


def test_bias_tied_to_a_normalisation_refused_naming_the_tie():
    """A LayerNorm whose bias is a Linear's (any trainable parameter tied to a Linear's
    weight or bias): the message names the tie."""
    model = torch.nn.Sequential(torchbp.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].bias = model[0].bias
    with pytest.raises(
        TypeError,
        match=r"'1' \(LayerNorm\) has trainable parameters \(weight, bias\) .*; bias is tied "
        r"to '0' \(Linear\)'s bias \(the same Parameter\): freezing it freezes that too",
    ):
        per_sample_grads(model)


class _Autocast(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x).float()


def test_tied_linear_under_autocast_refused_naming_it():
    """A Linear tied to another (weight and bias) is one of the model's Linears: its call
    under autocast is refused naming it and autocast, as the first one's would be (it was
    said not to be a Linear of the model)."""
    torch.manual_seed(0)
    model = _tied_model(bias=True).float()
    model[2] = _Autocast(model[2])
    with pytest.raises(
        RuntimeError,
        match=r"Linear '2.inner' ran under autocast, which hands it a weight cast by autocast "
        r"to torch.bfloat16",
    ):
        with per_sample_grads(model):
            model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())


def test_tied_linear_with_its_weight_swapped_refused_naming_it():
    """functional_call swapping a tied Linear's weight (the second module's own attribute):
    refused naming that module."""
    model = _tied_model(bias=True).float()
    swapped = {"weight": model[0].weight.detach().clone().requires_grad_()}
    with pytest.raises(RuntimeError, match=r"Linear '2' ran with its weight swapped"):
        with per_sample_grads(model):
            h = model[1](model[0](torch.randn(3, 4)))
            h = torch.func.functional_call(model[2], swapped, (h,), strict=False)
            model[4](model[3](h)).sum().backward()


@pytest.mark.parametrize(
    "segment, where",
    [
        ("second", r"outside any segment: Linear '0', '4'; in segment 1: Linear '2';"),
        ("first", r"outside any segment: Linear '2', '4'; in segment 1: Linear '0';"),
    ],
    ids=["second-in-segment", "first-in-segment"],
)
def test_tied_linears_split_by_a_reentrant_checkpoint_refused_naming_each_module(segment, where):
    """Two Linears sharing weight and bias, one inside a reentrant checkpoint segment and
    one outside: the split is refused naming the module that made each call. Before, both
    calls were named after the layer recording them ('outside any segment: Linear '0',
    '4'; in segment 1: Linear '0'' for a segment holding module '2')."""
    from torch.utils.checkpoint import checkpoint

    model = _tied_model(bias=True)
    x = torch.randn(5, 4, dtype=torch.double, requires_grad=True)
    with per_sample_grads(model):
        if segment == "second":
            out = model[4](checkpoint(model[2:4], model[:2](x), use_reentrant=True))
        else:
            out = model[2:](checkpoint(model[:2], x, use_reentrant=True))
        with pytest.raises(RuntimeError, match=r"split across reentrant .*: " + where):
            out.sum().backward()
    assert all(p.grad is None for p in model.parameters())
