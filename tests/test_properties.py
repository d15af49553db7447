"""Property-based tests: every torchbp op against native PyTorch on drawn inputs.

Hypothesis draws shapes (empty, size-1, leading dims, large class counts), dtypes,
memory layouts (transposed, sliced, expanded), reductions, class weights, ignore indices,
label smoothing and probability targets, and checks that torchbp's forward value, output
dtype and every gradient match ``torch.nn.functional``.

Low-precision results are judged against the native op in float64 on the same (rounded)
inputs: torchbp must be within tolerance of that truth, or at least no worse than about
twice native's own error (torchbp may accumulate more precisely than native does).

Profiles: the default ``ci`` profile is bounded (the whole file runs well under 2 minutes on
2 cores); ``TORCHBP_HYPOTHESIS_PROFILE=thorough`` draws many more examples.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tests._hypothesis import PROFILE
from tests._support import ACTIVATIONS

import torchbp.functional as bp
from torchbp.ops import of_kind

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]

dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaf(shape, dtype, seed, layout="contiguous", scale=1.0):
    """A leaf tensor (for .grad) and a view of it with the logical ``shape`` in ``layout``.

    Returns ``(leaf, x)``; ``x`` is what the op sees (differentiable w.r.t. ``leaf``).
    """
    g = _gen(seed)
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        base = torch.randn(tuple(reversed(shape)), generator=g, dtype=torch.float64) * scale
        leaf = base.to(dtype).requires_grad_()
        return leaf, leaf.permute(*reversed(range(len(shape))))
    if layout == "sliced" and len(shape) >= 1:
        wide = (*shape[:-1], shape[-1] * 2)
        base = torch.randn(wide, generator=g, dtype=torch.float64) * scale
        leaf = base.to(dtype).requires_grad_()
        return leaf, leaf[..., ::2]
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 0:
        base = torch.randn((1, *shape[1:]), generator=g, dtype=torch.float64) * scale
        leaf = base.to(dtype).requires_grad_()
        return leaf, leaf.expand(shape)
    base = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    leaf = base.to(dtype).requires_grad_()
    return leaf, leaf


def _run(fn, make_inputs, grad_seed):
    """Forward, then backward with a random (non-contiguous) grad_output; return out, grads."""
    leaves, args, kwargs = make_inputs()
    out = fn(*args, **kwargs)
    if out.requires_grad:
        g = torch.randn(tuple(reversed(out.shape)), generator=_gen(grad_seed), dtype=torch.float64)
        g = g.to(out.dtype).permute(tuple(reversed(range(out.dim()))))  # transposed grad_output
        grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    else:
        grads = [None] * len(leaves)
    grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, leaves)]
    return out, grads, leaves


def _to64(leaves, args, kwargs):
    """The same inputs (already rounded to their dtype) as float64 leaves, for the truth."""
    mapping = {}
    new_leaves = []
    for leaf in leaves:
        new = leaf.detach().to(torch.float64).requires_grad_()
        mapping[id(leaf)] = new
        new_leaves.append(new)
    return new_leaves, mapping


def _assert_matches(ours, native, truth, dtype, what):
    """ours ~ native (dtype equal) and, in float64 terms, ours close to the truth."""
    assert ours.dtype == native.dtype, f"{what}: dtype {ours.dtype} != native {native.dtype}"
    assert ours.shape == native.shape, f"{what}: shape {tuple(ours.shape)} != {native.shape}"
    atol, rtol = TOL[dtype]
    o, n, t = (v.detach().to(torch.float64) for v in (ours, native, truth))
    assert torch.equal(torch.isnan(o), torch.isnan(n)), f"{what}: NaN pattern differs from native"
    finite = ~torch.isnan(t)
    o, n, t = o[finite], n[finite], t[finite]
    if o.numel() == 0:
        return
    allowed = atol + rtol * t.abs() + 2 * (n - t).abs()
    excess = (o - t).abs() - allowed
    assert float(excess.max()) <= 0, (
        f"{what}: max abs error vs float64 truth {float((o - t).abs().max()):.3g}, "
        f"native's {float((n - t).abs().max()):.3g}"
    )


def check_op(ours_fn, native_fn, build, dtype, grad_seed=7):
    """build(dtype) -> (leaves, args, kwargs); compare ours vs native (vs float64 truth)."""
    out_o, grads_o, leaves_o = _run(ours_fn, lambda: build(dtype), grad_seed)
    out_n, grads_n, leaves_n = _run(native_fn, lambda: build(dtype), grad_seed)
    if dtype == torch.float64:
        out_t, grads_t = out_n, grads_n
    else:
        out_t, grads_t, _ = _run(native_fn, lambda: build(dtype, truth=True), grad_seed)
    _assert_matches(out_o, out_n, out_t, dtype, "output")
    for k, (a, b, t) in enumerate(zip(grads_o, grads_n, grads_t)):
        _assert_matches(a, b, t, dtype, f"grad of input {k}")


def _rounded(leaf, dtype, truth):
    """In truth mode, the float64 copy of an input already rounded to ``dtype``."""
    return leaf.detach().to(torch.float64).requires_grad_() if truth else leaf


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------

dims = st.integers(min_value=0, max_value=5)
shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4)
nonempty_shapes = st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=4)
seeds = st.integers(min_value=0, max_value=2**16)


def _builder(shape, layout, seed, scale=1.0, zero_frac=False):
    def build(dtype, truth=False):
        leaf, x = _leaf(shape, dtype, seed, layout, scale)
        if zero_frac and x.numel():
            x = x * (x.detach().abs() > 0.3).to(x.dtype)  # exact zeros: kink parity
        if truth:
            leaf64 = leaf.detach().to(torch.float64).requires_grad_()
            _, x64 = _relayout(leaf64, shape, layout)
            if zero_frac and x64.numel():
                x64 = x64 * (x.detach().to(torch.float64).abs() > 0).to(torch.float64)
            return [leaf64], [x64], {}
        return [leaf], [x], {}

    return build


def _relayout(leaf, shape, layout):
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        return leaf, leaf.permute(*reversed(range(len(shape))))
    if layout == "sliced" and len(shape) >= 1:
        return leaf, leaf[..., ::2]
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 0:
        return leaf, leaf.expand(shape)
    return leaf, leaf


# every activation variant: id -> (torchbp op, native op, keywords)
ELEMENTWISE = {str(v): (v.op.functional, v.op.torch_functional, v.kwargs) for v in ACTIVATIONS}


def _bind(fn, kwargs):
    return lambda *a: fn(*a, **kwargs)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ELEMENTWISE))
@PROFILE
@given(
    shape=shapes,
    dtype=dtypes,
    layout=layouts,
    seed=seeds,
    scale=st.sampled_from([1.0, 8.0]),
    kinks=st.booleans(),
)
def test_elementwise_matches_native(name, shape, dtype, layout, seed, scale, kinks):
    ours, native, kwargs = ELEMENTWISE[name]
    build = _builder(shape, layout, seed, scale, zero_frac=kinks)
    check_op(_bind(ours, kwargs), _bind(native, kwargs), build, dtype)


@PROFILE
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    n_in=st.integers(1, 6),
    n_out=st.integers(1, 6),
    bias=st.booleans(),
    dtype=dtypes,
    x_layout=layouts,
    w_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=seeds,
)
def test_linear_matches_native(lead, n_in, n_out, bias, dtype, x_layout, w_layout, seed):
    def build(dt, truth=False):
        lx, x = _leaf((*lead, n_in), dt, seed, x_layout)
        lw, w = _leaf((n_out, n_in), dt, seed + 1, w_layout)
        leaves, args = [lx, lw], [x, w]
        if bias:
            lb, b = _leaf((n_out,), dt, seed + 2)
            leaves.append(lb)
            args.append(b)
        if truth:
            l64 = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
            a64 = [
                _relayout(l64[0], (*lead, n_in), x_layout)[1],
                _relayout(l64[1], (n_out, n_in), w_layout)[1],
            ]
            if bias:
                a64.append(l64[2])
            return l64, a64, {}
        return leaves, args, {}

    check_op(bp.linear, F.linear, build, dtype)


@pytest.mark.parametrize("name", [op.name for op in of_kind("softmax")])
@PROFILE
@given(
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=3),
    dim_seed=st.integers(0, 10),
    dtype=dtypes,
    layout=layouts,
    seed=seeds,
    scale=st.sampled_from([1.0, 30.0]),
)
def test_softmax_family_matches_native(name, shape, dim_seed, dtype, layout, seed, scale):
    ours, native = getattr(bp, name), getattr(F, name)
    dim = dim_seed % max(len(shape), 1)
    if dim_seed % 2 and shape:
        dim -= len(shape)  # negative dims too
    build = _builder(shape, layout, seed, scale)
    check_op(_bind(ours, {"dim": dim}), _bind(native, {"dim": dim}), build, dtype)


@st.composite
def loss_setups(draw, probs_allowed: bool):
    """A classification loss setup: shapes, targets, weights and options."""
    unbatched = draw(st.booleans()) and draw(st.booleans())  # ~1/4 of examples
    classes = draw(st.sampled_from([1, 2, 3, 7, 64]))
    if unbatched:
        batch = ()
    else:
        n = draw(st.integers(0, 5))
        k_dims = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
        batch = (n, *k_dims)
    probs = probs_allowed and draw(st.booleans())
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    weight = draw(st.booleans())
    ignore = None if probs else draw(st.sampled_from([None, -100, 0]))
    smoothing = draw(st.sampled_from([0.0, 0.1, 0.5])) if probs_allowed else 0.0
    return {
        "classes": classes,
        "batch": batch,
        "probs": probs,
        "reduction": reduction,
        "weight": weight,
        "ignore": ignore,
        "smoothing": smoothing,
        "seed": draw(seeds),
        "layout": draw(st.sampled_from(["contiguous", "transposed"])),
        "scale": draw(st.sampled_from([1.0, 10.0])),
    }


def _loss_builder(setup, log_input: bool):
    c, batch = setup["classes"], setup["batch"]
    in_shape = (c,) if not batch else (batch[0], c, *batch[1:])
    seed = setup["seed"]

    def build(dtype, truth=False):
        leaf, x = _leaf(in_shape, dtype, seed, setup["layout"], setup["scale"])
        if truth:
            leaf = leaf.detach().to(torch.float64).requires_grad_()
            x = _relayout(leaf, in_shape, setup["layout"])[1]
        if log_input:
            x = torch.log_softmax(x, dim=0 if not batch else 1)
        g = _gen(seed + 11)
        kwargs = {"reduction": setup["reduction"]}
        tdtype = torch.float64 if truth else dtype
        if setup["probs"]:
            target = torch.softmax(
                torch.randn(in_shape, generator=g, dtype=torch.float64), 0 if not batch else 1
            )
            target = target.to(dtype).to(tdtype)
        else:
            target = torch.randint(0, c, batch, generator=g)
            if setup["ignore"] is not None:
                kwargs["ignore_index"] = setup["ignore"]
                mask = torch.rand(batch, generator=g) < 0.3
                target = target.masked_fill(mask, setup["ignore"])
        if setup["weight"]:
            w = torch.linspace(0.2, 2.0, c, dtype=torch.float64).to(dtype).to(tdtype)
            kwargs["weight"] = w
        if setup["smoothing"]:
            kwargs["label_smoothing"] = setup["smoothing"]
        return [leaf], [x, target], kwargs

    return build


@PROFILE
@given(setup=loss_setups(probs_allowed=False), dtype=dtypes)
def test_nll_loss_matches_native(setup, dtype):
    check_op(bp.nll_loss, F.nll_loss, _loss_builder(setup, log_input=True), dtype)


@PROFILE
@given(setup=loss_setups(probs_allowed=True), dtype=dtypes)
def test_cross_entropy_matches_native(setup, dtype):
    check_op(bp.cross_entropy, F.cross_entropy, _loss_builder(setup, log_input=False), dtype)


@pytest.mark.skipif(not hasattr(bp, "linear_cross_entropy"), reason="not implemented yet")
@PROFILE
@given(
    n=st.integers(0, 6),
    d=st.integers(1, 5),
    c=st.sampled_from([1, 3, 17, 100]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    ignore=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.1]),
    chunk=st.sampled_from([None, 1, 3]),
    dtype=dtypes,
    seed=seeds,
)
def test_linear_cross_entropy_matches_native(
    n, d, c, reduction, ignore, smoothing, chunk, dtype, seed
):
    def build(dt, truth=False):
        lx, x = _leaf((n, d), dt, seed)
        lw, w = _leaf((c, d), dt, seed + 1)
        if truth:
            lx, lw = (t.detach().to(torch.float64).requires_grad_() for t in (lx, lw))
            x, w = lx, lw
        t = torch.randint(0, c, (n,), generator=_gen(seed + 2))
        if ignore and n:
            t[::2] = -100
        kw = {"reduction": reduction, "label_smoothing": smoothing, "chunk_size": chunk}
        return [lx, lw], [x, w, t], kw

    def native(x, w, t, chunk_size=None, **kw):
        return F.cross_entropy(F.linear(x, w), t, **kw)

    def ours(x, w, t, **kw):
        return bp.linear_cross_entropy(x, w, t, **kw)

    check_op(ours, native, build, dtype)
