"""Softmax / softmin / log-softmax: parity, dims, dtype argument, max trick, gradcheck."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from tests._support import DEVICES, TOL, grads, make
from torch.autograd import gradcheck, gradgradcheck

import torchbp.functional as TF
import torchbp.nn

OPS = {
    "softmax": (TF.softmax, F.softmax),
    "softmin": (TF.softmin, F.softmin),
    "log_softmax": (TF.log_softmax, F.log_softmax),
}
CASES = [((), 0), ((5,), 0), ((0,), 0), ((3, 5), 1), ((3, 5), 0), ((2, 3, 4), -1), ((2, 0, 4), 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,dim", CASES, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_parity_with_native(name, shape, dim, dtype, device):
    ours, native = OPS[name]
    x = make(shape, dtype, device, scale=4.0)
    out, (gx,) = grads(lambda t: ours(t, dim), x)
    ref, (rx,) = grads(lambda t: native(t, dim), x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(gx, rx, **TOL[dtype])


@pytest.mark.parametrize("name", OPS)
def test_dtype_argument_casts_first(name):
    ours, native = OPS[name]
    x = make((3, 4), torch.float32)
    out = ours(x, 1, dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, native(x, 1, dtype=torch.float64))


@pytest.mark.parametrize("name", OPS)
def test_implicit_dim_warns_and_picks_native_dim(name):
    ours, native = OPS[name]
    for shape in [(4,), (3, 4), (2, 3, 4), (2, 3, 4, 5)]:
        x = make(shape, torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ours(x)
        assert any("Implicit dimension choice" in str(w.message) for w in caught)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(out, native(x))


def _implicit_dim_warning(fn, x, stacklevel):
    """``(message, filename, lineno)`` of ``fn(x)``'s implicit-dim warning, called from a
    helper whose caller (this function) ``_stacklevel=4`` names."""

    def helper():
        return fn(x, _stacklevel=stacklevel)

    with pytest.warns(UserWarning, match="Implicit dimension choice") as record:
        helper()
    (warning,) = record
    return str(warning.message), warning.filename, warning.lineno


@pytest.mark.parametrize("stacklevel", [3, 4])
@pytest.mark.parametrize("name", OPS)
def test_implicit_dim_warning_names_the_op_and_points_where_natives_does(name, stacklevel):
    ours, native = OPS[name]
    x = make((3, 4), torch.float64)
    got = _implicit_dim_warning(ours, x, stacklevel)
    assert got == _implicit_dim_warning(native, x, stacklevel)
    assert f"choice for {name} " in got[0]


@pytest.mark.filterwarnings("ignore:Implicit dimension choice:UserWarning")
@pytest.mark.parametrize("module", [False, True], ids=["functional", "module"])
@pytest.mark.parametrize("name", OPS)
def test_implicit_dim_compiles_with_fullgraph_as_natives(name, module):
    """Dynamo cannot trace ``warnings.warn``: the implicit-dim call (and the nn twins
    built without ``dim``) refused ``torch.compile(fullgraph=True)``, which native's
    takes (it warns once, at compilation, from inside torch)."""
    ours, native = OPS[name]
    if module:
        twin = {"softmax": "Softmax", "softmin": "Softmin", "log_softmax": "LogSoftmax"}[name]
        ours = getattr(torchbp.nn, twin)()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    out, (gx,) = grads(compiled, make((3, 4), torch.float64))
    ref, (rx,) = grads(native, make((3, 4), torch.float64))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)


@pytest.mark.parametrize("name", OPS)
def test_max_trick_keeps_huge_logits_finite(name):
    ours, native = OPS[name]
    x = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-1e38, 1e38, 0.0]], requires_grad=True)
    out = ours(x, 1)
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out, native(x.detach(), 1))


@pytest.mark.parametrize("name", OPS)
def test_masked_entries_and_nan_propagate_as_native(name):
    ours, native = OPS[name]
    x = torch.tensor([[0.5, -float("inf"), 1.0], [float("nan"), 0.0, 1.0], [-float("inf")] * 3])
    out, (gx,) = grads(lambda t: ours(t, 1), x, grad_output=torch.ones(3, 3))
    ref, (rx,) = grads(lambda t: native(t, 1), x, grad_output=torch.ones(3, 3))
    torch.testing.assert_close(out, ref, equal_nan=True)
    torch.testing.assert_close(gx, rx, equal_nan=True)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("name", OPS)
def test_gradcheck_and_gradgradcheck(name, dim):
    ours, _ = OPS[name]
    x = make((3, 4), torch.float64).requires_grad_()
    fn = lambda t: ours(t, dim)  # noqa: E731
    flags = dict(check_undefined_grad=True, check_batched_grad=True)
    assert gradcheck(fn, (x,), check_forward_ad=True, check_batched_forward_grad=True, **flags)
    assert gradgradcheck(fn, (x,), check_fwd_over_rev=True, **flags)


def test_softmax_is_a_distribution():
    p = TF.softmax(make((6, 9), torch.float64, scale=10.0), dim=1)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", OPS)
def test_half_precision_is_rounded_once_as_natives(name, dtype):
    """Native's kernels compute half-precision softmax / log-softmax in float32 and round
    once. torchbp rounded x - max to the half dtype first, and exp() turns that rounding
    (half an ulp of |x - max|, 0.06 at 20 in bfloat16) into a relative error of up to 7 %
    in the small probabilities (native: 0.4 %); both backwards rounded each step too (up
    to twice native's error). (log_softmax's forward keeps native's roundings.)"""
    ours, native = OPS[name]
    x = make((64, 100), torch.float64, seed=5, scale=4.0).to(dtype)
    g = make((64, 100), torch.float64, seed=6).to(dtype)
    exact, (exact_dx,) = grads(lambda t: native(t, 1), x.double(), grad_output=g.double())
    got, (got_dx,) = grads(lambda t: ours(t, 1), x, grad_output=g)
    if name == "softmax":  # probabilities: relative, correctly rounded (within 2^-8)
        finite = exact > torch.finfo(dtype).tiny  # float16 flushes the tiniest to 0
        torch.testing.assert_close(got.double()[finite], exact[finite], rtol=2**-8, atol=0)
    _, (native_dx,) = grads(lambda t: native(t, 1), x, grad_output=g)
    ours_error = (got_dx.double() - exact_dx).abs().max()
    native_error = (native_dx.double() - exact_dx).abs().max()
    assert ours_error <= 1.25 * native_error, (ours_error, native_error)


LAYOUTS = {
    "transposed": lambda: torch.randn(5, 4, dtype=torch.float64).t(),
    "channels_last": lambda: torch.randn(2, 3, 4, 5, dtype=torch.float64).to(
        memory_format=torch.channels_last
    ),
    "permuted": lambda: torch.randn(2, 3, 4, dtype=torch.float64).permute(2, 0, 1),
    # empty: contiguous() keeps any strides of an empty tensor (log_softmax kept them)
    "empty_transposed": lambda: torch.randn(0, 5, dtype=torch.float64).t(),
    "empty_channels_last": lambda: torch.randn(0, 3, 4, 5, dtype=torch.float64).to(
        memory_format=torch.channels_last
    ),
    "empty_permuted": lambda: torch.randn(3, 0, 5, dtype=torch.float64).permute(2, 0, 1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", OPS)
def test_output_is_contiguous_as_natives_for_any_input_layout(name, layout):
    """Native returns a contiguous softmax / log-softmax whatever the input's strides;
    torchbp's output kept a transposed or channels_last input's strides, so ``.view(-1)``
    after it raised where native's works (and log_softmax kept an empty input's strides,
    which ``contiguous()`` leaves as they are)."""
    ours, native = OPS[name]
    x0 = LAYOUTS[layout]()
    for dim in range(x0.dim()):
        x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
        out = ours(x, dim)
        ref = native(x, dim)
        assert out.stride() == ref.stride()
        torch.testing.assert_close(out.view(-1), ref.view(-1))
        g = torch.randn_like(ref)
        (gx,) = torch.autograd.grad(out, x, g)
        (rx,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(gx, rx)


@pytest.mark.parametrize("name", OPS)
def test_non_contiguous_input_keeps_jvp_vmap_and_double_backward(name):
    ours, _ = OPS[name]
    x = torch.randn(4, 5, dtype=torch.float64).t().requires_grad_()
    flags = {"check_forward_ad": True, "check_batched_forward_grad": True}
    assert gradcheck(lambda t: ours(t, 0), (x,), **flags)
    assert gradgradcheck(lambda t: ours(t, 1), (x,), check_fwd_over_rev=True)
    batched = torch.func.vmap(lambda t: ours(t, 0), in_dims=1)(x.detach())
    assert batched.is_contiguous()
    torch.testing.assert_close(batched, OPS[name][1](x.detach().t(), 1))


def test_nn_softmax_and_enabled_tensor_method_give_contiguous_output():
    import torchbp

    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert torchbp.nn.Softmax(dim=1)(x).view(-1).shape == (120,)
    assert torchbp.nn.LogSoftmax(dim=1)(x).view(-1).shape == (120,)
    with torchbp.enable():
        assert x.softmax(1).is_contiguous() and x.log_softmax(1).is_contiguous()
