"""The in-place first-order backward kernels (``wrapped.fast``) against the differentiable
formulas (``wrapped.formula``), unblocked and cache-blocked.

``activations.BLOCK`` is patched small so that a few hundred elements make several blocks
(with a shorter last one); the helper blocks only CPU tensors that are contiguous and at
least two blocks long, of kernels with scratch or of half precision.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests._support import TOL, grads, make

import torchbp.functional as TF
from torchbp.autograd import activations

BLOCK = 64
N_BLOCKED = 5 * BLOCK + 17  # six blocks, the last one short

# name -> (derivative, forward whose result is saved (None: the input), extra args)
DERIVATIVES = {
    "sigmoid": (activations._sigmoid_grad, torch.sigmoid, ()),
    "tanh": (activations._tanh_grad, torch.tanh, ()),
    "relu": (activations._relu_grad, torch.relu, ()),
    "leaky_relu": (activations._leaky_relu_grad, lambda x: F.leaky_relu(x, 0.1), (0.1,)),
    "leaky_relu_0": (activations._leaky_relu_grad, lambda x: F.leaky_relu(x, 0.0), (0.0,)),
    "leaky_relu_3": (activations._leaky_relu_grad, lambda x: F.leaky_relu(x, 3.3), (3.3,)),
    "leaky_relu_neg": (activations._leaky_relu_grad, None, (-0.5,)),
    "gelu": (activations._gelu_grad, None, ("none",)),
    "gelu_tanh": (activations._gelu_grad, None, ("tanh",)),
    "silu": (activations._silu_grad, None, ()),
}
# fast vs formula: the same math in other ops, so a few roundings apart (half precision:
# both computed in float32 and rounded once, so at most an ulp apart)
FAST_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(activations, "BLOCK", BLOCK)


def inputs(name, shape, dtype, device="cpu", special=False):
    """(g, saved, args) for a derivative, saved computed by its forward as in backward."""
    _, forward, args = DERIVATIVES[name]
    x = make(shape, torch.float64, scale=3.0)
    if special:  # non-finite and edge values of x, spread over the blocks
        x.view(-1)[:: max(1, x.numel() // 40)][: len(SPECIAL) * 4] = torch.tensor(SPECIAL * 4)
    x = x.to(dtype).to(device)
    saved = x if forward is None else forward(x)
    return make(shape, dtype, device, seed=1), saved, args


def check(name, g, saved, args, equal=False):
    derivative = DERIVATIVES[name][0]
    g_before, saved_before = g.clone(), saved.clone()
    fast = derivative.fast(g, saved, *args)
    want = derivative.formula(g, saved, *args)
    assert fast.dtype == want.dtype and fast.shape == want.shape
    if equal:
        assert torch.equal(fast.nan_to_num(), want.nan_to_num())
    torch.testing.assert_close(fast, want, equal_nan=True, **FAST_TOL[g.dtype])
    # neither g nor the saved tensor is written to
    torch.testing.assert_close(g, g_before, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(saved, saved_before, rtol=0, atol=0, equal_nan=True)
    return fast


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [BLOCK, N_BLOCKED], ids=["one_block", "six_blocks"])
@pytest.mark.parametrize("name", DERIVATIVES)
def test_fast_matches_formula(name, numel, dtype, device):
    g, saved, args = inputs(name, (numel,), dtype, device)
    check(name, g, saved, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", DERIVATIVES)
def test_fast_matches_formula_with_nan_and_inf(name, dtype):
    # non-finite inputs, and g with NaN and +-inf
    g, saved, args = inputs(name, (N_BLOCKED,), dtype, special=True)
    nonfinite = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    if name != "relu":  # relu: 0 · inf = NaN at an inactive unit, where native gives 0
        g[1::50] = nonfinite.repeat(len(g[1::50]))[: len(g[1::50])]
    check(name, g, saved, args)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "leaky_relu_0", "leaky_relu_3"])
@pytest.mark.parametrize("numel", [BLOCK, N_BLOCKED], ids=["one_block", "six_blocks"])
def test_piecewise_linear_fast_is_exact(name, numel):
    # g or slope · g, bit for bit (NaN aside): the mask is exactly 1 or the slope
    g, saved, args = inputs(name, (numel,), torch.float32, special=True)
    check(name, g, saved, args, equal=True)


@pytest.mark.parametrize(
    "layout", ["expanded_grad", "transposed_grad", "transposed_both", "sliced_saved"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", DERIVATIVES)
def test_fast_matches_formula_non_contiguous(name, dtype, layout):
    # big enough to block, but not contiguous: one call over the strided tensors
    g, saved, args = inputs(name, (N_BLOCKED // 7, 14), dtype)
    if layout == "expanded_grad":
        g = make((1, 14), dtype, seed=2).expand(g.shape)
    elif layout == "transposed_grad":
        g = g.t().contiguous().t()
    elif layout == "transposed_both":
        g, saved = g.t().contiguous().t(), saved.t().contiguous().t()
    else:
        saved = torch.cat([saved, saved], 1)[:, ::2]
    assert not (g.is_contiguous() and saved.is_contiguous())
    check(name, g, saved, args)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("scratch", [0, 1, 2])
def test_blocks_cover_the_tensor_in_order(scratch, half):
    # The helper's slicing, on a kernel that records what it is given.
    dtype = torch.bfloat16 if half else torch.float64
    g = torch.arange(N_BLOCKED, dtype=torch.float64).to(dtype)
    saved = make((N_BLOCKED,), dtype)
    calls = []

    def kernel(g, saved, offset, *, out, tmp):
        calls.append((out.numel(), out.dtype, [(t.numel(), t.dtype) for t in tmp]))
        return torch.add(g, offset, out=out)

    out = activations._evaluate_fast(kernel, scratch, g, saved, 0.5)
    assert torch.equal(out, g + 0.5) and out.dtype == dtype
    blocked = bool(scratch or half)
    sizes = [BLOCK] * 5 + [17] if blocked else [N_BLOCKED]
    compute = torch.float32 if half else dtype
    assert calls == [(n, compute, [(n, compute)] * scratch) for n in sizes]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "ours,native",
    [
        (TF.sigmoid, torch.sigmoid),
        (TF.tanh, torch.tanh),
        (TF.relu, F.relu),
        (lambda x: TF.leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2)),
        (lambda x: TF.leaky_relu(x, -0.5), lambda x: F.leaky_relu(x, -0.5)),
        (TF.gelu, F.gelu),
        (lambda x: TF.gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh")),
        (TF.silu, F.silu),
    ],
    ids=["sigmoid", "tanh", "relu", "leaky_relu", "leaky_relu_neg", "gelu", "gelu_tanh", "silu"],
)
def test_blocked_backward_matches_native(ours, native, dtype):
    # Through autograd: first-order backward takes the fast path, here in blocks.
    x = make((N_BLOCKED // 7, 7), dtype, scale=3.0)
    out, (gx,) = grads(ours, x)
    ref, (rx,) = grads(native, x)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(gx, rx, **TOL[dtype])
