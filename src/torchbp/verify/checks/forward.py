"""The ``forward`` check, which runs first: fn runs and returns floating-point tensors that
require grad. When it fails, every other check is skipped.

It calls fn on non-leaf copies of the differentiable inputs, so that a Function which
modifies an input in place and declares it with ``ctx.mark_dirty`` runs (autograd refuses
an in-place write into a leaf that requires grad); the inputs it returns as outputs are
recorded, and every later call gives fn non-leaf copies of those.
"""

from __future__ import annotations

from torch.utils._pytree import tree_leaves

from torchbp.verify.checks.compare import float_tensors, shape_text
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.explain import explain_error
from torchbp.verify.checks.outcomes import CheckFailure, Passed

__all__ = ["check_forward"]


def check_forward(ctx: CheckContext) -> Passed:
    """Calls fn once; records the shapes of its floating-point outputs and the inputs it
    modifies in place (``mark_dirty``) for later checks."""
    copies = [x.clone() for x in ctx.leaves()]
    try:
        out = ctx.call(ctx.fn, copies)
    except Exception as exc:  # noqa: BLE001 - fn's own error, in words
        raise CheckFailure(f"fn raised {explain_error(exc)}") from None
    returned = {id(t) for t in tree_leaves(out)}
    ctx.dirty_inputs = frozenset(k for k, c in enumerate(copies) if id(c) in returned)
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
    note = f"{len(outs)} output(s) of shape {shapes}"
    if ctx.dirty_inputs:
        dirty = ", ".join(ctx.input_name(k) for k in sorted(ctx.dirty_inputs))
        note += f"; modifies {dirty} in place (mark_dirty): checked on non-leaf copies"
    return Passed(note)
