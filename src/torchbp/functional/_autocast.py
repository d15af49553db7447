"""Autocast as native ops meet it, for the wrappers of :mod:`torchbp.functional`: the dtype
autocast would cast an op's inputs to, the cast itself, and a call run with autocast off
(torchbp's Functions take the inputs as cast, in their forward and backward)."""

from __future__ import annotations

import torch


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``t``'s op inputs to on ``t``'s device, or None where
    autocast is off there (or the device has none, ``meta``: torch's query raises there).
    Any device type with an autocast counts (``hpu``, ``xla``, ``mtia``, a privateuse1
    backend by its registered name), as native's ops see it."""
    device = _device_type(t)
    # every supported torch (2.11+) has these; a literal tuple, not a global: the common
    # call stays as fast as before (``is_autocast_available`` adds 0.6 us)
    if device not in ("cpu", "cuda", "xpu", "mps") and not torch.amp.is_autocast_available(device):
        return None
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _device_type(t: torch.Tensor) -> str:
    """``t.device.type``; for a plain CPU or CUDA tensor read from ``is_cpu`` / ``is_cuda``
    (a fifth of the cost: ``device`` builds a ``torch.device`` on every call of every
    wrapper). A subclass may report another device than its storage's (a fake tensor's
    storage is on the meta device): its ``device`` is asked."""
    if type(t) is torch.Tensor:
        if t.is_cpu:
            return "cpu"
        if t.is_cuda:
            return "cuda"
    return t.device.type


def _cast_low(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # Autocast casts floating tensors other than float64, as native does.
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _run_without_autocast(device_type: str, fn, *args):
    with torch.autocast(device_type, enabled=False):
        return fn(*args)
