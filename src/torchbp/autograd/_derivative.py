"""Evaluating an element-wise derivative ``g · f'``: the reference formula, or a fast kernel.

Every activation Function calls :func:`derivative` with its formula, written in
differentiable torch ops beside the Function. For a first-order eager backward (nothing
will differentiate the result) a kernel from :mod:`torchbp.kernels` computes the same
numbers in fewer passes: the Triton one on CUDA when asked for (``TORCHBP_TRITON=1``), else
the CPU one where the activation has one. Double backward, torch.func and torch.compile
get the formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchbp._execution import first_order_eager
from torchbp.kernels import _triton, cpu_act, triton_act

_HALF = (torch.float16, torch.bfloat16)


def derivative(
    name: str, formula: Callable[..., torch.Tensor], g: torch.Tensor | None, saved, *args
) -> torch.Tensor | None:
    """``formula(g, saved, *args)`` (``g · f'`` of activation ``name``), ``None`` for an
    undefined ``g``. Half-precision tensors are computed in float32 and rounded once, as
    native kernels do (``1 - y²`` in bfloat16 loses every digit as ``y -> 1``)."""
    if g is None:
        return None
    if first_order_eager(g):
        if _triton.requested() and triton_act.available(g, saved) and triton_act.supports(name):
            return triton_act.act_backward(name, g, saved, *args)
        if name in cpu_act.KERNELS:
            return cpu_act.backward(name, g, saved, *args)
    return reference(formula, g, saved, *args)


def reference(formula: Callable[..., torch.Tensor], g: torch.Tensor, saved, *args):
    """``formula(g, saved, *args)``, in float32 for half-precision tensors (rounded once)."""
    if g.dtype in _HALF:
        return formula(g.float(), saved.float(), *args).to(g.dtype)
    return formula(g, saved, *args)
