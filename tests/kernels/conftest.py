"""Fixtures of the Triton kernel tests."""

from __future__ import annotations

import pytest
from tests.kernels._interp import INTERPRETING, fix_interpreter_index, interpreter_index_broken


@pytest.fixture(scope="session", autouse=True)
def _interpreter_index_on_numpy_2():
    """Triton < 3.7's interpreter under numpy >= 2.4 fails on any runtime loop bound; in an
    interpreting process (``test_interpreter_suite``'s subprocess) apply the upstream fix
    for the session, so those tests also run on the Triton that torch 2.11 brings."""
    if not (INTERPRETING and interpreter_index_broken()):
        yield
        return
    undo = fix_interpreter_index()
    assert not interpreter_index_broken(), "the interpreter __index__ workaround did not take"
    yield
    undo()


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
