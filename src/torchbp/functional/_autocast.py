"""Autocast as native ops meet it, for the wrappers of :mod:`torchbp.functional`: the dtype
autocast would cast an op's inputs to, the cast itself, and a call run with autocast off
(torchbp's Functions take the inputs as cast, in their forward and backward)."""

from __future__ import annotations

import torch


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    device = t.device.type
    if device not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _cast_low(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # Autocast casts floating tensors other than float64, as native does.
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _run_without_autocast(device_type: str, fn, *args):
    with torch.autocast(device_type, enabled=False):
        return fn(*args)
