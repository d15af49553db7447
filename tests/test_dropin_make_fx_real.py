"""``make_fx`` with its default ``tracing_mode="real"``, and ``torch.func.linearize`` (which
runs it), over every registry op: they trace torchbp's ops, forward and gradient, as
native's, and the traced graph run on new inputs gives native's results.

Real tracing runs the code on real tensors, so torchbp's eager paths used to run there:
the losses' class-index checks and relu's backward kernel read values (refused: "trying
to get value out of a tracing tensor"), and the other backward kernels' ``out=`` ops were
recorded into a graph that refused them when run on inputs that require grad
(``_execution.compiling_or_tracing`` now tells the trace)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests._support import CUDA, NATIVE, UNARY, Variant, takes_inplace
from torch.fx.experimental.proxy_tensor import make_fx

import torchbp.functional as TF
from torchbp._checks import ClassIndexError
from torchbp._execution import first_order_eager, values_inspectable


def _in_place_variants() -> list[Variant]:
    """The unary variants that take ``inplace=True`` with autograd recording the input
    (not a negative slope of an activation that then keeps its input)."""
    return [
        v
        for v in UNARY
        if v.op.kind == "activation"
        and takes_inplace(v.op)
        and v.kwargs.get(v.op.input_if_negative, 0) >= 0
    ]


def _unary_call(variant: Variant, inplace: bool):
    if inplace:
        return lambda ns, x: variant.call(ns, x * 1, inplace=True)
    return lambda ns, x: variant.call(ns, x)


_UNARY_CALLS = {
    **{str(v): _unary_call(v, False) for v in UNARY},
    **{f"{v}-inplace": _unary_call(v, True) for v in _in_place_variants()},
}


def _inputs(seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Logits ``x`` (3, 4), a weight (5, 4) and bias (5,), class targets (one ignored at
    seed > 0, each seed's its own), probability targets and class weights."""
    generator = torch.Generator().manual_seed(seed)
    targets = [torch.tensor([0, 1, 3]), torch.tensor([2, -100, 1]), torch.tensor([3, 0, 0])]
    tensors = {
        "x": torch.randn(3, 4, generator=generator),
        "w": torch.randn(5, 4, generator=generator),
        "b": torch.randn(5, generator=generator),
        "t": targets[seed % 3],
        "p": torch.rand(3, 4, generator=generator).softmax(1),
        "cw": torch.rand(4, generator=generator) + 0.5,
    }
    tensors = {k: v.to(device) for k, v in tensors.items()}
    for name in ("x", "w", "b"):
        tensors[name].requires_grad_()
    return tensors


def _lce_target(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t == 3, 4, t)  # a class of the 5 the (5, 4) weight gives


_OTHER_CALLS = {
    "linear": lambda ns, d: ns.linear(d["x"], d["w"], d["b"]),
    "linear-3d": lambda ns, d: ns.linear(d["x"].view(3, 2, 2)[..., :1].expand(3, 2, 4), d["w"]),
    "linear-3d-bias": lambda ns, d: ns.linear(d["x"].unsqueeze(0) * 1, d["w"], d["b"]),
    "nll_loss": lambda ns, d: ns.nll_loss(d["x"].log_softmax(1), d["t"], weight=d["cw"]),
    "nll_loss-none": lambda ns, d: ns.nll_loss(
        d["x"], d["t"].clamp(min=0), ignore_index=1, reduction="none"
    ),
    "cross_entropy": lambda ns, d: ns.cross_entropy(
        d["x"], d["t"], weight=d["cw"], label_smoothing=0.1
    ),
    "cross_entropy-sum": lambda ns, d: ns.cross_entropy(d["x"], d["t"], reduction="sum"),
    "cross_entropy-probabilities": lambda ns, d: ns.cross_entropy(
        d["x"], d["p"], weight=d["cw"], label_smoothing=0.2
    ),
}
if hasattr(F, "linear_cross_entropy"):  # native's: torch 2.13+
    _OTHER_CALLS["linear_cross_entropy"] = lambda ns, d: ns.linear_cross_entropy(
        d["x"], d["w"], _lce_target(d["t"]), label_smoothing=0.1
    )

_CALLS = {
    **{name: (lambda call: lambda ns, d: call(ns, d["x"]))(c) for name, c in _UNARY_CALLS.items()},
    **_OTHER_CALLS,
}
_ARGS = ("x", "w", "b", "t", "p", "cw")


def _forward(ns, name: str):
    def run(*args):
        return _CALLS[name](ns, dict(zip(_ARGS, args)))

    return run


def _forward_and_grads(ns, name: str):
    """The output and its gradients of ``x``, ``w`` and ``b`` (zeros where unused) by
    ``torch.autograd.grad`` inside the traced function."""

    def run(*args):
        y = _CALLS[name](ns, dict(zip(_ARGS, args)))
        grads = torch.autograd.grad(y.sum(), args[:3], allow_unused=True)
        return y, *(torch.zeros_like(a) if g is None else g for a, g in zip(args[:3], grads))

    return run


def _ns(namespace):
    return TF if namespace == "torchbp" else NATIVE


@pytest.mark.parametrize("traced", [_forward, _forward_and_grads], ids=["forward", "grad"])
@pytest.mark.parametrize("name", list(_CALLS))
def test_make_fx_real_traces_each_op_as_native(name, traced):
    example, new = _inputs(0), _inputs(1)
    graph = make_fx(traced(TF, name))(*(example[k] for k in _ARGS))
    expected = traced(F, name)(*(new[k] for k in _ARGS))
    torch.testing.assert_close(graph(*(new[k] for k in _ARGS)), expected)


@pytest.mark.parametrize("name", _CALLS)
def test_linearize_of_each_op_as_native_jvp(name):
    example, tangent = _inputs(0), _inputs(1)
    x = example["x"].detach()

    def of_x(ns):
        return lambda x: _CALLS[name](ns, dict(example, x=x))

    output, jvp = torch.func.linearize(of_x(TF), x)
    expected = torch.func.jvp(of_x(F), (x,), (tangent["x"].detach(),))
    torch.testing.assert_close((output, jvp(tangent["x"].detach())), expected)


@pytest.mark.parametrize("name", ["nll_loss", "cross_entropy"])
def test_make_fx_real_graph_of_a_loss_refuses_a_bad_class_index(name):
    # the trace cannot check the targets it will be run on: its gather refuses one out of
    # range (RuntimeError, where native's graph raises IndexError); eager still checks
    inputs = _inputs(0)
    graph = make_fx(_forward(TF, name))(*(inputs[k] for k in _ARGS))
    bad = dict(inputs, t=torch.tensor([0, 7, 1]))
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        graph(*(bad[k] for k in _ARGS))
    with pytest.raises(ClassIndexError, match="7"):
        _forward(TF, name)(*(bad[k] for k in _ARGS))


def test_make_fx_real_is_told_apart_from_eager():
    # eager keeps its value checks and fast backward kernels; the trace takes neither
    t = torch.randn(3)
    seen = []

    def record(t):
        seen.append((values_inspectable(t), first_order_eager(t)))
        return t * 2

    record(t)
    with torch.no_grad():
        record(t)
        make_fx(record)(t)
    assert seen == [(True, False), (True, True), (False, False)]


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("name", ["silu", "relu-inplace", "cross_entropy", "linear_cross_entropy"])
def test_make_fx_real_traces_cuda_gradients_as_native(name):
    # a CUDA backward runs on a device thread, which sees make_fx's dispatch mode (not the
    # thread's autocast-cache flag, which make_fx turns off)
    if name not in _CALLS:
        pytest.skip("native linear_cross_entropy: torch 2.13+")
    example, new = _inputs(0, "cuda"), _inputs(1, "cuda")
    graph = make_fx(_forward_and_grads(TF, name))(*(example[k] for k in _ARGS))
    expected = _forward_and_grads(F, name)(*(new[k] for k in _ARGS))
    torch.testing.assert_close(graph(*(new[k] for k in _ARGS)), expected)


def _under_autocast_cache(ns, name: str):
    """:func:`_forward_and_grads` inside ``torch.autocast("cpu", enabled=False,
    cache_enabled=True)``: what the deprecated ``torch.cpu.amp.autocast(enabled=False)``
    and ``torch.cuda.amp.autocast(...)`` enter by default (``cache_enabled=True``), which
    turns back on the autocast cache that make_fx turns off while it traces."""
    traced = _forward_and_grads(ns, name)

    def run(*args):
        with torch.autocast("cpu", enabled=False, cache_enabled=True):
            return traced(*args)

    return run


@pytest.mark.parametrize("name", ["relu-inplace", "linear-3d-bias", "nll_loss", "cross_entropy"])
def test_make_fx_real_is_told_with_the_autocast_cache_turned_back_on(name):
    # the trace was told by the autocast cache being off: a region that turns it back on
    # ran the value checks on tracing tensors ("trying to get value out of a tracing
    # tensor") and recorded the out= backward kernels
    example, new = _inputs(0), _inputs(1)
    graph = make_fx(_under_autocast_cache(TF, name))(*(example[k] for k in _ARGS))
    expected = _under_autocast_cache(F, name)(*(new[k] for k in _ARGS))
    torch.testing.assert_close(graph(*(new[k] for k in _ARGS)), expected)
