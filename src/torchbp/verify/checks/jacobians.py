"""Jacobians three ways (finite differences, backward, jvp) and their comparison.

A Jacobian is a list over inputs ``k`` of lists over outputs ``o`` of float64 CPU matrices
``J[k][o]`` of shape ``(out_o.numel(), in_k.numel())``. The functions take the inputs as
positional tensors and return a tuple of output tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from torchbp.verify.checks.compare import difference, input_grads, max_errors, mismatch, unravel
from torchbp.verify.checks.spelling import option

__all__ = [
    "FULL_JACOBIAN_LIMIT",
    "analytical_jacobian",
    "compare_jacobians",
    "directional_quotients",
    "excuse_non_differentiable",
    "forward_jacobian",
    "jacobian_size",
    "numerical_jacobian",
    "one_sided_bracket",
    "projected_backward_error",
    "surrogate_gradient_hint",
    "uniform_direction",
    "unit_direction",
]

Jacobian = list[list[torch.Tensor]]
Func = Callable[..., Sequence[torch.Tensor]]

#: Beyond this many Jacobian entries, errors are measured on random projections v^T J u
#: instead of the full Jacobian (the pass/fail verdict still comes from torch's gradcheck).
FULL_JACOBIAN_LIMIT = 4096


def _zeros(outs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Jacobian:
    return [[torch.zeros(o.numel(), x.numel(), dtype=torch.float64) for o in outs] for x in inputs]


def jacobian_size(func: Func, inputs: Sequence[torch.Tensor], grad_mode: bool = False) -> int:
    """Number of entries of the Jacobian of ``func`` at ``inputs``."""
    with torch.set_grad_enabled(grad_mode):
        outs = func(*[x.detach() for x in inputs])
    n_out = sum(o.numel() for o in outs)
    return n_out * sum(x.numel() for x in inputs)


def _perturbed(x: torch.Tensor, index: tuple[int, ...], step: float) -> torch.Tensor:
    """A copy of ``x``, in its memory layout, with ``step`` added at ``index``."""
    copy = x.clone()  # preserve_format: the same strides
    copy[index] += step
    return copy


def numerical_jacobian(
    func: Func, inputs: Sequence[torch.Tensor], eps: float, grad_mode: bool = False
) -> Jacobian:
    """J[k][o] of shape (out_o.numel(), in_k.numel()) by central differences.

    Each perturbed input keeps the memory layout of ``inputs[k]`` (a transposed input stays
    transposed), so that the difference quotients are those of the function backward is
    compared with, also when it depends on the layout."""
    base = [x.detach().clone() for x in inputs]
    with torch.set_grad_enabled(grad_mode):
        outs = func(*base)
        jac = _zeros(outs, base)
        for k, x in enumerate(base):
            for j in range(x.numel()):
                vals = []
                for sign in (1.0, -1.0):
                    args = list(base)
                    args[k] = _perturbed(x, unravel(j, x.shape), sign * eps)
                    vals.append(func(*args))
                for o, (hi, lo) in enumerate(zip(*vals)):
                    hi, lo = hi.detach(), lo.detach()
                    d = (hi.to(torch.float64) - lo.to(torch.float64)) / (2 * eps)
                    jac[k][o][:, j] = d.reshape(-1).cpu()
    return jac


def analytical_jacobian(func: Func, inputs: Sequence[torch.Tensor]) -> Jacobian:
    """J[k][o] by one backward per output element."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = func(*leaves)
    jac = _zeros(outs, leaves)
    for o, out in enumerate(outs):
        if not out.requires_grad:
            continue
        for m in range(out.numel()):
            v = torch.zeros_like(out).reshape(-1)
            v[m] = 1
            grads = input_grads(
                out, leaves, v.reshape(out.shape), retain_graph=True, allow_unused=True
            )
            for k, gk in enumerate(grads):
                if gk is not None:
                    jac[k][o][m] = gk.detach().to(torch.float64).reshape(-1).cpu()
    return jac


def forward_jacobian(func: Func, inputs: Sequence[torch.Tensor]) -> Jacobian:
    """J[k][o] by one jvp (dual numbers) per input element."""
    base = [x.detach().clone() for x in inputs]
    with torch.no_grad():
        outs = func(*base)
    jac = _zeros(outs, base)
    for k, x in enumerate(base):
        for j in range(x.numel()):
            tangent = torch.zeros_like(x).reshape(-1)
            tangent[j] = 1
            with fwAD.dual_level():
                duals = [
                    fwAD.make_dual(b, tangent.reshape(x.shape)) if i == k else b
                    for i, b in enumerate(base)
                ]
                outs = func(*duals)
                for o, out in enumerate(outs):
                    t = fwAD.unpack_dual(out).tangent
                    if t is not None:
                        jac[k][o][:, j] = t.detach().to(torch.float64).reshape(-1).cpu()
    return jac


def compare_jacobians(
    actual: Jacobian,
    expected: Jacobian,
    what: str,
    input_names: Sequence[str],
    input_shapes: Sequence[tuple[int, ...]],
    out_shapes: Sequence[tuple[int, ...]],
    tolerance: tuple[float, float],
    against: str = "numerical",
) -> tuple[float, float, str | None]:
    """Compare two Jacobians entry by entry.

    Args:
        actual: the Jacobian under test (``what`` names how it was computed).
        expected: the numerical Jacobian.
        what: e.g. ``"backward"``, used in the message.
        input_names: how messages name each input.
        input_shapes: the shape of each input.
        out_shapes: the shape of each output.
        tolerance: ``(atol, rtol)``.
        against: how the message names ``expected`` (``"backward"`` when it is not the
            numerical Jacobian).

    Returns:
        ``(max abs error, max rel error, message)``; the message, None when everything is
        within tolerance, says where the first mismatch is.
    """
    atol, rtol = tolerance
    worst_abs, worst_rel, message = 0.0, 0.0, None
    for k, (act_k, exp_k) in enumerate(zip(actual, expected)):
        for o, (a, e) in enumerate(zip(act_k, exp_k)):
            if a.numel() == 0:
                continue
            abs_err, rel_err = max_errors(a, e)
            worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
            bad = mismatch(a, e, atol, rtol)
            if bad is not None and message is None:
                m, j = bad[2]
                in_shape = input_shapes[k]
                idx = unravel(j, in_shape)
                out_idx = unravel(m, out_shapes[o])
                where = f"at index {idx}" if in_shape else "(0-dim input)"
                if len(out_shapes) > 1 or len(out_shapes[o]) > 0:
                    where += f" of {input_names[k]}, output {o} element {out_idx}"
                message = (
                    f"{what} of {input_names[k]} disagrees with {against} gradient: "
                    f"max abs error {float((a - e).abs().max()):.1e} {where}; "
                    f"analytical {float(a[m, j]):.4g} vs {against} {float(e[m, j]):.4g}"
                )
    return worst_abs, worst_rel, message


def _surrogate_advice(what: str) -> str:
    """How a message tells a deliberate surrogate gradient from a wrong one it cannot
    check: leave out the checks comparing ``what`` (backward, or a jvp) with finite
    differences and give a reference with the gradient meant."""
    jvp = "jvp" in what
    skipped = ["gradcheck", "forward_ad"] if jvp else ["gradcheck"]
    also = "" if jvp else " (and forward_ad if fn has a jvp)"
    return (
        "; if deliberate, no surrogate gradient can pass this check: leave it out with "
        f"{option('skip', skipped)}{also} and pass {option('reference')} a function with "
        "the same forward and the gradient you intend, e.g. x + (torch.round(x) - "
        "x).detach() for a straight-through round, so that the other checks compare the "
        "gradients with it)"
    )


def _constant_ratio(a: torch.Tensor, e: torch.Tensor, atol: float, rtol: float) -> float | None:
    """The factor ``c`` (not 0 or 1) with ``a = c e`` for every entry within tolerance,
    taken at ``e``'s largest entry; None if there is none (fewer than two entries of ``e``
    above ``atol``, or no single factor)."""
    m = int(e.abs().argmax())
    if int((e.abs() > atol).sum()) < 2:
        return None  # one entry is a multiple of anything: no pattern to name
    c = float(a.reshape(-1)[m] / e.reshape(-1)[m])
    if c == 0.0 or math.isclose(c, 1.0, rel_tol=rtol) or not torch.allclose(a, c * e, rtol, atol):
        return None  # zero: no gradient at all (a None), not a scaled one
    return c


def _pattern(a: torch.Tensor, e: torch.Tensor, atol: float, rtol: float) -> tuple[str, float]:
    """How the actual Jacobian entries ``a`` of one input differ from the numerical ``e``
    in a pattern: ``("zero", 0)`` when ``e`` is zero everywhere and ``a`` is not,
    ``("factor", c)`` when ``a = c e``; ``("", 0)`` for no pattern (or non-finite
    values)."""
    if a.numel() == 0 or not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return "", 0.0
    if float(e.abs().max()) <= atol < float(a.abs().max()):
        return "zero", 0.0
    c = _constant_ratio(a, e, atol, rtol)
    return ("factor", c) if c is not None else ("", 0.0)


def _deliberate_pattern_hint(kind: str, c: float, what: str, name: str) -> str:
    """The note for a pattern ``kind`` of input ``name``, the one the message names:
    the bug it most often is, and the deliberate surrogate gradient it may also be."""
    if kind == "zero":
        return (
            f" (the numerical gradient of {name} is zero everywhere while {what}'s is not: "
            "a bug, a gradient for an input forward does not use (or at the wrong "
            "position), unless forward is piecewise-constant in it, such as round or sign, "
            f"and the gradient a deliberate straight-through estimator{_surrogate_advice(what)}"
        )
    return (
        f" ({what} of {name} is {c:.4g} times the numerical gradient everywhere: a bug, a "
        "constant factor missing or extra (the 2 of x**2, the 1/n of a mean, a scale or "
        "temperature), unless it is a deliberate gradient reversal or scaling layer"
        f"{_surrogate_advice(what)}"
    )


def _other_input_pattern_hint(kind: str, c: float, what: str, name: str) -> str:
    """The note for a pattern ``kind`` of input ``name`` when the message names another
    input, wrong with no pattern: no surrogate gradient explains both, so only the bug."""
    if kind == "zero":
        return (
            f" (besides, the numerical gradient of {name} is zero everywhere while "
            f"{what}'s is not: a gradient for an input forward does not use, or at the "
            "wrong position)"
        )
    return (
        f" (besides, {what} of {name} is {c:.4g} times the numerical gradient everywhere: "
        "a constant factor missing or extra there, such as the 2 of x**2, the 1/n of a "
        "mean, or a normalization computed otherwise than forward's)"
    )


def surrogate_gradient_hint(
    actual: Jacobian,
    expected: Jacobian,
    what: str,
    input_names: Sequence[str],
    tolerance: tuple[float, float],
) -> str:
    """A note when ``actual`` (``what``'s Jacobian) differs from the numerical ``expected``
    in a pattern, for some input: the numerical one is zero everywhere while ``actual`` is
    not, or ``actual`` is a constant multiple of it. When the first input that differs
    (the one the message names) shows it, the note words it as the bug it most often is
    (a gradient for an unused input, a factor missing or extra), with the deliberate
    surrogate gradient it may also be (a straight-through estimator of a
    piecewise-constant forward, a gradient reversal or scaling layer) and how to check
    that; when that input differs with no pattern and a later one shows one, the note
    names the later input, as a bug only. Empty when no input shows a pattern."""
    atol, rtol = tolerance
    named_input_differs = False
    for k, (act_k, exp_k) in enumerate(zip(actual, expected)):
        a = torch.cat([m.reshape(-1) for m in act_k]) if act_k else torch.zeros(0)
        e = torch.cat([m.reshape(-1) for m in exp_k]) if exp_k else torch.zeros(0)
        kind, c = _pattern(a, e, atol, rtol)
        if kind and not named_input_differs:
            return _deliberate_pattern_hint(kind, c, what, input_names[k])
        if kind:
            return _other_input_pattern_hint(kind, c, what, input_names[k])
        named_input_differs = named_input_differs or mismatch(a, e, atol, rtol) is not None
    return ""


def _difference_quotients(
    func: Func, base: list[torch.Tensor], k: int, j: int, eps: float, f0: Sequence[torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
    """Per output, the right and left differences and the central ones with ``eps`` and
    ``eps / 2`` of ``func`` at ``base`` along element ``j`` of input ``k``."""
    at = {}
    for step in (eps, -eps, eps / 2, -eps / 2):
        args = list(base)
        args[k] = _perturbed(base[k], unravel(j, base[k].shape), step)
        at[step] = [t.detach().to(torch.float64).reshape(-1).cpu() for t in func(*args)]
    f0 = [t.detach().to(torch.float64).reshape(-1).cpu() for t in f0]
    return {
        "right": [(h - c) / eps for h, c in zip(at[eps], f0)],
        "left": [(c - lo) / eps for c, lo in zip(f0, at[-eps])],
        "central": [(h - lo) / (2 * eps) for h, lo in zip(at[eps], at[-eps])],
        "half": [(h - lo) / eps for h, lo in zip(at[eps / 2], at[-eps / 2])],
    }


def _not_differentiable(
    quotients: dict[str, list[torch.Tensor]], o: int, actual: torch.Tensor, atol: float, rtol: float
) -> torch.Tensor:
    """Which entries of ``actual`` (one column of output ``o``'s Jacobian) are at a point
    where the function is not differentiable and so not comparable with a central
    difference: a kink (relu at 0, a tie in a max: the one-sided differences disagree)
    where ``actual`` lies between them, or a jump (the central difference doubles when
    ``eps`` halves, as the gradient of ``abs`` at 0 does)."""
    right, left = quotients["right"][o], quotients["left"][o]
    central, half = quotients["central"][o], quotients["half"][o]
    low, high = torch.minimum(left, right), torch.maximum(left, right)
    slack = atol + rtol * high.abs().maximum(low.abs())
    kink = (high - low > slack) & (actual >= low - slack) & (actual <= high + slack)
    jump = (central.abs() > slack) & ((half - 2 * central).abs() <= 0.1 * central.abs())
    return kink | jump


def _out_of_tolerance(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float
) -> torch.Tensor:
    """Where ``|actual - expected| > atol + rtol * |expected|`` (a NaN is never out)."""
    return (actual - expected).abs() > atol + rtol * expected.abs()


def excuse_non_differentiable(
    func: Func,
    inputs: Sequence[torch.Tensor],
    eps: float,
    jacobians: tuple[Jacobian, Jacobian],
    tolerance: tuple[float, float],
    grad_mode: bool = False,
) -> tuple[Jacobian, int]:
    """The numerical Jacobian of ``jacobians = (actual, numerical)`` with each mismatched
    entry at a point where ``func`` is not differentiable (:func:`_not_differentiable`)
    replaced by the actual value, and how many were: a central difference there is no
    derivative (its mean of the one-sided ones, or a jump over ``2 eps``), so an example
    input at a kink or tie does not fail a correct function."""
    actual, numerical = jacobians
    atol, rtol = tolerance
    base = [x.detach().clone() for x in inputs]
    excused = [[e.clone() for e in per_input] for per_input in numerical]
    count = 0
    with torch.set_grad_enabled(grad_mode):
        f0 = func(*base)
        for k, (act_k, exp_k) in enumerate(zip(actual, numerical)):
            bad_columns = set()
            for a, e in zip(act_k, exp_k):
                if a.numel():
                    bad = _out_of_tolerance(a, e, atol, rtol)
                    bad_columns |= set(bad.any(0).nonzero().flatten().tolist())
            for j in sorted(bad_columns):
                quotients = _difference_quotients(func, base, k, j, eps, f0)
                for o, a in enumerate(act_k):
                    if not a.numel():
                        continue
                    mask = _not_differentiable(quotients, o, a[:, j], atol, rtol)
                    mask &= _out_of_tolerance(a[:, j], exp_k[o][:, j], atol, rtol)
                    excused[k][o][mask, j] = a[mask, j]
                    count += int(mask.sum())
    return excused, count


def unit_direction(
    inputs: Sequence[torch.Tensor], randn: Callable[[torch.Size, torch.dtype], torch.Tensor]
) -> list[torch.Tensor]:
    """A random direction of norm 1 over all ``inputs`` together, drawn by
    ``randn(shape, dtype)`` (as torch's fast gradcheck draws its ``u``): no element moves
    by more than ``eps``, as with gradcheck's one-hot steps, so a central difference at a
    point where fn is only once differentiable (``t|t|`` or ``relu(t)²`` at 0, erring by
    ``eps u²`` there) stays as close to the derivative as gradcheck's."""
    us = [randn(x.shape, x.dtype) for x in inputs]
    norm = math.sqrt(sum(float((u * u).sum()) for u in us))
    return [u / norm for u in us] if norm > 0 else us


def uniform_direction(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The direction of norm 1 moving every element of every input by the same amount:
    ties stay ties along it (``max(a, b)`` at ``a == b`` is ``a + t`` there, a sort of
    tied values keeps their order), so a tie rule that no valid derivative has (the whole
    gradient to each tied element) shows along it, where a random direction, breaking the
    tie, may see only the kink's one-sided differences and accept it."""
    count = sum(x.numel() for x in inputs)
    return [torch.full_like(x, 1.0 / math.sqrt(max(count, 1))) for x in inputs]


def directional_quotients(
    func: Func, inputs: Sequence[torch.Tensor], us: Sequence[torch.Tensor], eps: float
) -> dict[str, list[torch.Tensor]]:
    """Per output of ``func``, in float64, its central, right and left difference
    quotients at ``inputs`` along the direction ``us`` (one tensor per input): the
    derivative ``J u`` where ``func`` is differentiable; where it is not (a kink), the
    one-sided ones bracket every derivative autograd may pick. Also ``"value"``, the
    outputs at ``inputs`` (the scale of the quotients' rounding)."""
    base = [x.detach() for x in inputs]
    with torch.no_grad():
        at = {
            step: [
                t.detach().to(torch.float64)
                for t in func(*[x + step * u for x, u in zip(base, us)])
            ]
            for step in (eps, 0.0, -eps)
        }
    return {
        "central": [(hi - lo) / (2 * eps) for hi, lo in zip(at[eps], at[-eps])],
        "right": [(hi - mid) / eps for hi, mid in zip(at[eps], at[0.0])],
        "left": [(mid - lo) / eps for mid, lo in zip(at[0.0], at[-eps])],
        "value": at[0.0],
    }


def one_sided_bracket(
    left: Sequence[torch.Tensor], right: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]
) -> tuple[float, float]:
    """The range of ``v^T d`` over every ``d`` lying, element by element, between the left
    and right difference quotients: at kinks and ties (each output element its own, such
    as one max per row) autograd may pick any derivative between them."""
    low = sum(float(torch.minimum(v * lo, v * hi).sum()) for lo, hi, v in zip(left, right, vs))
    high = sum(float(torch.maximum(v * lo, v * hi).sum()) for lo, hi, v in zip(left, right, vs))
    return low, high


def projected_backward_error(
    func: Func,
    inputs: Sequence[torch.Tensor],
    eps: float,
    randn: Callable[[torch.Size, torch.dtype], torch.Tensor],
    grad_mode: bool = False,
) -> tuple[float, float, float]:
    """``(abs, rel)`` error of backward's ``v^T J u`` against central differences, for
    a random ``u`` of norm 1 (:func:`unit_direction`) and random ``v`` (one per output),
    drawn by ``randn(shape, dtype)``, and the magnitude of the central differences'
    ``v^T J u`` (the scale of a relative tolerance; 0 when it is not finite).
    NaN-aware (:func:`difference`): NaN on one side only is an infinite error, NaN on
    both none. Backward's figure within the bracket of the one-sided differences
    (:func:`one_sided_bracket`: a kink, such as relu at an input of exactly 0) is no
    error: the central difference there is no derivative."""
    us = unit_direction(inputs, randn)
    with torch.set_grad_enabled(grad_mode):
        hi = [t.detach() for t in func(*[x.detach() + eps * u for x, u in zip(inputs, us)])]
        lo = [t.detach() for t in func(*[x.detach() - eps * u for x, u in zip(inputs, us)])]
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = func(*leaves)
    vs = [randn(o.shape, o.dtype) for o in outs]
    num = sum(float(((h - l) / (2 * eps) * v).sum()) for h, l, v in zip(hi, lo, vs))
    pairs = [(o, v) for o, v in zip(outs, vs) if o.requires_grad]
    grads = input_grads([p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True)
    ana = sum(float((g * u).sum()) for g, u in zip(grads, us) if g is not None)
    abs_err = float(difference(*torch.tensor([float(ana), float(num)], dtype=torch.float64)))
    mid = [o.detach() for o in outs]
    low, high = one_sided_bracket(
        [(m - l) / eps for m, l in zip(mid, lo)], [(h - m) / eps for h, m in zip(hi, mid)], vs
    )
    if all(math.isfinite(x) for x in (ana, low, high)) and low <= ana <= high:
        abs_err = 0.0
    scale = abs(num) if math.isfinite(num) else 0.0
    return abs_err, abs_err / max(scale, 1e-12), scale
