"""The ``vmap_in_dims`` check: ``torch.func.vmap`` of fn over a batch dimension that is not
the first one, and over some inputs only, equals a Python loop.

The ``vmap`` check batches every input along dim 0, the one case a hand-written ``vmap``
staticmethod that ignores ``in_dims`` (or treats ``None`` as batched) still gets right.
"""

from __future__ import annotations

import torch

from torchbp.verify.checks.compare import require_close
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.explain import outcome_of
from torchbp.verify.checks.outcomes import CheckSkip, Passed
from torchbp.verify.checks.transforms import SAME_DRAWS

__all__ = ["VMAP_IN_DIMS", "check_vmap_in_dims"]

#: The capability vmap_in_dims exercises and how to add it (a vmap rule that raises
#: ``NotImplementedError`` for these in_dims says it is absent: unsupported, not failed).
VMAP_IN_DIMS = (
    "vmap over a non-zero or None in_dims",
    "in the vmap staticmethod, move each batched input's dim in_dims[i] to 0 "
    "(x.movedim(in_dims[i], 0)) and expand the unbatched ones (in_dims[i] is None), or set "
    "generate_vmap_rule = True",
)


def _layouts(ctx: CheckContext) -> list[tuple[str, tuple[int | None, ...]]]:
    """``(label, in_dims)`` of the batchings tried: every grad input batched along its
    last dim; then only the first batched (the others shared, ``in_dims=None``)."""
    last = tuple(ctx.args[i].dim() for i in ctx.grad_idx)
    layouts = [("every grad input batched along its last dim", last)]
    if len(last) > 1:
        only_first = (last[0],) + (None,) * (len(last) - 1)
        layouts.append(("only the first grad input batched (the others in_dims=None)", only_first))
    return layouts


def check_vmap_in_dims(ctx: CheckContext) -> Passed:
    """vmap(fn, in_dims=...) over scaled copies stacked along the last dim (and with
    unbatched inputs) against a loop; skipped unless the ``vmap`` check passed, unsupported
    when the vmap rule raises ``NotImplementedError`` for these in_dims."""
    vmap_result = ctx.results.get("vmap")
    if vmap_result is not None and not vmap_result.passed:
        raise CheckSkip(f"the vmap check (in_dims=0) did not pass ({vmap_result.status})")
    batch = int(ctx.options.vmap_batch)
    scales = [1.0 + 0.25 * b for b in range(batch)]
    tolerance = ctx.parity_tolerances()
    worst = (0.0, 0.0)
    for label, in_dims in _layouts(ctx):
        xs = []
        for i, dim in zip(ctx.grad_idx, in_dims):
            x = ctx.args[i].detach()
            xs.append(x if dim is None else torch.stack([x * s for s in scales], dim=dim))
        try:
            batched = torch.func.vmap(ctx.diff_fn, in_dims=in_dims, randomness=SAME_DRAWS)(*xs)
        except Exception as exc:  # noqa: BLE001
            raise outcome_of(exc, f"vmap with {label} failed: ", VMAP_IN_DIMS) from None
        looped = [
            ctx.diff_fn(*[x if d is None else x.select(d, b) for x, d in zip(xs, in_dims)])
            for b in range(batch)
        ]
        for o, out in enumerate(batched):
            exp = torch.stack([lp[o] for lp in looped]).detach()
            problem = f"vmap output {o} with {label} (in_dims={in_dims}) differs from a loop"
            note = " (a vmap rule that ignores in_dims, or treats unbatched inputs as batched?)"
            worst = max(worst, require_close(out, exp, tolerance, problem, note=note))
    return Passed("batched along the last dim, and with unbatched inputs", *worst)
