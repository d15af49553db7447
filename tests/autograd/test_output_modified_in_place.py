"""An activation's output modified in place before backward, as native code does
(``h = act(x); h += skip``, ``nn.Dropout(inplace=True)`` after the activation).

Native allows it exactly where its out-of-place activation keeps its input (GELU, SiLU,
Softplus, LeakyReLU, ELU) and refuses it where it keeps its output (sigmoid, tanh, ReLU).
torchbp must do the same, through ``torchbp.functional``, :func:`torchbp.convert` and
:func:`torchbp.enable`: where native trains, with native's gradients. Which activations
allow it is found by running native, not listed here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests._support import ACTIVATIONS, make

import torchbp

MODIFIED = "modified by an inplace operation"


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


@pytest.mark.parametrize("variant", ACTIVATIONS, ids=str)
def test_functional_output_modified_in_place_is_allowed_or_refused_as_natively(variant):
    x0, skip = make((3, 4), torch.float64, scale=2.0), make((3, 4), torch.float64, seed=3)
    if not _native_allows(variant):
        x = x0.clone().requires_grad_()
        with pytest.raises(RuntimeError, match=MODIFIED):
            _add_skip_in_place(variant.ours, x * 1, skip).backward()
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
def test_dropout_in_place_after_the_activation_trains_as_natively(variant):
    _, native_cls = variant.modules()
    x = make((5, 4), torch.float64)
    native = _mlp_with_dropout_in_place(native_cls)
    converted = torchbp.convert(copy.deepcopy(native))
    routed = copy.deepcopy(native)
    if not _native_allows(variant):
        for model, under_enable in ((native, False), (converted, False), (routed, True)):
            with pytest.raises(RuntimeError, match=MODIFIED):
                _train_step(model, x, under_enable)
        return
    want = _train_step(native, x)
    assert type(converted[1]) is not native_cls  # torchbp's module ran
    for got in (_train_step(converted, x), _train_step(routed, x, under_enable=True)):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
