"""The ``forward`` check, which runs first: fn runs and returns floating-point tensors that
require grad. When it fails, every other check is skipped."""

from __future__ import annotations

from torchbp.verify.checks.compare import float_tensors, shape_text
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.outcomes import CheckFailure, Passed

__all__ = ["check_forward"]


def check_forward(ctx: CheckContext) -> Passed:
    """Calls fn once; records the shapes of its floating-point outputs for later checks."""
    out = ctx.call(ctx.fn, ctx.leaves())
    outs = float_tensors(out)
    if not outs:
        raise CheckFailure(
            f"fn returned no floating-point tensor (got {type(out).__name__}); nothing to "
            "differentiate"
        )
    if not any(t.requires_grad for t in outs):
        raise CheckFailure(
            "no output requires grad although the inputs do: fn detached its result or "
            "computed it under torch.no_grad()"
        )
    ctx.out_shapes = [tuple(t.shape) for t in outs]
    shapes = ", ".join(shape_text(t) for t in outs)
    return Passed(f"{len(outs)} output(s) of shape {shapes}")
