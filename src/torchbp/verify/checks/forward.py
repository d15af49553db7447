"""The ``forward`` check, which runs first: fn runs and returns floating-point tensors that
require grad. When it fails, every other check is skipped.

It calls fn on copies of every tensor input (non-leaf copies of the differentiable ones),
so that a Function which modifies an input in place and declares it with
``ctx.mark_dirty`` runs (autograd refuses an in-place write into a leaf that requires grad)
and writes into no tensor a later check uses; the inputs it returns as outputs are
recorded, and every later call gives fn fresh copies of those (an ``out=`` buffer left
out of ``grad_inputs`` would otherwise accumulate across calls). A second call must give
the same floating-point outputs (within the dtype's tolerance): every check compares calls
of fn, and one that keeps state between calls would fail them for misleading reasons. Every
call starts torch's generators from the run's seed (``checks.rng``), so a dropout drawing
its mask with ``torch.rand*`` gives the same outputs twice and passes.

Inputs outside fn's domain are a usage error (:class:`UsageError`), not a failure: fn's
first call refusing them with a ``ValueError`` (a Function checking that its input is
positive, or its shape), or fn giving NaN where the reference does too (a log of a
negative number) or no reference is given, while a check comparing with central
differences runs. No backward has run then, and the message names the inputs' shapes and
ranges and says that fn may also be wrong (raising or producing NaN by mistake).
"""

from __future__ import annotations

from typing import Any

import torch

from torchbp.verify.checks.compare import float_tensors, leaves, mismatch, shape_text
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.domain import CENTRAL_DIFFERENCE_CHECKS, input_ranges
from torchbp.verify.checks.explain import explain_error, raised_at
from torchbp.verify.checks.outcomes import CheckFailure, Passed, UsageError
from torchbp.verify.checks.rng import outside_generators_drawn
from torchbp.verify.checks.spelling import inputs_in_domain, keep_dtype

__all__ = ["check_forward"]


def _written_and_returned(full: list[Any], versions: dict[int, int], out: Any) -> frozenset[int]:
    """Positions of the tensors in ``full`` that fn wrote into in place (their version
    counter moved from ``versions``) and returned as an output (``ctx.mark_dirty``)."""
    returned = {id(t) for t in leaves(out)}
    return frozenset(
        i
        for i, before in versions.items()
        if id(full[i]) in returned and full[i]._version != before
    )


#: How torch's C++ errors name a dtype ("expected scalar type Float but found Double").
_SCALAR_TYPE_NAMES = {
    torch.float64: "Double",
    torch.float32: "Float",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
}


def _names_dtype(message: str, dtype: torch.dtype) -> bool:
    """True if ``message`` speaks of dtypes or names ``dtype`` (as Python or torch's C++
    errors write it)."""
    short = str(dtype).removeprefix("torch.")
    lowered = message.lower()
    cxx = _SCALAR_TYPE_NAMES.get(dtype)
    return "dtype" in lowered or short in lowered or (cxx is not None and cxx in message)


def _cast_hint(ctx: CheckContext, message: str) -> str:
    """Why fn may have refused its inputs when the ``dtype`` option cast them (a Function
    written for float32 only), and how to keep their dtype: only when the error
    ``message`` speaks of dtypes or names the caller's or the cast dtype; empty when no
    input was cast."""
    if not ctx.cast_from:
        return ""
    i, (before, after) = next(iter(ctx.cast_from.items()))
    if not any(_names_dtype(message, d) for d in (before, after)):
        return ""
    return (
        f" (fn was called with input {i} cast from {before} to {after} by the "
        f"dtype option, float64 by default: if fn takes only its own dtype, pass "
        f"{keep_dtype(before)}; the numerical checks need float64 and are then skipped)"
    )


def _difference(ctx: CheckContext, o: int, first: torch.Tensor, second: torch.Tensor):
    """How output ``o`` of a second call differs from the first's, or None (within the
    dtype's tolerance: a sum in another order is no difference)."""
    if first.shape != second.shape:
        return f"output {o} of shape {shape_text(first)} then {shape_text(second)}"
    bad = mismatch(second, first, *ctx.parity_tolerances(first.dtype))
    return None if bad is None else f"output {o}: max abs error {bad[0]:.1e}"


def _require_repeatable(ctx: CheckContext, tensors: frozenset[int], outs: list) -> None:
    """Fail unless a second call of fn, on fresh copies of the same inputs, gives the
    floating-point outputs ``outs`` of the first."""
    try:
        again = float_tensors(ctx.fn(*ctx.full_inputs(ctx.leaves(), copied=tensors)))
    except Exception as exc:  # noqa: BLE001 - fn's own error, in words
        raise CheckFailure(f"fn raised on its second call: {explain_error(exc)}") from None
    differences = [_difference(ctx, o, a, b) for o, (a, b) in enumerate(zip(outs, again))]
    if len(again) != len(outs):
        differences.insert(0, f"{len(outs)} then {len(again)} floating-point outputs")
    differ = next((d for d in differences if d is not None), None)
    if differ is None:
        return
    drawn = outside_generators_drawn(lambda: ctx.fn(*ctx.full_inputs(ctx.leaves(), copied=tensors)))
    if drawn:
        raise CheckFailure(
            f"fn gave different outputs on two calls with the same inputs ({differ}): it "
            f"draws random numbers from {' and '.join(drawn)}, which the checks cannot "
            "start from one seed for every call, as they do torch's generators; every "
            "check compares calls of fn: draw with torch instead (torch.rand_like(x), or "
            "a torch.Generator passed as an input)"
        )
    raise CheckFailure(
        f"fn gave different outputs on two calls with the same inputs ({differ}), "
        "although every call starts torch's generators from the same seed (a dropout "
        "drawing its mask with torch.rand* passes): it keeps state between calls (a "
        "counter, a tensor it updates) or draws random numbers torch does not seed "
        "(Python's random, NumPy, a torch.Generator made inside fn: pass it as an "
        "input); every check compares calls of fn, so make them agree"
    )


def _refuse_integer_outputs(out: Any) -> None:
    """A :class:`UsageError` when fn returned tensors, none of them floating point (an
    argmax's or top-k's indices, a mask): they have no gradient, so no check has anything
    to compare (torch's gradcheck passes such a fn having compared nothing)."""
    tensors = [t for t in leaves(out) if isinstance(t, torch.Tensor)]
    if not tensors:
        return
    returned = ", ".join(f"{t.dtype} of shape {shape_text(t)}" for t in tensors[:3])
    raise UsageError(
        f"check_function: fn returned only integer or bool tensors ({returned}), which "
        "have no gradient (an argmax's or a top-k's indices, a mask): nothing to "
        "differentiate, so nothing to check (torch.autograd.gradcheck passes such a fn "
        "without comparing anything); check a function with a floating-point output "
        "instead, such as the values those indices select"
    )


def _refused_inputs(ctx: CheckContext, error: str, where: tuple[str, bool] | None) -> UsageError:
    """The usage error for a fn whose first call raised ``ValueError`` (``error``, in
    words) on the given inputs: Python's signal of an argument it refuses (a Function
    checking that its input is positive, or its shape), so no check can run; no backward
    has run yet to be blamed. ``where`` (:func:`~.explain.raised_at`) names the line of
    fn's code that raised it: a ``raise`` statement of fn's refuses the inputs on purpose,
    while an operation failing (``a, b = x.shape`` on a 3-D x) is more likely a bug, and
    the message puts that cause first."""
    at = f" ({where[0]})" if where else ""
    refused = (
        "they are not inputs fn takes (values outside its domain, or shapes or dtypes it refuses)"
    )
    if where is None or where[1]:
        causes = f"either {refused} or fn raises it by mistake"
    else:
        causes = (
            "either fn has a bug there (the line is an operation failing, not a raise of "
            f"fn's own refusing them) or {refused}"
        )
    return UsageError(
        f"check_function: fn's first call raised {error}{at}, on the given inputs "
        f"({input_ranges(ctx)}): every check runs fn on them, so {causes}; "
        f"{inputs_in_domain()}"
    )


def _nan_mask(t: torch.Tensor) -> torch.Tensor:
    """Where ``t`` (dense, sparse or complex) is NaN, as a dense bool tensor."""
    values = t.detach()
    return torch.isnan(values.to_dense() if values.layout != torch.strided else values)


def _central_differences_compared(ctx: CheckContext) -> bool:
    """True when a check of :data:`CENTRAL_DIFFERENCE_CHECKS` is among those run."""
    opts = ctx.options
    chosen = set(CENTRAL_DIFFERENCE_CHECKS if opts.checks is None else opts.checks)
    chosen = (chosen | set(opts.require)) - set(opts.skip or ())
    return bool(chosen & CENTRAL_DIFFERENCE_CHECKS)


def _holds_nan(arg: object) -> bool:
    """True when ``arg`` is a floating-point or complex tensor holding a NaN."""
    if not isinstance(arg, torch.Tensor) or not (arg.is_floating_point() or arg.is_complex()):
        return False
    return bool(_nan_mask(arg).any())


def _reference_nan_too(ctx: CheckContext, o: int, nan: torch.Tensor) -> tuple[bool, str] | None:
    """What the reference says of the inputs where fn's output ``o`` is NaN (the mask
    ``nan``): ``(True, words)`` when they lie outside its domain too (its output is NaN
    there, or it refuses them with a ``ValueError``), ``(False, words)`` when it cannot
    tell (no reference: ``""``, or it raises another error). None when the reference is
    finite somewhere fn gives NaN (fn's own fault, for the checks to find)."""
    if ctx.reference is None:
        return False, "no reference is given"
    try:
        ref_outs = float_tensors(ctx.call(ctx.reference, ctx.leaves()))
    except ValueError as exc:
        return True, f"the reference refuses them too ({explain_error(exc)})"
    except Exception as exc:  # noqa: BLE001 - the reference cannot judge fn here
        return False, f"the reference raised {explain_error(exc)} on them"
    if o >= len(ref_outs) or ref_outs[o].shape != nan.shape:
        return None
    if not bool(_nan_mask(ref_outs[o])[nan].all()):
        return None
    return True, "the reference's output is NaN there too"


def _refuse_nan_outside_domain(ctx: CheckContext, outs: list[torch.Tensor]) -> None:
    """A :class:`UsageError` when an output of fn is NaN at the given inputs (a log or
    sqrt of a negative number, an acos beyond [-1, 1]) where the reference's is NaN too
    or the reference refuses them, or no reference judges them: no derivative exists
    there, and a correct backward would fail gradcheck against NaN central differences;
    without a reference's judgement the message also says fn may produce NaN by mistake.
    Not when an input holds NaN (the caller's on purpose, which fn's outputs carry on),
    nor when no check comparing with central differences runs."""
    if not _central_differences_compared(ctx) or any(_holds_nan(a) for a in ctx.args):
        return
    for o, out in enumerate(outs):
        nan = _nan_mask(out)
        if not bool(nan.any()):
            continue
        reference = _reference_nan_too(ctx, o, nan)
        if reference is None:
            continue
        first = tuple(int(i) for i in nan.nonzero()[0])
        raise UsageError(
            f"check_function: output {o} of fn is NaN at {int(nan.sum())} of "
            f"{nan.numel()} elements (first at index {first}) for the given inputs "
            f"({input_ranges(ctx)}){_nan_cause(*reference)}; {inputs_in_domain()}"
        )


def _nan_cause(outside_its_domain_too: bool, reference: str) -> str:
    """Why fn's output may be NaN at the given inputs: outside its domain, when the
    reference (``reference``, in words) says so too; else nothing tells that from a
    forward producing NaN by mistake, and the message says both."""
    outside = (
        "outside fn's domain (a log or a sqrt of a negative number, an acos beyond "
        "[-1, 1]), where no derivative exists to check"
    )
    if outside_its_domain_too:
        return f", where {reference}: they lie {outside}"
    return (
        f" and {reference}: either they lie {outside}, or fn produces NaN where it should "
        "not (a reference would tell: its outputs are compared with fn's)"
    )


def check_forward(ctx: CheckContext) -> Passed:
    """Calls fn twice; records the shapes of its floating-point outputs and the inputs it
    modifies in place (``mark_dirty``) for later checks; the two calls must agree."""
    tensors = frozenset(i for i, a in enumerate(ctx.args) if isinstance(a, torch.Tensor))
    full = ctx.full_inputs(ctx.leaves(), copied=tensors)
    versions = {i: full[i]._version for i in tensors}
    try:
        out = ctx.fn(*full)
    except Exception as exc:  # noqa: BLE001 - fn's own error, in words
        error = explain_error(exc)
        hint = _cast_hint(ctx, error)
        where = raised_at(exc)
        if isinstance(exc, ValueError) and not hint:
            raise _refused_inputs(ctx, error, where) from exc
        at = f" ({where[0]})" if where else ""
        raise CheckFailure(f"fn raised {error}{at}{hint}") from None
    ctx.dirty_inputs = _written_and_returned(full, versions, out)
    ctx.sparse_outputs = any(
        isinstance(t, torch.Tensor) and t.layout != torch.strided for t in leaves(out)
    )
    outs = float_tensors(out)
    if not outs:
        _refuse_integer_outputs(out)
        raise CheckFailure(
            f"fn returned no floating-point tensor (got {type(out).__name__}); nothing to "
            "differentiate"
        )
    if not any(t.requires_grad for t in outs):
        raise CheckFailure(
            "no output requires grad although the inputs do: fn detached its result or "
            "computed it under torch.no_grad()"
        )
    _refuse_nan_outside_domain(ctx, outs)
    _require_repeatable(ctx, tensors, outs)
    ctx.out_shapes = [tuple(t.shape) for t in outs]
    ctx.out_dtypes = [t.dtype for t in outs]
    shapes = ", ".join(shape_text(t) for t in outs)
    note = f"{len(outs)} output(s) of shape {shapes}"
    if ctx.dirty_inputs:
        dirty = ", ".join(f"input {i}" for i in sorted(ctx.dirty_inputs))
        note += f"; modifies {dirty} in place (mark_dirty): checked on non-leaf copies"
    if ctx.sparse_outputs:
        note += "; sparse outputs checked through .to_dense()"
    return Passed(note)
