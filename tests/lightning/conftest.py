"""Shared helpers for the Lightning tests: tiny in-process CLI runs inside a temp folder."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytorch_lightning")
pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny MLPs run fastest (and most reproducibly) on one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
