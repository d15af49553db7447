"""The MLP that :class:`~torchbp.lightning.ERMClassifier` trains: its activations and
backends by name, and :func:`build_mlp`."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, Literal

import torch

import torchbp.functional
import torchbp.nn
from torchbp.ops import activations

__all__ = ["ACTIVATIONS", "BACKENDS", "Activation", "Backend", "build_mlp", "check_choice"]

#: activation name -> class name in ``torchbp.nn`` / ``torch.nn``: every element-wise
#: activation of the op registry
ACTIVATIONS: dict[str, str] = {op.name: op.module.__name__ for op in activations()}

#: backend name -> its ``(nn, functional)`` modules: torchbp's twins or torch's own
BACKENDS: dict[str, tuple[ModuleType, ModuleType]] = {
    "torchbp": (torchbp.nn, torchbp.functional),
    "torch": (torch.nn, torch.nn.functional),
}

Backend = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]
Activation = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]


def check_choice(kind: str, value: str, choices: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the ``choices`` if ``value`` is none of them."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def build_mlp(
    input_size: int,
    num_classes: int,
    hidden_sizes: Sequence[int],
    activation: str = "relu",
    negative_slope: float = 0.01,
    bias: bool = True,
    backend: str = "torchbp",
) -> torch.nn.Sequential:
    """``Linear -> act -> ... -> Linear`` from ``backend``'s modules.

    Layers are constructed in the same order for both backends, and torchbp.nn mirrors
    torch.nn's initialisation, so the same RNG state gives identical weights.

    Args:
        input_size: Features of the input (``in_features`` of the first Linear layer).
        num_classes: Outputs of the last Linear layer.
        hidden_sizes: Widths of the hidden layers; ``[]`` gives one Linear layer.
        activation: Name of the hidden activation (a key of :data:`ACTIVATIONS`).
        negative_slope: Slope for ``x < 0`` of ``leaky_relu`` (ignored by the others).
        bias: Whether the Linear layers have a bias.
        backend: ``torchbp`` (``torchbp.nn`` modules) or ``torch`` (``torch.nn``).

    Returns:
        The network as a ``torch.nn.Sequential``.

    Raises:
        ValueError: An unknown ``backend`` or ``activation``.

    Examples::

        >>> build_mlp(4, 3, [8], activation="tanh")
        Sequential(
          (0): Linear(in_features=4, out_features=8, bias=True)
          (1): Tanh()
          (2): Linear(in_features=8, out_features=3, bias=True)
        )
    """
    check_choice("backend", backend, BACKENDS)
    check_choice("activation", activation, ACTIVATIONS)
    nn = BACKENDS[backend][0]
    act_cls = getattr(nn, ACTIVATIONS[activation])
    layers: list[torch.nn.Module] = []
    sizes = [input_size, *hidden_sizes]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        layers.append(act_cls(negative_slope) if activation == "leaky_relu" else act_cls())
    layers.append(nn.Linear(sizes[-1], num_classes, bias=bias))
    return torch.nn.Sequential(*layers)
