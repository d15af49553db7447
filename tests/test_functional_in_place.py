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


def _in_place_forms(op):
    """``(ours, native)`` for each in-place form: ``relu_``, ``relu(inplace=True)`` and
    ``nn.ReLU(inplace=True)`` (and LeakyReLU's, ELU's)."""
    return [
        (lambda x: op.in_place(x), lambda x: _native(op)(x)),
        (lambda x: op.functional(x, inplace=True), lambda x: op.torch_functional(x, inplace=True)),
        (op.module(inplace=True), op.torch_module(inplace=True)),
    ]


@pytest.mark.parametrize("op", IN_PLACE, ids=[op.name for op in IN_PLACE])
def test_an_unrecorded_write_moves_the_version_counter_as_natives_does(op):
    """Nothing records the input: native's kernel writes it, one version."""
    for ours, native in _in_place_forms(op):
        assert _version_moves(ours, False) == _version_moves(native, False)


@pytest.mark.parametrize("op", IN_PLACE, ids=[op.name for op in IN_PLACE])
def test_a_recorded_write_moves_the_version_counter(op):
    """Autograd records the input: the write is seen (native's moves 1, the Function's 2:
    its write, then ``mark_dirty``; ``autograd/activations.py`` says why not 1)."""
    for ours, native in _in_place_forms(op):
        assert _version_moves(ours, True) >= _version_moves(native, True) > 0


@pytest.mark.parametrize("op", IN_PLACE, ids=[op.name for op in IN_PLACE])
def test_a_saved_input_overwritten_is_refused_at_backward_as_native(op):
    """Another op saved ``x``; the in-place activation then overwrote it: backward
    refuses, as native's does."""
    for fn in (op.in_place, _native(op)):
        x = _inputs().requires_grad_() * 1.0
        product = x * x  # saves x at its version now
        fn(x)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            product.sum().backward()


@pytest.mark.parametrize("op", IN_PLACE, ids=[op.name for op in IN_PLACE])
@pytest.mark.parametrize("earlier_writes", [0, 1], ids=["fresh", "written_before"])
def test_allow_mutation_on_saved_tensors_keeps_what_another_op_saved(op, earlier_writes):
    """Under ``allow_mutation_on_saved_tensors`` an in-place op clones a tensor saved for
    backward before overwriting it, found by its data pointer and version: the
    activation's write must be seen on ``x`` itself (a write through ``x.data``, whose
    version is 0, went unseen once ``x`` had been written: ``sin``'s backward read the
    activation's output, a silent wrong gradient)."""
    grads = []
    for ours, native in _in_place_forms(op):
        for fn in (ours, native):
            leaf = _inputs().requires_grad_()
            with torch.autograd.graph.allow_mutation_on_saved_tensors():
                x = leaf * 1.0
                for _ in range(earlier_writes):
                    x.mul_(1.0)
                saved_by_sin = x.sin()
                fn(x)
                (saved_by_sin + x).sum().backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[-2], grads[-1], rtol=0, atol=0)


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
