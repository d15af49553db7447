"""fn in the inputs' own (narrower) dtype against fn itself in the cast dtype, without a
reference: where fn run in float64 on the same values gives a finite number well inside
the narrow dtype's range, fn in that dtype must be finite too.

The checks run fn in float64 (the ``dtype`` option) on float32 (float16, bfloat16) inputs
cast up, where an intermediate that overflows only in the narrow dtype (``exp(x)`` of a
logsumexp without the max trick at x = 100, a float16 sum of squares) never does: without
a reference nothing else sees it. The values themselves are not compared (fn may compute
otherwise in another dtype, and rounds differently): a reference decides them. A value
beyond the narrow dtype's range in float64 (``exp(100)`` is 2.7e43, above float32's
3.4e38) is an infinity there by right, and is not judged."""

from __future__ import annotations

import torch

from torchbp.verify.checks.compare import float_tensors, input_grads, unravel, zeros_for_none
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.explain import KERNEL_MISSING_FOR_A_DTYPE, explain_error, first_line
from torchbp.verify.checks.outcomes import CheckFailure, CheckSkip, Passed

__all__ = [
    "HEADROOM",
    "grad_output_from_one_to_two",
    "raised_in_own_dtype",
    "require_finite_as_in_cast_dtype",
]

#: How far inside the narrow dtype's largest finite value fn's float64 value must lie to
#: be judged: rounding to the narrow dtype may carry a value just below it over.
HEADROOM = 16.0


def _outputs_and_gradients(
    ctx: CheckContext, vs: list[torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """fn's floating-point outputs and gradients, for grad_outputs ``vs`` (float64, cast
    to each output's dtype), each named as a message names it."""
    leaves = ctx.leaves()
    outs = float_tensors(ctx.call(ctx.fn, leaves))
    live = [(o, v.to(o.dtype)) for o, v in zip(outs, vs) if o.requires_grad]
    grads = (
        input_grads([o for o, _ in live], leaves, [v for _, v in live], allow_unused=True)
        if live
        else [None for _ in leaves]
    )
    grads = zeros_for_none(grads, leaves)
    named = [(f"output {o}", t.detach()) for o, t in enumerate(outs)]
    named += [(f"gradient of {ctx.input_name(k)}", g.detach()) for k, g in enumerate(grads)]
    return named


def _judged(wide: torch.Tensor, narrow_dtype: torch.dtype) -> torch.Tensor:
    """Where fn's float64 value is finite and :data:`HEADROOM` times inside the largest
    finite value of ``narrow_dtype``."""
    if not (narrow_dtype.is_floating_point or narrow_dtype.is_complex):
        return torch.zeros_like(wide, dtype=torch.bool)
    largest = torch.finfo(narrow_dtype).max
    return torch.isfinite(wide) & (wide.abs() <= largest / HEADROOM)


def _first_lost(what: str, narrow: torch.Tensor, wide: torch.Tensor, dtypes: str) -> str | None:
    """The failure message for the first element of ``what`` that fn gives non-finite in
    its own dtype where its float64 value is judged, or None."""
    if narrow.shape != wide.shape:
        return None  # another shape in another dtype: the reference check's finding
    lost = _judged(wide, narrow.dtype) & ~torch.isfinite(narrow)
    if not bool(lost.any()):
        return None
    flat = int(lost.reshape(-1).nonzero()[0])
    index = unravel(flat, lost.shape)
    got, want = narrow.reshape(-1)[flat].item(), wide.reshape(-1)[flat].item()
    dtype = str(narrow.dtype).removeprefix("torch.")
    return (
        f"in {dtypes} (the inputs' own dtype): {what} is {got} at index {index} "
        f"({int(lost.sum())} element(s)) where fn run in float64 on the same values gives "
        f"{want:.6g}, well inside {dtype}'s range: an intermediate overflows, or rounds to "
        "0 and is divided by, in the narrow dtype (exp without the max trick, a sum of "
        "squares in float16, 1 + x - 1): compute it so that it stays in range, or in a "
        "wider dtype"
    )


def raised_in_own_dtype(exc: Exception, dtypes: str) -> CheckFailure | CheckSkip:
    """What fn raising ``exc`` on the inputs in their own dtypes (``dtypes``) makes of
    ``reference_dtype``: skipped for torch's dispatcher saying a kernel is missing for the
    dtype (``"cdist" not implemented for 'Half'`` on the CPU: fn is not wrong there, it
    cannot run there), else failed."""
    if KERNEL_MISSING_FOR_A_DTYPE.search(first_line(str(exc))):
        return CheckSkip(
            f"fn cannot run on the inputs in their own dtype ({dtypes}) here, torch has no "
            f"kernel for it ({explain_error(exc)}): checked in the cast dtype only"
        )
    return CheckFailure(
        f"fn raised on the inputs in their own dtype ({dtypes}): {explain_error(exc)}"
    )


def grad_output_from_one_to_two(
    ctx: CheckContext, shape: torch.Size, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A random grad_output of ``shape`` and ``dtype``, each element of magnitude between
    1 and 2 (and a random sign): a gradient well inside the narrow range has its
    derivatives there too, where a random normal element of 0.03 times a derivative
    beyond it (``1 / x**2`` of float16 0.0039: 65746) is a gradient well inside, that no
    backward computing the derivative first can give; and not 1 itself, which float16
    holds exactly, hiding a backward that rounds grad_output through it."""
    r = ctx.randn(shape, torch.float64)
    return (torch.where(r >= 0, 1.0, -1.0) * (1.0 + r.abs().frac())).to(dtype)


def require_finite_as_in_cast_dtype(ctx: CheckContext, own: CheckContext, dtypes: str) -> Passed:
    """Fail where fn on the inputs in their own dtypes (``own``: ``dtypes``) gives a
    non-finite output or gradient that fn in the cast dtype (``ctx``) gives finite and
    well inside the narrow dtype's range (:func:`_judged`); the same grad_outputs for both."""
    try:
        outs = float_tensors(own.call(own.fn, own.leaves()))
        vs = [grad_output_from_one_to_two(ctx, o.shape) for o in outs]
        narrow = _outputs_and_gradients(own, vs)
    except Exception as exc:  # noqa: BLE001 - fn's own error, in words
        raise raised_in_own_dtype(exc, dtypes) from None
    wide = _outputs_and_gradients(ctx, vs)  # fn's errors in float64 are other checks' findings
    for (what, a), (_, b) in zip(narrow, wide):
        message = _first_lost(what, a, b, dtypes)
        if message:
            raise CheckFailure(message)
    return Passed(
        f"in {dtypes}: finite where fn in {str(ctx.dtype).removeprefix('torch.')} is",
        caveat=(
            f"no reference given: fn in {dtypes} was compared with fn run in "
            f"{str(ctx.dtype).removeprefix('torch.')} only for values non-finite in "
            f"{dtypes} (an overflowing intermediate), not for its values; a reference "
            "compares those"
        ),
    )
