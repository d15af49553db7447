"""fn's output elements whose derivatives the checks comparing with central differences
of fn's outputs (``gradcheck``, ``forward_ad``) leave out: those that are the same
infinity at and near the given inputs (a masked attention score of ``-inf``), where a
central difference is ``inf - inf``. Which
derivative is right there only a reference can say (autograd gives 0 after
``masked_fill(mask, -inf)`` and 1 after adding a ``-inf`` mask, to equal functions): the
reference check compares fn's gradients there with the reference's, and
:func:`require_jvp_like_backward_where_left_out` holds fn's jvp to its backward there."""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD

from torchbp.verify.checks.compare import float_tensors, input_grads
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.jacobians import unit_direction
from torchbp.verify.checks.outcomes import CheckFailure

__all__ = ["infinite_elements", "require_jvp_like_backward_where_left_out"]


def infinite_elements(masks: list[torch.Tensor]) -> str:
    """Words naming the elements ``masks`` (per output) mark, e.g. ``"6 element(s) of
    output 0 (first at (0, 1))"``."""
    return " and ".join(
        f"{int(mask.sum())} element(s) of output {o} "
        f"(first at {tuple(int(i) for i in mask.nonzero()[0])})"
        for o, mask in enumerate(masks)
        if mask.any()
    )


def _jvp_projection(ctx: CheckContext, us: list[torch.Tensor], vs: list[torch.Tensor]) -> float:
    """``<v, J u>``: fn's jvp of the tangents ``us``, its output tangents weighted by
    ``vs`` (per floating-point output; a missing tangent counts as 0)."""
    base = [x.detach() for x in ctx.leaves()]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, u.clone()) for x, u in zip(base, us)]
        outs = float_tensors(ctx.call(ctx.fn, duals))
        tangents = [fwAD.unpack_dual(out).tangent for out in outs]
    return sum(
        float((t.detach().to(torch.float64) * v).sum())
        for t, v in zip(tangents, vs)
        if t is not None
    )


def _backward_projection(
    ctx: CheckContext, us: list[torch.Tensor], vs: list[torch.Tensor]
) -> float:
    """``<J^T v, u>``: fn's backward of the grad_outputs ``vs``, its gradients weighted by
    ``us`` (a missing gradient counts as 0)."""
    leaves = ctx.leaves()
    outs = float_tensors(ctx.call(ctx.fn, leaves))
    live = [(out, v.to(out.dtype)) for out, v in zip(outs, vs) if out.requires_grad]
    if not live:
        return 0.0
    grads = input_grads([o for o, _ in live], leaves, [v for _, v in live], allow_unused=True)
    return sum(
        float((g.detach().to(torch.float64) * u).sum()) for g, u in zip(grads, us) if g is not None
    )


def require_jvp_like_backward_where_left_out(ctx: CheckContext) -> None:
    """Fail unless fn's jvp gives the output elements :attr:`CheckContext.constant_infinities`
    marks what its backward gives them: ``<v, J u>`` from a jvp of random tangents ``u``
    equals ``<J^T v, u>`` from a backward of random grad_outputs ``v`` that are 0 off those
    elements, within gradcheck's ``atol + rtol * |<J^T v, u>|``. Both are products of one
    Jacobian: with the reference check deciding backward's derivatives there, this decides
    jvp's. Nothing to judge without such elements, when backward raises (the other checks
    report it) or when a figure is not finite."""
    masks = ctx.constant_infinities
    if masks is None:
        return
    us = unit_direction([x.detach() for x in ctx.leaves()], ctx.randn)
    vs = [ctx.randn(mask.shape, torch.float64) * mask for mask in masks]
    forward = _jvp_projection(ctx, us, vs)
    try:
        backward = _backward_projection(ctx, us, vs)
    except Exception:  # noqa: BLE001 - backward's own failure, for the other checks
        return
    if not (math.isfinite(forward) and math.isfinite(backward)):
        return
    error = abs(forward - backward)
    if error <= float(ctx.options.atol) + float(ctx.options.rtol) * abs(backward):
        return
    raise CheckFailure(
        f"forward-mode AD (jvp) disagrees with backward at {infinite_elements(masks)}, the "
        "same infinity at and near the given inputs, whose derivatives central differences "
        f"cannot measure: <v, J u> is {forward:.6g} from jvp, {backward:.6g} from backward, "
        f"for random tangents u and grad_outputs v held on those elements (seed "
        f"{ctx.options.seed}); jvp and backward must give one Jacobian (does one of them "
        "apply the mask forward applies and the other not?)",
        error,
        error / max(abs(backward), 1e-12),
    )
