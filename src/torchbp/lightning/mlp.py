"""The MLP that :class:`~torchbp.lightning.ERMClassifier` trains: its activations and
backends by name, and :func:`build_mlp`."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, Literal

import torch

import torchbp.functional
import torchbp.nn
from torchbp.ops import activations

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "Activation",
    "Backend",
    "build_mlp",
    "check_choice",
    "check_layer_sizes",
]

#: activation name -> class name in ``torchbp.nn`` / ``torch.nn``: every element-wise
#: activation of the op registry
ACTIVATIONS: dict[str, str] = {op.name: op.module.__name__ for op in activations()}

#: backend name -> its ``(nn, functional)`` modules: torchbp's twins or torch's own
BACKENDS: dict[str, tuple[ModuleType, ModuleType]] = {
    "torchbp": (torchbp.nn, torchbp.functional),
    "torch": (torch.nn, torch.nn.functional),
}

#: the names a config or a type checker accepts (spelled out so that both can read them;
#: tests/lightning/test_module.py holds them equal to the two tables above)
Backend = Literal["torchbp", "torch"]
Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu", "gelu", "silu", "elu", "softplus"]


def check_choice(kind: str, value: str, choices: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the ``choices`` if ``value`` is none of them."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


def check_layer_sizes(input_size: Any, num_classes: Any, hidden_sizes: Any) -> list[int]:
    """The layer sizes of an MLP, checked: ints (a bool is refused, though torch's
    ``nn.Linear(True, ...)`` takes it as one feature; a float failed deep inside torch),
    ``input_size`` and the hidden sizes >= 1, ``num_classes`` >= 2; returns
    ``hidden_sizes`` as a list of ints.

    Raises:
        TypeError: A size that is no int, or ``hidden_sizes`` that is no sequence of them.
        ValueError: A size below its minimum.
    """
    if isinstance(hidden_sizes, (str, bytes, Mapping)) or not isinstance(hidden_sizes, Iterable):
        raise TypeError(f"hidden_sizes must be a list of ints, got {hidden_sizes!r}")
    hidden_sizes = list(hidden_sizes)
    _check_int("input_size", input_size)
    _check_int("num_classes", num_classes)
    for i, size in enumerate(hidden_sizes):
        _check_int(f"hidden_sizes[{i}]", size)
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if any(size < 1 for size in hidden_sizes):
        raise ValueError(f"hidden_sizes must be positive integers, got {hidden_sizes}")
    return [int(size) for size in hidden_sizes]


def _check_int(name: str, value: Any) -> None:
    """Raise a ``TypeError`` naming ``name`` if ``value`` is no int (or is a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")


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
        TypeError: A size that is no int (see :func:`check_layer_sizes`).
        ValueError: An unknown ``backend`` or ``activation``, or a size below its minimum.

    Examples::

        >>> build_mlp(4, 3, [8], activation="tanh")
        Sequential(
          (0): Linear(in_features=4, out_features=8, bias=True)
          (1): Tanh()
          (2): Linear(in_features=8, out_features=3, bias=True)
        )
    """
    hidden_sizes = check_layer_sizes(input_size, num_classes, hidden_sizes)
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
