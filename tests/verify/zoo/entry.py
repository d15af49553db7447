"""One entry of the bug zoo: a buggy autograd Function beside its correct twin."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ZooEntry", "seeded"]


@dataclass(frozen=True)
class ZooEntry:
    """A realistic bug and the correct Function it should have been.

    Args:
        name: short identifier of the bug (test ids, table rows).
        family: formulas, loss_options, numerics, aliasing, structure or layouts.
        description: the bug in one line.
        bug: the buggy Function (class or callable).
        twin: the correct Function, same signature.
        inputs: builds fresh example inputs (tensors and plain scalars).
        reference: the native torch callable both must match, or None.
        expected: names of the checks that diagnose the bug; the report must fail at
            least one of them.
        kwargs: extra keyword arguments of ``check_function`` (for bug and twin).
    """

    name: str
    family: str
    description: str
    bug: Callable[..., Any]
    twin: Callable[..., Any]
    inputs: Callable[[], tuple[Any, ...]]
    reference: Callable[..., Any] | None
    expected: frozenset[str]
    kwargs: dict[str, Any] = field(default_factory=dict)


def seeded(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Standard-normal float64 values of ``shape``, reproducible, times ``scale`` plus ``shift``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
