"""Property tests of the cross-entropy / NLL and GELU fast paths against native torch on
drawn special values.

The paths: ``cpu_ce.weighted_rows`` (class weights without label smoothing) and the
``'mean'`` denominator of class weights (``_loss_terms``), the class-index check's cheap
path for an ``ignore_index`` outside ``[0, C)``, and the exact GELU backward kernel
(``cpu_act.gelu``: ``Φ(x)`` from ``gelu(x) / x`` at ``x`` nudged off 0, block by block).

Drawn: K-dim, 1-D, empty and one-class inputs; float32 / float64 / bfloat16 / float16;
class weights with zeros, negatives, ±inf, NaN, tiny and huge entries; ``ignore_index``
in range, out of range, negative or equal to C; every reduction; label smoothing; logits
with ±inf, NaN, huge or confident rows; transposed and sliced logits and targets. GELU
inputs near 0, subnormal, ±0, ±inf, NaN and huge, both approximations, non-contiguous,
sizes crossing the kernel's block.

Judged as ``tests/test_properties.py`` judges: native's NaN pattern exactly (the drop-in
contract), and every other element close to native on the same inputs in float64 (or no
worse than about twice native's own error). Huge class weights make gradients the
difference of terms of size ``|w|`` (``w_y p - w_y``), so the absolute tolerance scales
with the largest finite weight.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st
from tests._hypothesis import PROFILE
from tests._support import TOL

import torchbp.functional as bp
from torchbp.kernels import cpu_act

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF = (torch.float16, torch.bfloat16)
seeds = st.integers(min_value=0, max_value=2**16)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_close(ours, native, truth, dtype, what, scale=1.0):
    """``ours`` has native's dtype, shape and NaN pattern, and within tolerance (its
    ``atol`` times ``scale``) of the float64 ``truth`` or no worse than twice native."""
    assert ours.dtype == native.dtype, f"{what}: dtype {ours.dtype} != {native.dtype}"
    assert ours.shape == native.shape, f"{what}: shape {tuple(ours.shape)} != {native.shape}"
    o, n, t = (v.detach().to(torch.float64) for v in (ours, native, truth))
    # native's NaN pattern, but where native's NaN is its own overflow (the float64 truth
    # is a number: float32 GELU-tanh's x² at |x| > 1.8e19) the true value passes too
    overflow = n.isnan() & ~t.isnan()
    same_nan = torch.where(overflow, True, o.isnan() == n.isnan())
    assert bool(same_nan.all()), f"{what}: NaN pattern differs from native"
    same_inf = torch.where(n.isinf() & t.isinf(), o == n, True)
    assert bool(same_inf.all()), f"{what}: an infinity differs from native's"
    finite = t.isfinite() & (n.isfinite() | (overflow & ~o.isnan()))
    o, n, t = o[finite], n[finite].nan_to_num(), t[finite]
    if o.numel() == 0:
        return
    tol = TOL[dtype]
    allowed = tol["atol"] * scale + tol["rtol"] * t.abs() + 2 * (n - t).abs()
    excess = (o - t).abs() - allowed
    assert float(excess.max()) <= 0, (
        f"{what}: max error vs float64 {float((o - t).abs().max()):.3g}, "
        f"native's {float((n - t).abs().max()):.3g}"
    )


def _forward_backward(fn, z, layout, target, kwargs, grad_seed):
    """``(loss, ∂loss/∂z)`` of ``fn(z, target, **kwargs)`` under a drawn grad_output, the
    op seeing ``z`` in ``layout`` (a view of a leaf of another shape)."""
    leaf, view = _layout(z, layout)
    out = fn(view, target, **kwargs)
    grad_output = torch.randn(out.shape, generator=_gen(grad_seed), dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, leaf, grad_output.to(out.dtype))
    return out.detach(), _layout(grad, layout, inverse=True)


# ---------------------------------------------------------------------------------------------
# cross_entropy / nll_loss with class weights, ignore_index and special values
# ---------------------------------------------------------------------------------------------

WEIGHT_SPECIALS = [0.0, -0.0, -1.5, math.inf, -math.inf, math.nan, 1e-30, "huge"]
LOGIT_SPECIALS = [math.inf, -math.inf, math.nan, "huge", -5.0]


def _huge(dtype):
    """A huge finite value whose products with O(1) terms stay finite in ``dtype``."""
    return 1e4 if dtype in HALF else 1e30


def _special(value, dtype):
    return _huge(dtype) if value == "huge" else value


@st.composite
def weighted_setups(draw):
    """Shapes, dtype, weights, targets and options of a class-index loss."""
    dtype = draw(st.sampled_from(DTYPES))
    classes = draw(st.sampled_from([1, 2, 3, 5, 130]))
    kind = draw(st.sampled_from(["2d", "2d", "kdim", "1d", "empty"]))
    batch = {"2d": (draw(st.integers(1, 6)),), "kdim": (2, 2, 3), "1d": (), "empty": (0,)}[kind]
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    ignore = draw(st.sampled_from([None, 0, classes - 1, -100, -1, classes, 1000]))
    smoothing = draw(st.sampled_from([0.0, 0.0, 0.2]))
    weight = draw(st.sampled_from([None, "plain", "special", "special"]))
    weight_specials = draw(st.lists(st.sampled_from(WEIGHT_SPECIALS), min_size=1, max_size=2))
    logit_specials = draw(st.lists(st.sampled_from(LOGIT_SPECIALS), min_size=0, max_size=3))
    return {
        "dtype": dtype,
        "classes": classes,
        "batch": batch,
        "reduction": reduction,
        "ignore": ignore,
        "smoothing": smoothing,
        "weight": weight,
        "weight_specials": weight_specials,
        "logit_specials": logit_specials,
        "confident": draw(st.booleans()),
        "logits_layout": draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        "target_strided": draw(st.booleans()),
        "seed": draw(seeds),
    }


def _logits(setup):
    """Float64 logits (N, C, d...) or (C,), with the drawn special values and rows."""
    c, batch, dtype = setup["classes"], setup["batch"], setup["dtype"]
    shape = (c,) if not batch else (batch[0], c, *batch[1:])
    z = torch.randn(shape, generator=_gen(setup["seed"]), dtype=torch.float64) * 3
    flat = z.view(-1)
    g = _gen(setup["seed"] + 1)
    for value in setup["logit_specials"]:
        if flat.numel():
            flat[int(torch.randint(flat.numel(), (), generator=g))] = _special(value, dtype)
    if setup["confident"] and z.numel() and c > 1:
        first = z[0] if batch else z  # sample 0's classes (C, d...): class 0 certain
        first.fill_(-20.0 if dtype in HALF else -1e4)
        first[0] = 20.0 if dtype in HALF else 1e4
    return z


def _layout(z, layout, inverse=False):
    """``(leaf, view)``: a leaf holding ``z`` and the view of it that equals ``z`` in the
    drawn memory layout (transposed: a transposed contiguous leaf; sliced: every second
    element of a wider one). ``inverse``: ``z``, a gradient of such a leaf, read back in
    ``z``'s logical shape."""
    transposed = layout == "transposed" and z.dim() >= 2
    if inverse:
        if transposed:
            return z.transpose(0, -1)
        return z[..., 0] if layout == "sliced" else z
    if transposed:
        leaf = z.transpose(0, -1).contiguous().requires_grad_()
        return leaf, leaf.transpose(0, -1)
    if layout == "sliced":
        leaf = torch.stack([z, torch.zeros_like(z)], -1).requires_grad_()
        return leaf, leaf[..., 0]
    leaf = z.clone().requires_grad_()
    return leaf, leaf


def _targets(setup):
    c, batch, ignore = setup["classes"], setup["batch"], setup["ignore"]
    g = _gen(setup["seed"] + 2)
    target = torch.randint(0, c, batch, generator=g)
    if ignore is not None:
        target = target.masked_fill(torch.rand(batch, generator=g) < 0.4, ignore)
    if setup["target_strided"] and target.dim():
        target = torch.stack([target, target], -1)[..., 1]
    return target


def _weights(setup):
    """Float64 class weights (C,) with the drawn special values, or None."""
    if setup["weight"] is None:
        return None
    c = setup["classes"]
    w = torch.linspace(0.25, 2.0, c, dtype=torch.float64)
    if setup["weight"] == "special":
        g = _gen(setup["seed"] + 3)
        for value in setup["weight_specials"]:
            w[int(torch.randint(c, (), generator=g))] = _special(value, setup["dtype"])
    return w


def _weight_scale(weight):
    finite = weight[weight.isfinite()] if weight is not None else None
    if finite is None or finite.numel() == 0:
        return 1.0
    return max(1.0, float(finite.abs().max()))


def _check_loss(ours_fn, native_fn, setup, log_input):
    dtype = setup["dtype"]
    z = _logits(setup)
    if log_input:
        z = torch.log_softmax(z, 0 if not setup["batch"] else 1)
    target, weight = _targets(setup), _weights(setup)
    kwargs = {"reduction": setup["reduction"]}
    if setup["ignore"] is not None:
        kwargs["ignore_index"] = setup["ignore"]
    if setup["smoothing"] and not log_input:
        kwargs["label_smoothing"] = setup["smoothing"]
    x, layout = z.to(dtype), setup["logits_layout"]
    kwargs_low = dict(kwargs, weight=None if weight is None else weight.to(dtype))
    kwargs_64 = dict(kwargs, weight=None if weight is None else kwargs_low["weight"].double())
    seed = setup["seed"] + 4
    ours = _forward_backward(ours_fn, x, layout, target, kwargs_low, seed)
    native = _forward_backward(native_fn, x, layout, target, kwargs_low, seed)
    truth = native
    if dtype != torch.float64:
        truth = _forward_backward(native_fn, x.double(), layout, target, kwargs_64, seed)
    scale = _weight_scale(kwargs_64["weight"])
    for what, o, n, t in zip(("loss", "grad"), ours, native, truth):
        _assert_close(o, n, t, dtype, what, scale)


@PROFILE
@given(setup=weighted_setups())
def test_cross_entropy_special_values_match_native(setup):
    _check_loss(bp.cross_entropy, F.cross_entropy, setup, log_input=False)


@PROFILE
@given(setup=weighted_setups())
def test_nll_loss_special_values_match_native(setup):
    # native's nll_loss2d backward refuses a non-contiguous (N, C, d1, d2) input
    # ("grad_input must be contiguous"), where torchbp's serves it
    if len(setup["batch"]) > 1:
        setup = dict(setup, logits_layout="contiguous")
    _check_loss(bp.nll_loss, F.nll_loss, setup, log_input=True)


@PROFILE
@given(
    setup=weighted_setups(),
    weight_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
)
def test_class_weights_of_another_dtype_refused_as_native(setup, weight_dtype):
    """Class weights of another dtype than the input's: native raises a RuntimeError for
    class-index targets; torchbp raises one too (its DTypeError is one)."""
    dtype = setup["dtype"]
    if weight_dtype == dtype:
        weight_dtype = torch.float64 if dtype != torch.float64 else torch.float32
    x = _logits(setup).to(dtype)
    weight = torch.ones(setup["classes"], dtype=weight_dtype)
    target = _targets(setup)
    kwargs = {"weight": weight, "reduction": setup["reduction"]}
    for fn in (F.cross_entropy, bp.cross_entropy):
        with pytest.raises(RuntimeError):
            fn(x, target, **kwargs)


@PROFILE
@given(
    setup=weighted_setups(),
)
def test_cross_entropy_double_backward_matches_native(setup):
    """Second derivatives of float64 cross-entropy (class weights, ignore_index, label
    smoothing) against native's, on finite logits."""
    setup = dict(setup, dtype=torch.float64, logit_specials=[], confident=False)
    weight = _weights(setup)
    if weight is not None:
        weight = weight.nan_to_num(1.0, 1.0, 1.0)
    kwargs = {"reduction": setup["reduction"], "weight": weight}
    if setup["ignore"] is not None:
        kwargs["ignore_index"] = setup["ignore"]
    if setup["smoothing"]:
        kwargs["label_smoothing"] = setup["smoothing"]
    z, target = _logits(setup), _targets(setup)
    second = []
    for fn in (bp.cross_entropy, F.cross_entropy):
        leaf = z.clone().requires_grad_()
        (grad,) = torch.autograd.grad(fn(leaf, target, **kwargs).sum(), leaf, create_graph=True)
        probe = torch.randn(z.shape, generator=_gen(setup["seed"] + 5), dtype=torch.float64)
        (gg,) = torch.autograd.grad((grad * probe).sum(), leaf, allow_unused=True)
        second.append(torch.zeros_like(z) if gg is None else gg)
    _assert_close(*second, second[1], torch.float64, "double backward", _weight_scale(weight))


# ---------------------------------------------------------------------------------------------
# GELU: the exact backward kernel and the tanh form on special values
# ---------------------------------------------------------------------------------------------

GELU_SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e30, -1e30, 2.0**-36, -(2.0**-37)]


@st.composite
def gelu_inputs(draw):
    dtype = draw(st.sampled_from(DTYPES))
    size = draw(st.sampled_from([0, 1, 7, 33, 257]))  # BLOCK + 3: the explicit examples
    magnitude = draw(st.sampled_from(["normal", "tiny", "subnormal", "huge"]))
    return {
        "dtype": dtype,
        "size": size,
        "magnitude": magnitude,
        "specials": draw(st.lists(st.sampled_from(GELU_SPECIALS), min_size=0, max_size=4)),
        "approximate": draw(st.sampled_from(["none", "tanh"])),
        "layout": draw(st.sampled_from(["contiguous", "sliced", "transposed"])),
        "grad_special": draw(st.sampled_from([None, math.inf, math.nan, 0.0])),
        "seed": draw(seeds),
    }


def _gelu_input(spec):
    dtype, n = spec["dtype"], spec["size"]
    x = torch.randn(n, generator=_gen(spec["seed"]), dtype=torch.float64)
    g = _gen(spec["seed"] + 1)
    if spec["magnitude"] == "tiny":
        x *= 2.0**-40
    elif spec["magnitude"] == "subnormal":
        x *= torch.finfo(dtype).tiny / 4
    elif spec["magnitude"] == "huge":  # up to the dtype's max, past x² and x³ overflow
        top = math.log10(torch.finfo(dtype).max)
        x *= 10 ** torch.empty(n, dtype=torch.float64).uniform_(1, top, generator=g)
    for value in spec["specials"]:
        if n:
            x[int(torch.randint(n, (), generator=g))] = value
    return x.to(dtype)


def _gelu_2d(x, layout):
    """``x`` as (2, n/2) where it is to be seen transposed (an even, nonzero size)."""
    if layout == "transposed" and x.numel() % 2 == 0 and x.numel():
        return x.view(2, -1)
    return x


def _gelu_spec(dtype, size, magnitude, approximate, layout="contiguous"):
    """An explicit example of :func:`gelu_inputs` (every draw run in every profile)."""
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan]
    return {
        "dtype": dtype,
        "size": size,
        "magnitude": magnitude,
        "specials": specials,
        "approximate": approximate,
        "layout": layout,
        "grad_special": math.inf,
        "seed": 1,
    }


@PROFILE
@given(spec=gelu_inputs())
@example(spec=_gelu_spec(torch.float32, cpu_act.BLOCK + 3, "tiny", "none"))
@example(spec=_gelu_spec(torch.bfloat16, cpu_act.BLOCK + 3, "subnormal", "tanh"))
@example(spec=_gelu_spec(torch.float32, 257, "huge", "tanh", "sliced"))
@example(spec=_gelu_spec(torch.float64, 257, "huge", "none", "transposed"))
def test_gelu_special_values_match_native(spec):
    dtype, layout = spec["dtype"], spec["layout"]
    x = _gelu_2d(_gelu_input(spec), layout)
    grad_output = torch.randn(x.shape, generator=_gen(spec["seed"] + 2), dtype=torch.float64)
    if spec["grad_special"] is not None and x.numel():
        grad_output.view(-1)[0] = spec["grad_special"]
    results = []
    for fn, inputs in ((bp.gelu, x), (F.gelu, x), (F.gelu, x.double())):
        leaf, view = _layout(inputs, layout)
        y = fn(view, approximate=spec["approximate"])
        (grad,) = torch.autograd.grad(y, leaf, grad_output.to(dtype).to(inputs.dtype))
        results.append((y.detach(), _layout(grad, layout, inverse=True)))
    (y_o, g_o), (y_n, g_n), (y_t, g_t) = results
    _assert_close(y_o, y_n, y_t, dtype, "gelu")
    _assert_close(g_o, g_n, g_t, dtype, "gelu backward")


@PROFILE
@given(spec=gelu_inputs())
def test_gelu_double_backward_matches_native(spec):
    """Second derivatives (float64), an infinite or NaN grad_output included for the exact
    form. The tanh form's |x| stays below 1e100 (beyond it native's x³ terms overflow to
    NaN where the true value, torchbp's, is 0) and its grad_output finite (autograd
    through its y' sums inf terms of either sign to NaN where native's g · y'' is ±inf:
    known, not fixed)."""
    spec = dict(spec, dtype=torch.float64, size=min(spec["size"], 257))
    x = _gelu_input(spec)
    if spec["approximate"] == "tanh":
        x = x.masked_fill(x.abs() > 1e100, 3.0)
        spec["grad_special"] = None
    grad_output = torch.randn(x.shape, generator=_gen(spec["seed"] + 2), dtype=torch.float64)
    if spec["grad_special"] is not None and x.numel():
        grad_output[0] = spec["grad_special"]
    probe = torch.randn(x.shape, generator=_gen(spec["seed"] + 3), dtype=torch.float64)
    second = []
    for fn in (bp.gelu, F.gelu):
        leaf = x.clone().requires_grad_()
        y = fn(leaf, approximate=spec["approximate"])
        (grad,) = torch.autograd.grad(y, leaf, grad_output, create_graph=True)
        (gg,) = torch.autograd.grad(grad, leaf, probe, allow_unused=True)
        second.append(torch.zeros_like(x) if gg is None else gg)
    _assert_close(*second, second[1], torch.float64, "gelu double backward")


# ---------------------------------------------------------------------------------------------
# regressions the properties found
# ---------------------------------------------------------------------------------------------


def _gelu_grad(fn, x, approximate):
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(leaf, approximate=approximate), leaf, torch.ones_like(x))
    return grad


@pytest.mark.parametrize(
    "dtype, magnitudes",
    [
        (torch.float32, [1e13, 1e16, 1.5e19]),
        (torch.bfloat16, [1e13, 1e16, 1.5e19]),
        (torch.float64, [1e103, 1e130, 1e154]),
    ],
)
def test_gelu_tanh_backward_where_x_cubed_overflows(dtype, magnitudes):
    # where x³ overflows but x² does not, y' saturates to 1 (x > 0) or 0: the kernel's
    # (x v s)(1 - s) was inf · 0 = NaN; native (and the true value) is 1 or 0
    x = torch.tensor([*magnitudes, *(-m for m in magnitudes)], dtype=torch.float64).to(dtype)
    ours, native = (_gelu_grad(fn, x, "tanh") for fn in (bp.gelu, F.gelu))
    torch.testing.assert_close(ours, native, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_exact_gelu_backward_near_the_dtype_max(dtype):
    # gelu(x) overflows to inf near the dtype's max, and the kernel's Φ(x) = gelu(x) / x
    # was inf there, its y' inf instead of native's (and the true) 1
    top = torch.finfo(dtype).max
    x = torch.tensor([top, top / 1.5, -top, math.inf, -math.inf, math.nan], dtype=dtype)
    ours, native = (_gelu_grad(fn, x, "none") for fn in (bp.gelu, F.gelu))
    torch.testing.assert_close(ours, native, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("infinity", [math.inf, -math.inf])
def test_exact_gelu_double_backward_of_an_infinite_grad_output(dtype, infinity):
    # native's double backward is gg · g · y''(x): ±inf where y'' != 0; autograd through
    # g (Φ(x) + x φ(x)) summed inf · 2φ(x) and inf · (-x² φ(x)): NaN
    x = torch.tensor([-0.4, 0.3, 1.5, -2.0, 0.0], dtype=dtype)
    second = []
    for fn in (bp.gelu, F.gelu):
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(
            fn(leaf), leaf, torch.full_like(x, infinity), create_graph=True
        )
        (gg,) = torch.autograd.grad(grad, leaf, torch.ones_like(x))
        second.append(gg)
    torch.testing.assert_close(*second, rtol=0, atol=0, equal_nan=True)
