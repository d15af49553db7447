"""The CPU first-order backward kernels (:mod:`torchbp.kernels.cpu_act`) against the
registry's derivative formulas (``op.formula``, evaluated as backward does by
:func:`~torchbp.autograd._derivative.reference`), unblocked and cache-blocked.

Every activation with a kernel is covered with each of its registry variants; the tensor
the formula gets and its extra arguments are read off the Function (``saved_and_args``).
``cpu_act.BLOCK`` is patched small so that a few hundred elements make several blocks
(with a shorter last one); ``cpu_act.backward`` blocks only CPU tensors that are contiguous
and at least two blocks long, of kernels with scratch or of half precision.
"""

from __future__ import annotations

import pytest
import torch
from tests._support import ACTIVATIONS, TOL, Variant, grads, make, piecewise_linear, saved_and_args

from torchbp.autograd._derivative import reference
from torchbp.kernels import cpu_act
from torchbp.ops import OPS

BLOCK = 64
N_BLOCKED = 5 * BLOCK + 17  # six blocks, the last one short

# Every activation variant that has a CPU kernel.
KERNEL_CASES = [v for v in ACTIVATIONS if v.op.name in cpu_act.KERNELS]
# A slope beyond the registry's variants for the exactness test: one above 1.
EXTRA_SLOPES = [Variant(OPS["leaky_relu"], {"negative_slope": 3.3})]
# Kernels that run the formula's own ops on the same values, so bit for bit (sign of zero
# included): with the registry's variants and beyond -- ELU's alpha 0 and -0 (y + alpha at
# y = -0 is +0 and -0), a large one and a second negative one; Softplus thresholds below
# where float32's sigmoid reaches 1 (the kernel's other form), among them 0 and a negative.
BITWISE_CASES = [v for v in KERNEL_CASES if v.op.name in ("elu", "softplus")] + [
    *(Variant(OPS["elu"], {"alpha": a}) for a in (0.0, -0.0, 3.3, -2.0)),
    *(
        Variant(OPS["softplus"], {"beta": b, "threshold": t})
        for b, t in ((1.0, 3.0), (3.0, 0.0), (0.5, -2.0))
    ),
]
# kernels that multiply g by a 0/1 mask and may leave 0 · inf = NaN at an inactive unit
# where the formula (and native) selects 0: none (ReLU's checks for it, see cpu_act.relu)
MASK_TIMES_G: set[str] = set()

# kernel vs formula: the same math in other ops, so a few roundings apart (half precision:
# both computed in float32 and rounded once, so at most an ulp apart)
FAST_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0]
NUMELS = pytest.mark.parametrize("numel", [BLOCK, N_BLOCKED], ids=["one_block", "six_blocks"])


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(cpu_act, "BLOCK", BLOCK)


def inputs(variant, shape, dtype, device="cpu", special=False):
    """``(g, saved, args)`` for the kernel, ``saved`` computed by the Function's forward."""
    x = make(shape, torch.float64, scale=3.0)
    if special:  # non-finite and edge values of x, spread over the blocks
        x.view(-1)[:: max(1, x.numel() // 40)][: len(SPECIAL) * 4] = torch.tensor(SPECIAL * 4)
    saved, args = saved_and_args(variant, x.to(dtype).to(device))
    return make(shape, dtype, device, seed=1), saved, args


def check(variant, g, saved, args, equal=False):
    name = variant.op.name
    g_before, saved_before = g.clone(), saved.clone()
    fast = cpu_act.backward(name, g, saved, *args)
    want = reference(variant.op.formula, g, saved, *args)
    assert fast.dtype == want.dtype and fast.shape == want.shape
    if equal:
        assert torch.equal(fast.nan_to_num(), want.nan_to_num())
    torch.testing.assert_close(fast, want, equal_nan=True, **FAST_TOL[g.dtype])
    # neither g nor the saved tensor is written to
    torch.testing.assert_close(g, g_before, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(saved, saved_before, rtol=0, atol=0, equal_nan=True)
    return fast


def test_every_kernel_is_covered():
    assert {v.op.name for v in KERNEL_CASES} == set(cpu_act.KERNELS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@NUMELS
@pytest.mark.parametrize("variant", KERNEL_CASES, ids=str)
def test_kernel_matches_formula(variant, numel, dtype, device):
    g, saved, args = inputs(variant, (numel,), dtype, device)
    check(variant, g, saved, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", KERNEL_CASES, ids=str)
def test_kernel_matches_formula_with_nan_and_inf(variant, dtype):
    # non-finite inputs, and g with NaN and +-inf
    g, saved, args = inputs(variant, (N_BLOCKED,), dtype, special=True)
    nonfinite = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    if variant.op.name not in MASK_TIMES_G:
        g[1::50] = nonfinite.repeat(len(g[1::50]))[: len(g[1::50])]
    check(variant, g, saved, args)


@NUMELS
@pytest.mark.parametrize(
    "variant", [v for v in KERNEL_CASES if piecewise_linear(v)] + EXTRA_SLOPES, ids=str
)
def test_piecewise_linear_kernel_is_exact(variant, numel):
    # g or slope · g, bit for bit (NaN aside): the mask is exactly 1 or the slope
    g, saved, args = inputs(variant, (numel,), torch.float32, special=True)
    check(variant, g, saved, args, equal=True)


def same_bits(a, b):
    """Equal values with equal signs of zero, NaN in the same places."""
    nan = a.isnan()
    return (
        torch.equal(nan, b.isnan())
        and torch.equal(a[~nan], b[~nan])
        and torch.equal(a[~nan].signbit(), b[~nan].signbit())
    )


@NUMELS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", BITWISE_CASES, ids=str)
def test_kernel_is_the_formula_bit_for_bit(variant, dtype, numel):
    g, saved, args = inputs(variant, (numel,), dtype, special=True)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], dtype=dtype)
    g[1::11] = special.repeat(len(g[1::11]))[: len(g[1::11])]
    if variant.op.name == "softplus":  # saved is x: put beta x on the threshold and beside it
        beta, threshold = args
        edge = torch.tensor(threshold / beta, dtype=dtype)
        above = torch.nextafter(edge, torch.tensor(float("inf"), dtype=dtype))
        below = torch.nextafter(edge, torch.tensor(-float("inf"), dtype=dtype))
        saved[5::37] = torch.stack([edge, above, below]).repeat(numel)[: len(saved[5::37])]
    fast = check(variant, g, saved, args)
    assert same_bits(fast, reference(variant.op.formula, g, saved, *args))


@NUMELS
def test_elu_kernel_keeps_an_infinite_negative_branch(numel):
    # alpha >= 0 saves y, and alpha e^x = y + alpha: where alpha (e^x - 1) overflows the
    # dtype (float16 from 65504), y is -inf and the formula's y + alpha too, a negative
    # branch the kernel must not take for the positive one (f' = 1): bit for bit.
    variant = Variant(OPS["elu"], {"alpha": 1e5})
    g, saved, args = inputs(variant, (numel,), torch.float16, special=True)
    assert saved.isneginf().any()
    fast = check(variant, g, saved, args)
    assert same_bits(fast, reference(variant.op.formula, g, saved, *args))


@pytest.mark.parametrize(
    "layout", ["expanded_grad", "transposed_grad", "transposed_both", "sliced_saved"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", KERNEL_CASES, ids=str)
def test_kernel_matches_formula_non_contiguous(variant, dtype, layout):
    # big enough to block, but not contiguous: one call over the strided tensors
    g, saved, args = inputs(variant, (N_BLOCKED // 7, 14), dtype)
    if layout == "expanded_grad":
        g = make((1, 14), dtype, seed=2).expand(g.shape)
    elif layout == "transposed_grad":
        g = g.t().contiguous().t()
    elif layout == "transposed_both":
        g, saved = g.t().contiguous().t(), saved.t().contiguous().t()
    else:
        saved = torch.cat([saved, saved], 1)[:, ::2]
    assert not (g.is_contiguous() and saved.is_contiguous())
    check(variant, g, saved, args)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("scratch", [0, 1, 2])
def test_blocks_cover_the_tensor_in_order(monkeypatch, scratch, half):
    # cpu_act.backward's slicing, on a kernel that records what it is given.
    dtype = torch.bfloat16 if half else torch.float64
    g = torch.arange(N_BLOCKED, dtype=torch.float64).to(dtype)
    saved = make((N_BLOCKED,), dtype)
    calls = []

    def kernel(g, saved, offset, *, out, tmp):
        calls.append((out.numel(), out.dtype, [(t.numel(), t.dtype) for t in tmp]))
        return torch.add(g, offset, out=out)

    monkeypatch.setitem(cpu_act.KERNELS, "recording", cpu_act.Kernel(kernel, scratch))
    out = cpu_act.backward("recording", g, saved, 0.5)
    assert torch.equal(out, g + 0.5) and out.dtype == dtype
    blocked = bool(scratch or half)
    sizes = [BLOCK] * 5 + [17] if blocked else [N_BLOCKED]
    compute = torch.float32 if half else dtype
    assert calls == [(n, compute, [(n, compute)] * scratch) for n in sizes]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", KERNEL_CASES, ids=str)
def test_blocked_backward_matches_native(variant, dtype):
    # Through autograd: first-order backward takes the kernel, here in blocks.
    x = make((N_BLOCKED // 7, 7), dtype, scale=3.0)
    out, (gx,) = grads(variant.ours, x)
    ref, (rx,) = grads(variant.native, x)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(gx, rx, **TOL[dtype])


@NUMELS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_gelu_kernel_near_zero(dtype, numel):
    # The exact GELU kernel takes Φ(x) = gelu(x) / x at x + copysign(τ, x): at 0 (0/0), at
    # subnormals (x · ½ rounds), at ±τ itself and where x + τ starts to differ from x, the
    # derivative is still the formula's ½ g (+ x φ).
    tiny = cpu_act._TINY[torch.float64 if dtype == torch.float64 else torch.float32]
    info = torch.finfo(dtype)
    edges = [0.0, info.tiny, info.tiny * info.eps, 1e-30, tiny, tiny * 2**23, tiny * 2**25]
    values = torch.tensor(edges + [-v for v in edges], dtype=torch.float64)
    x = values.repeat(numel // len(values) + 1)[:numel].to(dtype)
    g = make((numel,), dtype, seed=1)
    variant = Variant(OPS["gelu"], {})
    saved, args = saved_and_args(variant, x)
    fast = check(variant, g, saved, args)
    torch.testing.assert_close(fast, g * 0.5, **FAST_TOL[dtype])


def test_gelu_kernel_uses_natives_gelu_when_torch_gelu_is_patched(monkeypatch):
    # a drop-in patch of F.gelu (with torchbp's, or a kernel library's) must not reach the
    # kernel's own Φ(x) = gelu(x) / x: torchbp's ran a whole Function per backward (and
    # recursed where its forward looked F.gelu up too)
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    g = torch.randn(64, generator=torch.Generator().manual_seed(1))
    expected = cpu_act.backward("gelu", g, x, "none")

    def patched_gelu(input, approximate="none"):
        raise AssertionError("the kernel called torch.nn.functional.gelu as patched")

    monkeypatch.setattr(torch.nn.functional, "gelu", patched_gelu)
    got = cpu_act.backward("gelu", g, x, "none")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
