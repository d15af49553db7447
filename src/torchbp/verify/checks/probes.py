"""The ``extreme_values`` check: outputs and gradients on inputs derived from the user's
example inputs - scaled up (large logits: overflow), scaled down to near zero (around the
kinks of piecewise functions), exactly zero and rounded to integers (on the kinks, e.g.
of relu at 0 or of clamp(-1, 1) at +-1) - equal the reference's.

Random example inputs of moderate size never reach these regions: a softmax without the
max trick, or a ReLU whose gradient at 0 differs from the reference's, passes gradcheck.
A probe on which the reference itself raises is left out, and so is one fn's forward
refuses with a ``ValueError`` (a Function checking that its input is positive, refusing
the zero probe: outside its domain, said in the note); one on which fn raises anything
else, or its backward raises anything, but the reference works fails. Where the
reference overflows on the scaled-up probe (a non-finite value where fn's is finite: a
textbook formula given as the reference of a stable Function), it cannot judge fn, and
those values are left out too; on the other probes a non-finite reference value is
exact (log(0) = -inf) and compared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from torchbp.verify.checks.compare import float_tensors, require_close, shape_text
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.explain import explain_error
from torchbp.verify.checks.jacobians import one_sided_bracket
from torchbp.verify.checks.outcomes import CheckFailure, CheckSkip, Passed
from torchbp.verify.checks.parity import grads_or_none
from torchbp.verify.checks.spelling import option

__all__ = ["PROBES", "Probe", "check_extreme_values"]


class Probe(NamedTuple):
    """One probe: ``label`` for messages, the ``transform`` applied to every grad input,
    ``large`` when it drives values up (where a non-finite reference value is an overflow)
    and ``atol_floor``, the least fraction of the absolute tolerance kept for tensors whose
    largest magnitude is below 1 (:func:`_probe_tolerance`)."""

    label: str
    transform: Callable[[torch.Tensor], torch.Tensor]
    large: bool
    atol_floor: float


#: The probes, in the order they run. On the near-zero one fn's values are about 1e-6 of
#: the usual: an absolute tolerance sized for values about 1 would accept any of them, so
#: there it shrinks with the values compared (down to 1e-6 of itself, for a tensor that is
#: zero in exact arithmetic and holds only rounding).
PROBES: tuple[Probe, ...] = (
    Probe("inputs scaled by 1e3 (large values)", lambda x: x * 1e3, True, 1.0),
    Probe("inputs scaled by 1e-6 (near zero, around kinks)", lambda x: x * 1e-6, False, 1e-6),
    Probe("inputs set to zero (on kinks)", torch.zeros_like, False, 1.0),
    Probe("inputs rounded to integers (on kinks at 0, +-1, ...)", torch.round, False, 1.0),
)


def _forward(ctx: CheckContext, f, inputs):
    """Fresh leaves of ``inputs`` and the floating-point outputs of ``f`` on them."""
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    return leaves, float_tensors(ctx.call(f, leaves))


def _run(ctx: CheckContext, f, inputs, vs=None):
    """Outputs of ``f`` on ``inputs`` (fresh leaves) and the gradients for ``vs`` (random
    grad_outputs drawn here when None; None for an input ``f`` does not use)."""
    leaves, outs = _forward(ctx, f, inputs)
    if vs is None:
        vs = ctx.randn_like_outputs(outs)
    return [o.detach() for o in outs], grads_or_none(outs, leaves, vs), vs


def _run_fn(ctx: CheckContext, inputs, vs, label: str):
    """fn's outputs and gradients for ``vs`` on the probe ``label``'s ``inputs``, or None
    when fn's forward refuses them with a ``ValueError`` (outside its domain: x <= 0 for a
    log). Any other error of the forward, and any error of its backward (a
    ``ValueError`` too), fails where the reference works."""
    try:
        leaves, outs = _forward(ctx, ctx.fn, inputs)
    except ValueError:
        return None
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(
            f"fn failed on {label}, where the reference works: {explain_error(exc)}"
        ) from None
    try:
        grads = grads_or_none(outs, leaves, vs)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(
            f"fn's backward failed on {label}, where the reference's works: {explain_error(exc)}"
        ) from None
    return [o.detach() for o in outs], grads


def _probe_inputs(ctx: CheckContext, transform: Callable[[torch.Tensor], torch.Tensor]):
    """The grad inputs with ``transform`` applied to the caller's (a module's parameters,
    differentiated as inputs too, are kept as they are)."""
    return [
        ctx.args[i].detach() if i in ctx.parameter_names else transform(ctx.args[i].detach())
        for i in ctx.grad_idx
    ]


def _gradient_pairs(ctx: CheckContext, grads, ref_grads, inputs):
    """``(what, fn's, the reference's, k)`` gradient of each grad input ``k``, zeros where
    unused; a module parameter the reference does not use (a reference module with its
    own parameters) has nothing to be compared against and is left out."""
    pairs = []
    for k, (a, b) in enumerate(zip(grads, ref_grads)):
        if b is None and ctx.grad_idx[k] in ctx.parameter_names:
            continue
        zeros = torch.zeros_like(inputs[k])
        what = f"gradient of {ctx.input_name(k)}"
        pairs.append((what, zeros if a is None else a, zeros if b is None else b, k))
    return pairs


#: At most this many elements of a gradient that differs from the reference's on a probe
#: are examined for a kink (two calls of fn each).
KINK_ELEMENTS = 64


def _kink_choice_note() -> str:
    """What a message adds when fn's gradient on a probe is a valid one at a kink."""
    return (
        " (another gradient at a kink: fn is not differentiable at each element where its "
        "gradient differs from the reference's - a tie, a threshold - and fn's lies there "
        "between the one-sided differences, a valid choice; the reference picks another: "
        "follow its choice if you mean to match it, as one matches native relu'(0) = 0, "
        "or else, the reference's choice being as arbitrary, pass "
        f"{option('skip', ['extreme_values'])})"
    )


def _one_sided_gradient(ctx: CheckContext, inputs, k: int, j: int, mid, vs):
    """The range of ``v^T d`` over the derivatives ``d`` of fn along element ``j`` of
    input ``k`` lying between its one-sided differences
    (:func:`~torchbp.verify.checks.jacobians.one_sided_bracket`), and whether those differ
    (fn is not differentiable there); None when fn raises on one side (a probe on the
    edge of its domain, a probability of exactly 1: no difference to take there)."""
    eps = ctx.options.eps
    quotients = []
    for step in (eps, -eps):
        moved = [x.detach() for x in inputs]
        flat = moved[k].clone().reshape(-1)
        flat[j] += step
        moved[k] = flat.reshape(inputs[k].shape)
        try:
            with torch.no_grad():
                outs = float_tensors(ctx.call(ctx.fn, moved))
        except Exception:  # noqa: BLE001 - outside fn's domain: the mismatch stands
            return None
        quotients.append([(o.detach() - m) / step for o, m in zip(outs, mid)])
    right, left = quotients
    kink = any(
        not torch.allclose(r, lf, ctx.options.rtol, ctx.options.atol) for r, lf in zip(right, left)
    )
    return one_sided_bracket(left, right, vs), kink


def _kink_choice(ctx: CheckContext, inputs, vs, mid, k: int, a, b, tolerance) -> str:
    """:func:`_kink_choice_note` when fn's gradient ``a`` of input ``k`` on a probe differs
    from the reference's ``b`` only at elements (at most :data:`KINK_ELEMENTS`) where fn
    is not differentiable and ``a`` lies between the one-sided differences there; else
    empty (a plain wrong gradient)."""
    atol, rtol = tolerance
    differing = (~torch.isclose(a, b, rtol, atol)).reshape(-1).nonzero().flatten().tolist()
    if not differing or len(differing) > KINK_ELEMENTS:
        return ""
    for j in differing:
        one_sided = _one_sided_gradient(ctx, inputs, k, j, mid, vs)
        if one_sided is None:
            return ""
        (low, high), kink = one_sided
        value = float(a.reshape(-1)[j])
        slack = atol + rtol * max(abs(low), abs(high))
        if not kink or not low - slack <= value <= high + slack:
            return ""
    return _kink_choice_note()


def _where_reference_finite(
    a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """fn's ``a`` and the reference's ``b`` with the values where the reference overflowed
    (``b`` non-finite, ``a`` finite; or ``b`` NaN, ``a`` infinite: the reference's
    ``inf - inf`` where fn's order of operations kept the infinity) set to zero in both,
    and how many there were."""
    overflowed = (~torch.isfinite(b) & torch.isfinite(a)) | (torch.isnan(b) & torch.isinf(a))
    count = int(overflowed.sum())
    if not count:
        return a, b, 0
    return a.masked_fill(overflowed, 0.0), b.masked_fill(overflowed, 0.0), count


def _where_reference_defined(
    a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """fn's gradient ``a`` and the reference's ``b`` with the values where the reference's
    is NaN and fn's finite (a gradient the reference leaves undefined, as the reference
    check leaves it out: torch.logsumexp of a row of -inf) set to zero in both, and how
    many there were."""
    undefined = torch.isnan(b) & torch.isfinite(a)
    count = int(undefined.sum())
    if not count:
        return a, b, 0
    return a.masked_fill(undefined, 0.0), b.masked_fill(undefined, 0.0), count


def _probe_tolerance(
    b: torch.Tensor, tolerance: tuple[float, float], probe: Probe
) -> tuple[float, float]:
    """``(atol, rtol)`` to compare a tensor with the reference's ``b`` on ``probe``: a
    norm-wise comparison. Scaled-up inputs make large terms that cancel: the absolute
    tolerance grows with ``b``'s largest finite magnitude; below 1 it shrinks with it, to
    no less than ``probe.atol_floor`` of itself (values about 1e-6 are compared to about
    the precision of values about 1, not accepted whatever they are) nor than the smallest
    normal number of ``b``'s dtype."""
    finite = b.detach().abs().masked_fill(~torch.isfinite(b), 0.0)
    scale = float(finite.max()) if finite.numel() else 0.0
    atol = tolerance[0] * min(1.0, max(scale, probe.atol_floor))
    if b.is_floating_point():
        # below the dtype's smallest normal number (float16's 6e-5) values are subnormal,
        # with an absolute precision no better than that
        atol = max(atol, torch.finfo(b.dtype).tiny)
    return atol + tolerance[1] * scale, tolerance[1]


def _require_close_on_probe(
    a: torch.Tensor,
    b: torch.Tensor,
    tolerance: tuple[float, float],
    what: str,
    probe: Probe,
    *,
    gradient: bool,
) -> tuple[tuple[float, float], int]:
    """The error of fn's ``a`` against the reference's ``b`` (``what``: which tensor on which
    probe; a ``gradient`` or an output) and how many values were left out where the
    reference overflowed (only on a ``large`` probe) or, for a gradient, is NaN where fn's
    is finite, or a failed check (tolerance: :func:`_probe_tolerance`)."""
    if a.shape != b.shape:
        raise CheckFailure(f"{what} has shape {shape_text(a)}, the reference's {shape_text(b)}")
    overflowed = 0
    if probe.large:
        a, b, overflowed = _where_reference_finite(a, b)
    elif gradient:
        a, b, overflowed = _where_reference_defined(a, b)
    note = _likely_cause(a, b)
    problem = f"{what} differs from the reference"
    probe_tolerance = _probe_tolerance(b, tolerance, probe)
    errors = require_close(a, b, probe_tolerance, problem, note=note, show_index=True)
    return errors, overflowed


#: The hint of a mismatch on a probe where fn and the reference are finite.
UNDERFLOW_OR_KINK = " (underflow, or another value or gradient at a kink?)"


def _likely_cause(a: torch.Tensor, b: torch.Tensor) -> str:
    """A hint at why fn's ``a`` differs from the reference's ``b`` on a probe, read off
    where fn is not finite and the reference is."""
    finite_ref = torch.isfinite(b)
    if bool((torch.isnan(a) & finite_ref).any()):
        return (
            " (fn gives NaN where the reference is finite: a 0/0, inf - inf or 0 * inf, "
            "e.g. a division by a norm or sum that can be zero, or exp without the max "
            "trick?)"
        )
    if bool((torch.isinf(a) & finite_ref).any()):
        return " (fn overflows where the reference is finite: exp without the max trick?)"
    return UNDERFLOW_OR_KINK


def _nothing_compared(refused: list[str]) -> str:
    """Why no probe was compared: the reference raised on the others, and fn refused
    ``refused`` with a ``ValueError`` (inputs outside its domain, not a fault)."""
    if not refused:
        return "the reference raised on every probe"
    return (
        f"fn refused {', '.join(refused)} with a ValueError (outside its domain) and the "
        "reference raised on the other probes"
    )


def check_extreme_values(ctx: CheckContext) -> Passed:
    """fn against the reference on each probe (outputs and gradients; dtype-aware
    tolerances relative to each tensor's largest finite magnitude; infinities and NaNs must
    match); skipped without a reference or when the reference check failed."""
    if ctx.reference is None:
        raise CheckSkip("no reference given (the probes compare fn with it)")
    if ctx.failed("reference"):
        raise CheckSkip("skipped because reference failed (fn differs on the example inputs)")
    tolerance = ctx.parity_tolerances()
    worst, compared, overflowed, refused = (0.0, 0.0), 0, 0, []
    for probe in PROBES:
        label = probe.label
        inputs = _probe_inputs(ctx, probe.transform)
        try:
            ref_outs, ref_grads, vs = _run(ctx, ctx.reference, inputs)
        except Exception:  # noqa: BLE001 - the probe is outside the reference's domain
            continue
        ran = _run_fn(ctx, inputs, vs, label)
        if ran is None:  # fn refuses the probe as outside its domain
            refused.append(label)
            continue
        outs, grads = ran
        compared += 1
        if len(outs) != len(ref_outs):
            raise CheckFailure(
                f"on {label}: fn returned {len(outs)} output(s), the reference {len(ref_outs)}"
            )
        pairs = [(f"output {o}", a, b, None) for o, (a, b) in enumerate(zip(outs, ref_outs))]
        pairs += _gradient_pairs(ctx, grads, ref_grads, inputs)
        for what, a, b, k in pairs:
            try:
                errors, count = _require_close_on_probe(
                    a, b, tolerance, f"on {label}: {what}", probe, gradient=k is not None
                )
            except CheckFailure as failure:
                if k is None or probe.large:
                    raise
                note = _kink_choice(ctx, inputs, vs, outs, k, a, b, tolerance)
                message = failure.message
                if note:
                    message = message.removesuffix(UNDERFLOW_OR_KINK) + note
                raise CheckFailure(message, failure.abs_err, failure.rel_err) from None
            worst, overflowed = max(worst, errors), overflowed + count
    if not compared:
        raise CheckSkip(_nothing_compared(refused))
    note = f"{compared} probe(s): large, near-zero, zero and integer inputs"
    if refused:
        note += f"; fn refused {', '.join(refused)} (ValueError: outside its domain)"
    if overflowed:
        note += (
            f"; {overflowed} value(s) where the reference overflowed (non-finite where "
            "fn's is finite, or NaN where fn's is infinite) or its gradient is NaN "
            "(undefined) where fn's is finite not compared"
        )
    return Passed(note, *worst)
