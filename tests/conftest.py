"""Shared test helpers: devices, per-dtype tolerances, a seed fixture.

* ``DEVICES`` -- ``["cpu", "cuda"]`` as pytest params; the CUDA one carries the ``cuda``
  marker and is skipped without a GPU. Any test that takes a ``device`` argument (and does
  not parametrise it itself) is run once per device.
* ``TOL`` -- ``rtol`` / ``atol`` per dtype for comparisons with native (from
  ``tests/_support.py``); the ``close`` fixture calls :func:`torch.testing.assert_close`
  with them.
* ``seed`` -- seeds torch's global generator (0) before the test.
"""

from __future__ import annotations

import pytest
import torch
from tests._support import DEVICES, TOL


def tol(dtype: torch.dtype) -> dict[str, float]:
    """``atol`` / ``rtol`` keyword arguments for ``dtype``."""
    return dict(TOL[dtype])


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


@pytest.fixture
def close():
    """``close(actual, expected, dtype=None)``: assert_close with the per-dtype tolerance
    (of ``expected``'s dtype unless given); dtypes must match too."""

    def _close(actual, expected, dtype: torch.dtype | None = None, **kwargs):
        kw = tol(dtype or expected.dtype) if expected.is_floating_point() else {}
        kw.update(kwargs)
        torch.testing.assert_close(actual, expected, **kw)

    return _close
