"""torchbp's activations and ``linear`` patched into :mod:`torch.nn.functional` in place of
their native namesakes, as kernel libraries patch functions (``F.gelu = torchbp.functional.gelu``):
every call torchbp hands to native's function (its Functions' forwards, an in-place call that
nothing records, a sparse or nested input, the GELU backward kernel) must reach native's, not
the patched name (which is torchbp's again: a RecursionError)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import torchbp

# name -> extra positional arguments (a negative slope / alpha tells the branches apart)
_OUT_OF_PLACE = {
    "relu": (),
    "leaky_relu": (0.1,),
    "gelu": (),
    "silu": (),
    "elu": (0.5,),
    "softplus": (2.0, 5.0),
}
_IN_PLACE = ["relu", "leaky_relu", "silu", "elu"]


def _input() -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _native_value_and_grad(name: str, *args) -> tuple[torch.Tensor, torch.Tensor]:
    x = _input().requires_grad_()
    y = getattr(F, name)(x, *args)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


def _patch_with_torchbp(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setattr(F, name, getattr(torchbp.functional, name))


@pytest.mark.parametrize("name", list(_OUT_OF_PLACE))
def test_patched_activation_runs_forward_and_backward(name, monkeypatch):
    args = _OUT_OF_PLACE[name]
    expected, expected_grad = _native_value_and_grad(name, *args)
    _patch_with_torchbp(monkeypatch, name)
    value, grad = _native_value_and_grad(name, *args)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_patched_gelu_tanh_runs_forward_and_backward(monkeypatch):
    x = _input().requires_grad_()
    expected = F.gelu(x, approximate="tanh")
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    _patch_with_torchbp(monkeypatch, "gelu")
    value = F.gelu(x, approximate="tanh")
    (grad,) = torch.autograd.grad(value.sum(), x)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("name", _IN_PLACE)
def test_patched_activation_in_place_under_no_grad(name, monkeypatch):
    args = _OUT_OF_PLACE[name]
    expected = getattr(F, name)(_input(), *args)
    _patch_with_torchbp(monkeypatch, name)
    x = _input()
    with torch.no_grad():
        out = getattr(F, name)(x, *args, inplace=True)
    assert out is x
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("name", ["leaky_relu", "elu"])
def test_patched_in_place_variant_where_autograd_records(name, monkeypatch):
    # the Function writes with native's in-place op (F.leaky_relu_ / F.elu_)
    args = _OUT_OF_PLACE[name]
    expected, expected_grad = _native_value_and_grad(name, *args)
    _patch_with_torchbp(monkeypatch, name, f"{name}_")
    x = _input().requires_grad_()
    h = x * 1.0
    assert getattr(F, f"{name}_")(h, *args) is h
    h.backward(torch.ones_like(h))
    torch.testing.assert_close(h.detach(), expected)
    torch.testing.assert_close(x.grad, expected_grad)


def _result_or_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as error:
        return type(error)


def _assert_same(got, want) -> None:
    if isinstance(want, type):
        assert got is want
        return
    for got_part, want_part in zip(got.unbind(), want.unbind(), strict=True):
        torch.testing.assert_close(got_part, want_part)


@pytest.mark.parametrize("name", list(_OUT_OF_PLACE))
def test_patched_activation_hands_a_sparse_input_to_native(name, monkeypatch):
    sparse = _input().to_sparse()
    args = _OUT_OF_PLACE[name]
    expected = _result_or_error(getattr(F, name), sparse, *args)  # relu's result, others' error
    _patch_with_torchbp(monkeypatch, name)
    got = _result_or_error(getattr(F, name), sparse, *args)
    if isinstance(expected, type):
        assert got is expected
    else:
        assert got.layout == torch.sparse_coo
        torch.testing.assert_close(got.to_dense(), expected.to_dense())


def _strided_nested() -> torch.Tensor:
    rows = _input()
    with warnings.catch_warnings():  # the prototype-stage warning of the strided layout
        warnings.simplefilter("ignore", UserWarning)
        return torch.nested.nested_tensor([rows, rows[:2]])


@pytest.mark.parametrize("name", list(_OUT_OF_PLACE))
def test_patched_activation_hands_a_nested_input_to_native(name, monkeypatch):
    args = _OUT_OF_PLACE[name]
    expected = _result_or_error(getattr(F, name), _strided_nested(), *args)
    _patch_with_torchbp(monkeypatch, name)
    _assert_same(_result_or_error(getattr(F, name), _strided_nested(), *args), expected)


def test_patched_linear_hands_a_nested_input_to_native(monkeypatch):
    weight = torch.randn(3, 6, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    expected = F.linear(_strided_nested(), weight, bias)
    _patch_with_torchbp(monkeypatch, "linear")
    _assert_same(F.linear(_strided_nested(), weight, bias), expected)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_patched_torch_sigmoid_and_tanh_run_forward_and_backward(name, monkeypatch):
    x = _input().requires_grad_()
    expected = getattr(torch, name)(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    sparse = _input().to_sparse()
    expected_sparse = _result_or_error(getattr(torch, name), sparse)  # tanh's, sigmoid's error
    monkeypatch.setattr(torch, name, getattr(torchbp.functional, name))
    value = getattr(torch, name)(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)
    got_sparse = _result_or_error(getattr(torch, name), sparse)  # handed to native's
    if isinstance(expected_sparse, type):
        assert got_sparse is expected_sparse
    else:
        torch.testing.assert_close(got_sparse.to_dense(), expected_sparse.to_dense())


@pytest.mark.parametrize(("name", "args"), [("silu", ()), ("softplus", (1.0, 20.0))])
def test_kernels_computing_sigmoid_take_natives_when_torch_sigmoid_is_patched(
    name, args, monkeypatch
):
    expected, expected_grad = _native_value_and_grad(name, *args)
    monkeypatch.setattr(torch, "sigmoid", torchbp.functional.sigmoid)
    x = _input().requires_grad_()
    y = getattr(torchbp.functional, name)(x, *args)
    y.backward(torch.ones_like(y))  # the first-order kernel writes sigmoid with out=
    torch.testing.assert_close(y.detach(), expected)
    torch.testing.assert_close(x.grad, expected_grad)


_FORMULAS_WITH_SIGMOID_OR_TANH = [
    ("sigmoid", "silu", {}),
    ("sigmoid", "softplus", {"beta": 2.0, "threshold": 5.0}),
    ("tanh", "gelu", {"approximate": "tanh"}),
]


@pytest.mark.parametrize(("patched", "name", "kwargs"), _FORMULAS_WITH_SIGMOID_OR_TANH)
def test_formulas_take_natives_under_torch_compile_when_patched(patched, name, kwargs, monkeypatch):
    # a compiled backward runs the derivative formula, which Dynamo traces strictly: torchbp's
    # sigmoid / tanh in it (reading a layout) was refused, "Strict mode banned op"
    x = _input().requires_grad_()
    expected = getattr(F, name)(x, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    monkeypatch.setattr(torch, patched, getattr(torchbp.functional, patched))
    compiled = torch.compile(getattr(torchbp.functional, name), backend="aot_eager", fullgraph=True)
    y = compiled(x, **kwargs)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(grad, expected_grad)
