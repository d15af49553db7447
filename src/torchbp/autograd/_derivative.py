"""Evaluating an element-wise derivative ``g · f'``: the reference formula, or a fast kernel.

Every activation Function calls :func:`derivative` with its formula, written in
differentiable torch ops beside the Function. For a first-order eager backward (nothing
will differentiate the result) a kernel from :mod:`torchbp.kernels` computes the same
numbers in fewer passes: the Triton one on CUDA when asked for (``TORCHBP_TRITON=1``), else
the CPU one where the activation has one. Double backward, torch.func and torch.compile
get the formula.

A piecewise activation (ReLU, LeakyReLU, ELU, Softplus) also passes its *curvature*
``curvature(v, saved, *args) = v · ∂f'/∂saved``. Where the result may be differentiated
again (grad mode on: ``create_graph=True``, forward-mode AD, torch.func), the formula then
runs inside :class:`DerivativeFunction`, whose own backward is hand-written from the two:
so the gradient stays attached to ``saved`` even where ``f'`` is piecewise constant
(ReLU's second derivative is 0, not an error, as native), and its value at a kink is
native's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import Function

from torchbp._execution import first_order_eager
from torchbp.kernels import _triton, cpu_act, triton_act

_HALF = (torch.float16, torch.bfloat16)


def derivative(
    name: str,
    formula: Callable[..., torch.Tensor],
    g: torch.Tensor | None,
    saved,
    *args,
    curvature: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """``formula(g, saved, *args)`` (``g · f'`` of activation ``name``), ``None`` for an
    undefined ``g``. Half-precision tensors are computed in float32 and rounded once, as
    native kernels do (``1 - y²`` in bfloat16 loses every digit as ``y -> 1``).

    With ``curvature`` (``v · ∂f'/∂saved``) and grad mode on, the result comes from
    :class:`DerivativeFunction` (differentiable as native's backward is)."""
    if g is None:
        return None
    if first_order_eager(g, saved):
        if _triton.requested() and triton_act.available(g, saved) and triton_act.supports(name):
            return triton_act.act_backward(name, g, saved, *args)
        if name in cpu_act.KERNELS:
            return cpu_act.backward(name, g, saved, *args)
    if curvature is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return DerivativeFunction.apply(g, saved, formula, curvature, *args)
    return reference(formula, g, saved, *args)


def reference(formula: Callable[..., torch.Tensor], g: torch.Tensor, saved, *args):
    """``formula(g, saved, *args)``, in float32 for half-precision tensors (rounded once)."""
    if g.dtype in _HALF:
        return formula(g.float(), saved.float(), *args).to(g.dtype)
    return formula(g, saved, *args)


class DerivativeFunction(Function):
    """``dx = formula(g, saved, *args) = g · f'(saved)`` (an activation's backward) as a
    Function of ``(g, saved)``, for activations whose ``f'`` is piecewise.

    Backward (``gg`` the gradient w.r.t. ``dx``): ``∂/∂g = gg · f'(saved)``, the formula
    again; ``∂/∂saved = g · gg · ∂f'/∂saved = curvature(g · gg, saved, *args)`` — all zeros
    for ReLU / LeakyReLU, as native (a tensor, not an error). Forward-mode:
    ``d(dx) = formula(dg, saved) + curvature(g · dsaved, saved)``. Saves ``g`` and
    ``saved``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(g, saved, formula, curvature, *args):
        return reference(formula, g, saved, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, saved, ctx.formula, ctx.curvature, *ctx.args = inputs
        ctx.save_for_backward(g, saved)
        ctx.save_for_forward(g, saved)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gg):
        none = (None,) * (2 + len(ctx.args))
        if gg is None:
            return (None, None, *none)
        g, saved = ctx.saved_tensors
        needs_g, needs_saved = ctx.needs_input_grad[:2]
        # ∂dx/∂g = f'(saved):  gg · f'
        grad_g = reference(ctx.formula, gg, saved, *ctx.args) if needs_g else None
        # ∂dx/∂saved = g · ∂f'/∂saved
        grad_saved = reference(ctx.curvature, g * gg, saved, *ctx.args) if needs_saved else None
        return (grad_g, grad_saved, *none)

    @staticmethod
    def jvp(ctx, g_t, saved_t, *_):
        g, saved = ctx.saved_tensors
        out = None
        # d(dx) = f'(saved) dg + g ∂f'/∂saved dsaved
        if g_t is not None:
            out = reference(ctx.formula, g_t, saved, *ctx.args)
        if saved_t is not None:
            term = reference(ctx.curvature, g * saved_t, saved, *ctx.args)
            out = term if out is None else out + term
        return out
