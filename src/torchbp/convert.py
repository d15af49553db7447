"""Swap the supported :mod:`torch.nn` modules of a model for torchbp's twins and back."""

from __future__ import annotations

import copy

from torch import nn

from torchbp.ops import module_twins

# Exact types only: a user subclass of nn.Linear may override forward, so it is left alone.
_TO_TORCHBP: dict[type[nn.Module], type[nn.Module]] = module_twins()
_TO_TORCH = {v: k for k, v in _TO_TORCHBP.items()}


def convert(module: nn.Module, inplace: bool = True, to: str = "torchbp") -> nn.Module:
    """Replace every supported submodule of ``module`` (recursively, in any container,
    ``module`` itself included) with its twin.

    Each torchbp module subclasses its torch.nn namesake with the same state, so a module
    is converted by switching its class: parameters, buffers, hooks and the training flag
    stay the very same objects. Unsupported modules (and user subclasses) are left alone.

    Args:
        module: the model.
        inplace: convert ``module`` itself (default); with ``False``, convert a deep copy
            (whose parameters are then copies, not shared).
        to: ``"torchbp"`` (default) or ``"torch"``.

    Returns:
        The converted module.

    Examples::

        >>> model = torchbp.convert(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()))
        >>> type(model[0]).__module__
        'torchbp.nn'
    """
    if to not in ("torchbp", "torch"):
        raise ValueError(f"convert: to must be 'torchbp' or 'torch', got {to!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(module).__name__}")
    mapping = _TO_TORCHBP if to == "torchbp" else _TO_TORCH
    if not inplace:
        module = copy.deepcopy(module)
    for sub in module.modules():
        twin = mapping.get(type(sub))
        if twin is not None:
            sub.__class__ = twin
    return module
