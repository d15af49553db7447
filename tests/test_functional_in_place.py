"""The in-place wrappers of ``torchbp.functional`` (``relu_``, ``leaky_relu_``, ``elu_``)
against their ``torch.nn.functional`` twins: the values written into the input, the
returned object, the gradients through a non-leaf, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchbp.ops import OPS

IN_PLACE = [op for op in OPS.values() if op.in_place is not None]
SLOPED = [op for op in IN_PLACE if op.input_if_negative]


def _positional(op, kwargs):
    """The variant's keywords as the in-place wrapper's positional arguments."""
    return [kwargs[k] for k in ("negative_slope", "alpha") if k in kwargs]


def _native(op):
    return getattr(F, op.name + "_")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    x[0, :3] = torch.tensor([0.0, -0.0, 1e-300], dtype=torch.float64)  # the kink's neighbours
    return x


@pytest.mark.parametrize("op", IN_PLACE, ids=[op.name for op in IN_PLACE])
def test_writes_native_values_into_the_input_and_returns_it(op):
    for kwargs in op.variants:
        args = _positional(op, kwargs)
        ours, native = _inputs(), _inputs()
        version = ours._version
        out = op.in_place(ours, *args)
        assert out is ours
        assert ours._version > version
        torch.testing.assert_close(ours, _native(op)(native, *args), rtol=0, atol=0)


@pytest.mark.parametrize("op", IN_PLACE, ids=[op.name for op in IN_PLACE])
def test_gradient_through_a_non_leaf_matches_native(op):
    for kwargs in op.variants:
        args = _positional(op, kwargs)
        if any(a < 0 for a in args):
            continue  # refused when autograd records the input (next test)
        grads = []
        for fn in (op.in_place, _native(op)):
            leaf = _inputs().requires_grad_()
            y = fn(leaf * 1.5, *args)
            (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("op", IN_PLACE, ids=[op.name for op in IN_PLACE])
def test_a_leaf_that_requires_grad_is_refused_as_native_refuses_it(op):
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        _native(op)(_inputs().requires_grad_())
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        op.in_place(_inputs().requires_grad_())


def _version_moves(write, requires_grad: bool) -> int:
    """How far ``write`` moves the version counter of a non-leaf (one autograd records
    when ``requires_grad``)."""
    x = _inputs().requires_grad_(requires_grad) * 1.0
    before = x._version
    write(x)
    return x._version - before


@pytest.mark.parametrize("op", IN_PLACE, ids=[op.name for op in IN_PLACE])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["unrecorded", "recorded"])
def test_the_version_counter_moves_as_natives_does(op, requires_grad):
    """One write, one version, in every in-place form (the in-place Function moved it
    twice where autograd records the input: its kernel's write, then ``mark_dirty``)."""
    module = op.module(inplace=True)
    forms = [
        (lambda x: op.in_place(x), lambda x: _native(op)(x)),
        (lambda x: op.functional(x, inplace=True), lambda x: op.torch_functional(x, inplace=True)),
        (module, op.torch_module(inplace=True)),
    ]
    for ours, native in forms:
        assert _version_moves(ours, requires_grad) == _version_moves(native, requires_grad)


@pytest.mark.parametrize("op", IN_PLACE, ids=[op.name for op in IN_PLACE])
def test_a_saved_input_overwritten_names_natives_versions(op):
    """Another op saved ``x``; the in-place activation then overwrote it: backward's
    error names the versions native's does ("is at version 1; expected version 0")."""
    messages = []
    for fn in (op.in_place, _native(op)):
        x = _inputs().requires_grad_() * 1.0
        product = x * x  # saves x at its version now
        fn(x)
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as error:
            product.sum().backward()
        messages.append(str(error.value).split("is at version")[1].split(".")[0])
    assert messages[0] == messages[1], messages


@pytest.mark.parametrize("op", SLOPED, ids=[op.name for op in SLOPED])
def test_a_negative_slope_is_refused_when_autograd_records_the_input(op):
    """Native refuses only at backward; torchbp at the call (see ``leaky_relu``)."""
    x = _inputs().requires_grad_() * 1.0
    with pytest.raises(RuntimeError, match=op.input_if_negative):
        op.in_place(x, -0.5)


class _Recording(torch.Tensor):
    """A tensor subclass that records the functions ``__torch_function__`` is handed."""

    handed: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.handed.append(func)
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("op", IN_PLACE, ids=[op.name for op in IN_PLACE])
def test_a_tensor_subclass_is_handed_the_in_place_function(op):
    """As native's ``F.relu_`` hands ``torch.relu_`` over: the wrapper itself, with its own
    arguments (it handed over ``relu`` with ``inplace=True``, which a subclass that tells
    in-place functions by name took for the out-of-place op)."""
    for kwargs in op.variants:
        args = _positional(op, kwargs)
        ours, native = _inputs().as_subclass(_Recording), _inputs()
        _Recording.handed.clear()
        out = op.in_place(ours, *args)
        assert _Recording.handed[0] is op.in_place
        assert out is ours
        torch.testing.assert_close(ours.as_subclass(torch.Tensor), _native(op)(native, *args))
