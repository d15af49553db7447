"""Shared test hooks: every test taking ``device`` runs per device; a seed fixture.

* ``DEVICES`` -- ``["cpu", "cuda"]`` as pytest params; the CUDA one carries the ``cuda``
  marker and is skipped without a GPU. Any test that takes a ``device`` argument (and does
  not parametrise it itself) is run once per device.
* ``seed`` -- seeds torch's global generator (0) before the test.
"""

from __future__ import annotations

import pytest
import torch
from tests._support import DEVICES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames and not _parametrized(metafunc, "device"):
        metafunc.parametrize("device", DEVICES)


def _parametrized(metafunc: pytest.Metafunc, name: str) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if name in names:
            return True
    return False


@pytest.fixture
def seed() -> int:
    """Seed torch's global generator so that the test is deterministic."""
    torch.manual_seed(0)
    return 0
