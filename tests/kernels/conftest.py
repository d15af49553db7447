"""Fixtures of the Triton kernel tests."""

from __future__ import annotations

import pytest
from tests.kernels._interp import INTERPRETING


@pytest.fixture
def interpret(monkeypatch):
    """Kernels run in Triton's interpreter on CPU tensors (the process started so)."""
    assert INTERPRETING
    monkeypatch.delenv("TORCHBP_TRITON", raising=False)


@pytest.fixture
def compiled(monkeypatch):
    """Kernels run compiled, on a GPU."""
    assert not INTERPRETING
    monkeypatch.delenv("TORCHBP_TRITON", raising=False)
