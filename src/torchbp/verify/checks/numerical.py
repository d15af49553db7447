"""Checks against numerical (finite-difference) derivatives, in float64 only:
``gradcheck`` (backward), ``gradgradcheck`` (double backward) and ``forward_ad`` (jvp).

Each runs torch's own gradcheck for the verdict, then compares the full Jacobians itself
(or random projections of large ones) to report the error and where it is. An entry at a
point where fn is not differentiable (a kink, a tie, a jump), where a central difference
is no derivative, is checked only against the one-sided differences.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from torchbp.verify.checks.backward_contract import require_jvp_layout_independent
from torchbp.verify.checks.compare import input_grads, require_close, same_values, zeros_for_none
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.custom_op import (
    custom_ops_reached,
    no_forward_ad,
    without_custom_ops,
)
from torchbp.verify.checks.explain import explain_error, first_line, outcome_of
from torchbp.verify.checks.jacobians import (
    FULL_JACOBIAN_LIMIT,
    Jacobian,
    analytical_jacobian,
    compare_jacobians,
    excuse_non_differentiable,
    forward_jacobian,
    jacobian_size,
    numerical_jacobian,
    projected_backward_error,
    surrogate_gradient_hint,
    unit_direction,
)
from torchbp.verify.checks.left_out import require_jvp_like_backward_where_left_out
from torchbp.verify.checks.linearity import (
    departure_note,
    require_backward_like_central_differences,
    require_backward_linear,
    require_jvp_like_central_differences,
    require_jvp_linear,
)
from torchbp.verify.checks.outcomes import CheckFailure, CheckSkip, CheckUnsupported, Passed
from torchbp.verify.checks.spelling import option, option_name

__all__ = [
    "DOUBLE_BACKWARD",
    "FORWARD_AD",
    "NARROWER_DTYPES",
    "check_forward_ad",
    "check_gradcheck",
    "check_gradgradcheck",
    "rounded_to",
]

#: The capability gradgradcheck exercises and how to add it (a NotImplementedError raised
#: while differentiating backward says it is absent: unsupported, not failed).
DOUBLE_BACKWARD = (
    "double backward",
    "write backward in differentiable torch ops, or give each Function that backward "
    "calls a backward of its own",
)

#: The capability forward_ad exercises and how to add it.
FORWARD_AD = (
    "forward-mode AD (jvp)",
    "write the jvp for these inputs (tangents in, output tangents out, from what "
    "setup_context saved with ctx.save_for_forward)",
)


def _require_float64(ctx: CheckContext) -> None:
    """Skip the check unless fn's inputs are float64: central differences in a lower
    precision are too coarse to judge any backward."""
    if ctx.dtype != torch.float64:
        raise CheckSkip(
            f"numerical differentiation needs float64 inputs (got {ctx.dtype}); "
            "run with dtype=torch.float64"
        )


def _numerical(ctx: CheckContext) -> Jacobian:
    """The numerical Jacobian of fn, computed once per run."""
    if ctx.numerical_jacobian is None:
        ctx.numerical_jacobian = numerical_jacobian(
            ctx.diff_fn, [ctx.args[i] for i in ctx.grad_idx], ctx.options.eps
        )
    return ctx.numerical_jacobian


def _torch_verdict(
    torch_check: Callable[..., Any],
    *args: Any,
    capability: tuple[str, str] | None = None,
    **kwargs: Any,
) -> str | None:
    """Run torch's gradcheck or gradgradcheck with the run's tolerances: None if it passed,
    its first line on a Jacobian mismatch (our own comparison then says where), an
    unsupported check for a missing capability (``capability``: the optional one it
    exercises, absent when it raises ``NotImplementedError``), a failed check for anything
    else."""
    try:
        torch_check(*args, check_undefined_grad=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure is reported
        if kwargs.get("check_forward_ad") and "not enough values to unpack" in str(exc):
            raise CheckFailure(
                "jvp found no saved tensors: save what jvp reads with ctx.save_for_forward "
                f"in setup_context, for every grad mode ({explain_error(exc)})"
            ) from None
        if not _is_jacobian_mismatch(str(exc)):
            raise outcome_of(exc, capability=capability) from None
        return first_line(str(exc)).rstrip(",")  # the line goes on with the Jacobians
    return None


def _is_jacobian_mismatch(message: str) -> bool:
    """True if torch's gradcheck ``message`` reports a Jacobian mismatch (backward's
    "Jacobian mismatch for output ...", forward mode's "Jacobian computed with forward
    mode mismatch for output ...", or a nonzero numerical derivative where the analytical
    one is absent: "Numerical gradient for function expected to be zero") rather than an
    error; the full comparison then says where, or excuses a non-differentiable point."""
    if "Numerical gradient for function expected to be zero" in message:
        return True
    return "Jacobian" in message and "mismatch for output" in message


def _torch_options(ctx: CheckContext) -> dict[str, Any]:
    """The options of torch's gradcheck / gradgradcheck, from check_function's."""
    opts = ctx.options
    return {
        "eps": opts.eps,
        "atol": opts.atol,
        "rtol": opts.rtol,
        "nondet_tol": opts.nondet_tol,
        "fast_mode": opts.fast_mode,
    }


def _full_comparison(
    ctx: CheckContext,
    jacobians: tuple[Jacobian, Jacobian],
    *,
    func: Callable[..., Any],
    grad_mode: bool = False,
    what: str,
    inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    out_shapes: Sequence[tuple[int, ...]],
    torch_name: str,
    torch_msg: str | Callable[[], str | None] | None,
    explain: Callable[[Jacobian, Jacobian], str] | None = None,
) -> tuple[float, float, str]:
    """``(max abs, max rel)`` error of the ``(actual, numerical)`` Jacobians of ``inputs``
    (of ``func``) and a note; a failed check on our mismatch (``what`` names the actual
    one, ``explain`` of the two Jacobians adds a hint) or else on torch's (``torch_msg``
    from ``torch_name``, or a function giving it, run only when it counts). Entries at
    points where ``func`` is not differentiable (a kink, a tie, a jump) are not compared
    with central differences
    (:func:`~torchbp.verify.checks.jacobians.excuse_non_differentiable`); torch's gradcheck
    compares them, so its mismatch then counts only if none was excused."""
    shapes = [tuple(x.shape) for x in inputs]
    tolerance = (ctx.options.atol, ctx.options.rtol)
    numerical, excused = excuse_non_differentiable(
        func, inputs, ctx.options.eps, jacobians, tolerance, grad_mode
    )
    abs_err, rel_err, msg = compare_jacobians(
        jacobians[0], numerical, what, input_names, shapes, out_shapes, tolerance
    )
    if msg and explain is not None:
        msg += explain(jacobians[0], numerical)
    if callable(torch_msg):
        torch_msg = None if msg or excused else torch_msg()
    if msg or (torch_msg and not excused):
        raise CheckFailure(msg or f"{torch_name}: {torch_msg}", abs_err, rel_err)
    entries = "1 entry" if excused == 1 else f"{excused} entries"
    note = (
        f"; {entries} at points where fn is not differentiable (a kink such as relu at 0, "
        "a tie in a max, a jump) checked only against the one-sided differences"
        if excused
        else ""
    )
    return abs_err, rel_err, note


def _first_order(
    ctx: CheckContext,
    diff: list[torch.Tensor],
    jacobian: Callable[..., Jacobian],
    what: str,
    torch_name: str,
    torch_msg: str | None,
) -> tuple[float, float, str] | None:
    """Error of fn's Jacobian computed by ``jacobian`` (backward or jvp) against the numerical
    one, and a note; None when it is too large to compare in full and torch found no
    mismatch."""
    if jacobian_size(ctx.diff_fn, diff) > FULL_JACOBIAN_LIMIT and not torch_msg:
        return None
    input_names = [ctx.input_name(k) for k in range(len(diff))]
    tolerance = (ctx.options.atol, ctx.options.rtol)
    low_precision = functools.cache(lambda: _low_precision_outputs(ctx))

    def surrogate(actual: Jacobian, numerical: Jacobian) -> str:
        # a numerical gradient rounded to a narrower dtype mimics a surrogate one (zero
        # where eps vanishes in the rounding): the precision note alone says why
        if low_precision():
            return ""
        return surrogate_gradient_hint(actual, numerical, what, input_names, tolerance)

    try:
        return _full_comparison(
            ctx,
            (jacobian(ctx.diff_fn, diff), _numerical(ctx)),
            func=ctx.diff_fn,
            what=what,
            inputs=diff,
            input_names=input_names,
            out_shapes=ctx.out_shapes,
            torch_name=torch_name,
            torch_msg=torch_msg,
            explain=surrogate,
        )
    except CheckFailure as failure:
        raise CheckFailure(
            failure.message + low_precision(), failure.abs_err, failure.rel_err
        ) from None


#: The dtypes a float64 computation may have been rounded to, narrowest first.
NARROWER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rounded_to(tensors: Sequence[torch.Tensor]) -> torch.dtype | None:
    """The narrowest of :data:`NARROWER_DTYPES` that holds exactly every finite
    non-integer value of the float64 ``tensors``, or None (some value needs float64, or
    none is a finite non-integer: integers fit every dtype and prove nothing). A float64
    result computed from random values in float32 and cast back holds only float32
    numbers; one computed in float64 almost never does.

    Examples:
        >>> rounded_to([torch.tensor([0.1, 2.0], dtype=torch.float64)]) is None
        True
        >>> rounded_to([torch.tensor([0.1], dtype=torch.float32).double()])
        torch.float32
    """
    flat = _finite_fractions(tensors)
    if flat.numel() == 0:
        return None
    return next((d for d in NARROWER_DTYPES if _fits(flat, d)), None)


def _finite_fractions(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The finite non-integer values of the float64 ``tensors``, flat, on the CPU."""
    values = [t.detach().reshape(-1).cpu() for t in tensors if t.dtype == torch.float64]
    flat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    return flat[torch.isfinite(flat) & (flat != flat.round())]


def _fits(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """True if ``dtype`` holds every one of the float64 ``values`` exactly."""
    return bool((values.to(dtype).to(torch.float64) == values).all())


def _low_precision_outputs(ctx: CheckContext) -> str:
    """Why the numerical gradient may be off although backward is right: fn returns an
    output of a dtype less precise than its float64 inputs, or float64 outputs holding
    only float32 numbers (:func:`rounded_to`: computed in float32 and cast back); its
    finite differences over ``eps`` then carry that precision's rounding. Empty when
    neither at the inputs nor at the inputs shifted by ``eps`` (:func:`_rounding_of_outputs`:
    where the inputs hold only such numbers, float32 inputs cast to float64 or round
    numbers such as 0.5, an output copying them proves nothing)."""
    low = [
        (o, d)
        for o, d in enumerate(ctx.out_dtypes)
        if d.is_floating_point and torch.finfo(d).eps > torch.finfo(torch.float64).eps
    ]
    if low:
        o, dtype = low[0]
        return (
            f" (output {o} is {dtype} although the inputs are float64: finite differences "
            f"over eps={ctx.options.eps:g} of a {dtype} output are rounded to its precision, "
            "so the numerical gradient is unreliable; let fn compute in float64 for the "
            f"check, or pass a larger {option_name('eps')})"
        )
    leaves = [x.detach() for x in ctx.leaves()]
    shifted = [x + ctx.options.eps for x in leaves]
    dtype = _rounding_of_outputs(ctx, leaves) or _rounding_of_outputs(ctx, shifted)
    if dtype is None:
        return ""
    return (
        f" (fn's float64 outputs hold only {dtype} numbers: does fn compute in {dtype} and "
        f"cast back? finite differences over eps={ctx.options.eps:g} are then rounded to "
        f"{dtype}'s precision, so the numerical gradient is unreliable; let fn compute in "
        f"float64 for the check, or pass a larger {option_name('eps')}"
        + (_UPCAST_NOTE if dtype == torch.float32 else "")
        + ")"
    )


#: How a float32 computation of float64 inputs usually comes about.
_UPCAST_NOTE = (
    "; an x.float() meant to upcast float16 inputs downcasts float64 ones: "
    "x.to(torch.promote_types(x.dtype, torch.float32)) upcasts only"
)


def _rounding_of_outputs(ctx: CheckContext, inputs: Sequence[torch.Tensor]) -> torch.dtype | None:
    """The narrower dtype (:func:`rounded_to`) whose numbers alone fn's float64 outputs at
    ``inputs`` hold while ``inputs`` do not; None if none. Inputs holding only float32
    numbers (float32 inputs cast to float64) are checked again shifted by ``eps``, as
    gradcheck evaluates fn: outputs that stay float32 numbers there are computed in
    float32, while those copying the inputs (relu) no longer are. None also when fn
    raises there: the shifted inputs may leave its domain (probabilities that must sum
    to 1), and the hint must not replace the failure it explains."""
    try:
        with torch.no_grad():
            outputs = ctx.diff_fn(*inputs)
    except Exception:  # noqa: BLE001 - fn refusing these inputs only loses the hint
        return None
    dtype = rounded_to(outputs)
    if dtype is None or _fits(_finite_fractions(inputs), dtype):
        return None
    return dtype


def _low_precision_backward(ctx: CheckContext) -> str:
    """Why the numerical second derivative may be off although double backward is right:
    backward's float64 gradients (of random grad_outputs) hold only float32 numbers
    (:func:`rounded_to`: backward computes in float32 and casts back), so its finite
    differences over ``eps`` carry float32's rounding. Empty when they do not."""
    leaves = ctx.leaves()
    outs = [o for o in ctx.diff_fn(*leaves) if o.requires_grad]
    grads = input_grads(outs, leaves, ctx.randn_like_outputs(outs), allow_unused=True)
    dtype = rounded_to([g for g in grads if g is not None])
    if dtype is None:
        return ""
    return (
        f" (backward's float64 gradients hold only {dtype} numbers: does backward compute "
        f"in {dtype}, a narrower dtype than its float64 inputs? that loses precision in "
        f"every use; and finite differences of backward over eps={ctx.options.eps:g} are "
        f"rounded to {dtype}'s precision, so the numerical second derivative is "
        "unreliable: compute backward in the inputs' dtype, or, if it does so on purpose, "
        f"pass a larger {option_name('eps')} (such as 1e-3) or "
        f"{option('skip', ['gradgradcheck'])})"
    )


def _projected_error(
    ctx: CheckContext,
    func: Callable[..., Any],
    inputs: Sequence[torch.Tensor],
    what: str,
    grad_mode: bool = False,
) -> tuple[float, float]:
    """``(abs, rel)`` error of ``what``'s ``v^T J u`` for the check's own random ``u`` and
    ``v`` (drawn from its seed), against central differences; with ``fast_mode`` a failed
    check when it is out of tolerance. torch's fast gradcheck projects on vectors drawn
    from a generator of fixed seed, the same on every run: a gradient wrong only along
    directions those miss would pass every run, whatever the seed."""
    abs_err, rel_err, scale = projected_backward_error(
        func, inputs, ctx.options.eps, ctx.randn, grad_mode
    )
    bound = ctx.options.atol + ctx.options.rtol * scale
    if ctx.options.fast_mode and abs_err > bound:
        raise CheckFailure(
            f"{what} disagrees with the numerical gradient along a random projection "
            f"v^T J u (fast_mode): max abs error {abs_err:.1e} (seed {ctx.options.seed})",
            abs_err,
            rel_err,
        )
    return abs_err, rel_err


def check_gradcheck(ctx: CheckContext) -> Passed:
    """Backward's Jacobian against central differences (torch's gradcheck decides; the
    full Jacobians, or random projections of large ones, give the error and where), then,
    for several outputs, backward given all their gradients at once against the sum of its
    gradients for each output alone (:func:`_require_linear_in_grad_outputs`), and
    backward linear in the grad_outputs (:func:`require_backward_linear`).
    Unsupported when backward returns a sparse gradient for a dense input, which torch's
    gradcheck cannot check, after our own comparison found it right (a wrong one fails)."""
    _require_float64(ctx)
    diff = ctx.leaves()
    sparse = ctx.sparse_gradient_inputs()
    torch_msg = None
    if not sparse:
        torch_msg = _torch_verdict(
            torch.autograd.gradcheck, ctx.diff_fn, tuple(diff), **_torch_options(ctx)
        )
    try:
        errors = _first_order(ctx, diff, analytical_jacobian, "backward", "gradcheck", torch_msg)
    except CheckFailure as failure:
        _require_linear_when_only_torch_failed(ctx, failure, "gradcheck", _require_backward_linear)
        hint = _missing_gradients_hint(ctx, diff) + _non_differentiable_outputs_hint(ctx, diff)
        raise CheckFailure(failure.message + hint, failure.abs_err, failure.rel_err) from None
    if errors is not None:
        abs_err, rel_err, note = errors
        note = f"full Jacobian compared{note}"
    else:
        abs_err, rel_err = _projected_error(ctx, ctx.diff_fn, diff, "backward")
        note = "random projections v^T J u compared (large inputs)"
    _require_backward_linear(ctx)
    if sparse:
        raise _sparse_gradient_gap(ctx, sparse, "gradcheck", note, abs_err, rel_err)
    return Passed(note, abs_err, rel_err)


def _require_backward_linear(ctx: CheckContext) -> None:
    """Fail unless backward is linear in the grad_outputs: given them all at once
    (:func:`_require_linear_in_grad_outputs`) and given random ones
    (:func:`require_backward_linear`), and right for random dense ones
    (:func:`require_backward_like_central_differences`)."""
    _require_linear_in_grad_outputs(ctx)
    require_backward_linear(ctx)
    require_backward_like_central_differences(ctx)


def _require_jvp_linear(ctx: CheckContext) -> None:
    """Fail unless jvp is linear in random tangents (:func:`require_jvp_linear`) and right
    for dense ones (:func:`require_jvp_like_central_differences`)."""
    require_jvp_linear(ctx)
    require_jvp_like_central_differences(ctx)


def _require_linear_when_only_torch_failed(
    ctx: CheckContext,
    failure: CheckFailure,
    torch_name: str,
    require_linear: Callable[[CheckContext], None],
) -> None:
    """When only torch's verdict failed (``failure`` is its bare line: the one-hot
    Jacobians agree), fail with ``require_linear``'s finding if it has one: torch's
    ``fast_mode`` projects on dense random vectors, so a map wrong or non-finite only for
    those fails there, and the linearity check names how. Nothing when it passes or
    raises otherwise (``failure`` then stands)."""
    if not failure.message.startswith(f"{torch_name}: "):
        return
    try:
        require_linear(ctx)
    except CheckFailure:
        raise
    except Exception:  # noqa: BLE001, S110 - the original failure stands
        return


def _sparse_gradient_gap(
    ctx: CheckContext,
    sparse: Sequence[int],
    torch_name: str,
    note: str,
    abs_err: float,
    rel_err: float,
) -> CheckUnsupported:
    """Unsupported for backward's sparse gradient of the dense inputs ``sparse``, which
    torch's ``torch_name`` cannot check, once our own comparison (``note``) found it right."""
    names = ", ".join(ctx.input_name(k) for k in sparse)
    return CheckUnsupported(
        f"a sparse gradient of a dense input ({names}): torch's {torch_name} cannot check "
        "it; the other checks compare it densely, and so did this one against central "
        f"differences, finding it right ({note})",
        f"return grad.to_dense() from backward if torch's {torch_name} must check it",
        abs_err,
        rel_err,
    )


def _without_gradient(ctx: CheckContext, diff: Sequence[torch.Tensor]) -> list[int]:
    """Positions ``k`` of the differentiated inputs that backward gives no gradient (None:
    backward returned None for them, or no output requiring grad reaches them) although
    the numerical Jacobian shows that fn's outputs depend on them."""
    numerical = ctx.numerical_jacobian
    if numerical is None:
        return []
    leaves = [x.detach().clone().requires_grad_(True) for x in diff]
    outs = [o for o in ctx.diff_fn(*leaves) if o.requires_grad]
    grads: Sequence[torch.Tensor | None] = [None] * len(leaves)
    if outs:
        vs = ctx.randn_like_outputs(outs)
        grads = input_grads(outs, leaves, vs, allow_unused=True)
    return [
        k
        for k, g in enumerate(grads)
        if g is None and any(bool((j.abs() > ctx.options.atol).any()) for j in numerical[k])
    ]


def _non_differentiable_outputs_hint(ctx: CheckContext, diff: Sequence[torch.Tensor]) -> str:
    """Why gradcheck failed when a floating output that depends on the inputs does not
    require grad (``ctx.mark_non_differentiable``): backward never gets a gradient for
    it, so its analytical Jacobian reads as 0; empty when no such output."""
    numerical = ctx.numerical_jacobian
    if numerical is None:
        return ""
    try:
        leaves = [x.detach().clone().requires_grad_(True) for x in diff]
        outs = ctx.diff_fn(*leaves)
    except Exception:  # noqa: BLE001 - fn already failed the check; no hint then
        return ""
    atol = ctx.options.atol
    cut = [
        o
        for o, out in enumerate(outs)
        if not out.requires_grad
        and any(o < len(jk) and bool((jk[o].abs() > atol).any()) for jk in numerical)
    ]
    if not cut:
        return ""
    return (
        f" (output {cut[0]} does not require grad (marked non-differentiable?) although it "
        "depends on the inputs: backward is never given its gradient, so any loss built on "
        "it gets none; mark only outputs that are constant in the inputs)"
    )


def _missing_gradients_hint(ctx: CheckContext, diff: Sequence[torch.Tensor]) -> str:
    """Why gradcheck failed when backward returns None for an input that requires grad
    (its analytical gradient then reads as 0), naming the input and how to leave it out;
    empty when every input fn depends on gets a gradient."""
    try:
        missing = _without_gradient(ctx, diff)
    except Exception:  # noqa: BLE001 - backward already failed the check; no hint then
        return ""
    if not missing:
        return ""
    names = ", ".join(ctx.input_name(k) for k in missing)
    several = len(missing) > 1
    ways = [f"return {'their gradients' if several else 'its gradient'}"]
    if any(ctx.grad_idx[k] not in ctx.parameter_names for k in missing):
        kept = tuple(
            i
            for k, i in enumerate(ctx.grad_idx)
            if k not in missing and i not in ctx.parameter_names
        )
        if kept:
            them = "them" if several else "it"
            ways.append(
                f"leave {them} out of the differentiated inputs with {option('grad_inputs', kept)}"
            )
    if any(ctx.grad_idx[k] in ctx.parameter_names for k in missing):
        ways.append("freeze the parameter with requires_grad_(False)")
    which = "require" if several else "requires"
    unreached = "or the graph does not reach it, e.g. through a .detach()"
    return (
        f" (backward returned None for {names}, which {which} grad ({unreached}): "
        f"{', or '.join(ways)})"
    )


def _require_linear_in_grad_outputs(ctx: CheckContext) -> None:
    """Fail unless backward given the gradients of all of fn's differentiable outputs at
    once returns the sum of what it returns for each output alone.

    The Jacobians compared above come from one output at a time (the others' gradients
    None, or zeros), as in torch's gradcheck, and each such gradient is right; a backward
    with a wrong branch for several defined gradients (``ctx.set_materialize_grads(False)``
    code handling None) is then wrong in every real use of more than one output, unseen.
    """
    leaves = ctx.leaves()
    outs = [o for o in ctx.diff_fn(*leaves) if o.requires_grad]
    if len(outs) < 2:
        return
    vs = ctx.randn_like_outputs(outs)
    at_once = f"given the gradients of all {len(outs)} outputs at once"
    try:
        joint = input_grads(outs, leaves, vs, retain_graph=True, allow_unused=True)
    except Exception as exc:  # noqa: BLE001 - each output alone worked: a bug, in words
        raise CheckFailure(f"backward fails {at_once}: {explain_error(exc)}") from None
    alone = [
        input_grads(o, leaves, v, retain_graph=True, allow_unused=True) for o, v in zip(outs, vs)
    ]
    tolerance = ctx.parity_tolerances()
    wrong_branch = (
        " (a wrong branch for several defined grad_outputs, e.g. under "
        "ctx.set_materialize_grads(False)?)"
    )
    for k, leaf in enumerate(leaves):
        expected = sum((g[k] for g in alone if g[k] is not None), torch.zeros_like(leaf))
        got = torch.zeros_like(leaf) if joint[k] is None else joint[k]
        require_close(
            got,
            expected,
            tolerance,
            f"backward of {ctx.input_name(k)} {at_once} differs from the sum of its "
            "gradients for each output alone",
            note=departure_note(got, expected, tolerance, wrong_branch),
            show_index=True,
        )


def _require_differentiable_backward(
    ctx: CheckContext,
    outs: list[torch.Tensor],
    diff: list[torch.Tensor],
    vs: list[torch.Tensor],
) -> bool:
    """Fail unless backward of ``outs`` builds a graph that connects its gradients to the
    inputs (``diff``) or grad_outputs (``vs``); unsupported when backward declares that it
    cannot be differentiated (``once_differentiable``: differentiating it raises, loudly;
    ``NotImplementedError`` raised by backward with ``create_graph=True`` or by the
    backward of what it computed).

    Returns:
        True when no gradient is connected to the graph at all: right only if backward
        is constant near these inputs (a step function's zero gradient, as torch.round
        or torch.floor give), which the numerical comparison decides
        (:func:`_constant_backward_failure` words its failure).
    """
    try:
        grads = input_grads(outs, diff, vs, create_graph=True, allow_unused=True)
    except Exception as exc:  # noqa: BLE001
        if "a leaf Variable that requires grad" in str(exc):
            # forward ran on these leaves already: the write is backward's
            raise CheckFailure(
                "backward writes in place into grad_output or an input (leaves that "
                "require grad in double backward): never modify them in backward, "
                "compute into a new tensor"
            ) from None
        raise outcome_of(exc, capability=DOUBLE_BACKWARD) from None
    live = [g for g in grads if g is not None]
    if live and not any(g.requires_grad for g in live):
        return True
    # once_differentiable (or an op without a derivative) puts a node here that raises
    # when differentiated: loud, so a missing capability rather than a silent bug
    if any(type(g.grad_fn).__name__ in ("Error", "DelayedError") for g in live):
        raise CheckUnsupported(
            "backward is once_differentiable (or uses an op PyTorch cannot differentiate): "
            "double backward is unsupported",
            "drop @once_differentiable and write backward in differentiable torch ops",
        )
    if not live:
        return False
    weights = [ctx.randn(g.shape, g.dtype) for g in live]
    try:
        second = input_grads(
            [g for g in live if g.requires_grad],
            [*diff, *vs],
            [w for g, w in zip(live, weights) if g.requires_grad],
            allow_unused=True,
        )
    except Exception as exc:  # noqa: BLE001
        raise outcome_of(exc, capability=DOUBLE_BACKWARD) from None
    if all(s is None for s in second):
        raise CheckFailure(
            "backward is not differentiable: its gradients are not connected to the "
            "inputs or grad_output in the autograd graph (once_differentiable, .detach() "
            "or a non-torch computation in backward?)"
        )
    return False


def _constant_backward_failure(failure: CheckFailure) -> CheckFailure:
    """``failure`` of the second-order comparison of a backward whose gradients are not
    connected to the graph, worded as that cause: its derivatives count as zero, and
    central differences found them not zero."""
    return CheckFailure(
        "backward's gradients are not connected to the graph (backward runs under no_grad, "
        "uses .detach(), or calls torch.autograd.grad without create_graph), so double "
        "backward silently takes them for constants and a gradient penalty gets zero: "
        "compute them differentiably (create_graph=torch.is_grad_enabled() for an inner "
        "torch.autograd.grad), or mark backward @once_differentiable to make double "
        f"backward raise instead: {failure.message}",
        failure.abs_err,
        failure.rel_err,
    )


def _require_same_gradients_with_graph(
    ctx: CheckContext, diff: list[torch.Tensor], vs: list[torch.Tensor]
) -> None:
    """Fail unless backward of fn at the leaves ``diff`` for the grad_outputs ``vs`` (one
    per output requiring grad) gives the same gradients with ``create_graph=True`` (grad
    mode on: the path double backward differentiates, and a gradient penalty trains with)
    as without: gradcheck checks only the latter, and gradgradcheck differentiates the
    former consistently with itself."""
    outs = [o for o in ctx.diff_fn(*diff) if o.requires_grad]
    plain, graph = (
        input_grads(
            outs,
            diff,
            [v.detach().clone() for v in vs],
            retain_graph=True,
            create_graph=create_graph,
            allow_unused=True,
        )
        for create_graph in (False, True)
    )
    tolerance = ctx.parity_tolerances()
    for k, (without, with_graph) in enumerate(
        zip(zeros_for_none(plain, diff), zeros_for_none(graph, diff))
    ):
        require_close(
            with_graph.detach(),
            without,
            tolerance,
            f"backward with create_graph=True gives another gradient of {ctx.input_name(k)} "
            "than without",
            note=(
                " (a branch on torch.is_grad_enabled() or create_graph, e.g. a "
                "differentiable path beside a fused one, wrong in one of them: gradcheck "
                "checks the path without a graph, double backward and gradient penalties "
                "use the other)"
            ),
            show_index=True,
        )


def check_gradgradcheck(ctx: CheckContext) -> Passed:
    """The Jacobian of backward (w.r.t. the inputs and grad_outputs) against central
    differences; skipped when gradcheck failed, unsupported when double backward raises
    ``NotImplementedError`` (or backward is ``once_differentiable``)."""
    _require_float64(ctx)
    if ctx.failed("gradcheck"):
        raise CheckSkip("skipped because gradcheck failed (first derivatives are wrong)")
    try:
        return _second_order(ctx)
    except CheckFailure as failure:
        hint = _hint(_low_precision_backward, ctx) + _hint(_saved_constants_hint, ctx)
        hint += _hint(functools.partial(_detached_inputs_hint, message=failure.message), ctx)
        if not hint:
            raise
        raise CheckFailure(failure.message + hint, failure.abs_err, failure.rel_err) from None
    except (CheckUnsupported, CheckSkip):
        raise
    except Exception as exc:  # noqa: BLE001
        raise outcome_of(exc, capability=DOUBLE_BACKWARD) from None


def _hint(hint: Callable[[CheckContext], str], ctx: CheckContext) -> str:
    """``hint(ctx)``, or empty when it raises: a hint must never replace the verdict."""
    try:
        return hint(ctx)
    except Exception:  # noqa: BLE001
        return ""


def _detached_inputs_hint(ctx: CheckContext, message: str) -> str:
    """Why double backward may be wrong for the input a gradgradcheck failure ``message``
    names (``d(grad)/d(input 0)``): backward's gradients, connected to the graph (through
    grad_output), have no path to that input, as when backward recomputes forward from
    ``x.detach()`` copies and differentiates them with an inner ``torch.autograd.grad``
    (``create_graph`` then connects grad_output only); empty otherwise (no gradient is
    connected at all: :func:`_constant_backward_failure` words that)."""
    diff = ctx.leaves()
    outs = [o for o in ctx.diff_fn(*diff) if o.requires_grad]
    vs = ctx.randn_like_outputs(outs)
    grads = input_grads(outs, diff, vs, create_graph=True, allow_unused=True)
    live = [g for g in grads if g is not None and g.requires_grad]
    if not live:
        return ""
    ones = [torch.ones_like(g) for g in live]
    second = input_grads(live, diff, ones, allow_unused=True)
    named = [
        ctx.input_name(k)
        for k, s in enumerate(second)
        if s is None and f"d(grad)/d({ctx.input_name(k)})" in message
    ]
    if not named:
        return ""
    return (
        f" (backward's gradients have no path to {_list(named)} in the autograd graph, "
        "only to grad_output: backward recomputes from a detached copy (x.detach(), "
        "then an inner torch.autograd.grad) or under torch.no_grad(), so double backward "
        "takes it for a constant; differentiate the saved input itself (with "
        "create_graph=torch.is_grad_enabled()), or mark backward @once_differentiable to "
        "make double backward raise instead)"
    )


def _saved_constants_hint(ctx: CheckContext) -> str:
    """Why double backward may be wrong: what fn's Functions saved for backward that is
    neither an input nor an output (:func:`saved_constants`); empty when nothing is."""
    constants = saved_constants(ctx)
    if not constants:
        return ""
    one = len(constants) == 1 and " and a " not in constants[0]
    it, is_, them = ("it", "it is", "it") if one else ("them", "they are", "each")
    return (
        f" (possible cause: {_list(constants)} for backward although {is_} neither an "
        f"input nor an output: forward runs without autograd, so double backward takes "
        f"{them} for a constant and misses its dependence on the inputs. Save inputs or "
        f"outputs and recompute {it} in backward, or return {it} as an output; mark "
        "backward @once_differentiable if double backward is not meant to work)"
    )


def saved_constants(ctx: CheckContext) -> list[str]:
    """What fn's Python Functions saved for backward that is neither one of fn's inputs
    nor an output of the Function, and whose values follow the differentiable inputs: a
    floating-point tensor computed in ``forward`` (which runs without autograd) from
    them, so the graph of a double backward holds it as a constant. A saved tensor that
    stays the same when the inputs move a little (one fn made from a non-differentiable
    input, such as a one-hot of labels; a mask of signs) is a constant indeed, and not
    named. One per Function, as ``"<Function> saved a <shape> and a <shape> tensor"``;
    empty when nothing is found or the saved tensors cannot be read (freed, or a C++
    node)."""
    diff = ctx.leaves()
    saved = _saved_non_inputs(ctx, diff)
    if not saved:
        return []
    moved = _saved_non_inputs(ctx, [_nudged(d) for d in diff])
    if [(name, t.shape) for name, t in moved] == [(name, t.shape) for name, t in saved]:
        # the same graph: name only what the nudge changed
        saved = [(name, t) for (name, t), (_, u) in zip(saved, moved) if not same_values(t, u)]
    shapes: dict[str, list[str]] = {}
    for name, t in saved:
        shapes.setdefault(name, []).append(f"a {tuple(t.shape)}")
    return [f"{name} saved {_list(found)} tensor" for name, found in shapes.items()]


def _saved_non_inputs(
    ctx: CheckContext, diff: Sequence[torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """``(Function name, tensor)`` for each floating-point tensor without autograd history
    that a Python Function of fn's graph at ``diff`` saved for backward and that is not
    one of fn's inputs, in the order of a depth-first walk from the outputs (the same
    for two calls that build the same graph); empty when fn raises."""
    inputs = ctx.full_inputs(diff)
    given = {t.data_ptr() for t in inputs if isinstance(t, torch.Tensor) and not t.is_sparse}
    try:
        # the outputs stay referenced while the graph is walked: a Python Function's node
        # lives only as long as the graph does (its ctx alone does not keep it)
        outs = ctx.diff_fn(*diff)
    except Exception:  # noqa: BLE001 - a hint only: fn already ran in the failed check
        return []
    roots = [o.grad_fn for o in reversed(outs) if o.grad_fn is not None]
    found: list[tuple[str, torch.Tensor]] = []
    seen = set()
    while roots:
        node = roots.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        try:
            roots.extend(parent for parent, _ in reversed(node.next_functions))
        except RuntimeError:  # a node whose graph is already gone: nothing to read
            continue
        if not isinstance(node, torch.autograd.function.BackwardCFunction):
            continue
        try:
            saved = node.saved_tensors
        except RuntimeError:
            continue
        name = type(node).__name__.removesuffix("Backward")
        found += [
            (name, t.detach())
            for t in saved
            if isinstance(t, torch.Tensor)
            and (t.is_floating_point() or t.is_complex())
            and not t.requires_grad
            and t.data_ptr() not in given
        ]
    return found


def _nudged(t: torch.Tensor) -> torch.Tensor:
    """``t`` moved by a small deterministic amount, different at each element (no draw
    from the check's generator, whose stream the other checks share)."""
    t = t.detach()
    pattern = torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device).sin()
    step = 1e-4 * (1 + t.abs()) * pattern.reshape(t.shape).to(t.real.dtype)
    return (t + step).requires_grad_(True)


def _list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _second_order(ctx: CheckContext) -> Passed:
    """The body of :func:`check_gradgradcheck`."""
    diff = ctx.leaves()
    outs_rg = [o for o in ctx.diff_fn(*diff) if o.requires_grad]
    vs = [ctx.randn(o.shape, o.dtype).requires_grad_(True) for o in outs_rg]
    detached = _require_differentiable_backward(ctx, outs_rg, diff, vs)
    _require_same_gradients_with_graph(ctx, diff, vs)
    n_in = len(diff)

    def first_grad(*xs_and_vs):
        xs, vv = xs_and_vs[:n_in], xs_and_vs[n_in:]
        xs = [x if x.requires_grad else x.detach().requires_grad_(True) for x in xs]
        o = [t for t in ctx.diff_fn(*xs) if t.requires_grad]
        gs = input_grads(o, xs, vv, create_graph=True, allow_unused=True)
        return tuple(zeros_for_none(gs, xs))

    vs_plain = [v.detach() for v in vs]
    inputs2 = [*[x.detach() for x in diff], *vs_plain]
    sparse = ctx.sparse_gradient_inputs()

    def torch_verdict() -> str | None:
        if sparse:
            return None
        return _torch_verdict(
            torch.autograd.gradgradcheck,
            lambda *xs: tuple(o for o in ctx.diff_fn(*xs) if o.requires_grad),
            tuple(x.detach().clone().requires_grad_(True) for x in diff),
            # differentiable, as torch's own random grad_outputs are: without them a
            # backward constant in the inputs has no differentiable output, and torch then
            # wants its numerical derivative exactly zero, ignoring nondet_tol
            tuple(v.clone().requires_grad_(True) for v in vs_plain),
            capability=DOUBLE_BACKWARD,
            **_torch_options(ctx),
        )

    large = jacobian_size(first_grad, inputs2, True) > FULL_JACOBIAN_LIMIT
    # at a kink torch's fast mode fails and, to say so, builds the full Jacobians that
    # the comparison below builds again: there it runs only when its verdict counts
    on_kink = large and not sparse and _on_a_kink(ctx, first_grad, inputs2)
    torch_msg = torch_verdict if on_kink else torch_verdict()
    names = [f"d(grad)/d({ctx.input_name(k)})" for k in range(n_in)]
    names += [f"d(grad)/d(grad_output {o})" for o in range(len(vs))]
    try:
        if not large or torch_msg:
            jacobians = (
                analytical_jacobian(first_grad, inputs2),
                numerical_jacobian(first_grad, inputs2, ctx.options.eps, True),
            )
            abs_err, rel_err, note = _full_comparison(
                ctx,
                jacobians,
                func=first_grad,
                grad_mode=True,
                what="double backward",
                inputs=inputs2,
                input_names=names,
                out_shapes=[tuple(x.shape) for x in diff],
                torch_name="gradgradcheck",
                torch_msg=torch_msg,
            )
            note = f"full second-order Jacobian compared{note}"
        else:
            abs_err, rel_err = _projected_error(ctx, first_grad, inputs2, "double backward", True)
            note = "random projections compared (large inputs)"
    except CheckFailure as failure:
        if detached:
            raise _constant_backward_failure(failure) from None
        raise
    if sparse:
        raise _sparse_gradient_gap(ctx, sparse, "gradgradcheck", note, abs_err, rel_err)
    return Passed(note, abs_err, rel_err)


def _on_a_kink(ctx: CheckContext, func: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> bool:
    """True if ``func``'s right and left differences along a random direction of norm 1
    (:func:`~torchbp.verify.checks.jacobians.unit_direction`) differ beyond gradcheck's
    tolerances: the inputs sit where ``func`` is not differentiable (relu's backward at
    0, a tie in a max), and projections across them disagree with central differences.
    Also True when ``func`` raises on the shifted inputs, which move every element at once
    (a fn refusing inputs off its domain, such as weights with at most k nonzeros): the
    projections would raise too, while the full comparison, which moves one element at a
    time, may stay inside it."""
    eps, atol, rtol = ctx.options.eps, ctx.options.atol, ctx.options.rtol
    us = unit_direction(inputs, ctx.randn)
    base = [x.detach() for x in inputs]
    try:
        hi, mid, lo = (
            [t.detach() for t in func(*[x + step * u for x, u in zip(base, us)])]
            for step in (eps, 0.0, -eps)
        )
    except Exception:  # noqa: BLE001 - fn refusing the shifted inputs: compare in full
        return True
    return any(
        not torch.allclose((h - m) / eps, (m - low) / eps, rtol, atol, equal_nan=True)
        for h, m, low in zip(hi, mid, lo)
    )


def check_forward_ad(ctx: CheckContext) -> Passed:
    """The Jacobian built from one jvp per input element against central differences, and
    each output's tangent in that output's dtype (or a wider one) and on its device;
    unsupported for a custom op (PyTorch has no jvp registration for one), for a fn that
    calls one on values computed from the inputs when forward AD fails or disagrees (the
    op's silent zero tangents), and when jvp raises ``NotImplementedError``."""
    if ctx.custom_op is not None:
        raise no_forward_ad()
    _require_float64(ctx)
    try:
        return _forward_ad(ctx)
    except (CheckFailure, CheckUnsupported):
        called = custom_ops_reached(ctx.diff_fn, ctx.leaves())
        if not called:
            raise
    _require_jvp_beside_custom_ops(ctx)
    raise no_forward_ad(called) from None  # the zero tangents PyTorch gives a custom op


def _require_jvp_beside_custom_ops(ctx: CheckContext) -> None:
    """Fail unless fn's forward-mode Jacobian equals its backward one where no custom op
    is involved (both with the custom ops' outputs detached): a wrong jvp beside a custom
    op must not pass as the op's missing forward AD. Nothing to say when the Jacobian is
    too large to build or forward AD raises (no jvp): the check is unsupported anyway."""
    diff = ctx.leaves()
    fn = without_custom_ops(ctx.diff_fn)
    if jacobian_size(fn, diff) > FULL_JACOBIAN_LIMIT:
        return
    try:
        forward, backward = forward_jacobian(fn, diff), analytical_jacobian(fn, diff)
    except Exception:  # noqa: BLE001, S110 - no jvp, or a failure the other checks report
        return
    names = [ctx.input_name(k) for k in range(len(diff))]
    shapes = [tuple(x.shape) for x in diff]
    tolerance = (ctx.options.atol, ctx.options.rtol)
    what = "forward-mode AD (jvp)"
    abs_err, rel_err, msg = compare_jacobians(
        forward, backward, what, names, shapes, ctx.out_shapes, tolerance, against="backward"
    )
    if msg:
        raise CheckFailure(
            f"{msg} (both without the custom ops' contribution: forward AD through a "
            "custom op is PyTorch's zero tangents, but this is a jvp of fn's own)",
            abs_err,
            rel_err,
        )


def _tangent_mismatch(tangent: torch.Tensor, output: torch.Tensor, o: int) -> str | None:
    """How the ``tangent`` jvp gave output ``o`` differs from that output in dtype (a
    narrower one) or device, as the end of a sentence; None if it does not."""
    if torch.promote_types(tangent.dtype, output.dtype) != tangent.dtype:
        return (
            f"a {tangent.dtype} tangent for output {o}, which is {output.dtype}: return it "
            "in the output's dtype (compute in it, or end with .to(x.dtype)) - PyTorch "
            "keeps the tangent as jvp returns it, so forward-mode derivatives (jacfwd, "
            "torch.func.jvp) silently lose precision"
        )
    if tangent.device != output.device:
        return (
            f"a tangent on device {tangent.device} for output {o}, which is on "
            f"{output.device}: return it on the output's device"
        )
    return None


def _require_tangents_like_outputs(ctx: CheckContext) -> None:
    """Fail unless one jvp (every grad input with a random tangent) gives each output a
    tangent of its dtype, or a wider one, on its device: the comparison with central
    differences, at gradcheck's tolerances, cannot see a float32 tangent's rounding."""
    base = [x.detach() for x in ctx.leaves()]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, ctx.randn(x.shape, x.dtype)) for x in base]
        for o, out in enumerate(ctx.diff_fn(*duals)):
            tangent = fwAD.unpack_dual(out).tangent
            problem = None if tangent is None else _tangent_mismatch(tangent, out, o)
            if problem:
                raise CheckFailure(f"forward-mode AD (jvp) gives {problem}")


def _forward_ad(ctx: CheckContext) -> Passed:
    """The body of :func:`check_forward_ad`, for a fn that is no custom op itself."""
    diff = ctx.leaves()
    torch_msg = _torch_verdict(
        torch.autograd.gradcheck,
        ctx.diff_fn,
        tuple(diff),
        check_forward_ad=True,
        check_backward_ad=False,
        capability=FORWARD_AD,
        **_torch_options(ctx),
    )
    try:
        errors = _first_order(
            ctx, diff, forward_jacobian, "forward-mode AD (jvp)", "forward AD", torch_msg
        )
    except CheckFailure as failure:
        _require_linear_when_only_torch_failed(ctx, failure, "forward AD", _require_jvp_linear)
        raise
    _require_tangents_like_outputs(ctx)
    _require_jvp_linear(ctx)
    require_jvp_layout_independent(ctx)
    require_jvp_like_backward_where_left_out(ctx)
    if errors is not None:
        abs_err, rel_err, note = errors
        return Passed(f"full forward Jacobian compared{note}", abs_err, rel_err)
    return Passed("torch gradcheck(check_forward_ad=True) passed")
