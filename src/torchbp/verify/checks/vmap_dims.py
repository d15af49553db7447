"""The ``vmap_in_dims`` check: ``torch.func.vmap`` of fn over a batch dimension that is not
the first one, and over some inputs only, equals a Python loop.

The ``vmap`` check batches every input along dim 0, the one case a hand-written ``vmap``
staticmethod that ignores ``in_dims`` (or treats ``None`` as batched) still gets right.
"""

from __future__ import annotations

import torch

from torchbp.verify.checks.compare import require_close
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.domain import batch_scales
from torchbp.verify.checks.explain import outcome_of
from torchbp.verify.checks.outcomes import CheckFailure, CheckSkip, Passed
from torchbp.verify.checks.rng import draws_random_numbers
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


#: What vmap_in_dims could not compare for a random fn whose vmap draws other numbers.
RANDOM_IN_DIMS_CAVEAT = (
    "fn draws random numbers, and vmap of fn drew other ones than its calls one by one: "
    "vmap over these in_dims was compared with vmap over the same samples batched along "
    "dim 0 (which draws the same numbers), not with plain calls"
)


def _loop(ctx: CheckContext, xs: list, in_dims: tuple, batch: int) -> list[torch.Tensor]:
    """fn called on each sample of ``xs`` (batched along ``in_dims``), stacked."""
    looped = [
        ctx.diff_fn(*[x if d is None else x.select(d, b) for x, d in zip(xs, in_dims)])
        for b in range(batch)
    ]
    return [torch.stack([lp[o] for lp in looped]).detach() for o in range(len(looped[0]))]


def _vmap_along_dim_0(ctx: CheckContext, xs: list, in_dims: tuple) -> list[torch.Tensor]:
    """vmap of fn over the samples of ``xs`` moved to dim 0 (in_dims 0, None kept)."""
    moved = [x if d is None else x.movedim(d, 0) for x, d in zip(xs, in_dims)]
    dims0 = tuple(None if d is None else 0 for d in in_dims)
    outs = torch.func.vmap(ctx.diff_fn, in_dims=dims0, randomness=SAME_DRAWS)(*moved)
    return [o.detach() for o in outs]


def _require_like(ctx: CheckContext, batched, expected, label, in_dims) -> tuple[float, float]:
    """vmap's outputs ``batched`` against ``expected``, output by output."""
    worst = (0.0, 0.0)
    for o, (out, exp) in enumerate(zip(batched, expected)):
        problem = f"vmap output {o} with {label} (in_dims={in_dims}) differs from a loop"
        note = " (a vmap rule that ignores in_dims, or treats unbatched inputs as batched?)"
        worst = max(worst, require_close(out, exp, ctx.parity_tolerances(), problem, note=note))
    return worst


def check_vmap_in_dims(ctx: CheckContext) -> Passed:
    """vmap(fn, in_dims=...) over scaled copies stacked along the last dim (and with
    unbatched inputs) against a loop; skipped unless the ``vmap`` check passed, unsupported
    when the vmap rule raises ``NotImplementedError`` for these in_dims. A random fn whose
    vmap draws other numbers than its plain calls is compared with vmap along dim 0
    instead, with a caveat saying so."""
    vmap_result = ctx.results.get("vmap")
    if vmap_result is not None and not vmap_result.passed:
        raise CheckSkip(f"the vmap check (in_dims=0) did not pass ({vmap_result.status})")
    batch = int(ctx.options.vmap_batch)
    scales = batch_scales(ctx, batch)
    worst, caveat = (0.0, 0.0), ""
    for label, in_dims in _layouts(ctx):
        xs = []
        for i, dim in zip(ctx.grad_idx, in_dims):
            x = ctx.args[i].detach()
            xs.append(x if dim is None else torch.stack([x * s for s in scales], dim=dim))
        try:
            batched = torch.func.vmap(ctx.diff_fn, in_dims=in_dims, randomness=SAME_DRAWS)(*xs)
        except Exception as exc:  # noqa: BLE001
            raise outcome_of(exc, f"vmap with {label} failed: ", VMAP_IN_DIMS) from None
        try:
            errors = _require_like(ctx, batched, _loop(ctx, xs, in_dims, batch), label, in_dims)
        except CheckFailure:
            if not draws_random_numbers(ctx):
                raise
            expected, caveat = _vmap_along_dim_0(ctx, xs, in_dims), RANDOM_IN_DIMS_CAVEAT
            errors = _require_like(ctx, batched, expected, label, in_dims)
        worst = max(worst, errors)
    return Passed("batched along the last dim, and with unbatched inputs", *worst, caveat=caveat)
