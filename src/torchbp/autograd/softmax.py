"""Softmax and log-softmax along one dim, with the max trick and hand-written backward.

Half-precision softmax and both backwards are computed in float32 and rounded once, as
native's kernels do: rounding ``x - m`` to bfloat16 would put ``exp`` off by up to
``ulp(x - m)`` relatively (7 % at ``x - m = -20``), and each rounded backward step loses
digits. Half-precision log-softmax's forward keeps native's own roundings (``x - m`` and
``log Σ`` in the input's dtype), whose result it matches.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from torchbp.autograd._derivative import reference

_HALF = (torch.float16, torch.bfloat16)


def _rounded_once(formula, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``formula(x, dim)``, in float32 for a half-precision ``x`` and rounded once."""
    if x.dtype in _HALF:
        return formula(x.float(), dim).to(x.dtype)
    return formula(x, dim)


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` with contiguous strides, as native's softmax / log-softmax read it, so that
    the output is contiguous for any layout of ``x``. An empty ``x`` is copied:
    ``contiguous()`` keeps its strides (torch calls every empty tensor contiguous), which
    the output would inherit (a transposed ``(0, 5)`` input gave strides ``(1, 5)``, native
    ``(1, 1)``)."""
    if x.numel() == 0:
        return x.clone(memory_format=torch.contiguous_format)
    return x.contiguous()


def _shifted(x: torch.Tensor, dim: int) -> torch.Tensor:
    # Max trick: softmax(x) = softmax(x - m) for m = max_j x_j, and x - m <= 0 keeps
    # exp() from overflowing. A row that is all -inf keeps m = -inf (x - m is then NaN,
    # as in native); a 0-size dim has no max, and its result is empty anyway.
    if x.shape[dim] == 0:
        return x.clone()
    return x - x.amax(dim, keepdim=True)


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    e = torch.exp(_shifted(x, dim))
    return e / e.sum(dim, keepdim=True)


def _log_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    # log softmax(x) = (x - m) - log Σ e^{x - m}
    s = _shifted(x, dim)
    return s - torch.exp(s).sum(dim, keepdim=True).log()


def softmax_backward(g: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    # y = softmax(x): ∂y_i/∂x_j = y_i (δ_ij - y_j)  =>  dx = y ⊙ (g - Σ_j g_j y_j)
    return y * (g - (g * y).sum(dim, keepdim=True))


def log_softmax_backward(g: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    # y = log softmax(x): ∂y_i/∂x_j = δ_ij - softmax_j  =>  dx = g - e^y Σ_i g_i
    return g - torch.exp(y) * g.sum(dim, keepdim=True)


def _log_softmax_jvp(x_t: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    # dy = J dx with J_ij = δ_ij - softmax_j  =>  dy = dx - Σ_j e^{y_j} dx_j
    return x_t - (torch.exp(y) * x_t).sum(dim, keepdim=True)


class SoftmaxFunction(Function):
    """``y = e^{x - m} / Σ e^{x - m}`` along ``dim`` (``m`` the max, for stability);
    backward ``dx = y ⊙ (g - Σ g ⊙ y)``. Saves ``y``, contiguous (as native's output) for
    any layout of ``x``. Forward-mode: ``dy = y ⊙ (dx - Σ dx ⊙ y)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim):
        # computed on a contiguous input, so the output is contiguous whatever x's strides
        # (transposed, channels_last, empty), as native's (which also reads x.contiguous())
        return _rounded_once(_softmax, _contiguous(x), dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None, None
        (y,) = ctx.saved_tensors
        return reference(softmax_backward, grad_y, y, ctx.dim), None

    @staticmethod
    def jvp(ctx, x_t, _dim):
        (y,) = ctx.saved_tensors
        # J_ij = y_i (δ_ij - y_j) is symmetric, so dy = J dx = y ⊙ (dx - Σ dx ⊙ y): the
        # backward formula applied to the tangent
        return None if x_t is None else reference(softmax_backward, x_t, y, ctx.dim)


class LogSoftmaxFunction(Function):
    """``y = (x - m) - log Σ e^{x - m}`` along ``dim``; backward ``dx = g - e^y Σ g``.
    Saves ``y``. Forward-mode: ``dy = dx - Σ e^y dx``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, dim):
        # in the input's dtype, as native's (see the module doc); contiguous, as SoftmaxFunction
        return _log_softmax(_contiguous(x), dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None, None
        (y,) = ctx.saved_tensors
        return reference(log_softmax_backward, grad_y, y, ctx.dim), None

    @staticmethod
    def jvp(ctx, x_t, _dim):
        (y,) = ctx.saved_tensors
        if x_t is None:
            return None
        return reference(_log_softmax_jvp, x_t, y, ctx.dim)
