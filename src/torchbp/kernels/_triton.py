"""What the Triton kernels' host code shares: whether Triton can run, and where.

:mod:`triton` itself is never imported at module import time, so that CPU-only installs
import torchbp without it.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch


def requested() -> bool:
    """Whether the user opted in to the Triton kernels (``TORCHBP_TRITON=1``)."""
    return os.environ.get("TORCHBP_TRITON") == "1"


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def importable() -> bool:
    """Whether :mod:`triton` imports (checked once)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing driver libraries, ...)
        return False
    return True


def runs_on(t: torch.Tensor) -> bool:
    """Whether a kernel can take this tensor: a CUDA one, or a CPU one in the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current device: make it ``device``."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
