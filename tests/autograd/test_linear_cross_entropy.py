"""Fused linear + cross-entropy: parity with ``cross_entropy(linear(...))``, gradcheck,
memory (never an (N, C) tensor), double backward, bad input, the nn module."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from tests._support import make
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import torchbp
import torchbp.functional as TF
from torchbp._checks import ClassIndexError, DTypeError, ShapeError
from torchbp.autograd import LinearCrossEntropyFunction
from torchbp.autograd.linear_cross_entropy import chunk_size_from_options, default_chunk_size

N, D, C = 11, 6, 9
CHUNK = 4  # 11 rows -> chunks of 4, 4, 3


def hard_target(shape, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(C, shape, generator=g)
    if ignore is not None and t.numel() > 1:
        t.view(-1)[::3] = ignore
    return t


def soft_target(shape, dtype=torch.float64, seed=0):
    return torch.softmax(make(shape, torch.float64, seed=seed) * 2, -1).to(dtype)


def reference(x, w, t, b=None, **kw):
    """Native torch: ``cross_entropy(linear(x, W, b), t)`` over rows (class dim last)."""
    logits = F.linear(x, w, b)
    soft = t.is_floating_point()
    flat = F.cross_entropy(
        logits.reshape(-1, w.shape[0]),
        t.reshape(-1, w.shape[0]) if soft else t.reshape(-1),
        **kw,
    )
    if kw.get("reduction") == "none":
        return flat.reshape(x.shape[:-1])
    return flat


def run(fn, x, w, t, b, grad_out_seed=7, **kw):
    """(loss, grads of x, W, b and a floating target) of ``fn`` with a fixed grad_output."""
    leaves = [x, w, b, t if t.is_floating_point() else None]
    leaves = [v.detach().clone().requires_grad_() if v is not None else None for v in leaves]
    x_, w_, b_, t_ = leaves
    out = fn(x_, w_, t_ if t_ is not None else t, b_, **kw)
    g = make(out.shape, out.dtype, seed=grad_out_seed)
    out.backward(g)
    return out.detach(), [v.grad if v is not None else None for v in leaves]


def ours(x, w, t, b=None, chunk_size=CHUNK, **kw):
    return TF.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk_size, **kw)


def assert_same(a, b, **tol):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, equal_nan=True, **tol)
    for ga, gb in zip(grads_a, grads_b):
        if gb is None:
            assert ga is None
        else:
            torch.testing.assert_close(ga, gb, equal_nan=True, **tol)


# --------------------------------------------------------------------------- parity
CASES = [
    dict(kind=k, reduction=r, weight=wt, smoothing=s, bias=bs, ignore=ig)
    for k, r, wt, s, bs, ig in itertools.product(
        ("hard", "soft"),
        ("none", "mean", "sum"),
        (False, True),
        (0.0, 0.2),
        (False, True),
        (None, -100, 3),
    )
    if not (k == "soft" and ig is not None)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_parity_float64(case):
    x, w = make((N, D), torch.float64, seed=1), make((C, D), torch.float64, seed=2)
    b = make((C,), torch.float64, seed=3) if case["bias"] else None
    if case["kind"] == "hard":
        t = hard_target((N,), ignore=case["ignore"])
    else:
        t = soft_target((N, C))
    kw = dict(reduction=case["reduction"], label_smoothing=case["smoothing"])
    if case["weight"]:
        kw["weight"] = torch.rand(
            C, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
        )
    if case["ignore"] is not None:
        kw["ignore_index"] = case["ignore"]
    assert_same(run(ours, x, w, t, b, **kw), run(reference, x, w, t, b, **kw))


@pytest.mark.parametrize("chunk", [1, 3, N, 100, None])
def test_chunk_sizes_agree(chunk):
    x, w, b = make((N, D), torch.float64), make((C, D), torch.float64, seed=1), make((C,), seed=2)
    b = b.double()
    t = hard_target((N,), ignore=-100)
    for reduction in ("mean", "none"):
        kw = dict(reduction=reduction, chunk_size=chunk)
        assert_same(run(ours, x, w, t, b, **kw), run(reference, x, w, t, b, reduction=reduction))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("shape", [(2, 3), (), (2, 1, 3)], ids=str)
def test_leading_batch_dims(shape, soft, reduction):
    x, w = make((*shape, D), torch.float64), make((C, D), torch.float64, seed=1)
    t = soft_target((*shape, C)) if soft else hard_target(shape)
    got = run(ours, x, w, t, None, reduction=reduction)
    assert_same(got, run(reference, x, w, t, None, reduction=reduction))
    if reduction == "none":
        assert got[0].shape == shape


def test_empty_batch():
    x, w = make((0, D), torch.float64), make((C, D), torch.float64, seed=1)
    t = hard_target((0,))
    for reduction in ("none", "mean", "sum"):
        assert_same(
            run(ours, x, w, t, None, reduction=reduction),
            run(reference, x, w, t, None, reduction=reduction),
        )


@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored(weighted):
    x, w = make((N, D), torch.float64), make((C, D), torch.float64, seed=1)
    t = torch.full((N,), -100)
    kw = {"weight": torch.rand(C, dtype=torch.float64)} if weighted else {}
    for reduction in ("none", "mean", "sum"):
        got = run(ours, x, w, t, None, reduction=reduction, **kw)
        assert_same(got, run(reference, x, w, t, None, reduction=reduction, **kw))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in got[1][:2])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_float32(reduction):
    x, w, b = make((64, 32)), make((300, 32), seed=1, scale=0.3), make((300,), seed=2)
    t = hard_target((64,)) * 30 + 7
    tol = dict(atol=2e-5, rtol=1e-4)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    assert_same(run(ours, x, w, t, b, chunk_size=10, **kw), run(reference, x, w, t, b, **kw), **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision(dtype, reduction):
    # Compare with a float64 reference on the same (rounded) inputs; the result dtypes
    # are the native ones.
    x, w = make((64, 32), dtype), make((300, 32), dtype, seed=1, scale=0.3)
    b = make((300,), dtype, seed=2)
    t = hard_target((64,)) * 30 + 7
    got = run(ours, x, w, t, b, chunk_size=10, reduction=reduction)
    nat = run(reference, x, w, t, b, reduction=reduction)
    ref = run(reference, x.double(), w.double(), t, b.double(), reduction=reduction)
    assert got[0].dtype == nat[0].dtype == dtype
    assert [g.dtype for g in got[1][:3]] == [dtype] * 3
    # Error relative to the largest reference entry: within twice native's own error.
    for a, n, r in zip([got[0], *got[1][:3]], [nat[0], *nat[1][:3]], [ref[0], *ref[1][:3]]):
        scale = r.abs().max()
        ours_err = (a.double() - r).abs().max() / scale
        native_err = (n.double() - r).abs().max() / scale
        assert ours_err <= 2 * native_err + 1e-3, (ours_err, native_err)


def test_bfloat16_confident_rows():
    # softmax(z)_y -> 1: p_y - 1 must be computed in float32 before rounding.
    d = 8
    w = torch.eye(d, dtype=torch.float64)[:, :d] * 12
    x = torch.eye(d, dtype=torch.float64)
    t = torch.arange(d)
    ref = run(reference, x, w, t, None, reduction="sum")
    got = run(ours, x.bfloat16(), w.bfloat16(), t, None, reduction="sum", chunk_size=3)
    torch.testing.assert_close(got[1][0].double(), ref[1][0], rtol=2e-2, atol=1e-7)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=2e-2, atol=1e-5)


def test_weight_grad_accumulated_in_float32():
    # Many chunks of bf16: the weight gradient must not drift (accumulator in float32).
    x, w = make((512, 16), torch.bfloat16), make((40, 16), torch.bfloat16, seed=1, scale=0.3)
    t = torch.randint(40, (512,), generator=torch.Generator().manual_seed(0))
    got = run(ours, x, w, t, None, reduction="sum", chunk_size=2)
    ref = run(reference, x.double(), w.double(), t, None, reduction="sum")
    err = (got[1][1].double() - ref[1][1]).abs().max() / ref[1][1].abs().max()
    assert err < 1e-2


def half_precision_grads(dtype, reduction):
    """(torchbp's, native's, float64 reference's) gradients of x, W and b in float64, for
    inputs where half-precision rounding shows: 2048 rows in 32 chunks, C = 1025 classes
    with near-uniform logits (p ≈ 1/C, so ``p_y - 1`` rounds to -1 in half precision: a
    bias that adds up over a class's rows), the targets in 4 classes, an upstream gradient
    that is not 1 (nor a power of 2)."""
    n, d, c = 2048, 32, 1025
    x, w = make((n, d), dtype, seed=1, scale=0.05), make((c, d), dtype, seed=2, scale=0.3)
    b = torch.zeros(c, dtype=dtype)
    t = torch.randint(4, (n,), generator=torch.Generator().manual_seed(4)) * (c // 4)
    upstream = make((n,), torch.float64, seed=5).abs() + 0.5 if reduction == "none" else 2.7

    def grads_of(fn, *inputs):
        x_, w_, b_ = [v.detach().clone().requires_grad_() for v in inputs]
        out = fn(x_, w_, t, b_, reduction=reduction)
        g = upstream if reduction == "none" else torch.tensor(upstream)
        out.backward(g.to(dtype).to(out.dtype).expand_as(out))  # a g rounded to the dtype
        return [v.grad.double() for v in (x_, w_, b_)]

    got = grads_of(lambda *a, **kw: ours(*a, chunk_size=64, **kw), x, w, b)
    return (
        got,
        grads_of(reference, x, w, b),
        grads_of(reference, x.double(), w.double(), b.double()),
    )


def ulps_off(got, ref, dtype):
    """Largest ``|got - ref|`` in units of the last place of ``ref`` in ``dtype``."""
    info = torch.finfo(dtype)
    ulp = info.eps * torch.exp2(torch.log2(ref.abs().clamp_min(info.smallest_normal)).floor())
    return ((got - ref).abs() / ulp).max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_half_precision_bias_grad_is_rounded_once_from_float32(dtype, reduction):
    # db = Σ_i s_i g G_i accumulated from the float32 ∂ℓ/∂z and rounded once, after the
    # upstream gradient g: within half an ulp of the float64 reference (+ the float32
    # sum's own error). Summing the half-rounded G (native's way, whose p_y - 1 -> -1
    # bias adds up over a class's rows) or rounding db before multiplying by g is not.
    got, _native, ref = half_precision_grads(dtype, reduction)
    assert ulps_off(got[2], ref[2], dtype) <= 0.55


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_half_precision_input_grad_is_no_less_accurate_than_natives(dtype, reduction):
    # dx = s_i g (G_i W), rounded once to the half dtype: its error against the float64
    # reference is no worse than native's cross_entropy(linear(...)) (which rounds G once
    # and the product once), in largest and in relative (norm) error. Rounding G W to
    # the half dtype and then scaling it (by s_i, or by g in backward) is worse.
    got, native, ref = half_precision_grads(dtype, reduction)
    ours_err, native_err = got[0] - ref[0], native[0] - ref[0]
    slack = 1e-6 * ref[0].abs().max()
    assert ours_err.abs().max() <= 1.05 * native_err.abs().max() + slack
    assert ours_err.norm() <= 1.05 * native_err.norm() + slack


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_half_precision_weight_grad_is_no_less_accurate_than_natives(dtype, reduction):
    # dW = Σ_chunks Gᵀ (s ⊙ x), each chunk's product formed in float32 and summed in
    # float32: no worse than native's one GEMM over all rows. A chunk product rounded to
    # the half dtype before the float32 sum (32 roundings), or s ⊙ x rounded to float16
    # (subnormal for a mean over 2048 rows), is.
    got, native, ref = half_precision_grads(dtype, reduction)
    ours_err, native_err = got[1] - ref[1], native[1] - ref[1]
    slack = 1e-6 * ref[1].abs().max()
    assert ours_err.abs().max() <= 1.05 * native_err.abs().max() + slack
    assert ours_err.norm() <= 1.05 * native_err.norm() + slack


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13")
def test_matches_torch_linear_cross_entropy():
    x, w, b = make((N, D), torch.float64), make((C, D), torch.float64, seed=1), None
    t = hard_target((N,), ignore=-100)

    def native(x, w, t, b, **kw):
        return F.linear_cross_entropy(x, w, t, **kw)

    for reduction in ("none", "mean", "sum"):
        assert_same(
            run(ours, x, w, t, b, reduction=reduction), run(native, x, w, t, b, reduction=reduction)
        )


def test_autocast_cpu_dtypes():
    x, w, b = make((N, D)), make((C, D), seed=1), make((C,), seed=2)
    t = hard_target((N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(x, w, t, b)
        nat = F.cross_entropy(F.linear(x, w, b), t)
    assert got.dtype == nat.dtype
    torch.testing.assert_close(got, nat, atol=2e-2, rtol=2e-2)


def test_no_grad_and_partial_requires_grad():
    x, w = make((N, D), torch.float64), make((C, D), torch.float64, seed=1)
    t = hard_target((N,))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, w, t), reference(x, w, t))
    w_ = w.clone().requires_grad_()
    ours(x, w_, t).backward()
    ref = w.clone().requires_grad_()
    reference(x, ref, t).backward()
    torch.testing.assert_close(w_.grad, ref.grad)


def test_retain_graph_and_inputs_untouched():
    x, w, b = (
        make((N, D), torch.float64).requires_grad_(),
        make((C, D), torch.float64, seed=1).requires_grad_(),
        make((C,), torch.float64, seed=2).requires_grad_(),
    )
    t = hard_target((N,), ignore=-100)
    copies = [v.detach().clone() for v in (x, w, b)]
    ref = torch.autograd.grad(reference(x, w, t, b), (x, w, b))
    for reduction in ("mean", "none"):
        loss = ours(x, w, t, b, reduction=reduction)
        if reduction == "none":
            loss = loss.sum() / (t != -100).sum()
        for v in (x, w, b):
            v.grad = None
        loss.backward(retain_graph=True)
        loss.backward(retain_graph=True)
        for v, r in zip((x, w, b), ref):
            torch.testing.assert_close(v.grad, 2 * r)
            v.grad.zero_()  # must not corrupt the retained graph's saved gradients
        loss.backward()
        for v, r in zip((x, w, b), ref):
            torch.testing.assert_close(v.grad, r)
    for v, c in zip((x, w, b), copies):
        assert torch.equal(v.detach(), c)


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_gradcheck(reduction, kind):
    x = make((5, 3), torch.float64).requires_grad_()
    w = make((4, 3), torch.float64, seed=1).requires_grad_()
    b = make((4,), torch.float64, seed=2).requires_grad_()
    if kind == "hard":
        t = torch.tensor([0, 3, -100, 1, 2])
        weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    else:
        t = soft_target((5, 4)).requires_grad_()
        weight = None

    def fn(x, w, b, t):
        return TF.linear_cross_entropy(
            x,
            w,
            t,
            linear_bias=b,
            weight=weight,
            reduction=reduction,
            label_smoothing=0.1,
            chunk_size=2,
        )

    inputs = (x, w, b, t)
    assert gradcheck(fn, inputs, check_batched_grad=True)


def test_double_backward_raises():
    x = make((5, 3), torch.float64).requires_grad_()
    w = make((4, 3), torch.float64, seed=1).requires_grad_()
    t = torch.tensor([0, 3, 1, 1, 2])
    for reduction in ("mean", "none"):
        loss = TF.linear_cross_entropy(x, w, t, reduction=reduction).sum()
        gx, gw = torch.autograd.grad(loss, (x, w), create_graph=True)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            (gx.sum() + gw.sum()).backward()


SECOND_ORDER = {
    # each differentiates the first-order gradients with respect to the inputs (hessian,
    # vhp) or to the incoming gradient (jvp, by the double-backward trick)
    "hessian": lambda f, x, v: torch.autograd.functional.hessian(lambda x: f(x).sum(), x),
    "vhp": lambda f, x, v: torch.autograd.functional.vhp(lambda x: f(x).sum(), x, v),
    "jvp": lambda f, x, v: torch.autograd.functional.jvp(f, x, v),
    "grad of grad": lambda f, x, v: _grad_of_grad(f, x.requires_grad_()),
}


def _grad_of_grad(f, x):
    (gx,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.sum(), x, allow_unused=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("second_order", SECOND_ORDER.values(), ids=SECOND_ORDER.keys())
def test_second_order_derivatives_raise_instead_of_returning_zeros(second_order, reduction):
    """torch.autograd.functional fills an unreached derivative with zeros (strict=False):
    the double-backward error must reach every derivative of the gradients, not only
    ``.backward()``, or a Hessian or jvp of the fused loss comes out silently 0."""
    x = make((5, 3), torch.float64)
    w = make((4, 3), torch.float64, seed=1).requires_grad_()
    t = torch.tensor([0, 3, 1, 1, 2])

    def f(x):
        return TF.linear_cross_entropy(x, w, t, reduction=reduction)

    with pytest.raises(NotImplementedError, match="double backward is not supported"):
        second_order(f, x, torch.ones_like(x))


# --------------------------------------------------------------------------- memory
def saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (numel) any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_saved_memory_is_not_n_by_c(reduction):
    n, d, c = 512, 16, 2048
    x = make((n, d)).requires_grad_()
    w = make((c, d), seed=1).requires_grad_()
    t = hard_target((n,)) * 200
    _, ours_bytes = saved_bytes(lambda: TF.linear_cross_entropy(x, w, t, reduction=reduction))
    _, native_bytes = saved_bytes(lambda: F.cross_entropy(F.linear(x, w), t, reduction=reduction))
    # dx (N, d) + dW (C, d) (or the inputs x, W, target for 'none') and a few vectors.
    assert ours_bytes <= 4 * (n * d + c * d) + 16 * n + 8 * c
    assert native_bytes >= 4 * n * c  # log-softmax output
    assert ours_bytes < native_bytes / 10


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_n_by_c(reduction):
    n, d, c, chunk = 256, 8, 1024, 16
    x = make((n, d)).requires_grad_()
    w = make((c, d), seed=1).requires_grad_()
    t = hard_target((n,)) * 100
    with LargestTensor() as mode:
        loss = TF.linear_cross_entropy(x, w, t, reduction=reduction, chunk_size=chunk)
        loss.sum().backward()
    assert mode.largest <= max(chunk * c, c * d, n * d)


def test_default_chunk_size_from_budget():
    assert default_chunk_size(4096, 32768, torch.float32, "cpu") == 384  # 48 MiB
    assert default_chunk_size(4096, 32768, torch.bfloat16, "cpu") == 256  # bf16 + fp32 bufs
    assert default_chunk_size(10, 32768, torch.float32, "cpu") == 10
    assert default_chunk_size(4096, 10**9, torch.float32, "cpu") == 1
    assert default_chunk_size(0, 5, torch.float32, "cpu") == 1


# --------------------------------------------------------------------------- bad input
BAD = [
    ("weight 1-D", dict(w=torch.randn(C)), ShapeError, "linear_weight with dimensionality"),
    ("weight 3-D, in_features", dict(w=torch.randn(C, D, 1)), ShapeError, "in_features"),
    ("in_features", dict(x=torch.randn(N, D + 1)), ShapeError, "in_features"),
    ("0-dim input", dict(x=torch.tensor(1.0)), ShapeError, "dimensionality 1 or 2"),
    ("bias shape", dict(b=torch.randn(C + 1)), ShapeError, "linear_bias must have shape"),
    ("bias 2-D", dict(b=torch.randn(1, C)), ShapeError, "linear_bias must have shape"),
    ("chunk 0", dict(chunk_size=0), ValueError, "chunk_size"),
    ("chunk -1", dict(chunk_size=-1), ValueError, "chunk_size"),
    ("chunk float", dict(chunk_size=2.5), ValueError, "chunk_size"),
    ("chunk bool", dict(chunk_size=True), ValueError, "chunk_size"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("smoothing", dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    ("class weight shape", dict(weight=torch.ones(C + 1)), ShapeError, "weight must have shape"),
    ("target range", dict(t=torch.full((N,), C)), ClassIndexError, "out of bounds"),
    ("target negative", dict(t=torch.full((N,), -1)), ClassIndexError, "out of bounds"),
    ("target shape", dict(t=torch.zeros(N + 1, dtype=torch.long)), ShapeError, "target"),
    ("target dtype", dict(t=torch.zeros(N, dtype=torch.int32)), DTypeError, "int64"),
    ("float target shape", dict(t=torch.rand(N, C + 1)), ShapeError, "floating-point target"),
    (
        "int probabilities",
        dict(t=torch.zeros(N, C, dtype=torch.long)),
        DTypeError,
        "floating point",
    ),
    ("ignore with probs", dict(t=torch.rand(N, C), ignore_index=0), ValueError, "ignore_index"),
    # native: ignore_index must stay None (its default) for probability targets, even -100
    ("-100 with probs", dict(t=torch.rand(N, C), ignore_index=-100), RuntimeError, "ignore_index"),
    (
        "K-dim unbatched",
        dict(x=torch.randn(D), w=torch.randn(C, 2, D), t=torch.zeros(2, dtype=torch.long)),
        RuntimeError,
        "batched",
    ),
    (
        "K-dim bias",
        dict(w=torch.randn(C, 2, D), t=torch.zeros(N, 2, dtype=torch.long), b=torch.randn(C)),
        RuntimeError,
        "linear_bias must have shape",
    ),
    ("options type", dict(options={"batch_chunk_size": 2}), TypeError, "options"),
    ("int input", dict(x=torch.ones(N, D, dtype=torch.long)), DTypeError, "floating-point"),
    ("dtype mix", dict(w=torch.randn(C, D, dtype=torch.float64)), DTypeError, "one dtype"),
    ("bias dtype", dict(b=torch.randn(C, dtype=torch.float64)), DTypeError, "one dtype"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_input(bad):
    _, change, error, match = bad
    args = dict(x=torch.randn(N, D), w=torch.randn(C, D), t=torch.randint(C, (N,)), b=None)
    kw = {}
    for k, v in change.items():
        (args if k in args else kw)[k] = v
    with pytest.raises(error, match=match):
        TF.linear_cross_entropy(args["x"], args["w"], args["t"], linear_bias=args["b"], **kw)


def test_class_weight_requires_grad_rejected():
    with pytest.raises(RuntimeError, match="not differentiable"):
        TF.linear_cross_entropy(
            torch.randn(N, D),
            torch.randn(C, D),
            torch.randint(C, (N,)),
            weight=torch.ones(C, requires_grad=True),
        )


# --------------------------------------------------------------------------- nn module
def test_module_parity_and_state_dict():
    torch.manual_seed(0)
    m = torchbp.nn.LinearCrossEntropyLoss(D, C, bias=True, label_smoothing=0.1, chunk_size=3)
    assert set(m.state_dict()) == {"linear.weight", "linear.bias"}
    x, t = make((N, D)).requires_grad_(), hard_target((N,))
    loss = m(x, t)
    ref = F.cross_entropy(F.linear(x, m.linear.weight, m.linear.bias), t, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert m.linear.weight.grad is not None and m.linear.bias.grad is not None
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        native = torch.nn.LinearCrossEntropyLoss(D, C, bias=True, label_smoothing=0.1)
        assert set(native.state_dict()) == set(m.state_dict())
        native.load_state_dict(m.state_dict())
        torch.testing.assert_close(native(x, t), loss)


def test_module_weight_buffer_and_checks():
    weight = torch.rand(C)
    m = torchbp.nn.LinearCrossEntropyLoss(D, C, weight=weight, reduction="sum")
    assert set(m.state_dict()) == {"linear.weight", "weight"}
    assert m.linear.bias is None
    x, t = make((N, D)), hard_target((N,))
    ref = F.cross_entropy(F.linear(x, m.linear.weight), t, weight=weight, reduction="sum")
    torch.testing.assert_close(m(x, t), ref)
    with pytest.raises(ValueError, match="weight"):
        torchbp.nn.LinearCrossEntropyLoss(D, C, weight=torch.ones(C + 1))
    with pytest.raises(ValueError, match="label_smoothing"):
        torchbp.nn.LinearCrossEntropyLoss(D, C, label_smoothing=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        torchbp.nn.LinearCrossEntropyLoss(D, C, chunk_size=0)


def test_function_is_public():
    assert torchbp.autograd.LinearCrossEntropyFunction is LinearCrossEntropyFunction
    assert "linear_cross_entropy" in TF.__all__
    assert "LinearCrossEntropyLoss" in torchbp.nn.__all__


# --------------------------------------------------------------------------- native's API
needs_native = pytest.mark.skipif(
    not hasattr(torch.nn, "LinearCrossEntropyOptions"),
    reason="needs torch.nn.LinearCrossEntropyOptions (torch >= 2.13)",
)


@needs_native
def test_options_choose_the_chunk_size():
    opts = torch.nn.LinearCrossEntropyOptions
    n, d, c = 64, 8, 32

    def chunk(**kw):
        return chunk_size_from_options(opts(**kw), n, d, c, torch.float32, "cpu")

    assert chunk(batch_chunk_size=5) == 5
    assert chunk(batch_chunk_size=500) == n
    assert chunk(chunking_method=None) == n  # one chunk, as native
    assert chunk() == default_chunk_size(n, c, torch.float32, "cpu")  # 'auto': our budget
    # aspect_ratio: ceil(C / d) = 4, next_pow2(ceil(64 / 4)) = 16, then divided by k
    assert chunk(chunking_method="aspect_ratio") == 16
    assert chunk(chunking_method="aspect_ratio:4") == 4
    assert chunk(chunking_method="aspect_ratio:2", batch_chunk_size=8) == 8  # they agree
    with pytest.raises(ValueError, match="give different chunk sizes"):
        chunk(chunking_method="aspect_ratio", batch_chunk_size=3)
    assert chunk_size_from_options(opts(), 0, d, c, torch.float32, "cpu") == 1


@needs_native
def test_options_aspect_ratio_rounds_the_rows_per_chunk_up():
    # next_pow2(ceil(N / ceil(C / d))): N = 65, ceil(32 / 8) = 4, ceil(65 / 4) = 17 -> 32
    # (rounding 65 / 4 down, 16, gave 16); above, 64 / 4 divides evenly and cannot tell.
    opts = torch.nn.LinearCrossEntropyOptions(chunking_method="aspect_ratio")
    assert chunk_size_from_options(opts, 65, 8, 32, torch.float32, "cpu") == 32


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_batch_chunk_size_bounds_the_working_set(reduction):
    n, d, c, chunk = 64, 8, 512, 8
    x = make((n, d)).requires_grad_()
    w = make((c, d), seed=1).requires_grad_()
    t = hard_target((n,)) * 50
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk)
    with LargestTensor() as mode:
        loss = TF.linear_cross_entropy(x, w, t, reduction=reduction, options=options)
        loss.sum().backward()
    assert mode.largest <= max(chunk * c, c * d, n * d)
    native = F.linear_cross_entropy(x, w, t, reduction=reduction, options=options)
    torch.testing.assert_close(loss, native)


ACC_DTYPES = [
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.bfloat16, torch.float16),
    (torch.float32, torch.bfloat16),
]


@needs_native
@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ``options`` ignored:UserWarning")
@pytest.mark.parametrize("dtype, acc_dtype", ACC_DTYPES, ids=str)
def test_options_acc_dtype_native_refuses_is_refused(dtype, acc_dtype):
    """Native's chunked path refuses an acc_dtype other than the input's (or float32 for
    half input); torchbp accepted it and ignored it (a float64 accumulation asked for a
    float32 input silently ran in float32)."""
    x, w, t = make((N, D)).to(dtype), make((C, D), seed=1).to(dtype), hard_target((N,))
    options = torch.nn.LinearCrossEntropyOptions(acc_dtype=acc_dtype)
    for fn in (F.linear_cross_entropy, TF.linear_cross_entropy):
        with pytest.raises(RuntimeError, match="acc_dtype"):
            fn(x, w, t, options=options)
    # native's reference path (label smoothing) takes any: so does torchbp
    smoothed = dict(options=options, label_smoothing=0.1)
    native = F.linear_cross_entropy(x, w, t, **smoothed)
    torch.testing.assert_close(TF.linear_cross_entropy(x, w, t, **smoothed), native)


@needs_native
@pytest.mark.parametrize(
    "dtype, acc_dtype", [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
)
def test_options_acc_dtype_native_takes_is_taken(dtype, acc_dtype):
    x, w, t = make((N, D)).to(dtype), make((C, D), seed=1).to(dtype), hard_target((N,))
    options = torch.nn.LinearCrossEntropyOptions(acc_dtype=acc_dtype)
    native = F.linear_cross_entropy(x, w, t, options=options)
    torch.testing.assert_close(TF.linear_cross_entropy(x, w, t, options=options), native)


def _raised(fn, *args, **kwargs) -> type[Exception] | None:
    try:
        fn(*args, **kwargs)
    except RuntimeError as error:
        return type(error)
    return None


@needs_native
@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ``options`` ignored:UserWarning")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("target_requires_grad", [False, True])
def test_options_acc_dtype_with_probabilities_refused_where_native_refuses_it(
    reduction, target_dtype, target_requires_grad
):
    """torch 2.14's native chunked path also takes probability targets (``'mean'`` /
    ``'sum'``, the input's dtype, not requiring grad) and refuses a float64 acc_dtype for
    float32 input there; torchbp accepted and ignored it (2.13 sends probabilities to its
    reference formula, which ignores acc_dtype: so does torchbp there)."""
    x, w = make((N, D)), make((C, D), seed=1)
    t = soft_target((N, C), target_dtype).requires_grad_(target_requires_grad)
    options = torch.nn.LinearCrossEntropyOptions(acc_dtype=torch.float64)
    kw = dict(reduction=reduction, options=options)
    native = _raised(F.linear_cross_entropy, x, w, t, **kw)
    got = _raised(TF.linear_cross_entropy, x, w, t, **kw)
    assert (got is None) == (native is None), (got, native)


@needs_native
def test_ignore_index_default_is_none_as_native():
    x, w = make((N, D), torch.float64), make((C, D), torch.float64, seed=1)
    probs = soft_target((N, C))
    torch.testing.assert_close(
        TF.linear_cross_entropy(x, w, probs), F.linear_cross_entropy(x, w, probs)
    )
    t = hard_target((N,), ignore=-100)
    torch.testing.assert_close(
        TF.linear_cross_entropy(x, w, t, ignore_index=None), F.cross_entropy(F.linear(x, w), t)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_k_dim_weight_is_the_reference_formula(reduction):
    """Weight ``(C, d1, d2, in)``: logits ``(N, C, d1, d2)``, loss per position, gradients of
    input, weight and bias as native's reference (``cross_entropy(linear(...))``)."""
    n, d, shape = 5, 4, (C, 2, 3)
    leaves = [make((n, d), torch.float64), make((*shape, d), torch.float64, seed=1)]
    leaves.append(make(shape, torch.float64, seed=2))
    t = torch.randint(C, (n, 2, 3), generator=torch.Generator().manual_seed(0))
    t[0, 0, 0] = 2  # the ignore_index below
    weight = torch.rand(C, dtype=torch.float64)
    kw = dict(reduction=reduction, ignore_index=2, label_smoothing=0.1, weight=weight)

    def reference_k(x, w, b):
        logits = F.linear(x, w.reshape(-1, d), b.reshape(-1)).reshape(n, *shape)
        return F.cross_entropy(logits, t, **kw)

    def ours(x, w, b):
        return TF.linear_cross_entropy(x, w, t, linear_bias=b, **kw)

    results = []
    for fn in (ours, reference_k):
        args = [v.clone().requires_grad_() for v in leaves]
        out = fn(*args)
        out.backward(make(out.shape, out.dtype, seed=7))
        results.append((out, [a.grad for a in args]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for o, r in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(o, r)


def test_vmap_grad_and_jvp_run_the_unfused_pair():
    """Under torch.func (no vmap rule, no jvp in the chunked Function) the wrapper computes
    the reference formula with torchbp's linear and cross_entropy: per-sample gradients and
    forward-mode AD equal native's."""
    x, w = make((N, D), torch.float64), make((C, D), torch.float64, seed=1)
    t = hard_target((N,), ignore=-100)

    def loss_of(fn, weight, xi, ti):
        return fn(xi.unsqueeze(0), weight, ti.unsqueeze(0))

    def native_lce(x_, w_, t_, **kw):
        return F.cross_entropy(F.linear(x_, w_), t_, **kw)

    per_sample = [
        torch.func.vmap(torch.func.grad(loss_of, argnums=1), in_dims=(None, None, 0, 0))(
            fn, w, x, t
        )
        for fn in (TF.linear_cross_entropy, native_lce)
    ]
    torch.testing.assert_close(per_sample[0], per_sample[1], equal_nan=True)
    tangent = make((C, D), torch.float64, seed=3)
    jvps = [
        torch.func.jvp(lambda w_, fn=fn: fn(x, w_, t, reduction="sum"), (w,), (tangent,))
        for fn in (TF.linear_cross_entropy, native_lce)
    ]
    torch.testing.assert_close(jvps[0], jvps[1])


def test_jvp_vmapped_over_targets_leaves_ignored_rows_at_zero_with_label_smoothing():
    """vmap over class-index targets (ignored rows, label smoothing) of a jvp: the batched
    target takes cross_entropy's out-of-place ∂ℓ/∂z, whose B must be 0 on ignored rows (no
    ε/C share), or an ignored row's loss tangent is -(ε/C) Σ_c (dz)_c instead of native's 0."""
    x, w = make((N, D), torch.float64), make((C, D), torch.float64, seed=1)
    tangent = make((C, D), torch.float64, seed=3)
    targets = torch.stack([hard_target((N,), seed=s, ignore=-100) for s in range(3)])

    def jvp_of(fn, t):
        return torch.func.jvp(
            lambda w_: fn(x, w_, t, reduction="none", label_smoothing=0.2), (w,), (tangent,)
        )

    def native_lce(x_, w_, t_, **kw):
        return F.cross_entropy(F.linear(x_, w_), t_, **kw)

    got = torch.func.vmap(lambda t: jvp_of(TF.linear_cross_entropy, t))(targets)
    # native's cross_entropy has no vmap over the target: one target at a time
    expected = [torch.stack(r) for r in zip(*(jvp_of(native_lce, t) for t in targets))]
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert torch.equal(got[1][targets == -100], torch.zeros((targets == -100).sum().item()))


@needs_native
@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ``options`` ignored:UserWarning")
def test_module_mirrors_native_k_dim_options_and_repr():
    kw = dict(out_features=(2,), bias=True, options=torch.nn.LinearCrossEntropyOptions())
    native = torch.nn.LinearCrossEntropyLoss(D, C, dtype=torch.float64, **kw)
    ours = torchbp.nn.LinearCrossEntropyLoss(D, C, dtype=torch.float64, **kw)
    ours.load_state_dict(native.state_dict())
    assert repr(ours) == repr(native)
    x, t = make((N, D), torch.float64), hard_target((N, 2))
    torch.testing.assert_close(ours(x, t), native(x, t))
    assert "options=None, chunk_size=3" in repr(
        torchbp.nn.LinearCrossEntropyLoss(D, C, chunk_size=3)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_uint8_class_indices_as_int64(reduction):
    # the docstring's uint8 targets crashed in gather() deep inside the chunk loop
    x, w = make((N, D), torch.float64), make((C, D), torch.float64, seed=1)
    t = hard_target((N,))
    want = run(ours, x, w, t, None, reduction=reduction)
    assert_same(run(ours, x, w, t.to(torch.uint8), None, reduction=reduction), want)


@pytest.mark.parametrize(
    "dtype, target_dtype",
    [
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float64),
    ],
    ids=str,
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_target_of_a_wider_dtype_promotes_as_native(dtype, target_dtype, reduction):
    # native promotes the logits to the target's dtype (cross_entropy's rule), so the loss
    # comes out in the promoted dtype, from the target's own values (torchbp cast the target
    # down to the input's dtype: a float64 target gave a float32 loss, a float32 one bfloat16)
    x, w = make((N, D), dtype), make((C, D), dtype, seed=1)
    t = soft_target((N, C), target_dtype)
    want = run(reference, x, w, t, None, reduction=reduction)
    got = run(ours, x, w, t, None, reduction=reduction)
    assert got[0].dtype == want[0].dtype == torch.promote_types(dtype, target_dtype)
    assert [g.dtype for g in got[1] if g is not None] == [dtype, dtype, target_dtype]
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_same(got, want, **tol)


@pytest.mark.parametrize(
    "dtype, weight_dtype",
    [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)],
    ids=str,
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_target_class_weights_of_a_wider_dtype_promote_as_native(
    dtype, weight_dtype, reduction
):
    # native's cross_entropy promotes the loss with the class weights (float64 weights: a
    # float64 loss); torchbp's came out in the input's dtype
    x, w = make((N, D), dtype), make((C, D), dtype, seed=1)
    t = soft_target((N, C), dtype)
    cw = make((C,), weight_dtype, seed=3).abs() + 0.1
    want = run(reference, x, w, t, None, reduction=reduction, weight=cw)
    got = run(ours, x, w, t, None, reduction=reduction, weight=cw)
    assert got[0].dtype == want[0].dtype == torch.promote_types(dtype, weight_dtype)
    tol = {} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_same(got, want, **tol)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_classes_as_native(soft, reduction):
    # a (0, d) weight: native gives rows of 0 (mean: nan) and zero gradients; the chunk loop
    # crashed in amax() ("Expected reduction dim 1 to have non-zero size")
    x, w = make((N, D), torch.float64), make((0, D), torch.float64)
    t = torch.zeros(N, 0, dtype=torch.float64) if soft else torch.full((N,), -100)

    def native(x, w, t, b, **kw):
        return F.cross_entropy(F.linear(x, w, b), t, **kw)

    assert_same(
        run(ours, x, w, t, None, reduction=reduction),
        run(native, x, w, t, None, reduction=reduction),
    )


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_zero_classes_with_label_smoothing_as_native(reduction):
    # every class index ignored and ε > 0: native's rows are NaN ((ε/C) times an empty sum,
    # ε/0 = inf); torchbp answered 0 (its 'mean' was NaN already: 0/0)
    x, w = make((N, D), torch.float64), make((0, D), torch.float64)
    t = torch.full((N,), -100)

    def native(x, w, t, b, **kw):
        return F.cross_entropy(F.linear(x, w, b), t, **kw)

    options = dict(reduction=reduction, label_smoothing=0.25, ignore_index=-100)
    assert_same(run(ours, x, w, t, None, **options), run(native, x, w, t, None, **options))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_target_class_weights_get_their_gradient_as_natives(reduction):
    # native differentiates -Σ_c w_c t_c logp_c in the class weights; torchbp refused them
    x, w = make((N, D), torch.float64), make((C, D), torch.float64, seed=1)
    t = soft_target((N, C))
    cw0 = make((C,), torch.float64, seed=3).abs() + 0.1
    results = []
    for fn in (ours, reference):
        cw = cw0.clone().requires_grad_()
        loss, grads = run(fn, x, w, t, None, reduction=reduction, weight=cw)
        results.append((loss, *grads[:2], cw.grad))
    torch.testing.assert_close(results[0], results[1])


def _inference(t):
    with torch.inference_mode():
        return t.clone()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("role", ["input", "target", "weight"])
def test_inference_tensor_saved_by_native_is_refused_as_native(role, reduction):
    """The naive cross_entropy(linear(x, W), t) saves x for W's gradient, and the target and
    class weights for the loss's: created under inference_mode they cannot be saved, and
    native raises. torchbp's 'mean' / 'sum' (gradients computed in forward) accepted them
    while 'none' raised autograd's error from inside; now every reduction refuses them with
    an error naming the argument."""
    args = {
        "input": make((N, D), torch.float32, seed=1),
        "target": hard_target((N,)),
        "weight": torch.rand(C, generator=torch.Generator().manual_seed(2)) + 0.5,
    }
    args[role] = _inference(args[role])
    w = make((C, D), torch.float32, seed=3).requires_grad_()
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        F.cross_entropy(
            F.linear(args["input"], w), args["target"], weight=args["weight"], reduction=reduction
        )
    with pytest.raises(RuntimeError, match=rf"linear_cross_entropy: {role} was created under"):
        TF.linear_cross_entropy(
            args["input"], w, args["target"], weight=args["weight"], reduction=reduction
        )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inference_input_native_does_not_save_is_accepted(reduction):
    """With the linear weight frozen native's linear keeps no input (only the bias needs a
    gradient), so an inference-mode input is fine there; torchbp's 'none' backward, which
    recomputes the logits from the input, raised autograd's error instead."""
    x = _inference(make((N, D), torch.float32, seed=1))
    w = make((C, D), torch.float32, seed=3)
    b = make((C,), torch.float32, seed=4).requires_grad_()
    t = hard_target((N,))
    want = reference(x, w, t, b, reduction=reduction)
    (want_db,) = torch.autograd.grad(want.sum(), b)
    got = TF.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
    (got_db,) = torch.autograd.grad(got.sum(), b)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_db, want_db)


SPARSE_LAYOUTS = {"coo": torch.Tensor.to_sparse, "csr": torch.Tensor.to_sparse_csr}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", SPARSE_LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("soft", [False, True], ids=["index", "probability"])
@pytest.mark.parametrize("leading", [(N,), (1, N)], ids=["2d", "3d"])
def test_sparse_linear_weight_gives_the_unfused_pairs_result(layout, reduction, soft, leading):
    # a sparse linear_weight crashed deep inside ('reshape is not implemented for sparse
    # tensors', 'Sparse CSR tensors do not have is_contiguous'); native's
    # cross_entropy(linear(x, W)) takes it, and so does torchbp now, with its gradients
    x = make((*leading, D), torch.float64)
    w = make((C, D), torch.float64, seed=1)
    t = soft_target((*leading, C), seed=2) if soft else hard_target(leading, seed=2)
    results = []
    for fn in (TF.linear_cross_entropy, reference):
        xs = x.clone().requires_grad_()
        ws = SPARSE_LAYOUTS[layout](w).requires_grad_()
        loss = fn(xs, ws, t, reduction=reduction, label_smoothing=0.1)
        loss.sum().backward()
        results.append((loss.detach(), xs.grad, ws.grad.to_dense()))
    torch.testing.assert_close(results[0], results[1])


def test_sparse_k_dim_linear_weight_is_refused_by_name():
    # native's K-dim path crashes in reshape(); torchbp names the argument
    x, w = make((N, D), torch.float64), make((C, 2, D), torch.float64, seed=1)
    with pytest.raises(RuntimeError, match="linear_weight must be a strided.*sparse_coo"):
        TF.linear_cross_entropy(x, w.to_sparse(), hard_target((N, 2)))


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.parametrize("argument", ["input", "target"])
def test_nested_tensor_is_refused_by_name_as_native_refuses_it(layout, argument):
    # a strided nested input failed inside ('NestedTensorImpl doesn't support sizes')
    rows = [torch.randn(2, 4), torch.randn(3, 4)]
    x, w, t = torch.randn(5, 4), torch.randn(6, 4), torch.randint(6, (5,))
    if argument == "input":
        x = torch.nested.nested_tensor(rows, layout=layout)
    else:
        t = torch.nested.nested_tensor(
            [torch.randint(6, (2,)), torch.randint(6, (3,))], layout=layout
        )
    with pytest.raises(RuntimeError, match=f"linear_cross_entropy: {argument} is a nested tensor"):
        TF.linear_cross_entropy(x, w, t)


def _lce_module():
    torch.manual_seed(0)
    return torchbp.nn.LinearCrossEntropyLoss(D, C, bias=True, chunk_size=CHUNK).double()


def _native_lce(module, x, t):
    return F.cross_entropy(module.linear(x), t)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_export_with_a_dynamic_batch_runs_other_batch_sizes(reduction):
    """The chunk loop specialised the batch size: torch.export with a dynamic batch dim
    refused the module ('you marked batch as dynamic but your code specialized it')."""
    module = _lce_module()
    module.reduction = reduction
    batch = torch.export.Dim("batch", min=2)
    example = (make((N, D), torch.float64), hard_target((N,)))
    exported = torch.export.export(module, example, dynamic_shapes=({0: batch}, {0: batch}))
    for rows in (3, 50):
        x, t = make((rows, D), torch.float64, seed=rows), hard_target((rows,), seed=rows)
        want = F.cross_entropy(module.linear(x), t, reduction=reduction)
        torch.testing.assert_close(exported.module()(x, t), want)


def test_jit_trace_passes_its_check_and_runs_other_batch_sizes():
    """torch.jit.trace's check (a second trace under no_grad) saw another graph: the
    chunked Function's ``needs`` flags differ without grad, so the trace failed."""
    module = _lce_module()
    traced = torch.jit.trace(module, (make((N, D), torch.float64), hard_target((N,))))
    x = make((5, D), torch.float64, seed=1).requires_grad_()
    t = hard_target((5,), seed=1)
    got, want = traced(x, t), _native_lce(module, x, t)
    torch.testing.assert_close(got, want)
    (gx,) = torch.autograd.grad(got, x)
    (rx,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(gx, rx)
