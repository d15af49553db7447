"""The eager cross-entropy fast paths (:mod:`torchbp.kernels.cpu_ce`) against the
reference :func:`torchbp.autograd.cross_entropy.ce_rows`, on the same inputs.

* ``plain_rows`` (one fused softmax) computes the same math in other ops: a few roundings
  apart, over dtypes, ignore_index (none, some rows, a class in range), confident rows and
  NaN / inf logits.
* ``blocked_rows`` runs the reference itself block by block: equal to one block, for
  every block size, target kind and dtype, into a new buffer or over the logits (bitwise,
  but for the smoothing term of class weights: a matrix-vector product, whose BLAS sum
  order depends on the block's shape).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tests._hypothesis import PROFILE
from tests._support import TOL, make

import torchbp.functional as TF
from torchbp.autograd.cross_entropy import ce_rows
from torchbp.kernels import cpu_ce

C = 7
ROWS = 13


def class_target(rows=ROWS, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(C, (rows,), generator=g)
    if ignore is not None:
        t[::3] = ignore
    return t


def logits(dtype, rows=ROWS, seed=0):
    z = make((rows, C), dtype, seed=seed, scale=4.0)
    z[0] = torch.tensor([30.0, -30.0, 0.0, 1.0, 2.0, -1.0, 0.5])  # a confident row
    return z


# --------------------------------------------------------------------------- softmax_rows
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_softmax_rows_gives_max_softmax_and_log_sum_exp(dtype):
    z = logits(dtype)
    m, p, log_total = cpu_ce.softmax_rows(z)
    torch.testing.assert_close(m, z.amax(1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(p, torch.softmax(z, 1), rtol=0, atol=0)
    torch.testing.assert_close(m + log_total, torch.logsumexp(z, 1, keepdim=True), **TOL[dtype])


# --------------------------------------------------------------------------- plain_rows
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "ignore_index, ignored",
    [(None, None), (-100, None), (-100, -100), (2, 2)],
    ids=["unmasked", "none-ignored", "some-ignored", "class-in-range"],
)
def test_plain_rows_matches_reference(dtype, ignore_index, ignored):
    z = logits(dtype)
    target = class_target(ignore=ignored)
    before = z.clone()
    ours = cpu_ce.plain_rows(z, target, ignore_index)
    ref = ce_rows(z, target, None, ignore_index, 0.0)
    assert torch.equal(z, before), "plain_rows wrote into the logits"
    for got, want in zip(ours, ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL[dtype])
    if ignored is not None:
        rows = target == ignored
        assert rows.any() and not ours[0][rows].any() and not ours[1][rows].any()


@pytest.mark.parametrize("path", ["composite", "fused"])
@pytest.mark.parametrize("ignore_index", [None, -100])
def test_plain_rows_propagates_nan_and_inf_like_reference(monkeypatch, path, ignore_index):
    monkeypatch.setattr(cpu_ce, "FUSED_SOFTMAX_MIN_CLASSES", C + 1 if path == "composite" else C)
    z = logits(torch.float64)
    z[1, 2], z[2, 3], z[3] = float("inf"), float("nan"), float("-inf")
    target = class_target()
    for got, want in zip(
        cpu_ce.plain_rows(z, target, ignore_index), ce_rows(z, target, None, ignore_index, 0.0)
    ):
        torch.testing.assert_close(got, want, equal_nan=True)


@PROFILE
@given(
    dtype=st.sampled_from([torch.float64, torch.float32]),
    rows=st.integers(1, 6),
    classes=st.sampled_from([1, 2, 7, 100]),
    shift=st.sampled_from([0.0, -1e3, 1e3, 1e4]),
    scale=st.sampled_from([1.0, 10.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_plain_rows_loss_is_as_accurate_as_the_reference(dtype, rows, classes, shift, scale, seed):
    # ℓ = lse - z_y of logits far from 0: the loss of a confident row is small while lse
    # and z_y are near the shift, so lse - z_y would keep only the bits below |m|'s
    # (logits around 1e4 in float32: ~1e-3 off a loss of 1e-7). The error must stay at the
    # scale of the loss itself: within a few roundings of ℓ + 1 (the terms log Σ e^{z-m}
    # <= ℓ + log C and m - z_y <= ℓ that make it up), as the reference's is.
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
    target = torch.randint(classes, (rows,), generator=g)
    target[::2] = z.argmax(1)[::2]  # confident rows: a loss near 0
    loss, grad, lse = cpu_ce.plain_rows(z, target, None)
    truth = ce_rows(z.double(), target, None, None, 0.0)[0]
    eps = torch.finfo(dtype).eps
    bound = 8 * eps * (truth + 1 + torch.log(torch.tensor(float(classes), dtype=truth.dtype)))
    assert ((loss.double() - truth).abs() <= bound).all(), (loss, truth)
    assert (loss >= 0).all()
    ref_loss, ref_grad, ref_lse = ce_rows(z, target, None, None, 0.0)
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **TOL[dtype])


# --------------------------------------------------------------------------- weighted_rows
def class_weight(dtype, special=None):
    """Class weights (C,) of ``dtype``; ``special`` puts inf / NaN / 0 / a negative weight
    on classes 1 and 4."""
    w = make((C,), dtype, seed=4).abs() + 0.1
    if special is not None:
        w[1], w[4] = special
    return w


WEIGHTS = [
    pytest.param(None, id="positive"),
    pytest.param((float("inf"), float("-inf")), id="inf"),
    pytest.param((float("nan"), 2.0), id="nan"),
    pytest.param((0.0, -1.5), id="zero-negative"),
]


@pytest.mark.parametrize("path", ["composite", "fused"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("special", WEIGHTS)
@pytest.mark.parametrize(
    "ignore_index, ignored",
    [(None, None), (-100, None), (-100, -100), (4, 4)],
    ids=["unmasked", "none-ignored", "some-ignored", "class-in-range"],
)
def test_weighted_rows_matches_reference(monkeypatch, path, dtype, special, ignore_index, ignored):
    monkeypatch.setattr(cpu_ce, "FUSED_SOFTMAX_MIN_CLASSES", C + 1 if path == "composite" else C)
    z = logits(dtype)
    z[1, 2], z[2, 3], z[4] = float("inf"), float("nan"), float("-inf")  # (row 3 is ignored)
    z[3, 0] = float("nan")
    target = class_target(ignore=ignored)
    target[0] = 0  # the confident row's max: p_y = 1, so w_y (p_y - 1) meets inf · 0
    weight = class_weight(dtype, special)
    before = z.clone(), weight.clone()
    ours = cpu_ce.weighted_rows(z, target, weight, ignore_index)
    ref = ce_rows(z, target, weight, ignore_index, 0.0)
    for kept, was in zip((z, weight), before):  # neither input written
        torch.testing.assert_close(kept, was, rtol=0, atol=0, equal_nan=True)
    for got, want in zip(ours, ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL[dtype], equal_nan=True)
    if ignored is not None:
        rows = target == ignored
        assert rows.any() and not ours[0][rows].any()


def test_weighted_rows_reads_strided_class_weights_by_class():
    # torch.take reads its input in row-major order, not memory order: a strided weight
    # view gives what its contiguous copy gives
    z, target = logits(torch.float64), class_target(ignore=-100)
    views = make((2 * C,), torch.float64, seed=4)[::2], make((C, 3), torch.float64, seed=5)[:, 1]
    for weight in views:
        assert not weight.is_contiguous()
        want = cpu_ce.weighted_rows(z, target, weight.contiguous(), -100)
        for got, expected in zip(cpu_ce.weighted_rows(z, target, weight, -100), want):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_weighted_rows_of_every_row_ignored_is_zero(dtype):
    z, target = logits(dtype), torch.full((ROWS,), -100)
    weight = class_weight(dtype, (float("inf"), float("nan")))
    loss, grad, lse = cpu_ce.weighted_rows(z, target, weight, -100)
    ref = ce_rows(z, target, weight, -100, 0.0)
    assert not loss.any() and not grad.any()
    torch.testing.assert_close(lse, ref.lse, **TOL[dtype])


# --------------------------------------------------------------------------- blocked_rows
TARGETS = [
    pytest.param(dict(kind="index", weighted=False, ignore=None, smoothing=0.0), id="plain"),
    pytest.param(dict(kind="index", weighted=True, ignore=-100, smoothing=0.3), id="w-ign-eps"),
    pytest.param(dict(kind="prob", weighted=True, ignore=None, smoothing=0.3), id="prob-w-eps"),
]


def reference_rows(case, dtype):
    """The reference as a row function of ``(z, t, out)`` and the full target, per case."""
    weight = make((C,), torch.float32, seed=4).abs() + 0.1 if case["weighted"] else None
    if case["kind"] == "index":
        target = class_target(ignore=case["ignore"])
    else:
        target = torch.softmax(make((ROWS, C), torch.float64, seed=5), 1).to(dtype)
    ignore = -100 if case["ignore"] is not None else None

    def rows_fn(z, t, out=None):
        return ce_rows(z, t, weight, ignore, case["smoothing"], out)

    return rows_fn, target


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", TARGETS)
@pytest.mark.parametrize("block", [1, 4, ROWS, 100])
@pytest.mark.parametrize("into", ["new", "logits"])
def test_blocked_rows_equals_reference_in_one_block(dtype, case, block, into):
    rows_fn, target = reference_rows(case, dtype)
    z = logits(dtype)
    ref_loss, ref_grad, ref_lse = rows_fn(z, target)
    grad = z if into == "logits" else torch.empty_like(z)
    loss, out, lse = cpu_ce.blocked_rows(rows_fn, z, target, block, grad)
    assert out is grad and out.dtype == dtype
    # the gradient is rounded once from the accumulation dtype, as the reference's
    exact = not (case["weighted"] and case["smoothing"]) or block >= ROWS
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    torch.testing.assert_close(out, ref_grad.to(dtype), **(tol if exact else TOL[dtype]))


def test_blocked_rows_of_no_rows():
    rows_fn, _ = reference_rows(
        dict(kind="index", weighted=False, ignore=None, smoothing=0.0), None
    )
    z = torch.empty((0, C))
    loss, grad, lse = cpu_ce.blocked_rows(rows_fn, z, class_target(0), 4, torch.empty_like(z))
    assert loss.shape == lse.shape == (0,) and grad.shape == (0, C)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block", [4, ROWS])
def test_blocked_rows_over_logits_that_the_target_views(dtype, block):
    # A probability target that shares the logits' storage (``z.detach()`` passed as the
    # target) is read as it was, although the gradient is written over the logits.
    case = dict(kind="soft", weighted=False, ignore=None, smoothing=0.0)
    rows_fn, _ = reference_rows(case, dtype)
    z = logits(dtype)
    ref_loss, ref_grad, _ = rows_fn(z, z.clone())
    loss, grad, _ = cpu_ce.blocked_rows(rows_fn, z, z.view_as(z), block, z)
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    torch.testing.assert_close(grad, ref_grad.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inplace_cross_entropy_of_a_target_viewing_the_logits_matches_native(dtype):
    leaf = make((ROWS, C), dtype, seed=3, scale=2.0).requires_grad_()
    native = F.cross_entropy(leaf * 1, (leaf * 1).detach())
    z = leaf * 1
    ours = TF.cross_entropy(z, z.detach(), inplace=True)
    torch.testing.assert_close(ours, native)
    want, got = (torch.autograd.grad(loss, leaf)[0] for loss in (native, ours))
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- both softmaxes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_composite_softmax_rows_gives_what_the_fused_kernel_gives(dtype):
    z = logits(dtype)
    y = class_target().unsqueeze(1)
    m, p, log_total, shifted_y = cpu_ce.composite_softmax_rows(z, y)
    fused = cpu_ce.fused_softmax_rows(z, y)
    torch.testing.assert_close(m, fused[0], rtol=0, atol=0)
    torch.testing.assert_close(shifted_y, fused[3], rtol=0, atol=0)
    for got, want in zip((p, log_total), fused[1:3]):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("path", ["composite", "fused"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("ignore_index, ignored", [(None, None), (-100, -100), (2, 2)])
def test_plain_rows_matches_reference_on_either_softmax(
    monkeypatch, path, dtype, ignore_index, ignored
):
    # the size that picks the path, moved so that this C takes the one under test
    monkeypatch.setattr(cpu_ce, "FUSED_SOFTMAX_MIN_CLASSES", C + 1 if path == "composite" else C)
    z = logits(dtype)
    z[2, 1] = float("nan") if ignored is not None else z[2, 1]  # an ignored row (::3 are)
    target = class_target(ignore=ignored)
    ours = cpu_ce.plain_rows(z, target, ignore_index)
    ref = ce_rows(z, target, None, ignore_index, 0.0)
    for got, want in zip(ours, ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **TOL[dtype], equal_nan=True)


# --------------------------------------------------------------------------- one-hot step
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_subtract_one_hot_takes_one_from_each_rows_target_column(dtype):
    """The CPU's scalar scatter (``reduce='add'``) gives ``p - onehot(y)`` exactly, with
    classes repeated across rows and a row's target at either end; ``p`` is returned,
    written in place."""
    p = torch.softmax(logits(dtype), 1)
    y = torch.tensor([0, C - 1, 3, 3, 0, 1, 2, 3, 4, 5, 6, C - 1, 0]).unsqueeze(1)
    want = p - F.one_hot(y.squeeze(1), C).to(dtype)
    got = cpu_ce.subtract_one_hot(p, y)
    assert got is p
    torch.testing.assert_close(got, want, rtol=0, atol=0)
