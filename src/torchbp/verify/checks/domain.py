"""Inputs too close to the edge of fn's domain for central differences: a check comparing
with them (``gradcheck``, ``gradgradcheck``, ``forward_ad``) evaluates fn at each input
element shifted by +-``eps``, and a log or sqrt of an input within ``eps`` of 0 is NaN,
-inf (a log at 0 itself) or refused there (a Function raising ``ValueError`` for
``x <= 0``). Such a check's failure
is then no fault of fn's derivatives: :func:`refuse_inputs_near_domain_edge` turns it into
a usage error saying how to give other inputs, or, when an earlier check already failed on
its own, skips the check with those words and lets that failure stand."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

import torch

from torchbp.verify.checks.compare import float_tensors, shape_text
from torchbp.verify.checks.context import FULL_JACOBIAN_ELEMENTS, CheckContext
from torchbp.verify.checks.explain import explain_error, raised_in_derivative
from torchbp.verify.checks.outcomes import CheckFailure, CheckSkip, UsageError
from torchbp.verify.checks.spelling import inputs_in_domain, option

__all__ = [
    "CENTRAL_DIFFERENCE_CHECKS",
    "Transform",
    "batch_scales",
    "constant_infinities",
    "first_accepted",
    "input_ranges",
    "refuse_inputs_near_domain_edge",
]

#: The checks comparing fn's derivatives with its central differences.
CENTRAL_DIFFERENCE_CHECKS = frozenset({"gradcheck", "gradgradcheck", "forward_ad"})


def input_ranges(ctx: CheckContext, limit: int = 4) -> str:
    """The shape and range of values of each real floating-point tensor input (not a
    module's parameter), e.g. ``"input 0 of shape (3, 4) in [-2.27, 1.95]"``: what a
    message about inputs fn refuses names, for the caller to see which inputs it was
    given (at most ``limit`` of them)."""
    ranges = []
    for i, arg in enumerate(ctx.args):
        if i in ctx.parameter_names or not _has_values(arg):
            continue
        low, high = float(arg.detach().min()), float(arg.detach().max())
        ranges.append(f"input {i} of shape {shape_text(arg)} in [{low:.3g}, {high:.3g}]")
    if len(ranges) > limit:
        ranges = [*ranges[:limit], "..."]
    return ", ".join(ranges) or "no floating-point tensor input"


def _has_values(arg: object) -> bool:
    """True for a real floating-point, strided tensor holding values to read."""
    return (
        isinstance(arg, torch.Tensor)
        and arg.is_floating_point()
        and arg.layout == torch.strided
        and not arg.is_meta
        and arg.numel() > 0
    )


def _values(out: torch.Tensor) -> torch.Tensor:
    """``out`` detached and dense (a sparse output through ``.to_dense()``)."""
    values = out.detach()
    return values.to_dense() if values.layout != torch.strided else values


def _outputs(ctx: CheckContext, inputs: list) -> list[torch.Tensor]:
    """fn's floating-point outputs on ``inputs`` (without grad), detached and dense."""
    with torch.no_grad():
        return [_values(out) for out in float_tensors(ctx.call(ctx.fn, inputs))]


def _newly_non_finite(outs: list[torch.Tensor], before: list[torch.Tensor]) -> str | None:
    """Words for the first output of ``outs`` that is NaN or infinite where the same
    output at the given inputs, ``before``, is finite (a log's -inf at 0, a sqrt's NaN
    below it), or None."""
    for o, (out, was) in enumerate(zip(outs, before)):
        if out.shape != was.shape:
            continue
        new = ~torch.isfinite(out) & torch.isfinite(was)
        if not bool(new.any()):
            continue
        nan = torch.isnan(out[new])
        kind = "NaN" if bool(nan.all()) else "NaN or infinite" if bool(nan.any()) else "infinite"
        first = tuple(int(i) for i in new.nonzero()[0])
        return f"output {o} of fn is {kind} at {int(new.sum())} element(s) (first at index {first})"
    return None


def _shifted_inputs(ctx: CheckContext) -> Iterator[tuple[str, list]]:
    """The differentiable inputs with one of them shifted by -``eps`` or +``eps``, each
    with words naming the shift: first every element of an input at once (a log's or a
    sqrt's edge), then, when the differentiable inputs hold at most
    :data:`FULL_JACOBIAN_ELEMENTS` elements (as many as gradcheck shifts one at a time),
    each element alone (two values of an input fn needs sorted or distinct, within eps of
    each other: shifting all of them keeps their order)."""
    eps = float(ctx.options.eps)
    leaves = [x.detach() for x in ctx.leaves()]
    for k, x in enumerate(leaves):
        for step in (-eps, eps):
            yield f"{ctx.input_name(k)} shifted by {step:+g}", _replaced(leaves, k, x + step)
    if sum(x.numel() for x in leaves) > FULL_JACOBIAN_ELEMENTS:
        return
    for k, x in enumerate(leaves):
        for flat in range(x.numel()):
            index = _unravel(flat, tuple(x.shape))
            for step in (-eps, eps):
                shifted = x.clone()
                shifted[index] += step
                where = f"element {index} of {ctx.input_name(k)} shifted by {step:+g}"
                yield where, _replaced(leaves, k, shifted)


def _replaced(leaves: list[torch.Tensor], k: int, x: torch.Tensor) -> list[torch.Tensor]:
    """``leaves`` with ``x`` in place of its ``k``-th tensor."""
    return [*leaves[:k], x, *leaves[k + 1 :]]


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The index of the ``flat``-th element, in row-major order, of a tensor of ``shape``."""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def _outside_at(ctx: CheckContext, shifted: list, before: list[torch.Tensor]) -> str | None:
    """What fn does outside its domain at the differentiable inputs ``shifted``: refuses
    them with a ``ValueError``, or gives NaN or an infinity where its outputs at the given
    inputs, ``before``, are finite; None when neither (fn raising anything else says
    nothing of a domain)."""
    try:
        outs = _outputs(ctx, shifted)
    except ValueError as exc:
        return f"fn raised {explain_error(exc)}"
    except Exception:  # noqa: BLE001 - not a refusal of values: the failure stands
        return None
    return _newly_non_finite(outs, before)


def _outputs_at_inputs(ctx: CheckContext) -> list[torch.Tensor] | None:
    """fn's outputs at the given inputs; None when fn raises there or an output is NaN
    (no edge to be near: fn is outside its domain, or wrong, already)."""
    try:
        outs = _outputs(ctx, ctx.leaves())
    except Exception:  # noqa: BLE001 - fn's own failure, for the check to report
        return None
    return None if any(bool(torch.isnan(out).any()) for out in outs) else outs


#: How a comparison with a non-finite numerical derivative ends a failure's message: the
#: central differences met NaN or an infinity (a log's -inf at 0) at the shifted input.
_NON_FINITE_NUMERICAL = re.compile(r"vs numerical (nan|-?inf)\b")


def _domain_like(cause: BaseException) -> bool:
    """True when a check's failure ``cause`` may come from fn leaving its domain: fn's
    forward raised ``ValueError`` (refusing values; a failed check made from it keeps it
    as its context), or the numerical derivative was NaN or infinite. A finite mismatch is a wrong
    derivative, whatever fn does beside its inputs, and so is a ``ValueError`` raised in
    a backward or jvp (:func:`~torchbp.verify.checks.explain.raised_in_derivative`)."""
    if isinstance(cause, CheckFailure):
        if _NON_FINITE_NUMERICAL.search(cause.message):
            return True
        cause = cause.__context__  # what the check's failure was made from, if anything
    return isinstance(cause, ValueError) and not raised_in_derivative(cause)


def refuse_inputs_near_domain_edge(ctx: CheckContext, check: str, cause: BaseException) -> None:
    """A :class:`UsageError` when ``check`` (one of :data:`CENTRAL_DIFFERENCE_CHECKS`)
    failed with ``cause`` because the given inputs lie within ``eps`` of the edge of fn's
    domain: the failure is a ``ValueError`` of fn or a comparison with a NaN or infinite
    numerical derivative, and fn is free of NaN at the inputs but refuses (``ValueError``)
    or gives NaN or an infinity where it was finite at an input shifted by +-``eps``
    (every element at once, then each element alone: :func:`_shifted_inputs`), or fn
    refused, with the failure's ``ValueError``, inputs the check's central differences
    moved by at most ``eps`` per element (any size, and a fast mode's random direction);
    a :class:`CheckSkip` saying so instead when an
    earlier check failed (:func:`_near_edge`). Nothing otherwise (the failure stands)."""
    if check not in CENTRAL_DIFFERENCE_CHECKS or not _domain_like(cause):
        return
    before = _outputs_at_inputs(ctx)
    if before is None:
        return
    eps = float(ctx.options.eps)
    for where, found in _found_outside(ctx, before, cause):
        raise _near_edge(
            ctx,
            f"check_function: {check} compares with central differences, which "
            f"evaluate fn at {where} (eps), and there {found}: the given inputs lie "
            "within eps of the edge of fn's domain (a log or a sqrt of a value below "
            "eps? two values fn needs sorted or distinct within eps of each other?); "
            f"pass inputs farther from it or a smaller eps ({option('eps', eps / 100)}); "
            f"{inputs_in_domain()}",
        )


def _found_outside(
    ctx: CheckContext, before: list[torch.Tensor], cause: BaseException
) -> Iterator[tuple[str, str]]:
    """``(where, what fn does there)`` for the first input within eps of the given ones
    at which fn leaves its domain: the shifted inputs of :func:`_shifted_inputs`, then
    those at which the check's central differences called fn and it refused with the
    ``ValueError`` the check failed with, ``cause`` (:func:`_refused_within_eps`: at any
    size, and along a fast mode's random direction); nothing when there is none."""
    for where, shifted in _shifted_inputs(ctx):
        found = _outside_at(ctx, shifted, before)
        if found is not None:
            yield where, found
            return
    refusal = cause.__context__ if isinstance(cause, CheckFailure) else cause
    refused = _refused_within_eps(ctx)
    if refused is not None and isinstance(refusal, ValueError):
        yield refused, f"fn raised {explain_error(refusal)}"


def _refused_within_eps(ctx: CheckContext) -> str | None:
    """Words naming the inputs at which the check called fn and fn refused them with a
    ``ValueError`` (:attr:`~.context.CheckContext.refused_inputs`), when they differ from
    the given ones by at most ``eps`` in every element, as central differences shift
    them: ``"element (0,) of input 0 shifted by +1e-06"``, or ``"input 0 with 5000
    elements shifted by up to 1.4e-08"`` along a fast mode's random direction; None when
    fn refused no such inputs."""
    refused, given = ctx.refused_inputs, [x.detach() for x in ctx.leaves()]
    if refused is None or [r.shape for r in refused] != [x.shape for x in given]:
        return None
    shifts = [r.to(x.dtype) - x for r, x in zip(refused, given)]
    largest = max((float(s.abs().max()) for s in shifts if s.numel()), default=0.0)
    if not 0 < largest <= float(ctx.options.eps) * (1 + 1e-6):
        return None  # not where central differences go: no edge within eps
    return " and ".join(
        _shift_words(ctx.input_name(k), shift) for k, shift in enumerate(shifts) if shift.any()
    )


def _shift_words(name: str, shift: torch.Tensor) -> str:
    """How a message names an input ``name`` moved by ``shift`` (nonzero somewhere)."""
    moved = shift.nonzero()
    if len(moved) == 1:
        index = tuple(int(i) for i in moved[0])
        return f"element {index} of {name} shifted by {float(shift[index]):+g}"
    return f"{name} with {len(moved)} elements shifted by up to {float(shift.abs().max()):.2g}"


def _near_edge(ctx: CheckContext, message: str) -> UsageError | CheckSkip:
    """How a check ends on inputs within eps of fn's domain edge (``message`` says so): a
    :class:`UsageError`, as no verdict on fn can be drawn from them; but when an earlier
    check already failed on its own (a finite mismatch, which no input near an edge
    explains), that verdict stands and only this check is skipped, with ``message``."""
    failed = [name for name, result in ctx.results.items() if result.failed]
    if not failed:
        return UsageError(message)
    return CheckSkip(
        f"{message.removeprefix('check_function: ')} (not a usage error: "
        f"{', '.join(failed)} already failed)"
    )


#: A way to make other values of the differentiable inputs (all of them, in order) from
#: the given ones.
Transform = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _accepts(ctx: CheckContext, inputs: list[torch.Tensor], before: list[torch.Tensor]) -> bool:
    """Whether fn runs on the differentiable inputs ``inputs`` without raising and without
    NaN or an infinity where its outputs at the given inputs, ``before``, are finite."""
    try:
        outs = _outputs(ctx, inputs)
    except Exception:  # noqa: BLE001 - refused (a ValueError, or torch's own check)
        return False
    return _newly_non_finite(outs, before) is None


def first_accepted(ctx: CheckContext, candidates: Sequence[Sequence[Transform]]) -> int:
    """The position of the first of ``candidates`` (each a few transforms, each making
    values of the differentiable inputs) at all of whose values fn runs as at the given ones: no
    error, no new NaN or infinity. A check needing other inputs (two calls before
    backward, a batch of scaled copies) must not leave fn's domain, as scaling a
    probability or an acos input of 0.9 up by 1.25 does. 0 when fn accepts none of them,
    or fails at the given inputs already (the check then shows why)."""
    given = [x.detach() for x in ctx.leaves()]
    try:
        before = _outputs(ctx, given)
    except Exception:  # noqa: BLE001 - fn's own failure, for the check to report
        return 0
    for position, transforms in enumerate(candidates):
        if all(_accepts(ctx, make(given), before) for make in transforms):
            return position
    return 0


def batch_scales(ctx: CheckContext, batch: int) -> list[float]:
    """The factors of the ``batch`` copies of the differentiable inputs the vmap checks
    stack: ``1, 1.25, 1.5, ...``, or ``1, 1/1.25, 1/1.5, ...`` when fn refuses a copy
    scaled up (:func:`first_accepted`: a probability or an acos input near 1)."""
    up = [1.0 + 0.25 * b for b in range(batch)]
    candidates = [up, [1.0 / s for s in up]]
    position = first_accepted(ctx, [[_times(s) for s in scales[1:]] for scales in candidates])
    return candidates[position]


def _times(factor: float) -> Transform:
    """The transform scaling every input by ``factor``."""
    return lambda xs: [x * factor for x in xs]


def constant_infinities(ctx: CheckContext) -> list[torch.Tensor] | None:
    """Per floating-point output of fn, where it is the same infinity at the given inputs
    and at each differentiable input shifted by -``eps`` and +``eps`` (a masked attention
    score), where central differences would take ``inf - inf``, NaN: the checks comparing
    with them leave fn's derivatives there out (which one is right, 0 after
    ``masked_fill(mask, -inf)`` or 1 after adding a ``-inf`` mask, only a reference can
    say). None when there is none (or fn raises)."""
    try:
        before = _outputs(ctx, [x.detach() for x in ctx.leaves()])
        masks = [torch.isinf(out) for out in before]
        if not any(bool(mask.any()) for mask in masks):
            return None
        eps = float(ctx.options.eps)
        leaves = [x.detach() for x in ctx.leaves()]
        for k, x in enumerate(leaves):
            for step in (-eps, eps):
                outs = _outputs(ctx, _replaced(leaves, k, x + step))
                masks = [m & (out == was) for m, out, was in zip(masks, outs, before)]
    except Exception:  # noqa: BLE001 - fn's own failure, for the check to report
        return None
    return masks if any(bool(mask.any()) for mask in masks) else None
