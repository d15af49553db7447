"""The per-call fast paths of the hot wrappers take the same decisions as the full paths
they skip: ``linear``'s one-test common call (:func:`torchbp._checks.plain_linear`)
against its full checks, and ``apply``'s unwrapping of dead torch.func wrappers, asked
only where a tensor argument lacks storage."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import torchbp.functional as TF
from torchbp import _checks
from torchbp._execution import any_without_storage
from torchbp.autograd import _compile

INPUTS = [(), (3,), (2, 3), (2, 4, 3), (2, 4), (0, 3)]
WEIGHTS = [(5, 3), (3,), (5, 4), (), (2, 5, 3)]
BIASES = [None, (5,), (1,), (), (1, 5), (4,), (2, 4, 5), "number"]
# (input's, weight's, bias's) dtype and device
KINDS = [
    (torch.float32, torch.float32, torch.float32, "cpu"),
    (torch.float64, torch.float32, torch.float32, "cpu"),
    (torch.float32, torch.float32, torch.float64, "cpu"),
    (torch.float32, torch.float32, torch.float32, "meta"),  # the bias on another device
    (torch.float64, torch.float64, torch.float64, "cpu"),
]


def _tensor(shape, dtype, device="cpu"):
    if shape == "number":
        return 1.0
    if shape is None:
        return None
    return torch.randn(shape, dtype=dtype, device=device)


def _outcome(fn, *args):
    """What ``fn(*args)`` gives: its output's shape, dtype and values, or its error's
    class and message."""
    try:
        out = fn(*args)
    except Exception as error:  # noqa: BLE001 - the class is what is compared
        return type(error), str(error)
    return out.shape, out.dtype, out.detach().tolist()


def _full_checks(monkeypatch):
    """``linear`` without its fast path: every call through the full checks."""
    monkeypatch.setattr(_checks, "plain_linear", lambda *args: False)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(map(str, k)))
def test_plain_linear_decides_as_the_full_checks(monkeypatch, kind):
    """For every combination of shapes (valid and invalid), dtypes and devices, linear
    gives the same output or raises the same error (class and message) with and without
    its one-test common call; and the calls it takes as common pass every full check."""
    in_dtype, w_dtype, b_dtype, b_device = kind
    plain_taken = 0
    for x_shape, w_shape, b_shape in itertools.product(INPUTS, WEIGHTS, BIASES):
        torch.manual_seed(0)
        x, w = _tensor(x_shape, in_dtype), _tensor(w_shape, w_dtype)
        b = _tensor(b_shape, b_dtype, b_device)
        if _checks.plain_linear(x, w, b):
            plain_taken += 1
            _checks.validate_linear(x, w, b)
            _checks.check_linear_dtypes("linear", x, w, b, "weight", "bias")
        fast = _outcome(TF.linear, x, w, b)
        with monkeypatch.context() as patch:
            _full_checks(patch)
            full = _outcome(TF.linear, x, w, b)
        assert fast == full, (x_shape, w_shape, b_shape)
    assert plain_taken > 0 or in_dtype != w_dtype  # (some bias-free call is common)


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"),
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.int64, torch.int64)],
)
def test_plain_linear_under_autocast_as_the_full_checks(monkeypatch, x_dtype, w_dtype):
    """Under CPU autocast (bfloat16) the casts come after the common-call test: equal
    dtypes stay equal, mixed ones are cast alike or refused as before."""
    x = torch.randn(4, 3).to(x_dtype)
    w, b = torch.randn(5, 3).to(w_dtype), torch.randn(5).to(w_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = _outcome(TF.linear, x, w, b)
        with monkeypatch.context() as patch:
            _full_checks(patch)
            full = _outcome(TF.linear, x, w, b)
    assert fast == full


def test_plain_linear_refuses_nested_and_non_tensors():
    """The calls that leave for native's op or raise are never taken as common."""
    w, b = torch.randn(5, 3), torch.randn(5)
    nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
    jagged = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], layout=torch.jagged)
    assert _checks.plain_linear(torch.randn(2, 3), w, b)
    assert _checks.plain_linear(torch.randn(2, 3), w, None)
    assert _checks.plain_linear(torch.randn(3), w, b)
    for x in (nested, jagged, [[1.0, 2.0, 3.0]], None):
        assert not _checks.plain_linear(x, w, b)
    assert not _checks.plain_linear(torch.randn(2, 3), w.tolist(), b)
    assert not _checks.plain_linear(torch.randn(2, 3), w, b.tolist())
    ours, native = TF.linear(jagged, w, b), F.linear(jagged, w, b)
    assert all(torch.equal(o, n) for o, n in zip(ours.unbind(), native.unbind(), strict=True))


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=str)
def test_nested_bias_decides_as_the_full_checks(monkeypatch, layout):
    """A nested bias (whose shape cannot be read) is no common call either."""
    x, w = torch.randn(2, 3), torch.randn(5, 3)
    bias = torch.nested.nested_tensor([torch.randn(5), torch.randn(5)], layout=layout)
    assert not _checks.plain_linear(x, w, bias)
    fast = _outcome(TF.linear, x, w, bias)
    with monkeypatch.context() as patch:
        _full_checks(patch)
        assert _outcome(TF.linear, x, w, bias) == fast


def test_any_without_storage():
    plain = torch.randn(3)
    sparse = torch.randn(2, 3).to_sparse()
    assert not any_without_storage((plain, None, 1.0, "x", plain.to("meta")))
    assert any_without_storage((plain, sparse))
    seen = []
    vmap(lambda t: seen.append(any_without_storage((plain, t))) or t)(torch.randn(2, 3))
    assert seen == [True]


def _dead_wrapper():
    """A tensor that escaped ``torch.func.grad``: a TensorWrapper whose level is gone."""
    leaked = []

    def loss(x):
        leaked.append(x)
        return x.sum()

    grad(loss)(torch.randn(4, 3))
    return leaked[0]


def test_dead_wrapper_is_unwrapped_for_apply():
    """A dead torch.func wrapper passed to a torchbp Function is unwrapped (as
    ``Function.apply`` does, and native's ops) before the Function sees it: the graph is
    recorded on the tensor it wraps, so the wrapper is no input of it, as with native's
    op; values and the other inputs' gradients are native's."""
    dead = _dead_wrapper()
    assert any_without_storage((dead,))
    w = torch.randn(5, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    ours, native = TF.linear(dead, w, b), F.linear(dead, w, b)
    torch.testing.assert_close(ours, native)
    for out in (ours, native):
        with pytest.raises(RuntimeError, match="not have been used in the graph"):
            torch.autograd.grad(out.sum(), dead, retain_graph=True)
    ours_grads = torch.autograd.grad(ours.sum(), (w, b))
    torch.testing.assert_close(ours_grads, torch.autograd.grad(native.sum(), (w, b)))


def test_dead_wrapper_is_unwrapped_for_an_activation():
    """The same for a one-input Function: relu of a dead wrapper (of a tensor that needs
    no gradient) records nothing, as native's."""
    dead = _dead_wrapper()
    assert dead.requires_grad  # (the wrapper's own flag, from grad's level)
    ours, native = TF.relu(dead), F.relu(dead)
    torch.testing.assert_close(ours, native)
    assert not native.requires_grad
    assert not ours.requires_grad


def test_apply_passes_plain_tensors_through():
    """A call whose tensors all have storage reaches the Function with those very tensors
    (nothing to unwrap)."""
    x = torch.randn(2, 3)
    seen = []

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(t, scale):
            seen.append(t)
            return t * scale

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g, None

    _compile.apply(_compile.pair(Identity), x, 2.0)
    assert seen[0] is x
