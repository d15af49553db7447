"""Activations: parity with native, gradcheck / gradgradcheck, kinks, NaN/inf, in-place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests._support import DEVICES, TOL, grads, make
from torch.autograd import gradcheck, gradgradcheck

import torchbp.functional as TF

# name -> (torchbp op, native op, has a kink at 0)
OPS = {
    "sigmoid": (TF.sigmoid, torch.sigmoid, False),
    "tanh": (TF.tanh, torch.tanh, False),
    "relu": (TF.relu, F.relu, True),
    "leaky_relu": (TF.leaky_relu, F.leaky_relu, True),
    "leaky_relu_0.2": (lambda x: TF.leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2), True),
    "leaky_relu_0": (lambda x: TF.leaky_relu(x, 0.0), lambda x: F.leaky_relu(x, 0.0), True),
    "leaky_relu_neg": (lambda x: TF.leaky_relu(x, -0.5), lambda x: F.leaky_relu(x, -0.5), True),
    "gelu": (TF.gelu, F.gelu, False),
    "gelu_tanh": (lambda x: TF.gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh"), False),
    "silu": (TF.silu, F.silu, False),
}
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (0, 4)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def away_from_kink(x: torch.Tensor) -> torch.Tensor:
    # |x| >= 0.1: finite differences with eps 1e-6 never straddle 0.
    return x + 0.1 * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_parity_with_native(name, shape, dtype, device):
    ours, native, _ = OPS[name]
    x = make(shape, dtype, device, scale=3.0)
    out, (gx,) = grads(ours, x)
    ref, (rx,) = grads(native, x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(gx, rx, **TOL[dtype])


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_grad", "transposed_grad"])
@pytest.mark.parametrize("name", OPS)
def test_non_contiguous(name, layout):
    ours, native, _ = OPS[name]
    base = make((6, 8), torch.float64, scale=2.0)
    x = {"transposed": base.t(), "sliced": base[:, ::2]}.get(layout, base)
    assert layout.endswith("grad") or not x.is_contiguous()
    if layout == "expanded_grad":
        g = torch.ones(()).to(torch.float64).expand(x.shape)
    elif layout == "transposed_grad":
        g = make(x.shape[::-1], torch.float64, seed=5).t()
    else:
        g = None
    out, (gx,) = grads(ours, x, grad_output=g)
    ref, (rx,) = grads(native, x, grad_output=g)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(gx, rx, **TOL[torch.float64])


@pytest.mark.parametrize("name", OPS)
def test_gradcheck_and_gradgradcheck(name):
    ours, _, _ = OPS[name]
    x = away_from_kink(make((3, 4), torch.float64)).requires_grad_()
    flags = dict(check_undefined_grad=True, check_batched_grad=True)
    assert gradcheck(ours, (x,), check_forward_ad=True, check_batched_forward_grad=True, **flags)
    assert gradgradcheck(ours, (x,), check_fwd_over_rev=True, **flags)


@pytest.mark.parametrize("name", [n for n, (_, _, kink) in OPS.items() if kink])
def test_gradient_at_kink_equals_native(name):
    ours, native, _ = OPS[name]
    x = torch.tensor([-1.0, -0.0, 0.0, 1e-30, 1.0], dtype=torch.float64)
    _, (gx,) = grads(ours, x, grad_output=torch.full((5,), 3.0, dtype=torch.float64))
    _, (rx,) = grads(native, x, grad_output=torch.full((5,), 3.0, dtype=torch.float64))
    assert torch.equal(gx, rx)


@pytest.mark.parametrize("name", OPS)
def test_nan_and_inf_propagate_as_native(name):
    ours, native, _ = OPS[name]
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, -2.0])
    out, (gx,) = grads(ours, x, grad_output=torch.ones(5))
    ref, (rx,) = grads(native, x, grad_output=torch.ones(5))
    torch.testing.assert_close(out, ref, equal_nan=True)
    torch.testing.assert_close(gx, rx, equal_nan=True)


def test_sigmoid_saturates_without_overflow():
    x = torch.tensor([-1000.0, 1000.0, -80.0, 80.0], requires_grad=True)
    y = TF.sigmoid(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y[0] == 0 and y[1] == 1 and torch.all(x.grad[:2] == 0)


def test_tanh_derivative_is_one_minus_tanh_squared():
    x = make((50,), torch.float64).requires_grad_()
    TF.tanh(x).sum().backward()
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_leaky_relu_definition():
    # f(x) = x for x >= 0, α x otherwise.
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    torch.testing.assert_close(TF.leaky_relu(x, 0.1), torch.tensor([-0.2, -0.05, 0.0, 0.5, 2.0]))


@pytest.mark.parametrize(
    "ours,native",
    [
        (lambda x: TF.relu(x, inplace=True), lambda x: F.relu(x, inplace=True)),
        (lambda x: TF.leaky_relu(x, 0.1, True), lambda x: F.leaky_relu(x, 0.1, True)),
        (lambda x: TF.silu(x, inplace=True), lambda x: F.silu(x, inplace=True)),
    ],
    ids=["relu", "leaky_relu", "silu"],
)
def test_inplace_matches_native_under_autograd(ours, native):
    x0 = make((4, 5), torch.float64)
    results = []
    for fn in (ours, native):
        leaf = x0.clone().requires_grad_()
        h = leaf * 2  # a non-leaf, as in a real network
        out = fn(h)
        assert out is h  # the result lives in the input's storage
        (out * out).sum().backward()
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize(
    "fn",
    [lambda x: TF.relu(x, inplace=True), lambda x: TF.leaky_relu(x, 0.1, inplace=True)],
    ids=["relu", "leaky_relu"],
)
def test_inplace_on_leaf_requiring_grad_raises_like_native(fn):
    x = make((3,), torch.float32).requires_grad_()
    with pytest.raises(RuntimeError, match="leaf Variable"):
        fn(x)


@pytest.mark.parametrize("name", OPS)
def test_no_input_or_grad_output_overwritten(name):
    ours, _, _ = OPS[name]
    x = make((4, 6), torch.float32, scale=2.0).requires_grad_()
    g = make((4, 6), torch.float32, seed=3)
    x_before, g_before = x.detach().clone(), g.clone()
    ours(x).backward(g)
    assert torch.equal(x.detach(), x_before) and torch.equal(g, g_before)


@pytest.mark.parametrize("name", OPS)
def test_retain_graph_second_backward(name):
    ours, _, _ = OPS[name]
    x = make((5,), torch.float64).requires_grad_()
    y = ours(x).sum()
    (g1,) = torch.autograd.grad(y, x, retain_graph=True)
    (g2,) = torch.autograd.grad(y, x)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize(
    "name,args",
    [
        ("_sigmoid_grad", ()),
        ("_tanh_grad", ()),
        ("_relu_grad", ()),
        ("_leaky_relu_grad", (0.1,)),
        ("_leaky_relu_grad", (-0.5,)),
        ("_gelu_grad", ("none",)),
        ("_gelu_grad", ("tanh",)),
        ("_silu_grad", ()),
    ],
)
def test_fast_first_order_backward_matches_formula(name, args):
    # The in-place first-order path against the differentiable formula, same inputs.
    from torchbp.autograd import activations

    derivative = getattr(activations, name)
    saved = make((1000,), torch.float64, scale=3.0)
    if name in ("_sigmoid_grad", "_tanh_grad", "_relu_grad"):
        out = {"_sigmoid_grad": torch.sigmoid, "_tanh_grad": torch.tanh, "_relu_grad": torch.relu}
        saved = out[name](saved)
        saved[:3] = torch.tensor([0.0, -0.0, float("nan")], dtype=saved.dtype)
    g = make((1000,), torch.float64, seed=1)
    g_before, saved_before = g.clone(), saved.clone()
    fast = derivative.fast(g, saved, *args)
    want = derivative.formula(g, saved, *args)
    torch.testing.assert_close(fast, want, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert torch.equal(g, g_before)
    torch.testing.assert_close(saved, saved_before, rtol=0, atol=0, equal_nan=True)
