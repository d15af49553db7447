"""Triton kernel for the first-order backward of the element-wise activations on CUDA.

Computes exactly what the derivative formulas of :mod:`torchbp.autograd.activations`
compute — ``dx = g · f'`` from the upstream gradient ``g`` and the tensor the Function
saved (the output ``y`` for sigmoid, tanh and ReLU; for LeakyReLU its input, or its
output where the slope is >= 0 and so the output's sign is the input's; the input ``x``
for GELU and SiLU) — in ONE pass over memory (read ``g`` and the saved tensor, write
``dx``), where the eager torch-op kernels make two to eight:

* grid ``(cdiv(n, BLOCK),)`` over the flattened tensors, ``BLOCK`` contiguous elements
  per program, the tail masked; offsets in int32 unless ``n`` needs int64;
* ``g`` and the saved tensor are loaded and upcast to float32, ``f'`` is evaluated in
  float32 and the product rounded once to the input dtype into a NEW buffer (neither
  input is written), as the formulas do for half-precision inputs;
* one kernel, the activation chosen by the ``OP`` constexpr (one compiled variant per
  activation and dtype): sigmoid ``g·(y(1 - y))``; tanh ``g·(1 - y·y)``; ReLU ``0`` where
  ``y <= 0``, else ``g`` (a NaN ``y`` passes ``g``, as native); LeakyReLU ``g`` where the
  saved tensor is ``> 0``, else ``g·slope``; exact GELU ``g·(Φ(x) + x φ(x))`` with
  ``Φ(x) = ½(1 + erf(x/√2))``, ``φ(x) = e^{-x²/2}/√(2π)``; tanh GELU
  ``g·(½(1 + t) + ½x(1 - t²)·√(2/π)(1 + 3c x²))``, ``t = tanh(√(2/π)(x + c x³))``,
  evaluated as ``½(1 + t) = σ(2u)`` and ``½(1 - t) = σ(-2u)`` from one ``e^{-2|u|}`` (no
  overflow, no cancellation as ``t -> ±1``); SiLU ``g·(s(1 + x(1 - s)))``,
  ``s = 1/(1 + e^{-x})`` (``e^{-x}`` overflowing to inf gives ``s = 0``).
  NaN and inf propagate as in the formulas; torch's own derivative kernels are never
  called.

``BLOCK`` and ``num_warps`` are not tuned on a GPU yet. No host synchronisation.
:mod:`triton` is imported lazily, on the first call of :func:`available` or
:func:`act_backward`, so that CPU-only installs import torchbp without it.

Under ``TRITON_INTERPRET=1`` the kernel runs in Triton's CPU interpreter, for tests (see
:mod:`torchbp.kernels._triton`).
"""

from __future__ import annotations

import functools

import torch

from torchbp._execution import values_inspectable
from torchbp.kernels import _triton

__all__ = ["act_backward", "available", "supports"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements per program, and warps per program (not tuned on a GPU yet): 8 elements per
# thread, i.e. 16-byte vector accesses of each tensor.
_BLOCK = 1024
_NUM_WARPS = 4
_INT32_MAX = 2**31 - 1


def available(g: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether :func:`act_backward` applies to these tensors: CUDA tensors (CPU ones too
    under ``TRITON_INTERPRET=1``) on one device, of one dtype among float16 / bfloat16 /
    float32 (float64 keeps the torch ops), of the same shape, both contiguous (an
    expanded or strided ``g`` keeps the torch ops, which read it in place), values that
    may be inspected (not while torch.compile traces, not under torch.func transforms),
    and an importable Triton."""
    if not (isinstance(g, torch.Tensor) and isinstance(saved, torch.Tensor)):
        return False
    if g.dtype not in _DTYPES or saved.dtype != g.dtype or g.shape != saved.shape:
        return False
    if not _triton.runs_on(g):
        return False
    if saved.device != g.device or not (g.is_contiguous() and saved.is_contiguous()):
        return False
    return values_inspectable(g) and values_inspectable(saved) and _triton.importable()


@functools.cache
def _kernel_module():
    """The jitted kernel's module (imported, and so Triton, on first use)."""
    from torchbp.kernels import _triton_act_kernel

    return _triton_act_kernel


def supports(op: str) -> bool:
    """Whether the kernel computes activation ``op`` (imports Triton: ask after
    :func:`available`)."""
    return op in _kernel_module().OPS


def act_backward(op: str, g: torch.Tensor, saved: torch.Tensor, *args) -> torch.Tensor:
    """``g · f'`` for the activation ``op`` (see :func:`supports`), from the upstream gradient
    ``g`` and the saved tensor, in a new tensor of their dtype and shape. ``args`` are
    the derivative formula's own: ``(slope,)`` for ``"leaky_relu"``, ``(approximate,)``
    for ``"gelu"`` (``"tanh"`` selects ``"gelu_tanh"``), none otherwise. Call only where
    :func:`available` holds."""
    slope = 0.0
    if op == "leaky_relu":
        (slope,) = args
    elif op == "gelu":
        (approximate,) = args
        if approximate == "tanh":
            op = "gelu_tanh"
    elif args:
        raise TypeError(f"{op} takes no extra arguments, got {args!r}")
    module = _kernel_module()
    code = module.OPS[op]
    out = torch.empty_like(g, memory_format=torch.contiguous_format)
    n = g.numel()
    if n == 0:
        return out
    kernel = module.act_backward_kernel
    grid = (-(-n // _BLOCK),)  # cdiv
    with _triton.on_device(g.device):
        kernel[grid](
            g,
            saved,
            out,
            n,
            float(slope),
            OP=code,
            BLOCK=_BLOCK,
            LARGE=n > _INT32_MAX - _BLOCK,
            num_warps=_NUM_WARPS,
        )
    return out
