"""Each ``torchbp.nn`` module against its ``torch.nn`` twin.

Same constructor signature and arguments (``device`` / ``dtype`` included), same
initialisation for the same seed, same ``state_dict`` keys and values,
``load_state_dict(strict=True)`` both ways, same ``repr`` / ``extra_repr``, and the same
forward and backward.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from tests._support import ACTIVATIONS, UNARY, call_id, takes_inplace

import torchbp
from torchbp.ops import activations

pytestmark = [
    pytest.mark.usefixtures("seed"),
    pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated"),
]

DT = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-8}
CLASS_WEIGHT = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=DT)
INPLACE_OPS = [op for op in activations() if takes_inplace(op)]


def _any_input(calls) -> dict:
    """Cases of modules that take any tensor, one per ``(op, constructor kwargs)``."""
    return {call_id(op.module.__name__, kw): (op.module.__name__, kw, "any") for op, kw in calls}


# id -> (class name, constructor kwargs, input kind)
CASES = {
    "Linear": ("Linear", {"in_features": 5, "out_features": 3}, "features"),
    "Linear_nobias": ("Linear", {"in_features": 5, "out_features": 3, "bias": False}, "features"),
    # every activation and softmax variant, and each in-place activation with its defaults
    **_any_input((v.op, v.kwargs) for v in UNARY),
    **_any_input((op, {**op.variants[0], "inplace": True}) for op in INPLACE_OPS),
    # softmax's extra_modules
    "Softmin": ("Softmin", {"dim": 1}, "any"),
    "Softmin_dim0": ("Softmin", {"dim": 0}, "any"),
    "Softmax2d": ("Softmax2d", {}, "image"),
    "NLLLoss": ("NLLLoss", {}, "logp"),
    "NLLLoss_weight_ignore_sum": (
        "NLLLoss",
        {"weight": CLASS_WEIGHT, "ignore_index": 1, "reduction": "sum"},
        "logp",
    ),
    "NLLLoss_legacy_size_average": ("NLLLoss", {"size_average": False}, "logp"),
    "CrossEntropyLoss": ("CrossEntropyLoss", {}, "logits"),
    "CrossEntropyLoss_all_args": (
        "CrossEntropyLoss",
        {"weight": CLASS_WEIGHT, "ignore_index": 2, "reduction": "none", "label_smoothing": 0.1},
        "logits",
    ),
    "CrossEntropyLoss_probs": ("CrossEntropyLoss", {"label_smoothing": 0.05}, "probs"),
    "CrossEntropyLoss_legacy_reduce": ("CrossEntropyLoss", {"reduce": False}, "logits"),
}
NAMES = sorted({c[0] for c in CASES.values()})


def _build(case: str, device="cpu"):
    """``(torchbp module, torch module)`` built from the same seed."""
    name, kwargs, _ = CASES[case]
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
    torch.manual_seed(1234)
    bp = getattr(torchbp.nn, name)(**kwargs)
    torch.manual_seed(1234)
    native = getattr(torch.nn, name)(**kwargs)
    return bp.to(device, DT), native.to(device, DT)


def _call_args(case, device):
    """Inputs (the first requires grad) for one call of the module."""
    kind = CASES[case][2]
    g = torch.Generator().manual_seed(5)
    if kind == "features":
        return [torch.randn(2, 4, 5, dtype=DT, generator=g).to(device)]
    if kind == "any":
        return [torch.randn(4, 6, dtype=DT, generator=g).to(device)]
    if kind == "image":
        return [torch.randn(2, 3, 4, 5, dtype=DT, generator=g).to(device)]
    target = torch.tensor([0, 1, 3, 2, 1, 0], device=device)
    if kind == "logp":
        return [torch.log_softmax(torch.randn(6, 4, dtype=DT, generator=g), 1).to(device), target]
    if kind == "logits":
        return [torch.randn(6, 4, dtype=DT, generator=g).to(device), target]
    probs = torch.softmax(torch.randn(6, 4, dtype=DT, generator=g), 1).to(device)
    return [torch.randn(6, 4, dtype=DT, generator=g).to(device), probs]


@pytest.mark.parametrize("name", NAMES)
def test_same_constructor_signature_and_type(name):
    bp_cls, torch_cls = getattr(torchbp.nn, name), getattr(torch.nn, name)
    assert bp_cls is not torch_cls
    assert issubclass(bp_cls, torch_cls)
    assert bp_cls.__name__ == torch_cls.__name__
    assert inspect.signature(bp_cls) == inspect.signature(torch_cls)
    assert name in torchbp.nn.__all__


@pytest.mark.parametrize("case", list(CASES))
def test_same_init_state_dict_and_repr(case):
    bp, native = _build(case)
    assert repr(bp) == repr(native)
    assert bp.extra_repr() == native.extra_repr()
    bp_state, native_state = bp.state_dict(), native.state_dict()
    assert list(bp_state) == list(native_state)
    for k in native_state:
        torch.testing.assert_close(bp_state[k], native_state[k], rtol=0, atol=0)
    assert [n for n, _ in bp.named_parameters()] == [n for n, _ in native.named_parameters()]
    assert [n for n, _ in bp.named_buffers()] == [n for n, _ in native.named_buffers()]
    for attr in ("inplace", "negative_slope", "approximate", "dim", "reduction", "ignore_index"):
        assert getattr(bp, attr, None) == getattr(native, attr, None), attr
    assert getattr(bp, "label_smoothing", None) == getattr(native, "label_smoothing", None)


@pytest.mark.parametrize("case", list(CASES))
def test_load_state_dict_strict_both_ways(case):
    bp, native = _build(case)
    # perturb one side so that loading is observable
    with torch.no_grad():
        for t in native.state_dict().values():
            t.add_(1.0)
    result = bp.load_state_dict(native.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in native.state_dict().items():
        torch.testing.assert_close(bp.state_dict()[k], v, rtol=0, atol=0)
    other = _build(case)[1]
    result = other.load_state_dict(bp.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in bp.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_parity(case, device):
    bp, native = _build(case, device)
    results = []
    for module in (bp, native):
        args = [a.clone() for a in _call_args(case, device)]
        leaf = args[0].requires_grad_()
        # in-place modules need a non-leaf input; the same for both sides
        out = module(leaf * 1.0, *args[1:])
        cot = torch.linspace(-1, 1, out.numel(), dtype=DT, device=device).reshape(out.shape)
        out.backward(cot)
        grads = [leaf.grad] + [p.grad for p in module.parameters()]
        results.append((out.detach(), grads))
    (out, grads), (out_ref, grads_ref) = results
    assert out.dtype == out_ref.dtype and out.shape == out_ref.shape
    torch.testing.assert_close(out, out_ref, **TOL)
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert g is not None
        torch.testing.assert_close(g, g_ref, **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_fx_symbolic_trace_keeps_torchbps_backward(case):
    """torch.fx traces a model of torch.nn modules (they are leaves); it traces into a
    torchbp module's forward, where the functional refused the Proxy ('linear: input must
    be a Tensor, got Proxy'). The functionals now take part in __torch_function__ as
    native's do, so the trace records them, and the GraphModule runs torchbp's backward."""
    bp, native = _build(case)
    traced = torch.fx.symbolic_trace(bp)
    called = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert called & {getattr(torchbp.functional, name) for name in torchbp.functional.__all__}
    results = []
    for module in (traced, native):
        args = [a.clone() for a in _call_args(case, "cpu")]
        leaf = args[0].requires_grad_()
        out = module(leaf * 1.0, *args[1:])
        out.sum().backward()
        results.append((out.detach(), leaf.grad))
    (out, grad), (out_ref, grad_ref) = results
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(grad, grad_ref, **TOL)


@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 3, 5)], ids=str)
def test_fx_symbolic_trace_of_softmin_without_dim(shape):
    """``Softmin()`` read ``input.dim()`` in its forward for the implicit dim, which a
    Proxy cannot answer: the trace failed. Its forward now calls
    ``torchbp.functional.softmin``, which the trace records as one node (the dim is picked,
    with native's warning, when the GraphModule runs)."""
    traced = torch.fx.symbolic_trace(torchbp.nn.Softmin())
    called = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    assert called == [torchbp.functional.softmin]
    results = []
    for module in (traced, torch.nn.Softmin()):
        x = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(0))
        x.requires_grad_()
        with pytest.warns(UserWarning, match="Implicit dimension choice for softmin"):
            out = module(x)
        out.backward(torch.arange(out.numel(), dtype=DT).reshape(out.shape))
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1], **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_factory_kwargs(bias, dtype, device):
    torch.manual_seed(3)
    bp = torchbp.nn.Linear(5, 3, bias=bias, device=device, dtype=dtype)
    torch.manual_seed(3)
    native = torch.nn.Linear(5, 3, bias=bias, device=device, dtype=dtype)
    for p, q in zip(bp.parameters(), native.parameters(), strict=True):
        assert (p.device, p.dtype) == (q.device, q.dtype)
        assert p.device.type == torch.device(device).type and p.dtype == dtype
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    x = torch.randn(4, 5, device=device, dtype=dtype)
    torch.testing.assert_close(bp(x), native(x))


@pytest.mark.parametrize("name", ["NLLLoss", "CrossEntropyLoss"])
def test_loss_weight_buffer_follows_device_and_dtype(name, device):
    bp = getattr(torchbp.nn, name)(weight=CLASS_WEIGHT.float()).to(device, DT)
    native = getattr(torch.nn, name)(weight=CLASS_WEIGHT.float()).to(device, DT)
    assert bp.weight.dtype == native.weight.dtype == DT
    assert bp.weight.device == native.weight.device
    assert "weight" in dict(bp.named_buffers())


@pytest.mark.parametrize("variant", [v for v in ACTIVATIONS if takes_inplace(v.op)], ids=str)
def test_inplace_modules_modify_input_like_native(variant, device):
    x = torch.randn(3, 4, dtype=DT, device=device)
    a, b = x.clone(), x.clone()
    bp, native = variant.modules()
    out_bp = bp(inplace=True)(a)
    out_native = native(inplace=True)(b)
    assert out_bp.data_ptr() == a.data_ptr()
    torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(out_bp, out_native, **TOL)


def test_train_step_matches_native():
    """A few SGD steps of an MLP: the two models stay equal."""
    torch.manual_seed(0)
    bp = torch.nn.Sequential(
        torchbp.nn.Linear(6, 8), torchbp.nn.GELU(), torchbp.nn.Linear(8, 3)
    ).to(DT)
    native = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    native = native.to(DT)
    native.load_state_dict(bp.state_dict())
    x, y = torch.randn(10, 6, dtype=DT), torch.randint(3, (10,))
    for model, loss_fn in (
        (bp, torchbp.nn.CrossEntropyLoss()),
        (native, torch.nn.CrossEntropyLoss()),
    ):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    for (k, p), (k2, q) in zip(bp.state_dict().items(), native.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("act", ["torchbp", "torch"])
def test_linear_then_inplace_relu(act):
    """``Linear -> ReLU(inplace=True)`` is a common torch.nn pattern."""
    relu = (torchbp.nn if act == "torchbp" else torch.nn).ReLU(inplace=True)
    model = torch.nn.Sequential(torchbp.nn.Linear(3, 4), relu)
    x = torch.randn(2, 3, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None


def _outcome(module, x):
    """``module(x)``, or the class and message of what it raised."""
    try:
        return module(x)
    except Exception as e:  # noqa: BLE001 (compared with native's)
        return type(e), str(e)


def _assert_same_outcome(got, want):
    if isinstance(want, tuple):
        assert got == want
    else:
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("shape", [(), (5,), (4, 5), (2, 4, 5), (2, 3, 4, 5, 6)], ids=str)
def test_softmax2d_checks_dims_as_native(shape):
    """3-D inputs (softmax over dim -3, as 4-D in the parity cases); any other number of
    dims: native's ValueError and message."""
    x = torch.randn(shape, dtype=DT)
    _assert_same_outcome(_outcome(torchbp.nn.Softmax2d(), x), _outcome(torch.nn.Softmax2d(), x))


@pytest.mark.parametrize("name, kwargs", [("Softmin", {"dim": 2}), ("Softmax2d", {})])
def test_softmax_twins_refuse_what_native_refuses(name, kwargs):
    """A dim out of range (IndexError), a bool input (RuntimeError, from the negation or
    the softmax) and an integer one (NotImplementedError): native's class."""
    bp, native = getattr(torchbp.nn, name)(**kwargs), getattr(torch.nn, name)(**kwargs)
    inputs = [torch.randn(3, 4, dtype=DT)]
    inputs += [torch.ones(3, 4, 5, dtype=dtype) for dtype in (torch.bool, torch.long)]
    for x in inputs:
        got, want = _outcome(bp, x), _outcome(native, x)
        if isinstance(want, tuple):
            assert isinstance(got, tuple) and issubclass(got[0], want[0]), (got, want)
        else:
            torch.testing.assert_close(got, want, **TOL)


def _implicit_dim_warning(module, x):
    """``(message, filename, lineno, output)`` of the implicit-dim warning of ``module(x)``."""
    with pytest.warns(UserWarning, match="Implicit dimension choice") as record:
        out = module(x)
    (warning,) = record
    return str(warning.message), warning.filename, warning.lineno, out


@pytest.mark.parametrize("shape", [(), (5,), (4, 5), (2, 3, 5), (2, 3, 4, 5)], ids=str)
def test_softmin_without_dim_picks_and_warns_as_native(shape):
    """``Softmin()``: native's implicit dim for the input's rank, and its warning (same
    text, pointing to the same line)."""
    x = torch.randn(shape, dtype=DT)
    *got_where, got = _implicit_dim_warning(torchbp.nn.Softmin(), x)
    *want_where, want = _implicit_dim_warning(torch.nn.Softmin(), x)
    assert got_where == want_where
    torch.testing.assert_close(got, want, **TOL)
