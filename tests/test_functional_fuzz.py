"""Differential fuzzing of :mod:`torchbp.functional` against :mod:`torch.nn.functional`.

Hypothesis draws whole calls (op, shapes incl. 0-dim / empty / K-dim losses, dtypes incl.
integer and bool, strided layouts, keyword values native accepts and ones it rejects,
positional vs keyword passing, the deprecated ``size_average`` / ``reduce``) and runs each
on native and on torchbp with independent copies of the inputs. Both must agree on: whether
an error is raised (torchbp's exception an instance of native's class), the output's value,
dtype and shape, every gradient, and which inputs were modified (and how).

Documented deliberate differences (a negative ``label_smoothing`` is refused; ``linear``
takes a 1-D weight with a bias for 2-D input) are drawn but not compared.

``TORCHBP_FUZZ_EXAMPLES=3000`` draws many more calls than the bounded default.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchbp.functional as bp

EXAMPLES = int(os.environ.get("TORCHBP_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 40,
    suppress_health_check=list(HealthCheck),
)

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ODD = [torch.int64, torch.int32, torch.bool]
TOL = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (3e-3, 3e-3),
}
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "channels_last", "nonleaf"]


# ------------------------------------------------------------------------- tensor drawing
def _values(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if dtype == torch.bool:
        return base > 0
    if not dtype.is_floating_point:
        return base.round().to(dtype)
    return base.to(dtype)


def _laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A copy of ``values`` laid out in ``layout``, same logical shape and values."""
    values = values.clone()
    if layout == "transposed" and values.dim() >= 2:
        return values.mT.contiguous().mT
    if layout == "sliced" and values.dim() >= 1:
        wide = torch.cat([values, values], dim=-1)
        return wide[..., : values.shape[-1]]
    if layout == "expanded" and values.dim() >= 1 and values.shape[0] > 0:
        if (values == values[:1]).all():
            return values[:1].expand_as(values)
        return values
    if layout == "channels_last" and values.dim() == 4:
        return values.contiguous(memory_format=torch.channels_last)
    return values


class Spec:
    """A tensor argument: its values and layout, and whether it requires grad."""

    def __init__(self, values, layout="contiguous", grad=False):
        self.values, self.layout, self.grad = values, layout, grad

    def __repr__(self):
        v = self.values
        return f"Spec({tuple(v.shape)}, {v.dtype}, {self.layout!r}, grad={self.grad})"

    def widened(self):
        """This argument in float64 (half and single precision floats only)."""
        low = self.values.is_floating_point() and self.values.dtype != torch.float64
        values = self.values.double() if low else self.values
        return Spec(values, self.layout, self.grad)

    def make(self):
        """``(leaf, arg)``: a fresh leaf (for .grad) and the argument built from it."""
        grad = self.grad and (self.values.is_floating_point() or self.values.is_complex())
        if self.layout == "nonleaf" and grad:
            leaf = self.values.clone().requires_grad_()
            return leaf, leaf * 1
        laid = _laid_out(self.values, self.layout)
        if not grad:
            return None, laid
        if laid._base is not None or not laid.is_contiguous():
            # a view: the leaf is the base, the argument the view of it
            leaf = laid.detach().requires_grad_()
            return leaf, leaf
        return laid.requires_grad_(), laid


@st.composite
def tensors(draw, shape, dtypes=FLOATS, grad=None, scale=3.0):
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    layout = draw(st.sampled_from(LAYOUTS))
    if grad is None:
        grad = draw(st.booleans())
    scale = draw(st.sampled_from([scale, scale, 0.1, 30.0]))
    if not math.prod(shape) and not dtype.is_floating_point:
        # native skips its dtype check on an empty input (torchbp does not): not compared
        dtype = torch.float32
    values = _values(tuple(shape), dtype, seed, scale)
    if dtype.is_floating_point and values.numel() and draw(st.integers(0, 5)) == 0:
        special = draw(st.sampled_from([float("inf"), -float("inf"), float("nan"), 0.0, 1e4]))
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = special
    if layout == "expanded" and values.dim() >= 1 and values.shape[0] > 0:
        values = values[:1].expand_as(values).clone()  # rows equal: an expanded view fits
    return Spec(values, layout, grad)


small = st.integers(0, 4)
positive = st.integers(1, 4)


@st.composite
def shapes(draw, min_dims=0, max_dims=4):
    n = draw(st.integers(min_dims, max_dims))
    return tuple(draw(st.integers(0, 4) if draw(st.booleans()) else positive) for _ in range(n))


# ------------------------------------------------------------------------- running one call
def _materialise(args, kwargs):
    leaves, built_args, built_kwargs, originals = [], [], {}, []

    def build(v):
        if isinstance(v, Spec):
            leaf, arg = v.make()
            if leaf is not None:
                leaves.append(leaf)
            originals.append((arg, arg.detach().clone()))
            return arg
        return v

    built_args = [build(a) for a in args]
    built_kwargs = {k: build(v) for k, v in kwargs.items()}
    return leaves, built_args, built_kwargs, originals


def _run(fn, args, kwargs):
    leaves, a, k, originals = _materialise(args, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = fn(*a, **k)
        except Exception as error:  # noqa: BLE001 - the class is what is compared
            return {"error": error, "modified": _modified(originals)}
        grads, grad_error = None, None
        if isinstance(out, torch.Tensor) and out.requires_grad and out.is_floating_point():
            g = torch.Generator().manual_seed(0)
            go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
            try:
                grads = torch.autograd.grad(out, leaves, go, allow_unused=True)
            except Exception as error:  # noqa: BLE001
                grad_error = error
    return {
        "out": out,
        "grads": grads,
        "grad_error": grad_error,
        "modified": _modified(originals),
        "inputs": [arg.detach().clone() for arg, _ in originals],
    }


def _modified(originals):
    return [
        not torch.equal(arg.detach(), before)
        if arg.shape == before.shape and not arg.detach().isnan().any()
        else not torch.equal(arg.detach().isnan(), before.isnan())
        for arg, before in originals
    ]


def _coarsest(dtypes):
    """The tolerance of the least precise floating dtype among ``dtypes``."""
    return max((TOL[d] for d in dtypes if d in TOL), default=(1e-4, 1e-4))


def _close(a, b, what, dtypes=()):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs native {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs native {b.dtype}"
    if a.is_floating_point():
        # computed through every input's dtype: judged at the coarsest one
        rtol, atol = _coarsest({a.dtype, *dtypes})
        torch.testing.assert_close(
            a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True, msg=what
        )
    else:
        assert torch.equal(a, b), what


def _spec_dtypes(args, kwargs):
    return {v.values.dtype for v in [*args, *kwargs.values()] if isinstance(v, Spec)}


def _judge(a, b, truth, what, dtypes, scale=1.0):
    if truth is None or not a.is_floating_point() or a.dtype != b.dtype:
        return _close(a, b, what, dtypes)
    return _no_worse_than_native(a, b, truth, what, dtypes, scale)


def _magnitude(inputs) -> float:
    """1 + the largest finite |value| among the floating inputs."""
    values = [t.double().abs() for t in inputs if t.is_floating_point() and t.numel()]
    finite = [v[v.isfinite()] for v in values]
    return 1.0 + max((float(v.max()) for v in finite if v.numel()), default=0.0)


def _widened(args, kwargs):
    """The call with every low-precision float argument in float64 (a ``dtype=`` too)."""
    widen = lambda v: v.widened() if isinstance(v, Spec) else v  # noqa: E731
    wide = {k: widen(v) for k, v in kwargs.items()}
    if isinstance(wide.get("dtype"), torch.dtype):
        wide["dtype"] = torch.float64
    return [widen(a) for a in args], wide


def _no_worse_than_native(a, b, truth, what, dtypes, scale):
    """Low precision: torchbp's ``a`` is within tolerance of native's ``b``, or no further
    from the float64 ``truth`` than about twice native's own error (torchbp may
    accumulate more precisely than native)."""
    try:
        _close(a, b, what, dtypes)
    except AssertionError:
        rtol, atol = _coarsest(dtypes)
        ours = (a.double() - truth.double()).abs().nan_to_num(0)
        theirs = (b.double() - truth.double()).abs().nan_to_num(0)
        # a result that cancels (Σ_c g_c W_c = 0) is off by the rounding of its terms:
        # the absolute tolerance scales with the inputs' magnitude
        bound = 2 * theirs + atol * scale + rtol * truth.double().abs().nan_to_num(0)
        assert (ours <= bound).all(), f"{what}: further from float64 than native"


# Native errors that are native's own failures on valid calls, where torchbp answers:
# uint8 targets with label smoothing and class weights; K-dim nll_loss with C = 0.
NATIVE_BUGS = ("gather(): Expected dtype int32/int64 for index", "size mismatch (got input: [")


def compare(native, ours, args, kwargs):
    expected = _run(native, args, kwargs)
    got = _run(ours, args, kwargs)
    truth = None
    if any(d in (torch.float16, torch.bfloat16) for d in _spec_dtypes(args, kwargs)):
        truth = _run(native, *_widened(args, kwargs))
        if "error" in truth or truth["grad_error"] is not None:
            truth = None
    if "error" in expected and any(m in str(expected["error"]) for m in NATIVE_BUGS):
        return  # native fails where it should not: no reference
    if "error" in expected:
        assert "error" in got, f"native raised {expected['error']!r}; torchbp returned"
        assert isinstance(got["error"], type(expected["error"])), (
            f"torchbp raised {type(got['error']).__name__}: {got['error']}; "
            f"native {type(expected['error']).__name__}: {expected['error']}"
        )
        assert got["modified"] == expected["modified"], "inputs modified differently on error"
        return
    if "error" in got:
        raise AssertionError(f"native returned; torchbp raised {got['error']!r}")
    dtypes = {arg.dtype for arg in expected["inputs"]} | _requested_dtypes(kwargs)
    _judge(got["out"], expected["out"], truth and truth["out"], "output", dtypes)
    assert got["modified"] == expected["modified"], (
        f"modified inputs {got['modified']} vs native {expected['modified']}"
    )
    for i, (a, b) in enumerate(zip(got["inputs"], expected["inputs"])):
        if expected["modified"][i]:
            _close(a, b, f"input {i} after the call", dtypes)
    if expected["grad_error"] is not None:
        return  # native's backward fails (e.g. 'grad_input must be contiguous'): no reference
    assert got["grad_error"] is None, f"torchbp backward raised {got['grad_error']!r}"
    assert (got["grads"] is None) == (expected["grads"] is None), "requires_grad differs"
    if expected["grads"] is not None:
        for i, (a, b) in enumerate(zip(got["grads"], expected["grads"])):
            assert (a is None) == (b is None), f"gradient {i}: None differs"
            if a is not None:
                wide = truth and truth["grads"] and truth["grads"][i]
                _judge(a, b, wide, f"gradient {i}", dtypes, _magnitude(expected["inputs"]))


def _requested_dtypes(kwargs):
    dtype = kwargs.get("dtype")
    return {dtype} if isinstance(dtype, torch.dtype) else set()


def _call(draw, args, kwargs, positional_names):
    """Pass some keyword arguments positionally (the ones native takes positionally)."""
    if draw(st.booleans()):
        for name in positional_names:
            if name not in kwargs:
                break
            args.append(kwargs.pop(name))
    return args, kwargs


# ------------------------------------------------------------------------- per-op calls
ACT = {
    "sigmoid": (torch.sigmoid, bp.sigmoid, []),
    "tanh": (torch.tanh, bp.tanh, []),
    "relu": (F.relu, bp.relu, ["inplace"]),
    "leaky_relu": (F.leaky_relu, bp.leaky_relu, ["negative_slope", "inplace"]),
    "gelu": (F.gelu, bp.gelu, []),
    "silu": (F.silu, bp.silu, ["inplace"]),
    "elu": (F.elu, bp.elu, ["alpha", "inplace"]),
    "softplus": (F.softplus, bp.softplus, ["beta", "threshold"]),
}
numbers = st.sampled_from([0.0, 0.01, -0.5, 1.0, 2.0, 1e-3, 30.0, -2.0, 0, 3])


@st.composite
def activation_calls(draw):
    name = draw(st.sampled_from(sorted(ACT)))
    native, ours, positional = ACT[name]
    x = draw(tensors(draw(shapes()), dtypes=FLOATS + ODD if draw(st.booleans()) else FLOATS))
    kwargs = {}
    if "inplace" in positional and draw(st.booleans()):
        kwargs["inplace"] = draw(st.booleans())
    if name == "leaky_relu" and draw(st.booleans()):
        kwargs["negative_slope"] = draw(numbers)
    if name == "elu" and draw(st.booleans()):
        kwargs["alpha"] = draw(numbers)
    if name == "softplus":
        if draw(st.booleans()):
            kwargs["beta"] = draw(numbers)
        if draw(st.booleans()):
            kwargs["threshold"] = draw(numbers)
    if name == "gelu" and draw(st.booleans()):
        kwargs["approximate"] = draw(st.sampled_from(["none", "tanh", "bogus"]))
    order = [p for p in positional if p in kwargs] if name != "gelu" else []
    ordered = {k: kwargs[k] for k in positional if k in kwargs}
    if order == [p for p in positional[: len(order)]]:
        args, kwargs2 = _call(draw, [x], dict(ordered), positional)
        kwargs2.update({k: v for k, v in kwargs.items() if k not in ordered})
        return name, native, ours, args, kwargs2
    return name, native, ours, [x], kwargs


@st.composite
def softmax_calls(draw):
    name = draw(st.sampled_from(["softmax", "log_softmax"]))
    native, ours = getattr(F, name), getattr(bp, name)
    x = draw(tensors(draw(shapes()), dtypes=FLOATS + ODD if draw(st.booleans()) else FLOATS))
    kwargs = {}
    kwargs["dim"] = draw(st.sampled_from([None, 0, 1, -1, 2, -3, 4]))
    if draw(st.booleans()):
        kwargs["dtype"] = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    if draw(st.booleans()):
        return name, native, ours, [x, kwargs.pop("dim")], kwargs
    return name, native, ours, [x], kwargs


@st.composite
def linear_calls(draw):
    lead = draw(shapes(0, 3))
    fin, fout = draw(small), draw(small)
    dtype = draw(st.sampled_from(FLOATS))
    same = st.sampled_from([dtype]) if draw(st.integers(0, 5)) else st.sampled_from(FLOATS)
    x = draw(tensors((*lead, fin), dtypes=[dtype]))
    # native's acceptance of mixed dtypes and of an unbatched input's (1, out) bias depends
    # on which kernel its dispatch picks for the layout (addmm or matmul + add_): not drawn
    x.layout = "contiguous" if len(lead) == 1 else x.layout
    wshape = draw(st.sampled_from([(fout, fin), (fout, fin), (fin,), (fout, fin + 1)]))
    w = draw(tensors(wshape, dtypes=[draw(same)]))
    bshapes = [None, (fout,), (fout,), (1,), (), (fout + 1,)] + ([(1, fout)] if lead else [])
    bshape = draw(st.sampled_from(bshapes))
    if len(lead) != 1:
        same = st.sampled_from([dtype])
    kwargs = {}
    if bshape is not None:
        kwargs["bias"] = draw(tensors(bshape, dtypes=[draw(same)]))
    if len(wshape) == 1 and bshape is not None:
        kwargs.pop("bias")  # documented: torchbp takes it where native refuses
    args, kwargs = _call(draw, [x, w], kwargs, ["bias"])
    return "linear", F.linear, bp.linear, args, kwargs


@st.composite
def loss_calls(draw):
    name = draw(st.sampled_from(["nll_loss", "cross_entropy"]))
    native, ours = getattr(F, name), getattr(bp, name)
    kind = draw(st.sampled_from(["1d", "2d", "kdim"]))
    classes = draw(small)
    n = draw(small)
    extra = tuple(draw(small) for _ in range(draw(st.integers(1, 2)))) if kind == "kdim" else ()
    shape = {"1d": (classes,), "2d": (n, classes), "kdim": (n, classes, *extra)}[kind]
    batch = {"1d": (), "2d": (n,), "kdim": (n, *extra)}[kind]
    x = draw(tensors(shape, dtypes=FLOATS + [torch.int64] if draw(st.booleans()) else FLOATS))
    kwargs = {}
    soft = name == "cross_entropy" and draw(st.integers(0, 3)) == 0
    ignore = draw(st.sampled_from([-100, -100, 0, 1, -1, 5, classes]))
    if soft:
        g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
        probs = torch.rand(shape, generator=g, dtype=torch.float64)
        tdtype = draw(st.sampled_from(FLOATS))
        target = Spec(probs.to(tdtype), draw(st.sampled_from(LAYOUTS)), draw(st.booleans()))
    else:
        index_dtypes = [torch.int64] * 4 + [torch.int32, torch.uint8, torch.float32]
        tdtype = draw(st.sampled_from(index_dtypes))
        high = classes + (1 if draw(st.integers(0, 5)) == 0 else 0)
        low = -1 if draw(st.integers(0, 5)) == 0 else 0
        g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
        if high > low:
            t = torch.randint(low, high, batch, generator=g)
        else:
            t = torch.zeros(batch, dtype=torch.int64)
        if draw(st.booleans()) and t.numel():
            t.view(-1)[0] = ignore
        # documented: K-dim input needs int64 (native's empty 'mean' loss skips the check)
        if tdtype == torch.uint8 and ((t < 0).any() or kind == "kdim"):
            tdtype = torch.int64
        tshape_ok = draw(st.integers(0, 8))
        if tshape_ok == 0 and t.dim() >= 1:
            t = t[:-1] if t.shape[0] else t
        target = Spec(t.to(tdtype), draw(st.sampled_from(LAYOUTS)), False)
    if draw(st.booleans()):
        wlen = classes if draw(st.integers(0, 6)) else classes + 1
        wd = draw(st.sampled_from(FLOATS + [torch.int64]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
        kwargs["weight"] = Spec(
            torch.rand(wlen, generator=g, dtype=torch.float64).to(wd), "contiguous", False
        )
    if draw(st.booleans()):
        kwargs["ignore_index"] = ignore
    if draw(st.booleans()):
        kwargs["reduction"] = draw(st.sampled_from(["mean", "sum", "none", "bogus"]))
    if draw(st.integers(0, 5)) == 0:
        kwargs["size_average"] = draw(st.sampled_from([None, True, False]))
    if draw(st.integers(0, 5)) == 0:
        kwargs["reduce"] = draw(st.sampled_from([None, True, False]))
    if name == "cross_entropy" and draw(st.booleans()):
        kwargs["label_smoothing"] = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.5]))
    positional = ["weight", "size_average", "ignore_index", "reduce", "reduction"]
    if name == "cross_entropy":
        positional.append("label_smoothing")
    if draw(st.booleans()):
        args = [x, target]
        for p in positional:
            if p not in kwargs:
                break
            args.append(kwargs.pop(p))
        return name, native, ours, args, kwargs
    return name, native, ours, [x, target], kwargs


@st.composite
def linear_cross_entropy_calls(draw):
    lead = draw(st.sampled_from([(), (0,), (1,), (3,), (5,)]))
    fin, classes = draw(small), draw(small)
    dtype = draw(st.sampled_from(FLOATS))
    x = draw(tensors((*lead, fin), dtypes=[dtype], scale=1.0))
    w = draw(tensors((classes, fin), dtypes=[dtype], scale=1.0))
    kwargs = {}
    if draw(st.booleans()):
        kwargs["linear_bias"] = draw(tensors((classes,), dtypes=[dtype], scale=1.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    if draw(st.integers(0, 3)) == 0:
        probs = torch.rand((*lead, classes), generator=g, dtype=torch.float64)
        target = Spec(probs.to(draw(st.sampled_from(FLOATS))), "contiguous", draw(st.booleans()))
    else:
        high = classes + (1 if draw(st.integers(0, 5)) == 0 else 0)
        t = torch.randint(0, high, lead, generator=g) if high else torch.zeros(lead).long()
        if draw(st.booleans()) and t.numel():
            t.view(-1)[0] = draw(st.sampled_from([-100, 0, -1]))
        target = Spec(t, draw(st.sampled_from(LAYOUTS)), False)
    if draw(st.booleans()):
        wd = draw(st.sampled_from([dtype, dtype, torch.float64]))
        kwargs["weight"] = Spec(torch.rand(classes, generator=g, dtype=torch.float64).to(wd))
    if draw(st.booleans()):
        kwargs["ignore_index"] = draw(st.sampled_from([None, -100, 0, -1, 1]))
    if draw(st.booleans()):
        kwargs["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    if draw(st.booleans()):
        kwargs["label_smoothing"] = draw(st.sampled_from([0.0, 0.2, 1.0]))
    native, ours = F.linear_cross_entropy, bp.linear_cross_entropy
    return "linear_cross_entropy", native, ours, [x, w, target], kwargs


# native's linear_cross_entropy is new in torch 2.13 (the suite runs on 2.11 too)
HAS_NATIVE_LCE = hasattr(F, "linear_cross_entropy")
calls = st.one_of(
    activation_calls(),
    softmax_calls(),
    linear_calls(),
    loss_calls(),
    *([linear_cross_entropy_calls()] if HAS_NATIVE_LCE else []),
)


@FUZZ
@given(calls)
def test_functional_call_matches_native(call):
    name, native, ours, args, kwargs = call
    compare(native, ours, args, kwargs)


# ------------------------------------------------------------------------- regressions
@pytest.mark.parametrize("name", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("shape", "batch"), [((0, 0, 3), (0, 3)), ((2, 0, 0), (2, 0))])
def test_k_dim_loss_without_classes_or_rows_matches_native(name, reduction, shape, batch):
    # (N, C, d1) with C = 0 and no row: "cannot reshape tensor of 0 elements into shape
    # [-1, 0]" where native returns an empty loss (nan for 'mean')
    x = Spec(torch.randn(shape, dtype=torch.float64), grad=True)
    target = Spec(torch.zeros(batch, dtype=torch.int64))
    compare(getattr(F, name), getattr(bp, name), [x, target], {"reduction": reduction})


def test_k_dim_probability_target_without_classes_matches_native():
    x = Spec(torch.randn(0, 0, 3, dtype=torch.float64), grad=True)
    target = Spec(torch.rand(0, 0, 3, dtype=torch.float64), grad=True)
    compare(F.cross_entropy, bp.cross_entropy, [x, target], {"reduction": "none"})


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize(
    "name",
    [
        "cross_entropy",
        pytest.param(
            "linear_cross_entropy",
            marks=pytest.mark.skipif(not HAS_NATIVE_LCE, reason="native's needs torch 2.13"),
        ),
    ],
)
def test_probability_target_gradient_of_large_logits_matches_native(name, offset):
    # ∂loss/∂t = -logp was formed as z - lse: at |z| = 1e6 (float32) lse's rounding
    # (ulp 0.06) left 0.875 where native's log-softmax gives 0.862
    logits = torch.tensor([[0.0, 0.0, -1.0], [2.0, -3.0, 0.5]], dtype=torch.float64) + offset
    target = torch.rand(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if name == "cross_entropy":
        args = [Spec(logits.float(), grad=True), Spec(target.float(), grad=True)]
        kwargs = {}
    else:  # the logits as x Wᵀ + b with x = 1, W = 0: b
        x, w = Spec(torch.ones(2, 1), grad=True), Spec(torch.zeros(3, 1), grad=True)
        args = [x, w, Spec(target.float(), grad=True)]
        kwargs = {"linear_bias": Spec(logits[0].float())}
    compare(getattr(F, name), getattr(bp, name), args, kwargs)
