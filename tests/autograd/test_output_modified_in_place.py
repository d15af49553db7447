"""An activation's output modified in place before backward, as native code does
(``h = act(x); h += skip``, ``nn.Dropout(inplace=True)`` after the activation).

Native allows it exactly where its out-of-place activation keeps its input (GELU, SiLU,
Softplus, LeakyReLU, ELU) and refuses it where it keeps its output (sigmoid, tanh, ReLU).
torchbp does the same, through ``torchbp.functional``, :func:`torchbp.convert` and
:func:`torchbp.enable` (where native trains, with native's gradients), except where it
keeps the output and native the input (LeakyReLU with slope >= 0, ELU with alpha >= 0:
half the saved bytes of a LeakyReLU MLP, a closed issue's requirement): there its backward
raises torch's RuntimeError with a line naming the reason and the out-of-place form. Which
activations native allows it for is found by running native, and what torchbp keeps is
read from the registry, not listed here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests._support import ACTIVATIONS, make

import torchbp

MODIFIED = "modified by an inplace operation"
# the line torchbp adds under torch's error
KEEPS_OUTPUT = r"keeps its output for backward \(half the saved memory of native's"
WORKAROUND = r"use the out-of-place form \(nn\.Dropout\(\), h = h \+ skip\)"
CLEAR = f"(?s){MODIFIED}.*{KEEPS_OUTPUT}.*{WORKAROUND}"
# the name the line gives each op's module
_NAMES = {"leaky_relu": "LeakyReLU", "elu": "ELU"}


def _add_skip_in_place(act, x, skip):
    """``h = act(x); h += skip``, then a loss of ``h``."""
    h = act(x)
    h += skip
    return (h * h).sum()


def _native_allows(variant) -> bool:
    """Whether native's backward runs after its activation's output was modified in place."""
    x = make((3, 4), torch.float64).requires_grad_()
    try:
        _add_skip_in_place(variant.native, x * 1, 1.0).backward()
    except RuntimeError as error:
        assert MODIFIED in str(error)
        return False
    return True


def _keeps_output_where_native_trains(variant) -> bool:
    """Whether torchbp keeps the output where native keeps the input (and so trains)."""
    return variant.saves == "output" and _native_allows(variant)


def _assert_clear_error(error_info, name: str) -> None:
    """torch's own RuntimeError text first, then torchbp's line naming ``name``."""
    assert error_info.type is RuntimeError
    text = str(error_info.value)
    assert text.index(MODIFIED) < text.index(f"torchbp's {name} keeps its output")


def test_the_registry_has_an_activation_that_keeps_its_output_where_native_trains():
    # else the tests of the clear error below would check nothing
    kept = {v.op.name for v in ACTIVATIONS if _keeps_output_where_native_trains(v)}
    assert kept == {"leaky_relu", "elu"}


@pytest.mark.parametrize("variant", ACTIVATIONS, ids=str)
def test_functional_output_modified_in_place_is_allowed_or_refused(variant):
    x0, skip = make((3, 4), torch.float64, scale=2.0), make((3, 4), torch.float64, seed=3)
    if _keeps_output_where_native_trains(variant):
        x = x0.clone().requires_grad_()
        loss = _add_skip_in_place(variant.ours, x * 1, skip)
        with pytest.raises(RuntimeError, match=CLEAR) as error:
            loss.backward()
        _assert_clear_error(error, _NAMES[variant.op.name])
        return
    if not _native_allows(variant):
        x = x0.clone().requires_grad_()
        with pytest.raises(RuntimeError, match=MODIFIED) as error:
            _add_skip_in_place(variant.ours, x * 1, skip).backward()
        assert "torchbp" not in str(error.value)  # torch's own error, as natively
        return
    grads = []
    for act in (variant.ours, variant.native):
        x = x0.clone().requires_grad_()
        _add_skip_in_place(act, x * 1, skip).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def _mlp_with_dropout_in_place(module_cls):
    """``Linear -> activation -> Dropout(inplace=True) -> Linear``: the dropout writes into
    the activation's output."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        module_cls(),
        torch.nn.Dropout(0.3, inplace=True),
        torch.nn.Linear(6, 2),
    ).double()


def _train_step(model, x, under_enable=False):
    """Forward (the same dropout mask every time) and backward; the parameters' grads."""
    torch.manual_seed(1)
    if under_enable:
        with torchbp.enable():
            loss = model(x).square().sum()
    else:
        loss = model(x).square().sum()
    loss.backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("variant", ACTIVATIONS, ids=str)
def test_dropout_in_place_after_the_activation_trains_or_is_refused(variant):
    _, native_cls = variant.modules()
    x = make((5, 4), torch.float64)
    native = _mlp_with_dropout_in_place(native_cls)
    converted = torchbp.convert(copy.deepcopy(native))
    routed = copy.deepcopy(native)
    assert type(converted[1]) is not native_cls  # torchbp's module runs
    ours = ((converted, False), (routed, True))
    if _keeps_output_where_native_trains(variant):
        _train_step(copy.deepcopy(native), x)  # native trains
        for model, under_enable in ours:
            with pytest.raises(RuntimeError, match=CLEAR) as error:
                _train_step(model, x, under_enable)
            _assert_clear_error(error, _NAMES[variant.op.name])
        return
    if not _native_allows(variant):
        for model, under_enable in ((native, False), *ours):
            with pytest.raises(RuntimeError, match=MODIFIED):
                _train_step(model, x, under_enable)
        return
    want = _train_step(native, x)
    for got in (_train_step(converted, x), _train_step(routed, x, under_enable=True)):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_backward_twice_keeps_torchs_error_alone():
    # the line is added only under the in-place error: a second backward through freed
    # saved tensors keeps torch's own message
    x = make((3, 4), torch.float64).requires_grad_()
    loss = torchbp.functional.leaky_relu(x * 1).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time") as e:
        loss.backward()
    assert "torchbp" not in str(e.value)


def _add_skip(act, x, skip):
    """``h = act(x); h = h + skip`` (out of place), then a loss of ``h``."""
    h = act(x)
    h = h + skip
    return (h * h).sum()


@pytest.mark.parametrize("variant", ACTIVATIONS, ids=str)
def test_compiled_output_modified_in_place_gets_the_true_gradient(variant):
    # torch.compile functionalizes ``h += skip`` with no version check, so a backward from
    # the saved output read the modified values: LeakyReLU's slope 1 for 0.01, ReLU's mask
    # of h + skip, silently (native trains with the true gradient after LeakyReLU, ELU,
    # and refuses at compile after ReLU, sigmoid, tanh). While compiling, torchbp keeps the
    # input: the gradient is that of what was computed, written out of place natively.
    x0, skip = make((3, 4), torch.float64, scale=2.0), make((3, 4), torch.float64, seed=3)
    torch.compiler.reset()
    x = x0.clone().requires_grad_()
    compiled = torch.compile(_add_skip_in_place, backend="aot_eager", fullgraph=True)
    compiled(variant.ours, x * 1, skip).backward()
    want = x0.clone().requires_grad_()
    _add_skip(variant.native, want * 1, skip).backward()
    torch.testing.assert_close(x.grad, want.grad, rtol=1e-12, atol=1e-14)


def _backward_with_create_graph(loss, x):
    torch.autograd.grad(loss(x), x, create_graph=True)


def _backward_under_torch_func_grad(loss, x):
    torch.func.grad(loss)(x.detach())


@pytest.mark.parametrize("run", [_backward_with_create_graph, _backward_under_torch_func_grad])
@pytest.mark.parametrize("op", ["leaky_relu", "elu"])
def test_clear_error_for_double_backward_and_torch_func(op, run):
    # the line is added wherever torchbp's backward reads the modified output: a backward
    # building a graph for double backward, and torch.func.grad's (its own Function class)
    def loss(x):
        return _add_skip_in_place(getattr(torchbp.functional, op), x * 1, 1.0)

    x = make((3, 4), torch.float64).requires_grad_()
    with pytest.raises(RuntimeError, match=CLEAR) as error:
        run(loss, x)
    _assert_clear_error(error, _NAMES[op])
