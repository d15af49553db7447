"""torchbp's functionals patched into :mod:`torch.nn.functional` in place of their native
namesakes, as kernel libraries patch functions (``F.softmax = torchbp.functional.softmax``):
the calls torchbp hands to native's function must reach native's, not the patched name
(which is torchbp's again: a RecursionError)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchbp


def _strided_nested() -> torch.Tensor:
    rows = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    return torch.nested.nested_tensor([rows, rows[:2]])


@pytest.mark.parametrize("name", ["softmax", "softmin"])
def test_patched_softmax_family_hands_a_nested_input_to_native(name, monkeypatch):
    native = getattr(F, name)
    expected = native(_strided_nested(), -1)
    monkeypatch.setattr(F, name, getattr(torchbp.functional, name))
    out = getattr(F, name)(_strided_nested(), -1)
    for got, want in zip(out.unbind(), expected.unbind()):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_patched_softmax_family_raises_natives_error_for_a_sparse_input(name, monkeypatch):
    sparse = torch.randn(3, 4).to_sparse()
    with pytest.raises(NotImplementedError):  # native's own refusal
        getattr(F, name)(sparse, -1)
    monkeypatch.setattr(F, name, getattr(torchbp.functional, name))
    with pytest.raises(NotImplementedError):  # not a RecursionError
        getattr(F, name)(sparse, -1)
