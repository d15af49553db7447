"""torchbp's losses patched into :mod:`torch.nn.functional` in place of their native
namesakes, as kernel libraries patch functions (``F.cross_entropy = their_fn``): the calls
torchbp hands to native's function (a sparse or strided nested argument) must reach
native's, not the patched name (which is torchbp's again: a RecursionError)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchbp

_LOSSES = ["cross_entropy", "nll_loss"]


def _logits() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def _target() -> torch.Tensor:
    return torch.tensor([0, 3, 1])


def _strided_nested(rows: torch.Tensor) -> torch.Tensor:
    return torch.nested.nested_tensor([rows, rows[:2]])


def _sparse_input():
    return _logits().to_sparse(), _target(), None


def _sparse_csr_input():
    return _logits().to_sparse_csr(), _target(), None


def _sparse_target():
    return _logits(), _target().to_sparse(), None


def _sparse_weight():
    return (
        _logits(),
        _target(),
        torch.rand(4, generator=torch.Generator().manual_seed(1)).to_sparse(),
    )


def _nested_input_and_target():
    return _strided_nested(_logits()), _strided_nested(_target()), None


_NATIVE_ROUTES = {
    "sparse_input": _sparse_input,
    "sparse_csr_input": _sparse_csr_input,
    "sparse_target": _sparse_target,
    "sparse_weight": _sparse_weight,
    "nested_input_and_target": _nested_input_and_target,
}


def _natives_outcome(fn, args):
    """``(result, None)`` or ``(None, exception)`` of ``fn(*args)``."""
    try:
        return fn(*args), None
    except Exception as error:  # native's own refusal, whatever its class
        return None, error


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("route", sorted(_NATIVE_ROUTES))
@pytest.mark.parametrize("name", _LOSSES)
def test_patched_loss_hands_a_native_layout_to_native(name, route, monkeypatch):
    args = _NATIVE_ROUTES[route]()
    expected, native_error = _natives_outcome(getattr(F, name), args)
    monkeypatch.setattr(F, name, getattr(torchbp.functional, name))
    if native_error is None:
        torch.testing.assert_close(getattr(F, name)(*args), expected)
        return
    # native's error (class and message), not a RecursionError
    with pytest.raises(type(native_error)) as raised:
        getattr(F, name)(*args)
    assert str(raised.value) == str(native_error)
