"""Triton kernel for the fused cross-entropy forward on CUDA (class-index targets).

Computes exactly what :func:`torchbp.autograd.cross_entropy.ce_rows` computes for ``(N, C)``
logits — per row ``ℓ_i = Σ_c B_ic (lse_i - z_ic)`` and ``∂ℓ_i/∂z_i = a_i p_i - B_i``
with class weights, ``ignore_index`` and label smoothing — in one launch of the kernel in
:mod:`._triton_ce_kernel`:

* grid ``(N,)``: one program per row, looping over the classes in ``BLOCK``-sized chunks;
* pass 1 (read the row once): online softmax — a running max ``m`` and the sum
  ``s = Σ e^{z - m}`` rescaled by ``e^{m_old - m_new}`` whenever the max grows — plus,
  with label smoothing and class weights, ``Σ_c w_c``, all accumulated in float32;
* the per-row scalars: ``lse = m + log s``, ``a`` and, without label smoothing, the loss
  ``w_y (log s - (z_y - m))``, stored in float32;
* pass 2 (read the row again, write it once): ``a e^{z - m} / s - B`` in float32, rounded
  once to the logits' dtype into a NEW gradient buffer (the logits are never written),
  so that ``p_y - 1`` of a confident low-precision row keeps its precision; with label
  smoothing also ``Σ_c w_c (log s - (z_c - m))`` from the logits and weights it loads
  anyway, and then the loss. Every term ``-log p_c = log s - (z_c - m)`` is formed before
  it is weighted, as native's ``-Σ_c B_c log p_c``: split as ``a log s - Σ_c B_c (z_c -
  m)``, an infinite class weight would meet ``log s = 0`` or ``z_c - m = 0`` (NaN for
  native's ``+inf``).

No host synchronisation: everything the kernel needs is on the device or a Python
scalar. :mod:`triton` is imported lazily, on the first call of :func:`available` or
:func:`ce_forward_rows`, so that CPU-only installs import torchbp without it.

Under ``TRITON_INTERPRET=1`` the kernel runs in Triton's CPU interpreter, for tests (see
:mod:`torchbp.kernels._triton`).
"""

from __future__ import annotations

import functools

import torch

from torchbp._execution import values_inspectable
from torchbp.kernels import _triton

__all__ = ["available", "ce_forward_rows"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Largest chunk of classes one program handles per loop iteration (a power of two).
_MAX_BLOCK = 4096


def available(logits: torch.Tensor, target: torch.Tensor | None = None, weight=None) -> bool:
    """Whether :func:`ce_forward_rows` applies to these inputs: 2-D CUDA logits (CPU ones
    too under ``TRITON_INTERPRET=1``) in float16 / bfloat16 / float32 with at least one
    class, a 1-D class-index target of as many rows (when given), a 1-D float weight of
    ``C`` entries or none, values that may be inspected (not while torch.compile traces,
    not under torch.func transforms), and an importable Triton."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.dtype not in _DTYPES:
        return False
    if logits.shape[1] == 0:
        return False
    if not _triton.runs_on(logits):
        return False
    if target is not None:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            return False
        if target.dim() != 1 or target.shape[0] != logits.shape[0]:
            return False
        if target.device != logits.device or not values_inspectable(target):
            return False
    if weight is not None:
        if not weight.is_floating_point() or tuple(weight.shape) != (logits.shape[1],):
            return False
        if weight.device != logits.device or not values_inspectable(weight):
            return False
    return values_inspectable(logits) and _triton.importable()


def _config(classes: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for a row of ``classes`` logits (not tuned on a GPU yet)."""
    block = max(16, min(_MAX_BLOCK, 1 << max(classes - 1, 0).bit_length()))
    if block >= 4096:
        return block, 16
    if block >= 1024:
        return block, 8
    return block, 4


@functools.cache
def _kernel():
    """The jitted kernel (its module, and so Triton, is imported on first use)."""
    from torchbp.kernels import _triton_ce_kernel

    return _triton_ce_kernel.ce_forward_kernel


def ce_forward_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ℓ, ∂ℓ/∂z, lse)`` of ``(N, C)`` logits with ``(N,)`` class-index targets: the
    outputs of ``ce_rows`` (``ℓ`` and ``lse`` float32, ignored rows have ``ℓ = 0`` and a
    zero gradient), with the gradient rounded once to the logits' dtype into a new
    tensor. Call only where :func:`available` holds; target values are not checked
    (the wrapper validates them)."""
    rows, classes = logits.shape
    device = logits.device
    loss = torch.empty(rows, dtype=torch.float32, device=device)
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    grad = torch.empty((rows, classes), dtype=logits.dtype, device=device)
    if rows == 0:
        return loss, grad, lse
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # the kernel reads each row as one contiguous run
    w = None if weight is None else weight.to(torch.float32).contiguous()
    block, num_warps = _config(classes)
    kernel = _kernel()
    with _triton.on_device(device):
        kernel[(rows,)](
            logits,
            logits.stride(0),
            target,
            target.stride(0),
            loss if w is None else w,  # unused without weights (HAS_WEIGHT is a constexpr)
            grad,
            loss,
            lse,
            classes,
            int(ignore_index),
            float(label_smoothing),
            HAS_WEIGHT=w is not None,
            SMOOTH=bool(label_smoothing),
            BLOCK=block,
            num_warps=num_warps,
        )
    return loss, grad, lse
