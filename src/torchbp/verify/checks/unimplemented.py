"""Inputs whose gradient fn does not offer: a backward raising ``NotImplementedError`` when
one input requires grad (a loss refusing the gradient of its target, as some of torch's
own ops refuse theirs). Asked to differentiate such an input (by default every
floating-point input is), every check running backward would fail with that error, though
fn says plainly that it offers no such gradient: :func:`refuse_unimplemented_gradients`
turns it into a usage error naming the inputs to leave out."""

from __future__ import annotations

import torch

from torchbp.verify.checks.compare import input_grads
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.explain import explain_error, raised_in_derivative
from torchbp.verify.checks.outcomes import CheckFailure, UsageError
from torchbp.verify.checks.spelling import option

__all__ = ["refuse_unimplemented_gradients"]


def _not_implemented(cause: BaseException) -> NotImplementedError | None:
    """The ``NotImplementedError`` a backward raised that a check failed with (``cause``,
    or what the check's failure was made from), or None."""
    exc = cause.__context__ if isinstance(cause, CheckFailure) else cause
    if isinstance(exc, NotImplementedError) and raised_in_derivative(exc):
        return exc
    return None


def _refuses_gradients(ctx: CheckContext, wanted: list[int]) -> bool:
    """Whether backward raises ``NotImplementedError`` when the differentiable inputs at
    the positions ``wanted`` (among them) alone require grad."""
    diff = [x if j in wanted else x.detach() for j, x in enumerate(ctx.leaves())]
    try:
        outs = [o for o in ctx.diff_fn(*diff) if o.requires_grad]
        grads_of = [diff[j] for j in wanted]
        input_grads(outs, grads_of, [torch.ones_like(o) for o in outs], allow_unused=True)
    except NotImplementedError:
        return True
    except Exception:  # noqa: BLE001 - another failure, for the checks to report
        return False
    return False


def refuse_unimplemented_gradients(ctx: CheckContext, cause: BaseException) -> None:
    """A :class:`UsageError` when a check failed with ``cause``, a ``NotImplementedError``
    of fn's backward, because some of the differentiated inputs (not all, and none a
    module's parameter) are ones whose gradient backward refuses: it names them and the
    ``grad_inputs`` leaving them out. Nothing otherwise, nor after an earlier check failed,
    nor when backward gives their gradients once every input requires grad (it refuses
    them alone only: a bug of its ``ctx.needs_input_grad`` paths; the failure stands)."""
    error = _not_implemented(cause)
    if error is None or any(result.failed for result in ctx.results.values()):
        return  # an earlier check's own failure stands
    every = list(range(len(ctx.grad_idx)))
    refused = [k for k in every if _refuses_gradients(ctx, [k])]
    positions = [ctx.grad_idx[k] for k in refused]
    if not refused or len(refused) == len(ctx.grad_idx):
        return
    if not _refuses_gradients(ctx, every):
        return  # offered with the others: refusing it alone is a needs_input_grad bug
    if any(i in ctx.parameter_names for i in positions):
        return
    kept = tuple(i for i in ctx.grad_idx if i not in positions and i not in ctx.parameter_names)
    names = ", ".join(ctx.input_name(k) for k in refused)
    raise UsageError(
        f"check_function: backward raises {explain_error(error)} when {names} requires "
        "grad: fn does not offer that gradient (as torch's own ops refuse some, a loss's "
        f"target's), so no check can differentiate it; leave it out with "
        f"{option('grad_inputs', kept)}"
    )
