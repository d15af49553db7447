"""Property-based hunt for silent wrong answers: torchbp.functional against
torch.nn.functional over combinations that hand-picked tests do not cover together.

Each drawn call runs on native and on torchbp with independent copies of its inputs; both
must agree on whether it raises (torchbp's exception an instance of native's class), the
output's value, dtype and shape, every first-order gradient and, where torchbp supports
double backward, the gradient of ``Σ v · grad`` (grad of grad), and what an in-place form
leaves in its input. Drawn together: every floating dtype on CPU (float64 / float32 /
bfloat16 / float16), 0-d / 1-d / N-d / zero-size shapes, transposed, sliced, expanded
(stride 0) and channels-last inputs, class-index targets of every integer dtype, class
weights with zeros, ``ignore_index`` absent / present / on every row, label smoothing with
weights and ignore_index, probability targets with smoothing, extreme logits (±1e4, ±inf,
NaN), gradients required by only some inputs, and the in-place forms.

Low-precision results are judged against native in float64 on the same (rounded) inputs:
torchbp must be within the dtype's tolerance of native, or no further from the float64
truth than about twice native's own error.

Settings: the derandomized ``ci`` profile of :mod:`tests._hypothesis`, with
:data:`EXAMPLES` examples per property (``TORCHBP_HYPOTHESIS_PROFILE=thorough`` scales it).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tests._hypothesis import PROFILE

import torchbp.functional as bp

EXAMPLES = PROFILE.max_examples * 4
FUZZ = settings(PROFILE, max_examples=EXAMPLES)

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (3e-3, 3e-3),
}
INDEX_DTYPES = [torch.int64, torch.uint8, torch.int32, torch.int16, torch.int8]
SPECIALS = [1e4, -1e4, float("inf"), -float("inf"), float("nan")]
# the first entry of the upstream gradient: mostly finite (None), else NaN or ±inf
UPSTREAM = [None, None, float("nan"), float("inf"), -float("inf")]
# Native's failures on calls it should serve (uint8 targets with label smoothing and class
# weights), and its backward's refusals (a non-contiguous K-dim nll_loss gradient): no
# reference there.
NATIVE_FAILURES = ("gather(): Expected dtype int32/int64 for index", "must be contiguous")


# ------------------------------------------------------------------------- tensor arguments
@dataclasses.dataclass
class Arg:
    """A tensor argument: float64 master values, the dtype and layout it is passed in, and
    whether it is a leaf that requires grad (``nonleaf``: passed as ``leaf * 1``, which an
    in-place form may overwrite)."""

    values: torch.Tensor
    dtype: torch.dtype
    layout: str = "contiguous"
    grad: bool = False
    nonleaf: bool = False

    def make(self, wide: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(leaf or None, argument)``; ``wide``: low-precision floats in float64 (rounded
        to their dtype first, so that both see the same inputs)."""
        values = self.values.to(self.dtype)
        if wide and values.is_floating_point():
            values = values.double()
        laid = _laid_out(values, self.layout)
        if not (self.grad and values.is_floating_point()):
            return None, laid
        if self.layout == "expanded" and laid.dim() and laid.stride(0) == 0:
            leaf = laid[:1].detach().requires_grad_()
            base = leaf * 1 if self.nonleaf else leaf
            return leaf, base.expand(laid.shape)
        leaf = laid.detach().requires_grad_()
        return leaf, (leaf * 1 if self.nonleaf else leaf)


def _laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (same logical shape) in ``layout``; ``expanded`` repeats the first row."""
    if layout == "transposed" and values.dim() >= 2:
        return values.mT.contiguous().mT
    if layout == "sliced" and values.dim() >= 1:
        return torch.cat([values, values], -1)[..., : values.shape[-1]]
    if layout == "expanded" and values.dim() >= 1 and values.shape[0] > 0:
        return values[:1].expand(values.shape)
    if layout == "channels_last" and values.dim() == 4:
        return values.contiguous(memory_format=torch.channels_last)
    return values.clone()


def _seeded(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _with_specials(values: torch.Tensor, draw, allowed=SPECIALS) -> torch.Tensor:
    """``values`` with one or two entries set to a drawn extreme value (sometimes)."""
    if values.numel() and draw(st.integers(0, 3)) == 0:
        values = values.clone()
        for _ in range(draw(st.integers(1, 2))):
            at = draw(st.integers(0, values.numel() - 1))
            values.view(-1)[at] = draw(st.sampled_from(allowed))
    return values


# ------------------------------------------------------------------------- running a call
@dataclasses.dataclass(repr=False)
class Call:
    """One drawn call: ``ours(*args, **kwargs)`` against ``native(...)``; ``order`` 2 also
    compares the double backward; ``upstream`` (±inf or NaN) is put into the first entry
    of the upstream gradient."""

    name: str
    ours: Callable
    native: Callable
    args: list[Any]
    kwargs: dict[str, Any]
    order: int = 1
    upstream: float | None = None

    def __repr__(self):
        show = lambda v: (  # noqa: E731
            f"Arg({tuple(v.values.shape)}, {v.dtype}, {v.layout}, grad={v.grad})"
            if isinstance(v, Arg)
            else repr(v)
        )
        args = ", ".join(show(a) for a in self.args)
        kwargs = ", ".join(f"{k}={show(v)}" for k, v in self.kwargs.items())
        return f"{self.name}({args}, {kwargs}) order={self.order} upstream={self.upstream}"

    def dtypes(self) -> set[torch.dtype]:
        values = [*self.args, *self.kwargs.values()]
        return {v.dtype for v in values if isinstance(v, Arg) and v.dtype.is_floating_point}


def _outcome(fn: Callable, call: Call, wide: bool) -> dict[str, Any]:
    """Run ``fn`` on fresh inputs: the error, or the output, gradients (and grad of grad
    with ``order`` 2) and every tensor argument after the call."""
    leaves, built = [], []

    def build(v):
        if not isinstance(v, Arg):
            return torch.float64 if wide and isinstance(v, torch.dtype) else v
        leaf, arg = v.make(wide)
        if leaf is not None:
            leaves.append(leaf)
        built.append(arg)
        return arg

    args = [build(a) for a in call.args]
    kwargs = {k: build(v) for k, v in call.kwargs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - its class is what is compared
            return {"error": error}
        result = {"out": out.detach(), "grads": None, "grads2": None}
        if out.requires_grad:
            try:
                result.update(_gradients(out, leaves, call.order, call.upstream))
            except RuntimeError as error:
                result["backward_error"] = error
    result["after"] = [arg.detach().clone() for arg in built]
    return result


def _gradients(out, leaves, order, upstream):
    """First-order gradients for a seeded upstream gradient (its first entry ``upstream``
    if given) and, with ``order`` 2, the gradient of ``Σ v · grad`` for a seeded ``v``."""
    g = _seeded(out.shape, 1).to(out.dtype)
    if upstream is not None and g.numel():
        g.view(-1)[0] = upstream
    grads = torch.autograd.grad(out, leaves, g, create_graph=order == 2, allow_unused=True)
    second = [gr for gr in grads if gr is not None and gr.requires_grad]
    if order == 1 or not second:
        return {"grads": grads, "grads2": None}
    total = sum((gr.double() * _seeded(gr.shape, 2)).sum() for gr in second)
    return {"grads": grads, "grads2": torch.autograd.grad(total, leaves, allow_unused=True)}


def _judge(ours, native, truth, what, dtypes, scale=1.0):
    """``ours`` has native's dtype, shape and NaN pattern, and is within tolerance of
    native or no further from the float64 ``truth`` than about twice native's error. Where
    native is NaN but float64 is not (a float16 GELU's double backward at x = 1e4 squares
    x into inf), ``ours`` must be within tolerance of float64."""
    if ours is None or native is None:
        assert (ours is None) == (native is None), f"{what}: None where native is not"
        return
    assert ours.shape == native.shape, f"{what}: shape {tuple(ours.shape)} vs {native.shape}"
    assert ours.dtype == native.dtype, f"{what}: dtype {ours.dtype} vs {native.dtype}"
    if not ours.is_floating_point():
        assert torch.equal(ours, native), what
        return
    rtol, atol = max(TOL[d] for d in {ours.dtype, *dtypes})
    o, n = ours.double(), native.double()
    differs = o.isnan() != n.isnan()
    if differs.any():  # only where native's NaN is its own low-precision failure
        unexplained = truth is None or truth.double()[differs].isnan().any()
        assert not (unexplained or o[differs].isnan().any()), f"{what}: NaN unlike native"
    if torch.allclose(o, n, rtol=rtol, atol=atol, equal_nan=True):
        return
    assert truth is not None, f"{what}: max difference {float((o - n).abs().max()):.3g}"
    t = truth.double()
    error, native_error = (o - t).abs().nan_to_num(0), (n - t).abs().nan_to_num(0)
    bound = 2 * native_error + atol * scale + rtol * t.abs().nan_to_num(0)
    worst = float((error - bound).max())
    assert worst <= 0, f"{what}: {worst:.3g} further from float64 than native allows"


def _magnitude(call: Call) -> float:
    """1 + the largest finite |input| (a sum that cancels is off by its terms' rounding)."""
    values = [v.values.abs() for v in [*call.args, *call.kwargs.values()] if isinstance(v, Arg)]
    finite = [v[v.isfinite()] for v in values if v.is_floating_point()]
    return 1.0 + max((float(v.max()) for v in finite if v.numel()), default=0.0)


def compare(call: Call) -> None:
    """``call`` on torchbp and on native (and native in float64): they must agree."""
    expected = _outcome(call.native, call, wide=False)
    got = _outcome(call.ours, call, wide=False)
    if any(m in str(expected.get("error", "")) for m in NATIVE_FAILURES):
        return
    if "error" in expected:
        assert "error" in got, f"native raised {expected['error']!r}; torchbp returned"
        assert isinstance(got["error"], type(expected["error"])), (
            f"torchbp raised {got['error']!r}; native {expected['error']!r}"
        )
        return
    if "error" in got and "backward_error" in expected:
        # a call native's forward takes and its backward refuses (torch 2.11: an empty
        # int32 class-index target): torchbp refuses it at the call (docs/ops.md)
        assert isinstance(got["error"], type(expected["backward_error"])), got["error"]
        return
    assert "error" not in got, f"native returned; torchbp raised {got['error']!r}"
    dtypes = call.dtypes()
    low = dtypes & {torch.float16, torch.bfloat16}
    truth = _outcome(call.native, call, wide=True) if low else expected
    truth = truth if "out" in truth and "backward_error" not in truth else {}
    _judge(got["out"], expected["out"], truth.get("out"), "output", dtypes)
    for i, (a, b) in enumerate(zip(got["after"], expected["after"])):
        _judge(a, b, None if not truth else truth["after"][i], f"argument {i} after", dtypes)
    if "backward_error" in expected:
        assert any(m in str(expected["backward_error"]) for m in NATIVE_FAILURES) or (
            "backward_error" in got
        ), f"native's backward raised {expected['backward_error']!r}; torchbp's did not"
        return
    assert "backward_error" not in got, f"torchbp's backward raised {got['backward_error']!r}"
    scale = _magnitude(call)
    for key in ("grads", "grads2"):
        ours, theirs, wide = got[key], expected[key], truth.get(key)
        if ours is None or theirs is None:
            assert (ours is None) == (theirs is None), f"{key}: None where native is not"
            continue
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _judge(a, b, None if wide is None else wide[i], f"{key}[{i}]", dtypes, scale)


def _upstream(draw, name: str, order: int) -> float | None:
    """A drawn special first entry of the upstream gradient. Not compared (not decided
    yet): an infinite one of cross-entropy and GELU, whose gradient is ±inf where native's
    is NaN (native's log-softmax and float32 GELU backward form inf - inf), and of ELU,
    NaN where native's is ±inf (its saved output's y + α is 0 once e^x < ε); any of
    linear_cross_entropy, whose x and W gradients are NaN where no row counts (N = 0, all
    ignored) and native's are 0 (it scales gradients formed in forward); and any in double
    backward (sigmoid's and GELU's grad of grad for an infinite one is NaN where native's
    is ±inf; ELU's is 0 at x > 0 for a NaN one where native's is NaN)."""
    if order == 2 or name == "linear_cross_entropy":
        return None
    infinite_differs = name in ("cross_entropy", "gelu", "elu", "elu_")
    return draw(st.sampled_from(UPSTREAM[:3] if infinite_differs else UPSTREAM))


# ------------------------------------------------------------------------- loss calls
@st.composite
def loss_calls(draw) -> Call:
    """cross_entropy / nll_loss / linear_cross_entropy with everything drawn together."""
    name = draw(st.sampled_from(["cross_entropy", "nll_loss", "linear_cross_entropy"]))
    dtype = draw(st.sampled_from(FLOATS))
    classes = draw(st.sampled_from([1, 2, 3, 5, 7]))
    rows = draw(st.integers(0, 4))
    kind = "2d" if name == "linear_cross_entropy" else draw(st.sampled_from(["1d", "2d", "kd"]))
    extra = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 2))))
    batch = {"1d": (), "2d": (rows,), "kd": (rows, *extra)}[kind]
    shape = (classes,) if kind == "1d" else (rows, classes, *batch[1:])
    class_dim = 0 if kind == "1d" else 1
    seed = draw(st.integers(0, 2**16))
    kwargs = {"reduction": draw(st.sampled_from(["mean", "sum", "none"]))}
    probs = name != "nll_loss" and draw(st.integers(0, 3)) == 0
    if probs:
        target_values = torch.softmax(_seeded(shape, seed + 1), class_dim)
        target = Arg(target_values, dtype, grad=draw(st.booleans()))
    else:
        target = _class_target(draw, batch, classes, seed, kwargs, kind)
    if draw(st.booleans()):
        weight = torch.rand(classes, generator=torch.Generator().manual_seed(seed + 2)) + 0.1
        if draw(st.booleans()):
            weight[draw(st.integers(0, classes - 1))] = 0.0
        kwargs["weight"] = Arg(weight.double(), dtype)
    if name != "nll_loss" and draw(st.booleans()):
        kwargs["label_smoothing"] = draw(st.sampled_from([0.1, 0.5, 1.0]))
    if name == "linear_cross_entropy":
        return _linear_cross_entropy_call(draw, dtype, rows, classes, seed, target, kwargs)
    logits = _with_specials(_seeded(shape, seed, draw(st.sampled_from([1.0, 3.0, 30.0]))), draw)
    values = torch.log_softmax(logits, class_dim) if name == "nll_loss" else logits
    layouts = ["contiguous", "transposed", "channels_last"]
    x = Arg(values, dtype, draw(st.sampled_from(layouts)), grad=True)
    order = draw(st.sampled_from([1, 2]))
    upstream = _upstream(draw, name, order)
    return Call(name, getattr(bp, name), getattr(F, name), [x, target], kwargs, order, upstream)


def _class_target(draw, batch, classes, seed, kwargs, kind) -> Arg:
    """Class indices of a drawn integer dtype (int64 for K-dim input, as native requires),
    with ``ignore_index`` absent, on some rows, or on every row."""
    index_dtype = torch.int64 if kind == "kd" else draw(st.sampled_from(INDEX_DTYPES))
    g = torch.Generator().manual_seed(seed + 3)
    target = torch.randint(0, classes, batch, generator=g)
    ignoring = draw(st.sampled_from(["absent", "absent", "some", "all"]))
    if ignoring != "absent":
        negative_ok = index_dtype != torch.uint8
        ignore = draw(st.sampled_from([-100, 0, classes - 1] if negative_ok else [0, 255]))
        kwargs["ignore_index"] = ignore
        ignored = torch.rand(batch, generator=g) < 0.4 if ignoring == "some" else True
        target = target.masked_fill(torch.as_tensor(ignored), ignore)
    return Arg(target.double(), index_dtype)


def _linear_cross_entropy_call(draw, dtype, rows, classes, seed, target, kwargs) -> Call:
    """linear_cross_entropy against native's composite ``cross_entropy(linear(x, W))`` (the
    fused native op is new in torch 2.13); first order only (double backward is
    unsupported by design)."""
    features = draw(st.integers(1, 4))
    x = Arg(_seeded((rows, features), seed), dtype, draw(st.sampled_from(["contiguous", "sliced"])))
    x.grad = draw(st.booleans())
    w = Arg(_seeded((classes, features), seed + 5), dtype, "transposed", grad=True)
    if draw(st.booleans()):
        kwargs["linear_bias"] = Arg(_seeded((classes,), seed + 6, 3.0), dtype, grad=True)

    name, native = "linear_cross_entropy", _composite_linear_cross_entropy
    upstream = _upstream(draw, name, 1)
    return Call(name, bp.linear_cross_entropy, native, [x, w, target], kwargs, 1, upstream)


def _composite_linear_cross_entropy(x, linear_weight, target, linear_bias=None, **options):
    """Native's cross_entropy of native's linear: the reference on every torch."""
    return F.cross_entropy(F.linear(x, linear_weight, linear_bias), target, **options)


@FUZZ
@given(loss_calls())
def test_loss_call_matches_native(call):
    compare(call)


# ------------------------------------------------------------------------- one-tensor ops
ACTIVATIONS = {
    "sigmoid": (bp.sigmoid, torch.sigmoid, {}),
    "tanh": (bp.tanh, torch.tanh, {}),
    "relu": (bp.relu, F.relu, {}),
    "leaky_relu": (bp.leaky_relu, F.leaky_relu, {"negative_slope": [0.01, 0.0, 0.5, 2.0, -0.5]}),
    "gelu": (bp.gelu, F.gelu, {"approximate": ["none", "tanh"]}),
    "silu": (bp.silu, F.silu, {}),
    "elu": (bp.elu, F.elu, {"alpha": [1.0, 0.5, 2.0, 0.0]}),
    "softplus": (bp.softplus, F.softplus, {"beta": [1.0, 2.0, 0.5], "threshold": [20.0, 1.0]}),
    "relu_": (bp.relu_, torch.relu_, {}),
    "leaky_relu_": (bp.leaky_relu_, F.leaky_relu_, {"negative_slope": [0.01, 0.0, 2.0]}),
    "elu_": (bp.elu_, F.elu_, {"alpha": [1.0, 0.5, 2.0]}),
    "softmax": (bp.softmax, F.softmax, {}),
    "log_softmax": (bp.log_softmax, F.log_softmax, {}),
}
TAKES_INPLACE = {"relu", "leaky_relu", "elu", "silu"}


@st.composite
def unary_calls(draw) -> Call:
    """An activation (in-place forms too) or softmax / log_softmax call."""
    name = draw(st.sampled_from(sorted(ACTIVATIONS)))
    ours, native, options = ACTIVATIONS[name]
    kwargs = {k: draw(st.sampled_from(v)) for k, v in options.items() if draw(st.booleans())}
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 5]), max_size=4)))
    values = _seeded(shape, draw(st.integers(0, 2**16)), draw(st.sampled_from([1.0, 5.0, 30.0])))
    if values.numel() and draw(st.booleans()):
        values = values * (values.abs() > 0.5)  # exact zeros: the kinks
    # ELU's gradient at NaN depends on native's tensor size (docs/ops.md): not drawn
    values = _with_specials(values, draw, SPECIALS[:-1] if "elu" in name else SPECIALS)
    inplace = name.endswith("_")
    if name in TAKES_INPLACE and draw(st.booleans()):
        inplace = kwargs["inplace"] = True
    slope = kwargs.get("negative_slope", kwargs.get("alpha", 1.0))
    assume(not (inplace and slope < 0))  # refused in forward, native in backward (documented)
    if name in ("softmax", "log_softmax"):
        kwargs["dim"] = draw(st.integers(-max(len(shape), 1), max(len(shape), 1) - 1))
        if draw(st.integers(0, 3)) == 0:
            kwargs["dtype"] = draw(st.sampled_from([torch.float64, torch.float32]))
    layouts = ["contiguous", "transposed", "sliced", "expanded", "channels_last"]
    x = Arg(values, draw(st.sampled_from(FLOATS)), draw(st.sampled_from(layouts)), True, inplace)
    order = draw(st.sampled_from([1, 2]))
    return Call(name, ours, native, [x], kwargs, order, _upstream(draw, name, order))


@FUZZ
@given(unary_calls())
def test_unary_call_matches_native(call):
    compare(call)


@st.composite
def linear_calls(draw) -> Call:
    """linear with gradients required by only some of x, W, b, and double backward."""
    lead = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3]), max_size=3)))
    fin, fout = draw(st.sampled_from([0, 1, 3, 5])), draw(st.sampled_from([0, 1, 2, 4]))
    dtype, seed = draw(st.sampled_from(FLOATS)), draw(st.integers(0, 2**16))
    layouts = ["contiguous", "transposed", "sliced"]
    x = Arg(_seeded((*lead, fin), seed), dtype, draw(st.sampled_from([*layouts, "expanded"])))
    w = Arg(_seeded((fout, fin), seed + 1), dtype, draw(st.sampled_from(layouts)))
    args = [x, w]
    if draw(st.booleans()):
        args.append(Arg(_seeded((fout,), seed + 2), dtype))
    for arg in args:
        arg.grad = draw(st.booleans())
    order = draw(st.sampled_from([1, 2]))
    return Call("linear", bp.linear, F.linear, args, {}, order, _upstream(draw, "linear", order))


@FUZZ
@given(linear_calls())
def test_linear_call_matches_native(call):
    compare(call)


# ------------------------------------------------------------------------- regressions
@pytest.mark.parametrize("smoothing", [0.1, 1.0])
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
def test_mean_over_zero_total_weight_with_label_smoothing_is_nan(name, smoothing):
    # the only kept target is a class of weight 0 (the other row is ignored): native's
    # 'mean' is NaN, its gradient NaN on the kept row and 0 on the ignored one
    kwargs = {
        "weight": Arg(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), torch.float32),
        "ignore_index": 1,
        "label_smoothing": smoothing,
    }
    target = Arg(torch.tensor([2.0, 1.0], dtype=torch.float64), torch.int64)
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], dtype=torch.float64)
    if name == "cross_entropy":
        x = Arg(logits, torch.float32, grad=True)
        call = Call(name, bp.cross_entropy, F.cross_entropy, [x, target], kwargs)
    else:  # the same logits as x Wᵀ with x = I (2 by 2), W = logitsᵀ
        x = Arg(torch.eye(2, dtype=torch.float64), torch.float32, grad=True)
        w = Arg(logits.T.contiguous(), torch.float32, grad=True)
        call = Call(
            name, bp.linear_cross_entropy, _composite_linear_cross_entropy, [x, w, target], kwargs
        )
    compare(call)
