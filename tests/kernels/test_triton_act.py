"""The Triton activation-backward kernel against the library's derivative formulas.

* On CPU, through Triton's interpreter: the same inputs through the kernel and through
  the registry's ``op.formula`` (the differentiable torch formula of
  :mod:`torchbp.autograd.activations`; half precision computed in float32 and rounded),
  for every activation variant the kernel computes x
  float32 / float16 / bfloat16 x sizes (empty, one element, a tail, several full
  blocks), NaN / inf in either input, which inputs :func:`triton_act.available` refuses,
  and the dispatch (taken with ``TORCHBP_TRITON=1`` only, first-order backward only).
  Triton fixes interpreted vs compiled for the whole process when it is first imported,
  so the ``interp`` tests run only in a process started with ``TRITON_INTERPRET=1``;
  ``test_interpreter_suite`` starts one (a pytest subprocess on this file), as
  ``test_triton_ce.py`` does.
* Without a GPU, the kernel is also compiled for sm_90 / sm_80 (PTX and cubin): the real
  compiler's typing rules, 16-byte vector accesses, one rounding to nearest.
* On CUDA (``cuda`` marker): the compiled kernel against the formula, and the
  activations end to end with ``TORCHBP_TRITON=1`` against native autograd.

Skipped entirely where Triton is not installed (CI installs triton 3.9.0, so they run there).

Note: the interpreter truncates float32 -> bfloat16 conversions (the GPU rounds to
nearest even; float16 it rounds to nearest too), so low-precision results are compared
within a couple of units in the last place of the reference, and checked to be rounded
like the reference only for float16 (and on the GPU). The float32 formulas for GELU
cancel in places (``_slack``), where the kernel is compared with some absolute slack.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._hypothesis import PROFILE
from tests._support import ACTIVATIONS, CUDA, piecewise_linear, saved_and_args
from tests.kernels._interp import BITS, interp, not_interp, run_interpreter_suite

TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not TRITON, reason="triton is not installed")

import torchbp  # noqa: E402
from torchbp.kernels import triton_act  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")

# Every activation variant the kernel computes (without Triton: every one, all skipped).
CASES = [v for v in ACTIVATIONS if not TRITON or triton_act.supports(v.op.name)]
CASE = pytest.mark.parametrize("variant", CASES, ids=str)


def _inputs(shape, dtype, device, variant=None, *, seed=0, scale=4.0):
    """``(g, saved)``: a random upstream gradient and what ``variant``'s Function saves
    for a random input (the input itself without a variant), wide enough to reach the
    saturated ends, both rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if variant is None:
        return g.to(device), x.to(device)
    saved, _ = saved_and_args(variant, x.float())  # in float32, as the Functions' forward
    return g.to(device), saved.to(dtype).to(device)


def _same_specials(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """NaN and ±inf in the same places; returns the mask of the finite rest."""
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN in different places"
    inf = expected.isinf()
    assert torch.equal(actual.isinf(), inf), "inf in different places"
    assert torch.equal(actual[inf], expected[inf]), "infinities of different signs"
    return expected.isfinite()


def _slack(variant, g: torch.Tensor) -> torch.Tensor | float:
    """The float32 formulas' own absolute error beyond a few roundings of the result, for
    GELU: ½(1 + erf(x/√2)) cancels as x -> -∞ (an ulp of 1, kernel and formula alike),
    and the tanh form's ½(1 + t) and 1 - t² of a float32 t = tanh u cancel as t -> ±1
    (the kernel forms both from e^{-2|u|} instead and does not cancel): measured up to
    9.4 · 2^-24 |g| for the formula, 17 · 2^-24 |g| for native's CPU kernel. SiLU:
    below x ≈ -88.7 the kernel's e^{-x} overflows (s = 0, as native's CPU kernels) where
    the formula's sigmoid is a float32 subnormal s < 2^-126 (down to x ≈ -103.3): they
    differ by |g| s (1 + |x|) < 2^-119 |g|."""
    if variant.op.name == "silu":
        return 2.0**-119 * g.double().abs()
    if variant.op.name != "gelu":
        return 0.0
    if variant.args["approximate"] == "tanh":
        return 32 * 2.0**-24 * g.double().abs()
    return 2 * 2.0**-24 * g.double().abs()


def _close(actual, expected, dtype, slack=0.0) -> None:
    """|actual - expected| <= 1e-5 |expected| + 1e-6 (float32), or two units in the last
    place of ``expected`` in ``dtype`` (half; the interpreter truncates to bfloat16, the
    GPU rounds to nearest), plus ``slack``. Half: plus 2^-126 too, below which Triton's
    interpreter converts float32 subnormals to half wrongly (and a GPU may flush them)."""
    a, e = actual.double(), expected.double()
    if dtype == torch.float32:
        tol = 1e-5 * e.abs() + 1e-6
    else:
        exponent = torch.floor(torch.log2(e.abs().clamp_min(torch.finfo(dtype).smallest_normal)))
        tol = 2 * torch.exp2(exponent - (BITS[dtype] - 1)) + 2.0**-126
    bad = (a - e).abs() > tol + slack
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} beyond tolerance; first: "
        f"{a[bad][:4].tolist()} vs {e[bad][:4].tolist()}"
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns (to compare tensors holding NaN)."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _check(variant, g, saved, *, exact_round=False):
    """act_backward vs ``op.formula`` on the same inputs: contract (dtype, shape, a new
    buffer, inputs untouched) and values: NaN and inf where the formula has them; the
    piecewise-linear activations (selects and one product by a float32 scalar) in float32
    bit for bit; otherwise close to the formula evaluated in float32 (what the torch path
    computes) and in float64 (the exact derivative)."""
    name, formula, args = variant.op.name, variant.op.formula, tuple(variant.args.values())
    before = g.clone(), saved.clone()
    assert triton_act.available(g, saved)
    out = triton_act.act_backward(name, g, saved, *args)
    assert _bits(g).equal(_bits(before[0])), "g written"
    assert _bits(saved).equal(_bits(before[1])), "saved tensor written"
    assert out.dtype == g.dtype and out.shape == g.shape and out.is_contiguous()
    assert out.numel() == 0 or out.data_ptr() not in (g.data_ptr(), saved.data_ptr())
    ref = formula(g.float(), saved.float(), *args)  # float32, not yet rounded
    finite = _same_specials(out.float(), ref.to(g.dtype).float())
    if g.dtype == torch.float32 and piecewise_linear(variant):
        assert torch.equal(out[finite], ref[finite])
        return out
    slack = _slack(variant, g[finite])
    _close(out[finite], ref[finite], g.dtype, slack)
    exact = formula(g.double(), saved.double(), *args)[finite]
    _close(out[finite], exact, g.dtype, slack)
    if exact_round and g.dtype != torch.float32 and out.numel():
        # rounded once, to nearest: as the float32 formula or the exact value rounds
        o = out[finite]
        same = (o == ref[finite].to(g.dtype)) | (o == exact.to(g.dtype))
        assert same.double().mean() > 0.99, f"only {float(same.double().mean()):.3f} rounded"
    return out


# --------------------------------------------------------------------------- interpreter
@not_interp
def test_interpreter_suite():
    """Run this file's ``interp`` tests in a fresh process under TRITON_INTERPRET=1."""
    run_interpreter_suite(__file__)


# The interpreter's numpy warns of the overflows and NaNs (inf·0, ...) the formulas make.
numpy_nan_warnings = pytest.mark.filterwarnings(
    "ignore:(invalid value|overflow) encountered:RuntimeWarning"
)


@interp
@numpy_nan_warnings
@CASE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# BLOCK = 1024: empty, one element, 2.5 programs (a masked tail; 2-D), 4 full programs
@pytest.mark.parametrize("shape", [(0,), (1,), (50, 51), (4096,)], ids=str)
def test_interpreter_matches_formula(interpret, variant, dtype, shape):
    g, saved = _inputs(shape, dtype, "cpu", variant)
    # the interpreter rounds float32 -> float16 to nearest (but truncates to bfloat16)
    _check(variant, g, saved, exact_round=dtype == torch.float16)


@interp
@numpy_nan_warnings
@CASE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreter_nan_inf(interpret, variant, dtype):
    """Every pair of special (and ordinary) values of g and the saved tensor, plus
    saturating inputs: NaN and inf where the formula has them, the same finite values."""
    specials = [NAN, INF, -INF, 0.0, -0.0, 1.0, -2.5, 30.0, -30.0, 1e4, -1e4, 3e38, -3e38]
    vals = torch.tensor(specials, dtype=torch.float32)
    gv, sv = torch.cartesian_prod(vals, vals).unbind(1)
    g, saved = gv.to(dtype).contiguous(), sv.to(dtype).contiguous()
    _check(variant, g, saved)


@st.composite
def kernel_cases(draw):
    """``(variant, g, saved)``: sizes around the block (a lone element, one short of a
    block, one past it, a masked tail after several), scales that saturate, and a few
    NaN / ±inf / signed zeros in either tensor."""
    variant = draw(st.sampled_from(CASES))
    dtype = draw(st.sampled_from(DTYPES))
    size = draw(st.sampled_from([1, 2, 7, 1023, 1025, 2500]))
    scale = draw(st.sampled_from([1.0, 4.0, 40.0]))
    g, saved = _inputs((size,), dtype, "cpu", variant, seed=draw(st.integers(0, 999)), scale=scale)
    for tensor in (g, saved):
        for _ in range(draw(st.integers(0, 2))):
            at = draw(st.integers(0, size - 1))
            tensor[at] = draw(st.sampled_from([NAN, INF, -INF, 0.0, -0.0]))
        if dtype != torch.float32:
            # the interpreter loads half subnormals wrongly (bfloat16 6.1e-39 as 0, 1e-39
            # as 5.9e-39), which a normal product (sigmoid's g·y(1-y) at x = -88) shows
            tensor[tensor.abs() < torch.finfo(dtype).smallest_normal] = 0.0
    return variant, g, saved


@interp
@numpy_nan_warnings
@settings(PROFILE, max_examples=PROFILE.max_examples * 3)
@given(case=kernel_cases())
def test_interpreter_property_matches_formula(case):
    variant, g, saved = case
    _check(variant, g, saved)


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreter_relu_conventions(interpret, dtype):
    # a NaN y passes g (native); an inactive unit gives 0 even for an infinite or NaN g
    g = torch.tensor([2.0, INF, NAN, 3.0, -INF, 5.0], dtype=dtype)
    y = torch.tensor([NAN, 0.0, 0.0, 0.0, 1.0, -0.0], dtype=dtype)
    out = triton_act.act_backward("relu", g, y)
    want = torch.tensor([2.0, 0.0, 0.0, 0.0, -INF, 0.0], dtype=dtype)
    assert torch.equal(out, want)


@interp
def test_interpreter_available(interpret, monkeypatch):
    g, saved = _inputs((6, 8), torch.float32, "cpu")
    assert triton_act.available(g, saved)
    assert triton_act.available(g.half(), saved.half())
    assert triton_act.available(g.bfloat16(), saved.bfloat16())
    assert not triton_act.available(g.double(), saved.double())  # float64: the torch ops
    assert not triton_act.available(g, saved.half())  # mixed dtypes
    assert not triton_act.available(g.int(), saved.int())
    assert not triton_act.available(g.t(), saved.t())  # non-contiguous
    assert not triton_act.available(g[:, ::2], saved[:, ::2])
    assert not triton_act.available(g, saved.t().contiguous().t())
    one = torch.ones(()).expand(6, 8)  # an expanded g (sum's backward)
    assert not triton_act.available(one, saved)
    assert not triton_act.available(g[:3], saved)  # mismatched shapes
    assert not triton_act.available(g.view(-1), saved)  # same numel, other shape
    assert not triton_act.available(g, None)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_act.available(g, saved)  # CPU tensors only for the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@interp
def test_interpreter_args(interpret):
    g, x = _inputs((5,), torch.float32, "cpu")
    with pytest.raises(TypeError):
        triton_act.act_backward("sigmoid", g, x, 0.1)
    exact = triton_act.act_backward("gelu", g, x, "none")
    approx = triton_act.act_backward("gelu", g, x, "tanh")
    assert not torch.equal(exact, approx)


def _run(fn, x, g, *, create_graph=False):
    xa = x.detach().clone().requires_grad_()
    (dx,) = torch.autograd.grad(fn(xa), xa, g, create_graph=create_graph)
    return dx


@interp
@numpy_nan_warnings
@CASE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreter_dispatch_end_to_end(interpret, monkeypatch, variant, dtype):
    """The backward of each functional goes through the kernel with TORCHBP_TRITON=1
    only, first order only, and agrees with native autograd."""
    calls = []
    real = triton_act.act_backward

    def spy(*a):
        calls.append(a[0])
        return real(*a)

    monkeypatch.setattr(triton_act, "act_backward", spy)
    g, x = _inputs((3, 37), dtype, "cpu")
    x[0, :4] = torch.tensor([0.0, NAN, INF, -INF])

    off = _run(variant.ours, x, g)
    assert not calls, "TORCHBP_TRITON unset: the Triton path must not be taken"

    monkeypatch.setenv("TORCHBP_TRITON", "1")
    on = _run(variant.ours, x, g)
    assert calls == [variant.op.name], calls
    assert on.dtype == dtype and on.shape == x.shape
    xr = x.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(variant.native(xr), xr, g)
    finite = _same_specials(on.float(), ref.float())
    _same_specials(on.float(), off.float())
    slack = _slack(variant, g[finite])
    _close(on[finite], ref[finite], dtype, slack)
    _close(on[finite], off[finite], dtype, slack)

    calls.clear()
    _run(variant.ours, x, g, create_graph=True)  # double backward: the formula
    _run(variant.ours, x.double(), g.double())  # float64: the torch ops
    _run(variant.ours, x, g.t().contiguous().t())  # a non-contiguous g: the torch ops
    assert not calls, calls


# --------------------------------------------------------------------------- GELU specials
# The inputs of tests/test_properties_s18_ce_gelu.py's GELU properties and regressions
# (0eb1c86): near 0, subnormal, huge (past x² and x³ overflow, up to the dtype's max),
# ±0, ±inf, NaN, an infinite grad_output; a size crossing the kernel's block.
GELU_SPECIALS = [0.0, -0.0, INF, -INF, NAN, 1e30, -1e30, 2.0**-36, -(2.0**-37)]
GELU_MAGNITUDES = ["normal", "tiny", "subnormal", "huge", "regressions"]


def _gelu_special_input(dtype, magnitude, *, seed=1):
    """``(g, x)`` of ``dtype`` (float32 values first): ``x`` of the magnitude, with the
    specials at fixed places, ``g`` normal with an inf and a NaN; ``BLOCK + 3`` long."""
    gen = torch.Generator().manual_seed(seed)
    n = triton_act._BLOCK + 3
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if magnitude == "tiny":
        x *= 2.0**-40
    elif magnitude == "subnormal":
        x *= torch.finfo(dtype).tiny / 4
    elif magnitude == "huge":
        top = torch.finfo(dtype).max
        x *= 10 ** torch.empty(n, dtype=torch.float64).uniform_(1, math.log10(top), generator=gen)
    elif magnitude == "regressions":  # x³ overflows, x² not; near the dtype's max
        top = torch.finfo(dtype).max
        values = [1e13, 1e16, 1.5e19, 2e19, top, top / 1.5]
        values = torch.tensor(values + [-v for v in values], dtype=torch.float64)
        x[: values.numel()] = values
    x[-len(GELU_SPECIALS) :] = torch.tensor(GELU_SPECIALS, dtype=torch.float64)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    g[0], g[triton_act._BLOCK] = INF, NAN  # (x[0]: a drawn value, x[BLOCK]: the next block)
    return g.to(dtype), x.to(dtype)


def _gelu_grad(fn, x, g, approximate):
    leaf = x.detach().clone().requires_grad_()
    (dx,) = torch.autograd.grad(fn(leaf, approximate=approximate), leaf, g.to(x.dtype))
    return dx


def _assert_gelu_close(ours, native, truth, slack, what):
    """``ours`` has native's NaN pattern, but where native's NaN is its own overflow (the
    float64 ``truth`` is a number: float32 GELU-tanh's x² past 1.8e19), where the truth
    passes too; native's infinities; each finite value within two units in the last
    place of the truth plus ``slack``, or no farther from it than twice native."""
    o, n, t = (v.double() for v in (ours, native, truth))
    overflow = n.isnan() & ~t.isnan()
    assert bool(torch.where(overflow, True, o.isnan() == n.isnan()).all()), f"{what}: NaN"
    assert torch.equal(o.isinf() & ~overflow, n.isinf()), f"{what}: inf in other places"
    assert torch.equal(o[n.isinf()], n[n.isinf()]), f"{what}: infinities of other signs"
    finite = n.isfinite() & o.isfinite()
    err, native_err = (o - t).abs()[finite], (n - t).abs()[finite]
    info = torch.finfo(ours.dtype)
    tol = 2 * info.eps * t.abs()[finite] + slack[finite] + info.tiny
    bad = (err > tol) & (err > 2 * native_err)
    assert not bad.any(), f"{what}: {o[finite][bad][:4].tolist()} vs {t[finite][bad][:4].tolist()}"


def _check_gelu_special_values(monkeypatch, dtype, magnitude, approximate, device):
    """GELU's backward through the kernel (``TORCHBP_TRITON=1``), and through torchbp's
    default path (the CPU kernel; the torch ops on CUDA), against native's on the same
    inputs and native's in float64."""
    g, x = (t.to(device) for t in _gelu_special_input(dtype, magnitude))
    native = _gelu_grad(F.gelu, x, g, approximate)
    truth = _gelu_grad(F.gelu, x.double(), g, approximate)
    default = _gelu_grad(torchbp.functional.gelu, x, g, approximate)
    calls = []
    real = triton_act.act_backward
    monkeypatch.setattr(triton_act, "act_backward", lambda *a: calls.append(a[0]) or real(*a))
    monkeypatch.setenv("TORCHBP_TRITON", "1")
    kernel = _gelu_grad(torchbp.functional.gelu, x, g, approximate)
    assert calls == ["gelu"], calls
    variant = next(v for v in CASES if v.op.name == "gelu" and v.args["approximate"] == approximate)
    slack = torch.as_tensor(_slack(variant, g)).double().expand(g.shape)
    _assert_gelu_close(kernel, native, truth, slack, "kernel")
    _assert_gelu_close(default, native, truth, slack, "default path")


@interp
@numpy_nan_warnings
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("magnitude", GELU_MAGNITUDES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interpreter_gelu_special_values_match_native(
    interpret, monkeypatch, dtype, magnitude, approximate
):
    """The kernel's GELU backward at the inputs that found 0eb1c86's bugs in the CPU
    kernel (huge x past x³ / x² overflow and near the dtype's max, subnormal, ±inf, an
    infinite grad_output) agrees with native and with torchbp's CPU path."""
    _check_gelu_special_values(monkeypatch, dtype, magnitude, approximate, "cpu")


# --------------------------------------------------------------------------- compile only
@not_interp
@pytest.mark.parametrize("arch", [90, 80])
def test_compiles_for_gpu(compiled, arch):
    """The real compiler (to PTX and cubin; no GPU needed) accepts every activation in
    every dtype, and with 16-byte-aligned tensors (as torch allocates them) makes one
    pass of 16-byte vector loads and stores, rounding to nearest once."""
    import triton
    from triton.backends.compiler import GPUTarget

    module = triton_act._kernel_module()
    kernel = module.act_backward_kernel
    for dtype in ("fp32", "bf16", "fp16"):
        for op, code in module.OPS.items():
            if dtype != "fp32" and op not in ("gelu", "silu", "relu"):
                continue  # every op in float32, a few in half (the load/store part)
            for large in (False, True) if op == "silu" else (False,):
                sig = dict(
                    g_ptr=f"*{dtype}", s_ptr=f"*{dtype}", out_ptr=f"*{dtype}",
                    n="i64" if large else "i32", slope="fp32", OP="constexpr",
                    BLOCK="constexpr", LARGE="constexpr",
                )  # fmt: skip
                consts = dict(OP=code, BLOCK=triton_act._BLOCK, LARGE=large)
                # what Triton's launcher infers for aligned pointers and n % 16 == 0
                attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}
                source = triton.compiler.ASTSource(
                    fn=kernel, signature=sig, constexprs=consts, attrs=attrs
                )
                binary = triton.compile(
                    source,
                    target=GPUTarget("cuda", arch, 32),
                    options=dict(num_warps=triton_act._NUM_WARPS, enable_fp_fusion=True),
                )
                ptx = binary.asm["ptx"]
                # each thread's share of each tensor in 16-byte accesses, nothing else
                per_thread = triton_act._BLOCK // (32 * triton_act._NUM_WARPS)
                vectors = per_thread * (4 if dtype == "fp32" else 2) // 16
                assert ptx.count("ld.global") == ptx.count("ld.global.v4") == 2 * vectors, op
                assert ptx.count("st.global") == ptx.count("st.global.v4") == vectors, op
                if op in ("gelu", "gelu_tanh", "silu"):
                    assert "ex2.approx.f32" in ptx
                if dtype == "bf16" and arch == 90 and op != "relu":  # (relu: a select)
                    assert "cvt.rn.bf16" in ptx  # rounded to nearest, once


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@CUDA
@not_interp
@CASE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (1,), (1000, 37), (1 << 20,)], ids=str)
def test_cuda_matches_formula(compiled, variant, dtype, shape):
    g, saved = _inputs(shape, dtype, "cuda", variant)
    _check(variant, g, saved, exact_round=True)


@pytest.mark.cuda
@CUDA
@not_interp
@CASE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_nan_inf(compiled, variant, dtype):
    specials = [NAN, INF, -INF, 0.0, -0.0, 1.0, -2.5, 30.0, -30.0, 1e4, -1e4, 3e38, -3e38]
    vals = torch.tensor(specials, dtype=torch.float32)
    gv, sv = torch.cartesian_prod(vals, vals).unbind(1)
    _check(variant, gv.to(dtype).cuda(), sv.to(dtype).cuda())


@pytest.mark.cuda
@CUDA
@not_interp
@CASE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dispatch_end_to_end(compiled, monkeypatch, variant, dtype):
    """With TORCHBP_TRITON=1 each functional's backward runs the kernel and agrees with
    native autograd (half: within native's own rounding)."""
    calls = []
    real = triton_act.act_backward
    monkeypatch.setattr(triton_act, "act_backward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("TORCHBP_TRITON", "1")
    g, x = _inputs((4096, 257), dtype, "cuda")
    on = _run(variant.ours, x, g)
    assert calls, "the Triton path was not taken"
    xr = x.detach().clone().requires_grad_()
    (ref,) = torch.autograd.grad(variant.native(xr), xr, g)
    _close(on, ref, dtype, _slack(variant, g))


@pytest.mark.cuda
@CUDA
@not_interp
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("magnitude", GELU_MAGNITUDES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_gelu_special_values_match_native(
    compiled, monkeypatch, dtype, magnitude, approximate
):
    """The compiled kernel's GELU backward at 0eb1c86's inputs agrees with native CUDA's
    and with torchbp's default CUDA path (the formula's torch ops)."""
    _check_gelu_special_values(monkeypatch, dtype, magnitude, approximate, "cuda")
