"""The checks of what a user passes to ``per_sample_grads`` and to ``ps.add_noise``.

Each check raises, naming the argument, before the context or any gradient changes:
``TypeError`` for a value of the wrong kind, ``ValueError`` for one out of range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import TypeGuard

import torch

__all__ = [
    "MODES",
    "checked_max_norm",
    "checked_mode",
    "checked_noise_multiplier",
    "checked_statistics",
    "refuse_unrepresentable_std",
    "refuse_unusable_generator",
]

MODES = ("norms", "grads", "clip")


def checked_mode(mode: object) -> str:
    """``mode``, one of :data:`MODES`.

    Raises:
        ValueError: any other value.
    """
    if mode not in MODES:
        raise ValueError(
            f"per_sample_grads: mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}"
        )
    return mode


def checked_max_norm(mode: str, max_norm: object) -> float | None:
    """``max_norm`` as a float: a positive finite number (or a 0-dim real tensor of one) in
    clip mode, ``None`` otherwise.

    Raises:
        TypeError: clip mode without a number (``None`` included).
        ValueError: clip mode with one that is not positive and finite, or another mode
            with one.
    """
    if mode != "clip":
        if max_norm is not None:
            raise ValueError(
                f"per_sample_grads: max_norm is used only by mode='clip' (mode={mode!r})"
            )
        return None
    if _is_real_scalar_tensor(max_norm):
        max_norm = max_norm.item()  # (as torch.nn.utils.clip_grad_norm_ takes one)
    if not _is_number(max_norm):
        raise TypeError(
            f"per_sample_grads: mode='clip' needs max_norm, a positive number; got {max_norm!r}"
        )
    if not (_is_finite(max_norm) and max_norm > 0):
        raise ValueError(f"per_sample_grads: max_norm must be positive and finite, got {max_norm}")
    return float(max_norm)


def checked_statistics(statistics: object) -> bool:
    """``statistics``, a bool.

    Raises:
        TypeError: any other value (an int included).
    """
    if not isinstance(statistics, bool):
        raise TypeError(f"per_sample_grads: statistics must be a bool, got {statistics!r}")
    return statistics


def checked_noise_multiplier(noise_multiplier: object) -> float:
    """``add_noise``'s ``σ``: a finite number ``>= 0``.

    Raises:
        TypeError: not a number.
        ValueError: negative or not finite.
    """
    if not _is_number(noise_multiplier):
        raise TypeError(
            f"per_sample_grads: noise_multiplier must be a number, got {noise_multiplier!r}"
        )
    if not (_is_finite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(
            f"per_sample_grads: noise_multiplier must be finite and >= 0, got {noise_multiplier}"
        )
    return noise_multiplier


def refuse_unrepresentable_std(
    grad_dtypes: Iterable[torch.dtype], noise_multiplier: float, max_norm: float, std: float
) -> None:
    """Raise, before any gradient changes, if the noise std ``σC`` is not a finite
    number of every gradient's dtype (the noise, drawn in it, would be ±inf, or torch
    would fail midway through the parameters).

    Raises:
        ValueError: naming ``σ``, ``C``, their product and the dtype.
    """
    for dtype in dict.fromkeys(grad_dtypes):
        largest = torch.finfo(dtype).max
        if not (math.isfinite(std) and std <= largest):
            raise ValueError(
                f"per_sample_grads: the noise std noise_multiplier * max_norm = "
                f"{noise_multiplier} * {max_norm} = {std} is beyond the largest "
                f"{dtype} number ({largest:.4g}), the dtype of the gradients"
            )


def refuse_unusable_generator(parameters: Iterable[torch.Tensor], generator: object) -> None:
    """Raise, before any gradient changes, if ``generator`` is neither ``None`` nor a
    :class:`torch.Generator` of every parameter's device type (torch.randn would fail at
    the first parameter it cannot draw for, after the noise of the others was added).

    Raises:
        TypeError: not a :class:`torch.Generator`.
        ValueError: a generator of another device type than a parameter's.
    """
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "per_sample_grads: add_noise's generator must be a torch.Generator or None, "
            f"got {type(generator).__name__}"
        )
    # the device type, which is what torch.randn checks (not on meta, where it
    # draws nothing and takes any generator)
    for device in dict.fromkeys(p.device.type for p in parameters):
        if device not in (generator.device.type, "meta"):
            raise ValueError(
                f"per_sample_grads: add_noise's generator is on {generator.device.type}, "
                f"but parameters are on {device}: give a generator of the parameters' "
                "device (or None for each device's global one)"
            )


def _is_real_scalar_tensor(value: object) -> TypeGuard[torch.Tensor]:
    """A 0-dim tensor of a real dtype (not bool, not complex), off the meta device."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not (value.dtype == torch.bool or value.is_complex() or value.is_meta)
    )


def _is_finite(value: float) -> bool:
    """Whether ``value`` is a finite float (an int too large for one is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_number(value: object) -> TypeGuard[float]:
    """A real number: Python's or numpy's (``True`` is not one here; a type checker takes
    it for a float)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
