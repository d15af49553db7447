"""Backward and jvp must be linear: backward returns the vector-Jacobian product
``J^T v``, linear in the grad_output ``v``, and jvp the Jacobian-vector product ``J u``,
linear in the tangent ``u``.

The Jacobians the ``gradcheck`` and ``forward_ad`` checks compare are built one one-hot
``v`` (or ``u``) at a time, as torch's gradcheck builds them: a backward computing
``2 * x * g.abs()`` or clipping ``g.clamp(-1, 1)``, or a jvp computing ``t * t.sum()``,
is right for every one-hot vector and wrong for nearly any other, which is what
autograd hands it in training (and what ``torch.func.jvp`` is given). So is a backward
(or jvp) giving NaN or inf for a dense vector only, where fn's derivatives are finite: NaN
compares equal to NaN in the linearity test, so finiteness is required first. And a map
linear in dense vectors may still be wrong for all of them (another path for several
nonzeros): its results for dense random vectors are compared with central differences."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from torchbp.verify.checks.compare import (
    dense,
    difference,
    input_grads,
    mismatch,
    require_close,
    unravel,
)
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.jacobians import (
    directional_quotients,
    one_sided_bracket,
    uniform_direction,
    unit_direction,
)
from torchbp.verify.checks.outcomes import CheckFailure
from torchbp.verify.checks.spelling import option_name

__all__ = [
    "departure_note",
    "require_backward_like_central_differences",
    "require_backward_linear",
    "require_jvp_like_central_differences",
    "require_jvp_linear",
]

#: The combination compared: f(a + SCALE * b) against f(a) + SCALE * f(b).
SCALE = 2.0

#: Below this relative error a departure from linearity is a rounding error's size: a
#: result computed in a narrower dtype (float16, float32) than the float64 inputs.
ROUNDING_SIZE = 1e-2


def _rounding_note() -> str:
    """The likely cause of a departure of a rounding error's size, and the options that
    accept it (gradcheck's atol / rtol loosen only the comparison with central
    differences)."""
    return (
        " (of a rounding error's size: does it compute in a narrower dtype, float16 or "
        "float32, than its float64 inputs? that loses precision in every use; if it does "
        f"so on purpose, pass {option_name('parity_atol')} (above that max abs error) or "
        f"{option_name('parity_rtol')} to accept it: {option_name('atol')} and "
        f"{option_name('rtol')} loosen only the comparison with the numerical gradient)"
    )


def departure_note(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: tuple[float, float], note: str
) -> str:
    """The note for a failed comparison of ``actual`` with ``expected`` (what linearity
    says it must be): :func:`_rounding_note` when the worst departure is below
    :data:`ROUNDING_SIZE` relative to ``expected``, else ``note`` (the likely bug)."""
    bad = mismatch(actual, expected, *tolerance)
    return _rounding_note() if bad is not None and bad[1] < ROUNDING_SIZE else note


@dataclass(frozen=True)
class _LinearMap:
    """How messages name a map that must be linear in its vectors.

    Args:
        subject: the map, e.g. ``"backward"``.
        vector: what it is given, e.g. ``"grad_output"``.
        linear_in: how "not linear in ..." names it, e.g. ``"the tangent"``.
        result_name: names its result ``k``, e.g. ``"the gradient of input 0"``.
        note: the likely bug when it is not linear, in parentheses.
    """

    subject: str
    vector: str
    linear_in: str
    result_name: Callable[[int], str]
    note: str


def _require_linear(
    ctx: CheckContext,
    apply: Callable[[Sequence[torch.Tensor]], list[torch.Tensor | None]],
    like: Sequence[torch.Tensor],
    results_like: Sequence[torch.Tensor],
    linear_map: _LinearMap,
) -> None:
    """Fail unless ``apply`` (a map of vectors shaped ``like`` to results shaped
    ``results_like``; None for a zero result) gives for ``a + SCALE * b`` the sum of what
    it gives for ``a`` and ``SCALE`` times what it gives for ``b``, for random ``a``,
    ``b``. First, ``apply`` must give the same results twice (a result that changes from
    run to run is no departure from linearity), and finite ones where fn's derivatives
    are finite (NaN would compare equal to NaN below)."""
    a = [ctx.randn(t.shape, t.dtype) for t in like]
    b = [ctx.randn(t.shape, t.dtype) for t in like]
    mixed = [x + SCALE * y for x, y in zip(a, b)]
    # copies: a backward writing into grad_output is grad_output_safety's finding
    got_a, got_b, got_mixed, again = (apply([v.clone() for v in vs]) for vs in (a, b, mixed, a))
    what = f"{linear_map.subject} (given the same {linear_map.vector}s)"
    _require_repeatable(got_a, again, what, float(ctx.options.nondet_tol))
    _require_finite(ctx, (got_a, got_b, got_mixed), linear_map)
    for k, template in enumerate(results_like):
        zero = torch.zeros_like(template)
        ra, rb, rm = (zero if r[k] is None else dense(r[k]) for r in (got_a, got_b, got_mixed))
        expected = ra + SCALE * rb
        tolerance = ctx.parity_tolerances()
        require_close(
            rm,
            expected,
            tolerance,
            f"{linear_map.subject} is not linear in {linear_map.linear_in}: "
            f"{linear_map.result_name(k)} for a + {SCALE:g} * b differs from that for a "
            f"plus {SCALE:g} times that for b (random a, b)",
            note=departure_note(rm, expected, tolerance, linear_map.note),
            show_index=True,
        )


def _first_non_finite(
    results: Sequence[Sequence[torch.Tensor | None]],
) -> tuple[int, tuple[int, ...], float] | None:
    """``(k, index, value)`` of the first NaN or infinite value of a result ``k`` among
    ``results`` (runs, each a list of results; None a zero result), or None."""
    for run in results:
        for k, r in enumerate(run):
            if r is None:
                continue
            bad = ~torch.isfinite(dense(r))
            if bool(bad.any()):
                flat = int(bad.reshape(-1).nonzero()[0])
                return k, unravel(flat, r.shape), float(dense(r).reshape(-1)[flat])
    return None


def _derivatives_finite(ctx: CheckContext) -> bool:
    """Whether fn's central differences along a random direction (every differentiable
    input moved at once, by ``eps``) are all finite: then its Jacobian is (every entry
    weighs in), and so is every Jacobian product with a finite vector. False when an
    input is sparse (no elementwise step)."""
    base = [x.detach() for x in ctx.leaves()]
    if any(x.layout != torch.strided for x in base):
        return False
    steps = [float(ctx.options.eps) * ctx.randn(x.shape, x.dtype) for x in base]
    with torch.no_grad():
        above = ctx.diff_fn(*[x + s for x, s in zip(base, steps)])
        below = ctx.diff_fn(*[x - s for x, s in zip(base, steps)])
    return all(bool(torch.isfinite(hi - lo).all()) for hi, lo in zip(above, below))


def _require_finite(
    ctx: CheckContext,
    results: Sequence[Sequence[torch.Tensor | None]],
    linear_map: _LinearMap,
) -> None:
    """Fail if the map gave a NaN or infinite result for the finite random vectors
    (``results``: one list per vector) although fn's derivatives are finite here
    (:func:`_derivatives_finite`): the one-hot vectors of gradcheck's Jacobians gave
    finite results, so the map branches on the whole vector (its count of nonzeros, its
    norm) and gives NaN in training, unseen by gradcheck."""
    found = _first_non_finite(results)
    if found is None or not _derivatives_finite(ctx):
        return
    k, index, value = found
    subject, vector = linear_map.subject, linear_map.vector
    raise CheckFailure(
        f"{subject} gives {value} for dense random {vector}s: "
        f"{linear_map.result_name(k)} is {value} at index {index}, although fn's "
        "derivatives are finite here (its central differences along a random direction "
        f"are) and one-hot {vector}s, as gradcheck's Jacobians use, give finite values: "
        f"{subject} must be finite for every finite {vector} (does it branch on the whole "
        f"{vector}, e.g. its count of nonzeros or its norm, or divide by one of them?)",
        math.inf,
        math.inf,
    )


def _gap(x: torch.Tensor | None, y: torch.Tensor | None) -> float:
    """The largest difference of two runs' results: infinite when only one is None, or
    NaN or infinite in one run only (:func:`difference`); 0 for NaN in both."""
    if x is None or y is None:
        return 0.0 if (x is None) == (y is None) else math.inf
    gap = difference(dense(x), dense(y))
    return float(gap.max()) if gap.numel() > 0 else 0.0


def _require_repeatable(
    first: list[torch.Tensor | None],
    again: list[torch.Tensor | None],
    what: str,
    nondet_tol: float,
) -> None:
    """Fail unless two runs of ``what`` on the same vectors gave the same results, within
    ``nondet_tol``."""
    gap = max((_gap(x, y) for x, y in zip(first, again)), default=0.0)
    if gap > nondet_tol:
        size = (
            "a result None, NaN or infinite in one run only"
            if math.isinf(gap)
            else f"by up to {gap:.1e}"
        )
        raise CheckFailure(
            f"{what} gives different results for the same inputs and vectors on two runs "
            f"({size}, nondet_tol={nondet_tol:g}): it reads memory it never "
            "wrote (torch.empty filled in part), keeps state between calls, draws random "
            "numbers without restoring the generator state forward drew from, or sums in "
            "an order that changes between runs (atomic adds on CUDA: if so, pass "
            f"{option_name('nondet_tol')} above that difference, as to torch's gradcheck)"
        )


def require_backward_linear(ctx: CheckContext) -> None:
    """Fail unless backward is linear in the grad_outputs (all outputs at once)."""
    leaves = ctx.leaves()
    outs = [o for o in ctx.diff_fn(*leaves) if o.requires_grad]
    if not outs:
        return

    def backward(vs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        grads = input_grads(outs, leaves, vs, retain_graph=True, allow_unused=True)
        # copies: a backward returning a buffer it reuses is the interleave check's finding
        return [None if g is None else g.detach().clone() for g in grads]

    linear_map = _LinearMap(
        "backward",
        "grad_output",
        "grad_output",
        lambda k: f"the gradient of {ctx.input_name(k)}",
        " (backward must return the vector-Jacobian product, linear in grad_output: no "
        "abs, clamp, sign or normalisation of it; one-hot grad_outputs, as gradcheck's "
        "Jacobian uses, do not show this)",
    )
    _require_linear(ctx, backward, outs, leaves, linear_map)


def require_backward_like_central_differences(ctx: CheckContext) -> None:
    """Fail unless backward, given random dense grad_outputs ``v``, agrees with fn's
    central differences along a random direction ``u``, and along the uniform one
    (:func:`~torchbp.verify.checks.jacobians.uniform_direction`, which keeps ties tied):
    ``v^T J u`` within gradcheck's ``atol + rtol * s``, ``s`` the size of the terms it
    sums (:func:`_magnitude_of_terms`), or within the bracket of the one-sided
    differences (a kink,
    :func:`~torchbp.verify.checks.jacobians.one_sided_bracket`).

    gradcheck's Jacobian comes from one-hot grad_outputs: a backward with another path
    for a dense one (a "fast path" for a single nonzero, right, beside a wrong general
    one) can be linear in the dense ones and wrong for all of them. Nothing to judge when
    a figure is not finite (the finiteness requirement speaks for backward)."""
    leaves = ctx.leaves()
    _require_backward_along(
        ctx, leaves, lambda: unit_direction(leaves, ctx.randn), RANDOM_DIRECTION
    )
    _require_backward_along(
        ctx, leaves, lambda: uniform_direction(leaves), UNIFORM_DIRECTION, refusal_skips=True
    )


#: How a failure of :func:`require_backward_like_central_differences` names the random
#: direction, and the likely cause of a backward failing along it.
RANDOM_DIRECTION = (
    "a random direction u",
    "does backward take another path for a grad_output with several nonzeros (a branch "
    "on its count of nonzeros, a fast path for a single one)?",
)

#: ... and the uniform direction (every element moved by the same amount).
UNIFORM_DIRECTION = (
    "the direction u moving every element of the inputs by the same amount (ties stay "
    "tied along it: max(a, b) at a == b moves as a + t)",
    "at a tie (of a max, a pooling window, a sort), does backward give each tied element "
    "the whole gradient? A derivative there gives it to one of them, or shares summing "
    "to it (torch.max(dim) picks one, torch.amax splits it evenly)",
)


def _require_backward_along(
    ctx: CheckContext,
    leaves: list[torch.Tensor],
    direction_of: Callable[[], list[torch.Tensor]],
    direction: tuple[str, str],
    *,
    refusal_skips: bool = False,
) -> None:
    """:func:`require_backward_like_central_differences` along the direction
    ``direction_of()`` gives, drawn after the grad_outputs (``direction``: its name and
    the likely cause of a failure along it); nothing judged, with ``refusal_skips``,
    where fn raises at the inputs moved along it (:func:`_quotients_where_fn_runs`)."""
    outs = ctx.diff_fn(*leaves)
    wanted = [o for o, out in enumerate(outs) if out.requires_grad]
    if not wanted:
        return
    vs = [ctx.randn(outs[o].shape, outs[o].dtype).to(torch.float64) for o in wanted]
    us = direction_of()
    quotients = _quotients_where_fn_runs(ctx, leaves, us, refusal_skips)
    if quotients is None:
        return
    pick = {name: [per_output[o] for o in wanted] for name, per_output in quotients.items()}
    # no grad_output at a jump: its central difference there is no derivative
    vs = [v.masked_fill(jump, 0.0) for v, jump in zip(vs, pick["jump"])]
    # copies: a backward writing into grad_output is grad_output_safety's finding
    given = [v.to(outs[o].dtype, copy=True) for o, v in zip(wanted, vs)]
    grads = input_grads([outs[o] for o in wanted], leaves, given, allow_unused=True)
    backward = sum(
        float((g.detach().to(torch.float64) * u).sum()) for g, u in zip(grads, us) if g is not None
    )
    central = sum(float((d * v).sum()) for d, v in zip(pick["central"], vs))
    low, high = one_sided_bracket(pick["left"], pick["right"], vs)
    terms = _magnitude_of_terms(grads, us, pick["central"], vs)
    if not all(math.isfinite(x) for x in (backward, central, low, high, terms)):
        return
    slack = float(ctx.options.atol) + float(ctx.options.rtol) * max(abs(central), terms)
    if abs(backward - central) <= slack or low - slack <= backward <= high + slack:
        return
    error = abs(backward - central)
    name, cause = direction
    raise CheckFailure(
        "backward for dense random grad_outputs v disagrees with central differences "
        f"along {name}: v^T J u is {backward:.6g} from backward, "
        f"{central:.6g} from central differences (abs error {error:.1e}, seed "
        f"{ctx.options.seed}), although its results for one-hot grad_outputs (gradcheck's "
        f"Jacobian) agree with them: {cause}",
        error,
        error / max(abs(central), 1e-12),
    )


def _quotients_where_fn_runs(
    ctx: CheckContext,
    inputs: list[torch.Tensor],
    us: list[torch.Tensor],
    refusal_skips: bool,
) -> dict[str, list[torch.Tensor]] | None:
    """fn's difference quotients along ``us``
    (:func:`~torchbp.verify.checks.jacobians.directional_quotients`), or, with
    ``refusal_skips``, None where fn raises at the inputs moved along them: the uniform
    direction moves every element by ``eps / sqrt(n)``, a sum by ``sqrt(n) eps``, off a
    domain that one-hot steps of ``eps`` keep to (a probability vector whose sum fn
    checks to 1e-5), and fn's refusal there says nothing of its derivatives. Without
    ``refusal_skips`` fn's error propagates (to the near-edge usage error). Also
    ``"jump"``, per output, where fn jumps (:func:`_jumps`)."""
    try:
        return _quotients_and_jumps(ctx, inputs, us)
    except Exception:  # noqa: BLE001 - fn refusing the moved inputs: nothing to judge
        if not refusal_skips:
            raise
        return None


def _quotients_and_jumps(
    ctx: CheckContext, inputs: list[torch.Tensor], us: list[torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
    """fn's difference quotients along ``us`` with ``"jump"``: per output, where its
    central difference doubles when ``eps`` halves, as over a jump (sign at 0: 1 / eps),
    a step no derivative spans and gradcheck's one-hot comparison excuses too
    (:func:`~torchbp.verify.checks.jacobians.excuse_non_differentiable`)."""
    eps = float(ctx.options.eps)
    quotients = directional_quotients(ctx.diff_fn, inputs, us, eps)
    halved = directional_quotients(ctx.diff_fn, inputs, us, eps / 2)["central"]
    atol = float(ctx.options.atol)
    quotients["jump"] = [
        (central.abs() > atol) & ((half - 2 * central).abs() <= 0.1 * central.abs())
        for central, half in zip(quotients["central"], halved)
    ]
    return quotients


def _rounding(value: torch.Tensor, eps: float) -> torch.Tensor:
    """How far rounding may carry a central difference of outputs near ``value`` (fn at
    the unmoved inputs) over ``2 eps``: each of the two outputs off by 2 ulps
    (``2 * 2.2e-16 * |value|``), their difference by twice that, divided by ``2 eps``.
    Outputs of 1e5, rounding by 1e-11, move 1e-5 along a step of 1e-6: beyond ``atol``
    for an element whose derivative along the direction is 0 (``x - x.mean()`` along the
    uniform direction), where ``rtol`` gives no slack."""
    return 2 * torch.finfo(torch.float64).eps * value.abs() / eps


def _magnitude_of_terms(
    grads: Sequence[torch.Tensor | None],
    us: Sequence[torch.Tensor],
    central: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
) -> float:
    """The larger of ``sum |g_j u_j|`` (backward's gradients ``g`` along ``us``) and
    ``sum |v_i d_i|`` (the central differences ``d`` given ``vs``): the size of the terms
    that ``v^T J u`` sums, the scale of its rounding where they cancel (a shift-invariant
    fn such as log_softmax along the uniform direction: ``v^T J u`` is 0, its central
    differences of outputs of order 1e6 off by 1e-4), as gradcheck's ``rtol`` scales
    with each Jacobian entry, not with their sum."""
    backward = sum(
        float((g.detach().to(torch.float64) * u).abs().sum())
        for g, u in zip(grads, us)
        if g is not None
    )
    differences = sum(float((d * v).abs().sum()) for d, v in zip(central, vs))
    return max(backward, differences)


def require_jvp_linear(ctx: CheckContext) -> None:
    """Fail unless jvp is linear in the tangents (all grad inputs dual at once)."""
    base = [x.detach() for x in ctx.leaves()]
    with torch.no_grad():
        outs = list(ctx.diff_fn(*base))

    def jvp(tangents: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(x, t) for x, t in zip(base, tangents)]
            found = [fwAD.unpack_dual(o).tangent for o in ctx.diff_fn(*duals)]
            return [None if t is None else t.detach().clone() for t in found]

    linear_map = _LinearMap(
        "jvp",
        "tangent",
        "the tangent",
        lambda o: f"the tangent of output {o}",
        " (jvp must return the Jacobian-vector product, linear in the tangents: no abs, "
        "sign or products of tangents; one-hot tangents, as the forward Jacobian uses, do "
        "not show this)",
    )
    _require_linear(ctx, jvp, base, outs, linear_map)


def require_jvp_like_central_differences(ctx: CheckContext) -> None:
    """Fail unless jvp, given random dense tangents ``u`` (every grad input dual at once),
    and the uniform tangent (:func:`~torchbp.verify.checks.jacobians.uniform_direction`,
    which keeps ties tied), gives each output the tangent fn's central differences along
    ``u`` give, element by element within gradcheck's ``atol + rtol * |J u|``, or between
    the one-sided differences (a kink): the forward Jacobian comes from one-hot tangents,
    so a jvp with another path for a dense tangent can be linear in the dense ones and
    wrong for all of them. Elements where a figure is not finite are not judged."""
    base = [x.detach() for x in ctx.leaves()]
    _require_jvp_along(ctx, base, unit_direction(base, ctx.randn), JVP_RANDOM_DIRECTION)
    _require_jvp_along(
        ctx, base, uniform_direction(base), JVP_UNIFORM_DIRECTION, refusal_skips=True
    )


#: How a failure of :func:`require_jvp_like_central_differences` names the random
#: tangent, and the likely cause of a jvp failing for it.
JVP_RANDOM_DIRECTION = (
    "dense random tangents u",
    "does jvp take another path for a tangent with several nonzeros (a branch on its "
    "count of nonzeros, a fast path for a single one)?",
)

#: ... and the uniform tangent (every element moved by the same amount).
JVP_UNIFORM_DIRECTION = (
    "the tangent u moving every element of the inputs by the same amount (ties stay tied "
    "along it: max(a, b) at a == b moves as a + t)",
    "at a tie (of a max, a pooling window, a sort), does jvp add the tangents of the tied "
    "elements? A derivative there takes one of them, or a weighted mean (torch.max(dim) "
    "takes one, torch.amax the mean)",
)


def _require_jvp_along(
    ctx: CheckContext,
    base: list[torch.Tensor],
    us: list[torch.Tensor],
    direction: tuple[str, str],
    *,
    refusal_skips: bool = False,
) -> None:
    """:func:`require_jvp_like_central_differences` for the tangents ``us``
    (``direction``: their name and the likely cause of a failure for them); nothing
    judged, with ``refusal_skips``, where fn raises at the inputs moved along them
    (:func:`_quotients_where_fn_runs`)."""
    eps = float(ctx.options.eps)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, u.clone()) for x, u in zip(base, us)]
        tangents = [fwAD.unpack_dual(o).tangent for o in ctx.diff_fn(*duals)]
    quotients = _quotients_where_fn_runs(ctx, base, us, refusal_skips)
    if quotients is None:
        return
    atol, rtol = float(ctx.options.atol), float(ctx.options.rtol)
    for o, tangent in enumerate(tangents):
        if tangent is None:
            continue
        got = dense(tangent).detach().to(torch.float64)
        central, left, right = (quotients[k][o] for k in ("central", "left", "right"))
        slack = atol + rtol * central.abs() + _rounding(quotients["value"][o], eps)
        inside = (got - central).abs() <= slack
        inside |= (got >= torch.minimum(left, right) - slack) & (
            got <= torch.maximum(left, right) + slack
        )
        judged = (
            torch.isfinite(got)
            & torch.isfinite(central)
            & torch.isfinite(left)
            & torch.isfinite(right)
            & ~quotients["jump"][o]
        )
        wrong = judged & ~inside
        if bool(wrong.any()):
            flat = int(wrong.reshape(-1).nonzero()[0])
            index = unravel(flat, got.shape)
            error = float((got - central).abs().masked_fill(~judged, 0.0).max())
            name, cause = direction
            raise CheckFailure(
                f"jvp for {name} disagrees with central differences along u: "
                f"the tangent of output {o} is {float(got.reshape(-1)[flat]):.6g} at index "
                f"{index}, central differences give {float(central.reshape(-1)[flat]):.6g} "
                f"(seed {ctx.options.seed}), although its results for one-hot tangents (the "
                f"forward Jacobian) agree with them: {cause}",
                error,
                math.inf,
            )
