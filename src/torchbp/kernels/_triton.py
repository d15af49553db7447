"""What the Triton kernels' host code shares: whether Triton can run, and where.

:mod:`triton` itself is never imported at module import time, so that CPU-only installs
import torchbp without it.

With ``TRITON_INTERPRET=1`` in the environment, Triton's interpreter runs the kernels on
CPU tensors and each kernel's ``available`` accepts CPU tensors too (:func:`runs_on`);
this exists for testing without a GPU. Triton fixes the mode for the whole process when
it is first imported (its own library functions are then interpreted), so set the
variable before that, and do not mix interpreted and compiled kernels in one process.
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
