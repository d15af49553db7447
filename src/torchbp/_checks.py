"""Argument checks shared by the wrappers: clear errors that name the problem."""

from __future__ import annotations

import torch

from torchbp._execution import values_inspectable


class ShapeError(ValueError, RuntimeError):
    """A tensor has the wrong shape (a ``ValueError``; also a ``RuntimeError`` like
    native's, so existing ``except RuntimeError`` code keeps working)."""


class DTypeError(TypeError, RuntimeError):
    """A tensor has the wrong dtype (a ``TypeError`` and a ``RuntimeError``)."""


class DeviceError(ValueError, RuntimeError):
    """Tensors live on different devices."""


class InplaceError(ValueError, RuntimeError):
    """An in-place call that autograd could not differentiate."""


class ClassIndexError(IndexError, RuntimeError):
    """A class index lies outside ``[0, C)`` and is not ``ignore_index``."""


def check_inplace_slope(op: str, name: str, value: float, inplace: bool, input) -> None:
    """An in-place activation whose negative ``value`` (slope or alpha) flips the sign of
    the negative branch overwrites the only tensor that tells the branch: refuse it when
    autograd would need it (as native does, at backward)."""
    if inplace and value < 0 and torch.is_grad_enabled() and input.requires_grad:
        raise InplaceError(
            f"{op}: inplace=True with a negative {name} ({value}) cannot be differentiated "
            "(the input is overwritten and the sign of its result no longer tells the "
            "branch); use inplace=False"
        )


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in named.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in named.items())
        raise DeviceError(f"{op}: expected all tensors on one device, got {listing}")


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise DTypeError(f"{op}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def check_reduction(reduction: str) -> None:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(
            f"{reduction} is not a valid value for reduction (expected 'none', 'mean' or 'sum')"
        )


def check_class_indices(op: str, target: torch.Tensor, classes: int, ignore_index: int) -> bool:
    """Raise :class:`ClassIndexError` naming the first bad class index (eager only: on CUDA
    this costs one host sync, and it replaces a device-side assert).

    Returns whether every target is now known to be a class index in ``[0, C)`` other than
    ``ignore_index`` (so no row is ignored and the loss needs no masks).
    """
    if target.dtype not in (torch.int64, torch.uint8):
        raise DTypeError(
            f"{op}: expected class-index target of dtype int64 (Long) or uint8 (Byte), "
            f"got {target.dtype}"
        )
    if target.numel() == 0 or not values_inspectable(target):
        return False
    low, high = (int(v) for v in torch.aminmax(target))
    if 0 <= low and high < classes:  # the common case: one reduction
        return not low <= ignore_index <= high
    bad = ((target < 0) | (target >= classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad].reshape(-1)[0])
        raise ClassIndexError(
            f"{op}: target {value} is out of bounds: class indices must lie in [0, {classes}) "
            f"(C = {classes}) or equal ignore_index = {ignore_index}"
        )
    return False


def check_class_weight(op: str, weight: torch.Tensor | None, classes: int) -> None:
    if weight is None:
        return
    if weight.dim() != 1 or weight.shape[0] != classes:
        raise ShapeError(
            f"{op}: weight must have shape ({classes},), one entry per class, "
            f"got {tuple(weight.shape)}"
        )
    check_floating(op, "weight", weight)
    if weight.requires_grad:
        raise RuntimeError(
            f"{op}: class weights are not differentiable (as in torch.nn.functional); "
            "pass weight.detach()"
        )
