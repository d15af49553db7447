"""The Triton cross-entropy forward kernel against the reference ``ce_rows``.

* On CPU, through Triton's interpreter: the same inputs through both, over dtypes,
  weights, ignore_index (all rows ignored too), label smoothing, several chunks per row,
  C = 1 and N = 0. Triton fixes interpreted vs compiled for the whole process when it is
  first imported, so the ``interp`` tests run only in a process started with
  ``TRITON_INTERPRET=1``; ``test_interpreter_suite`` starts one (a pytest subprocess on
  this file), so that a plain ``pytest`` run covers them without putting the rest of the
  session (CUDA, torch.compile) in interpreter mode.
* Without a GPU, the kernel is also compiled for sm_90 / sm_80 (PTX and cubin), which
  checks what the interpreter does not: the typing rules of the real compiler.
* On CUDA (``cuda`` marker): the compiled kernel, and ``cross_entropy`` end to end with
  ``TORCHBP_TRITON=1`` against ``F.cross_entropy``.

Skipped entirely where Triton is not installed (CI).

Note: the interpreter truncates float32 -> bfloat16 conversions (the GPU rounds to
nearest even), so low-precision gradients are compared within one unit in the last place
of the reference.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._hypothesis import PROFILE
from tests._support import CUDA
from tests.kernels._interp import BITS, interp, not_interp, run_interpreter_suite

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)

import torchbp.functional as TF  # noqa: E402
from torchbp.autograd.cross_entropy import ce_rows  # noqa: E402
from torchbp.kernels import triton_ce  # noqa: E402

IGNORE = -100


def _inputs(rows, classes, dtype, device, *, seed=0, scale=3.0, ignore_every=0, weighted=False):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    y = torch.randint(classes, (rows,), generator=g)
    if ignore_every:
        y[::ignore_every] = IGNORE
    w = torch.rand(classes, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    w = None if w is None else w.to(torch.float32).to(device)
    return z.to(device), y.to(device), w


def _within_ulp(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """|actual - expected| <= one unit in the last place of ``expected`` in ``dtype``."""
    a, e = actual.double(), expected.double()
    exponent = torch.floor(torch.log2(e.abs().clamp_min(torch.finfo(dtype).smallest_normal)))
    ulp = torch.exp2(exponent - (BITS[dtype] - 1))
    bad = (a - e).abs() > ulp
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} beyond 1 ulp; worst "
        f"{float((a - e).abs().max()):.3g} at {tuple(int(i) for i in bad.nonzero()[0])}"
    )


def _check(z, y, w, smoothing, *, exact_round=False):
    """ce_forward_rows vs ce_rows on the same inputs: contract (dtypes, shapes, the logits
    untouched) and values."""
    before = z.clone()
    assert triton_ce.available(z, y, w)
    loss, grad, lse = triton_ce.ce_forward_rows(z, y, w, IGNORE, smoothing)
    ref_loss, ref_grad, ref_lse = ce_rows(z, y, w, IGNORE, smoothing)
    assert torch.equal(z, before), "the kernel wrote into the logits"
    assert loss.dtype == lse.dtype == torch.float32 and grad.dtype == z.dtype
    assert loss.shape == lse.shape == (z.shape[0],) and grad.shape == z.shape
    assert grad.numel() == 0 or grad.data_ptr() != z.data_ptr()  # (empty: both null)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    if z.dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    else:
        _within_ulp(grad, ref_grad, z.dtype)
        if exact_round:  # the GPU rounds once, to nearest: almost all equal the reference
            same = (grad == ref_grad.to(z.dtype)).double().mean()
            assert same > 0.99, f"only {float(same):.3f} rounded like the reference"
    return loss, grad, lse


CASES = [
    pytest.param(w, s, id=f"{'w' if w else 'now'}-eps{s}")
    for w in (False, True)
    for s in (0.0, 0.1)
]


# One row each: the ±inf / NaN corners of cross-entropy, each placed in the first or a
# later chunk of BLOCK = 16 classes (40 classes: three chunks), every target position.
NONFINITE_ROWS = [  # (position, value) edits of a finite row
    [(slice(None), float("-inf"))],  # all -inf
    [(3, float("inf"))],  # +inf in chunk 0
    [(20, float("inf"))],  # +inf in chunk 1
    [(3, float("inf")), (30, float("-inf"))],
    [(slice(None), float("inf"))],
    [(33, float("nan"))],  # NaN in chunk 2
    [(slice(None), float("-inf")), (25, float("nan"))],
    [(slice(None), float("nan"))],
    [(slice(0, 16), float("-inf"))],  # chunk 0 all -inf
    [(slice(None), float("-inf")), (39, 1.0)],  # one finite logit
]


def _nonfinite_batch(device):
    """``(z, y)``: every :data:`NONFINITE_ROWS` row with each target of 0, 3, 20, 39 and
    ``IGNORE`` (float32 logits, 40 classes)."""
    base = torch.randn(40, generator=torch.Generator().manual_seed(5))
    rows, targets = [], []
    for edits in NONFINITE_ROWS:
        for target in (0, 3, 20, 39, IGNORE):
            row = base.clone()
            for at, value in edits:
                row[at] = value
            rows.append(row)
            targets.append(target)
    return torch.stack(rows).to(device), torch.tensor(targets, device=device)


def _check_nonfinite_against_native(z, y, weighted, smoothing):
    """The kernel's loss and gradient of :func:`_nonfinite_batch` rows are native's, NaN
    where native's are NaN, ±inf where native's are: every chunk of the online softmax
    meets the row's infinities (the running max at ±inf, NaN in a chunk)."""
    w = torch.linspace(0.5, 2.0, 40, device=z.device) if weighted else None
    if weighted:
        w[20] = 0.0  # a zero weight at a target, next to infinite logits
    loss, grad, _lse = triton_ce.ce_forward_rows(z, y, w, IGNORE, smoothing)
    zn = z.clone().requires_grad_()
    native = F.cross_entropy(zn, y, w, reduction="none", label_smoothing=smoothing)
    native.sum().backward()
    torch.testing.assert_close(loss, native, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(grad, zn.grad, rtol=1e-5, atol=1e-6, equal_nan=True)


# --------------------------------------------------------------------------- interpreter
@not_interp
def test_interpreter_suite():
    """Run this file's ``interp`` tests in a fresh process under TRITON_INTERPRET=1."""
    run_interpreter_suite(__file__)


@interp
@pytest.mark.parametrize("weighted, smoothing", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_block", [16, 4096], ids=["chunks", "oneblock"])
def test_interpreter_matches_reference(
    interpret, monkeypatch, dtype, weighted, smoothing, max_block
):
    # 37 classes: not a multiple of BLOCK; with BLOCK = 16, three chunks per row exercise
    # the online rescaling of the running sum.
    monkeypatch.setattr(triton_ce, "_MAX_BLOCK", max_block)
    z, y, w = _inputs(6, 37, dtype, "cpu", ignore_every=4, weighted=weighted)
    _check(z, y, w, smoothing)


@interp
@pytest.mark.parametrize("weighted, smoothing", CASES)
def test_interpreter_one_class(interpret, weighted, smoothing):
    z, y, w = _inputs(3, 1, torch.float32, "cpu", ignore_every=3, weighted=weighted)
    loss, grad, lse = _check(z, y, w, smoothing)
    assert torch.equal(grad, torch.zeros_like(grad)) and torch.equal(lse, z[:, 0])


@interp
@pytest.mark.parametrize("weighted, smoothing", CASES)
def test_interpreter_no_rows(interpret, weighted, smoothing):
    # through _check, as test_cuda_matches_reference's (0, 7) case: empty tensors have
    # a null data_ptr on CPU and CUDA alike (so "a new buffer" cannot be told by address)
    z, y, w = _inputs(0, 7, torch.bfloat16, "cpu", weighted=weighted)
    loss, grad, lse = _check(z, y, w, smoothing)
    assert loss.shape == lse.shape == (0,) and grad.shape == (0, 7) and grad.dtype == z.dtype


@interp
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_interpreter_all_ignored(interpret, smoothing):
    z, y, w = _inputs(4, 10, torch.bfloat16, "cpu", weighted=True)
    y.fill_(IGNORE)
    loss, grad, lse = _check(z, y, w, smoothing)
    assert not loss.any() and not grad.any()


@interp
def test_interpreter_confident_bf16(interpret):
    # p_y = 1 - δ with δ ~ 1e-4: p_y - 1 must be formed in float32 and rounded once
    # (rounding p_y to bfloat16 first would give 0).
    z, y, _ = _inputs(8, 50, torch.float32, "cpu", scale=1.0)
    z[torch.arange(8), y] += torch.linspace(8, 14, 8, dtype=torch.float64).float()
    z = z.to(torch.bfloat16)
    _loss, grad, _lse = _check(z, y, None, 0.0)
    picked = grad[torch.arange(8), y].double()
    exact = torch.softmax(z.double(), 1)[torch.arange(8), y] - 1
    assert (picked < 0).all()
    torch.testing.assert_close(picked, exact, rtol=2**-7, atol=0)


@interp
def test_interpreter_inf_first_chunk_and_large_offset(interpret, monkeypatch):
    # The whole first chunk at -inf (the running max starts at -inf), and logits far from
    # 0 (the max trick).
    monkeypatch.setattr(triton_ce, "_MAX_BLOCK", 16)
    z, y, w = _inputs(4, 40, torch.float32, "cpu", weighted=True)
    z[:2, :16] = float("-inf")
    y[:2] = torch.tensor([20, 39])
    z[2:] += 1e4
    loss, grad, lse = _check(z, y, w, 0.0)
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    assert not grad[:2, :16].any()


@interp
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "w"])
def test_interpreter_smoothing_of_logits_far_from_zero(interpret, monkeypatch, weighted):
    # The smoothing term Σ_c w_c (z_c - m) of logits around 1e4 (spread ~10): formed as
    # Σ w z - m Σ w it cancels about log2(1e4 · C) bits of float32; the reference keeps
    # its error at the spread's scale (native's is as small).
    monkeypatch.setattr(triton_ce, "_MAX_BLOCK", 256)
    z, y, w = _inputs(4, 1000, torch.float32, "cpu", weighted=weighted)
    z += 1e4
    loss, _grad, _lse = _check(z, y, w, 0.1)
    w64 = None if w is None else w.double()
    exact = F.cross_entropy(z.double(), y, w64, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=0)


@interp
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_interpreter_infinite_class_weight(interpret, smoothing):
    # w_y = inf: the loss is +inf, as ce_rows' and native's; formed as a·log s - Σ B (z - m)
    # it met inf · 0 (log s = 0 where z_y's neighbour dominates the row: NaN)
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 100.0, -1.0]])
    y = torch.tensor([0, 0])
    w = torch.tensor([float("inf"), 1.0, 1.0])
    loss, _grad, lse = triton_ce.ce_forward_rows(z, y, w, IGNORE, smoothing)
    ref_loss, _ref_grad, ref_lse = ce_rows(z, y, w, IGNORE, smoothing)
    native = F.cross_entropy(z, y, w, reduction="none", label_smoothing=smoothing)
    assert torch.equal(ref_loss, native) and torch.equal(native, torch.full((2,), float("inf")))
    assert torch.equal(loss, native)
    torch.testing.assert_close(lse, ref_lse)


@interp
@pytest.mark.parametrize("weighted, smoothing", CASES)
def test_interpreter_nonfinite_rows_match_native(interpret, monkeypatch, weighted, smoothing):
    monkeypatch.setattr(triton_ce, "_MAX_BLOCK", 16)
    z, y = _nonfinite_batch("cpu")
    _check_nonfinite_against_native(z, y, weighted, smoothing)


@interp
def test_interpreter_strided_logits_int32_target(interpret):
    z, y, w = _inputs(40, 9, torch.float32, "cpu", ignore_every=5, weighted=True)
    zt = z.t().contiguous().t()  # column-major (copied to row-major for the kernel)
    _check(zt, y.to(torch.int32)[:], w, 0.1)
    _check(z[::2], y[::2], None, 0.0)


@st.composite
def kernel_cases(draw):
    """Rows of logits the kernel may meet: odd class counts against small and large blocks
    (C = 1, C a block plus one, C far above BLOCK = 16), N = 0 / 1, float32 / half, class
    weights with zeros, ignore_index on some or every row, label smoothing up to 1, a large
    offset, and column-major, row-strided or expanded (stride 0) logits and targets."""
    rows = draw(st.sampled_from([0, 1, 2, 5]))
    classes = draw(st.sampled_from([1, 2, 3, 17, 33, 100, 257]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 999))
    z, y, w = _inputs(rows, classes, dtype, "cpu", seed=seed)
    z = (z.double() + draw(st.sampled_from([0.0, 0.0, 100.0, -1e4]))).to(dtype)
    if rows:
        y[torch.rand(rows, generator=torch.Generator().manual_seed(seed)) < 0.4] = IGNORE
        if draw(st.integers(0, 4)) == 0:
            y.fill_(IGNORE)
    if draw(st.booleans()):
        w = torch.linspace(0.5, 2.0, classes, dtype=draw(st.sampled_from(FLOAT_WEIGHTS)))
        w[draw(st.integers(0, classes - 1))] = 0.0
    layout = draw(st.sampled_from(["contiguous", "column-major", "row-strided", "expanded"]))
    if layout == "column-major":
        z = z.t().contiguous().t()
    elif layout == "row-strided":
        z, y = torch.cat([z, z])[::2], torch.cat([y, y])[::2]
    elif layout == "expanded" and rows:
        z, y = z[:1].expand(rows, classes), y[:1].expand(rows)
    y = y.to(draw(st.sampled_from([torch.int64, torch.int32])))
    return z, y, w, draw(st.sampled_from([0.0, 0.1, 1.0])), draw(st.sampled_from([16, 64, 4096]))


FLOAT_WEIGHTS = [torch.float32, torch.float64, torch.bfloat16]


@interp
@settings(PROFILE, max_examples=PROFILE.max_examples * 3)
@given(case=kernel_cases())
def test_interpreter_property_matches_reference(case):
    z, y, w, smoothing, max_block = case
    original = triton_ce._MAX_BLOCK
    triton_ce._MAX_BLOCK = max_block
    try:
        _check(z, y, w, smoothing)
    finally:
        triton_ce._MAX_BLOCK = original


@interp
def test_interpreter_available(interpret, monkeypatch):
    z, y, w = _inputs(3, 5, torch.float32, "cpu", weighted=True)
    assert triton_ce.available(z, y, w)
    assert not triton_ce.available(z.double(), y)
    assert not triton_ce.available(z.unsqueeze(0), y)
    assert not triton_ce.available(z, torch.softmax(z, 1))  # probabilities: the torch path
    assert not triton_ce.available(z, y[:2])
    assert not triton_ce.available(z[:, :0], y)
    assert not triton_ce.available(z, y, w[:4])
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_ce.available(z, y)  # CPU tensors only for the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@interp
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_interpreter_dispatch_end_to_end(interpret, monkeypatch, smoothing):
    """cross_entropy with TORCHBP_TRITON=1 goes through the kernel and matches native."""
    calls = []
    real = triton_ce.ce_forward_rows

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(triton_ce, "ce_forward_rows", spy)
    monkeypatch.setenv("TORCHBP_TRITON", "1")
    z, y, w = _inputs(6, 13, torch.float32, "cpu", ignore_every=3, weighted=True)
    kw = dict(weight=w, ignore_index=IGNORE, label_smoothing=smoothing)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    out = TF.cross_entropy(za, y, **kw)
    ref = F.cross_entropy(zb, y, **kw)
    out.backward()
    ref.backward()
    assert calls, "the Triton path was not taken"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- class weights
# 240eb82's special class weights (the CPU path's weighted_rows forms w_y p - w_y onehot so
# that an infinite weight gives native's NaN): the kernel's a p - B must give native's
# values and NaN pattern too, as must the default path beside it.
SPECIAL_WEIGHTS = {
    "inf": (float("inf"), float("-inf")),
    "nan": (float("nan"), 2.0),
    "zero-negative": (0.0, -1.5),
}


def _special_weight_batch(device, special, ignore_index):
    """Logits (12, 7) with an inf, a NaN and a -inf row; targets with every third one
    ``ignore_index``; class weights with ``special`` on classes 1 and 4."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 7, generator=g, dtype=torch.float64) * 3
    z[1, 2], z[2, 3], z[4] = float("inf"), float("nan"), float("-inf")
    y = torch.randint(7, (12,), generator=g)
    y[0] = int(z[0].argmax())
    y[::3] = ignore_index
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    w[1], w[4] = SPECIAL_WEIGHTS[special]
    return z.float().to(device), y.to(device), w.float().to(device)


def _check_special_weights(monkeypatch, device, special, ignore_index, reduction):
    """cross_entropy through the kernel (TORCHBP_TRITON=1) and through the default path
    against native: loss and gradient, NaN in the same places."""
    z, y, w = _special_weight_batch(device, special, ignore_index)
    kw = dict(weight=w, ignore_index=ignore_index, reduction=reduction)
    grad_output = torch.rand(12 if reduction == "none" else (), device=device)

    def loss_and_grad(fn):
        leaf = z.clone().requires_grad_()
        loss = fn(leaf, y, **kw)
        (grad,) = torch.autograd.grad(loss, leaf, grad_output)
        return loss.detach(), grad

    native, default = loss_and_grad(F.cross_entropy), loss_and_grad(TF.cross_entropy)
    calls = []
    real = triton_ce.ce_forward_rows
    monkeypatch.setattr(triton_ce, "ce_forward_rows", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("TORCHBP_TRITON", "1")
    kernel = loss_and_grad(TF.cross_entropy)
    assert calls, "the Triton path was not taken"
    for ours in (kernel, default):
        for got, want in zip(ours, native):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


@interp
@pytest.mark.filterwarnings(
    "ignore:(invalid value|overflow|divide by zero) encountered:RuntimeWarning"
)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("ignore_index", [IGNORE, 4], ids=["padded", "class-4"])
@pytest.mark.parametrize("special", SPECIAL_WEIGHTS)
def test_interpreter_special_class_weights_match_native(
    interpret, monkeypatch, special, ignore_index, reduction
):
    _check_special_weights(monkeypatch, "cpu", special, ignore_index, reduction)


# --------------------------------------------------------------------------- compile only
@not_interp
@pytest.mark.parametrize("arch", [90, 80])
def test_compiles_for_gpu(compiled, arch):
    """The real compiler (to PTX and cubin; no GPU needed) accepts every variant,
    including C = 1, where Triton passes ``classes`` as the constant 1."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton_ce._kernel()
    for dtype in ("fp32", "bf16"):
        for has_weight, smooth, classes in ((False, False, None), (True, True, None), (0, 1, 1)):
            sig = dict(
                z_ptr=f"*{dtype}", z_stride_row="i32", y_ptr="*i64",
                y_stride="constexpr", w_ptr="*fp32", grad_ptr=f"*{dtype}", loss_ptr="*fp32",
                lse_ptr="*fp32", classes="i32", ignore_index="i32", smoothing="fp32",
                HAS_WEIGHT="constexpr", SMOOTH="constexpr", BLOCK="constexpr",
            )  # fmt: skip
            consts = dict(y_stride=1, HAS_WEIGHT=bool(has_weight))
            consts.update(SMOOTH=bool(smooth), BLOCK=4096 if classes is None else 16)
            if classes is not None:
                sig["classes"] = sig["z_stride_row"] = "constexpr"
                consts.update(classes=classes, z_stride_row=classes)
            source = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
            binary = triton.compile(
                source,
                target=GPUTarget("cuda", arch, 32),
                options=dict(num_warps=8, enable_fp_fusion=True),
            )
            ptx = binary.asm["ptx"]
            assert "ex2.approx.f32" in ptx
            if dtype == "bf16" and arch == 90:
                assert "cvt.rn.bf16" in ptx  # rounded to nearest, once


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@CUDA
@not_interp
@pytest.mark.parametrize("weighted, smoothing", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 37), (16, 5000), (3, 1), (0, 7), (8, 131072)])
def test_cuda_matches_reference(compiled, dtype, weighted, smoothing, shape):
    z, y, w = _inputs(*shape, dtype, "cuda", ignore_every=5, weighted=weighted)
    _check(z, y, w, smoothing, exact_round=dtype != torch.float32 and shape[0] * shape[1] > 0)


@pytest.mark.cuda
@CUDA
@not_interp
def test_cuda_confident_and_all_ignored(compiled):
    z, y, _ = _inputs(32, 1000, torch.float32, "cuda", scale=1.0)
    z[torch.arange(32), y] += torch.linspace(6, 16, 32, device="cuda")
    zb = z.to(torch.bfloat16)
    _loss, grad, _lse = _check(zb, y, None, 0.0, exact_round=True)
    exact = torch.softmax(zb.double(), 1)[torch.arange(32), y] - 1
    torch.testing.assert_close(grad[torch.arange(32), y].double(), exact, rtol=2**-7, atol=0)
    y.fill_(IGNORE)
    loss, grad, _lse = _check(zb, y, None, 0.1)
    assert not loss.any() and not grad.any()


@pytest.mark.cuda
@CUDA
@not_interp
@pytest.mark.parametrize("max_block", [16, 4096], ids=["chunks", "oneblock"])
@pytest.mark.parametrize("weighted, smoothing", CASES)
def test_cuda_nonfinite_rows_match_native(compiled, monkeypatch, weighted, smoothing, max_block):
    """As the interpreter's test, compiled: the GPU's max ignores a NaN operand (the
    interpreter's numpy propagates it), so a NaN row must still come out NaN through the
    running sum, not through the max."""
    monkeypatch.setattr(triton_ce, "_MAX_BLOCK", max_block)
    z, y = _nonfinite_batch("cuda")
    _check_nonfinite_against_native(z, y, weighted, smoothing)


@pytest.mark.cuda
@CUDA
@not_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted, smoothing", CASES)
def test_cuda_dispatch_end_to_end(compiled, monkeypatch, dtype, weighted, smoothing):
    """cross_entropy with TORCHBP_TRITON=1 against F.cross_entropy (bf16 against native on
    float32-upcast logits, within native's own bf16 tolerance); logits left intact."""
    calls = []
    real = triton_ce.ce_forward_rows
    monkeypatch.setattr(triton_ce, "ce_forward_rows", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("TORCHBP_TRITON", "1")
    z, y, w = _inputs(512, 32000, dtype, "cuda", ignore_every=7, weighted=weighted)
    w = None if w is None else w.to(dtype).float()  # the same weights whatever the rounding
    # reduction="sum": the gradient keeps the size of p (a mean would shrink it below atol)
    kw = dict(weight=w, ignore_index=IGNORE, label_smoothing=smoothing, reduction="sum")
    za = z.clone().requires_grad_()
    out = TF.cross_entropy(za, y, **kw)
    out.backward()
    assert calls, "the Triton path was not taken"
    assert torch.equal(za.detach(), z)
    zr = z.float().requires_grad_()
    ref = F.cross_entropy(zr, y, **kw)
    ref.backward()
    # bf16: the loss and the gradient are each rounded once to bfloat16 (2^-8 relative)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    assert out.dtype == dtype and za.grad.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(za.grad.float(), zr.grad, **tol)


@pytest.mark.cuda
@CUDA
@not_interp
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("ignore_index", [IGNORE, 4], ids=["padded", "class-4"])
@pytest.mark.parametrize("special", SPECIAL_WEIGHTS)
def test_cuda_special_class_weights_match_native(
    compiled, monkeypatch, special, ignore_index, reduction
):
    """As the interpreter's test, compiled, and beside it torchbp's default CUDA path
    (weighted_rows) against native CUDA."""
    _check_special_weights(monkeypatch, "cuda", special, ignore_index, reduction)
