"""Linear: parity with F.linear over shapes, dtypes, layouts; gradcheck; saved tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests._support import DEVICES, TOL, grads, make
from torch.autograd import gradcheck, gradgradcheck

import torchbp.functional as TF

INPUT_SHAPES = [(3,), (5, 3), (2, 4, 3), (2, 1, 2, 3), (0, 3), (2, 0, 3), (1, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", INPUT_SHAPES, ids=str)
def test_parity_with_native(shape, bias, dtype, device):
    x = make(shape, dtype, device)
    w = make((4, 3), dtype, device, seed=1)
    args = (x, w) + ((make((4,), dtype, device, seed=2),) if bias else ())
    out, g = grads(TF.linear, *args)
    ref, r = grads(F.linear, *args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])
    for a, b in zip(g, r):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize(
    "layout", ["transposed_input", "sliced_input", "expanded_grad", "transposed_grad"]
)
def test_non_contiguous(layout):
    w, b = make((4, 6), torch.float64, seed=1), make((4,), torch.float64, seed=2)
    base = make((6, 5), torch.float64)
    x = {"transposed_input": base.t(), "sliced_input": make((5, 12), torch.float64)[:, ::2]}.get(
        layout, make((5, 6), torch.float64)
    )
    if layout == "expanded_grad":
        g = torch.ones((), dtype=torch.float64).expand(5, 4)
    elif layout == "transposed_grad":
        g = make((4, 5), torch.float64, seed=7).t()
    else:
        g = None
    out, gs = grads(TF.linear, x, w, b, grad_output=g)
    ref, rs = grads(F.linear, x, w, b, grad_output=g)
    torch.testing.assert_close(out, ref)
    for a, c in zip(gs, rs):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 2, 3)], ids=str)
def test_gradcheck_and_gradgradcheck(shape, bias):
    x = make(shape, torch.float64).requires_grad_()
    w = make((2, 3), torch.float64, seed=1).requires_grad_()
    args = (x, w) + ((make((2,), torch.float64, seed=2).requires_grad_(),) if bias else ())
    flags = dict(check_undefined_grad=True, check_batched_grad=True)
    assert gradcheck(
        TF.linear, args, check_forward_ad=True, check_batched_forward_grad=True, **flags
    )
    assert gradgradcheck(TF.linear, args, check_fwd_over_rev=True, **flags)


def test_bias_gradient_reduced_over_every_leading_dim():
    x = make((2, 3, 5, 4), torch.float64)
    w = make((6, 4), torch.float64, seed=1)
    b = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    g = make((2, 3, 5, 6), torch.float64, seed=2)
    TF.linear(x, w, b).backward(g)
    assert b.grad.shape == (6,)
    torch.testing.assert_close(b.grad, g.sum(dim=(0, 1, 2)))


@pytest.mark.parametrize("frozen", ["weight", "input"])
def test_saves_only_what_the_wanted_gradients_need(frozen):
    x = make((8, 4), torch.float32).requires_grad_(frozen == "weight")
    w = make((3, 4), torch.float32, seed=1).requires_grad_(frozen == "input")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        TF.linear(x, w)
    # dx needs only W; dW needs only x.
    assert [tuple(t.shape) for t in saved] == ([(3, 4)] if frozen == "weight" else [(8, 4)])


def test_complex_gradients_are_natives():
    """Native's gradients of y = x Wᵀ + b for complex tensors are g conj(W) and gᵀ conj(x);
    torchbp's g W and gᵀ x were silently another gradient."""
    x = torch.complex(make((4, 3), torch.float64, seed=1), make((4, 3), torch.float64, seed=11))
    x.requires_grad_()
    w = torch.complex(make((5, 3), torch.float64, seed=2), make((5, 3), torch.float64, seed=12))
    w.requires_grad_()
    b = torch.complex(make((5,), torch.float64, seed=3), make((5,), torch.float64, seed=13))
    b.requires_grad_()
    want = torch.autograd.grad(F.linear(x, w, b).abs().sum(), (x, w, b))
    got = torch.autograd.grad(TF.linear(x, w, b).abs().sum(), (x, w, b))
    for g, n in zip(got, want):
        torch.testing.assert_close(g, n)
    assert gradcheck(TF.linear, (x, w, b))
    assert gradgradcheck(TF.linear, (x, w, b))


_IN = 512  # long rows: float32 / float64 differ too (a last-bit difference)
_ROWS_INPUTS = {
    "3d": lambda dtype: make((4, 8, _IN), dtype),
    "4d": lambda dtype: make((2, 2, 8, _IN), dtype),
    "1d": lambda dtype: make((_IN,), dtype),
    "transposed": lambda dtype: make((8, 4, _IN), dtype).transpose(0, 1),
    "expanded": lambda dtype: make((1, 8, _IN), dtype).expand(4, 8, _IN),
}
_ROWS_BIASES = {"vector": (48,), "one": (1,), "scalar": (), "row": (1, 48), "rows": (8, 48)}


@pytest.mark.parametrize("bias_shape", _ROWS_BIASES.values(), ids=_ROWS_BIASES.keys())
@pytest.mark.parametrize("layout", _ROWS_INPUTS, ids=_ROWS_INPUTS.keys())
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str
)
def test_forward_with_bias_is_bitwise_natives(dtype, layout, bias_shape):
    # native adds a (out,), (1,) or (1, out) bias inside the GEMM of a contiguous input's
    # rows (addmm: one rounding), and any other as matmul, then add; torchbp added it after
    # the matmul for every input but 2-D (~28% of bf16 outputs differed in the last bit)
    x = _ROWS_INPUTS[layout](dtype).requires_grad_()
    w = (make((48, _IN), torch.float32, seed=1) / 32).to(dtype).requires_grad_()
    b = make(bias_shape, dtype, seed=2).requires_grad_()
    if x.dim() == 1 and b.dim() == 2:
        pytest.skip("an unbatched input with a (1, out) bias is computed as one 2-D row")
    out, g = grads(TF.linear, x, w, b)
    ref, r = grads(F.linear, x, w, b)
    assert torch.equal(out, ref)
    for a, c in zip(g, r):
        torch.testing.assert_close(a, c, **TOL[dtype])


@pytest.mark.parametrize("bias_shape", _ROWS_BIASES.values(), ids=_ROWS_BIASES.keys())
@pytest.mark.parametrize("layout", _ROWS_INPUTS, ids=_ROWS_INPUTS.keys())
def test_output_may_be_modified_in_place_as_natives(layout, bias_shape):
    # The output is the caller's to write into (ReLU(inplace=True) after a Linear): it must
    # not be a view made inside the Function, which autograd refuses to modify in place.
    # (grads() hands back a detached output, so this needs the live one.)
    x = _ROWS_INPUTS[layout](torch.float64)
    if x.dim() == 1 and len(bias_shape) == 2:
        pytest.skip("an unbatched input with a (1, out) bias is computed as one 2-D row")
    w = make((48, _IN), torch.float64, seed=1) / 32
    b = make(bias_shape, torch.float64, seed=2)
    results = []
    for fn in (TF.linear, F.linear):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        out = fn(*leaves)
        out.mul_(2).relu_()
        out.sum().backward()
        results.append((out.detach(), *(t.grad for t in leaves)))
    torch.testing.assert_close(results[0], results[1])


def _leaf_grads(op, x, w, b, g):
    """Gradients w.r.t. the leaves ``x`` and ``w`` of ``op`` applied to ``x.t()`` /
    ``w.t()`` where a leaf is stored transposed (first dim ``in`` = 3)."""
    operands = [t.t() if t.shape[0] == 3 else t for t in (x, w)]
    return torch.autograd.grad(op(*operands, b), (x, w), g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
@pytest.mark.parametrize("transposed", ["input", "weight", "both"])
def test_column_major_operands_get_natives_gradient_layout(transposed, dtype):
    # native's mm backward returns a column-major operand's gradient column-major (so a
    # transposed parameter's .grad needs no copy): the values and the strides must match
    x = make((3, 4), dtype, seed=0)  # stored (in, M): x.t() is a column-major (M, in)
    w = make((3, 5), dtype, seed=1)  # stored (in, out): w.t() is a column-major (out, in)
    if transposed == "weight":
        x = x.t().contiguous()
    if transposed == "input":
        w = w.t().contiguous()
    x.requires_grad_()
    w.requires_grad_()
    b, g = make((5,), dtype, seed=2), make((4, 5), dtype, seed=3)
    ours = _leaf_grads(TF.linear, x, w, b, g)
    native = _leaf_grads(F.linear, x, w, b, g)
    for got, want in zip(ours, native, strict=True):
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride()


@pytest.mark.parametrize("shape", [(2, 3, 8), (4, 8)])
def test_compiled_linear_with_bias_gives_eager_gradients(shape):
    # torch 2.11's compiled backward of a forward adding the bias into its fresh output in
    # place (add_, addmm's resize_) got every gradient of a 3-D input wrong
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape[:-1], 5, dtype=torch.float64)
    want = torch.autograd.grad(TF.linear(x, w, b), (x, w, b), g)
    compiled = torch.compile(TF.linear, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w, b), (x, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
