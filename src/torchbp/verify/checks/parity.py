"""Checks that fn equals another computation of it on the same inputs and grad_outputs:
``compile`` (torch.compile of fn) and ``reference`` (the reference callable). Floating
outputs and gradients are compared within dtype-aware tolerances, integer and boolean
outputs (indices, masks) exactly.

gradcheck compares fn's backward only with fn's own forward: a forward that computes the
wrong function, differentiated consistently, passes it (``reference`` catches it), and so
does a Function that breaks or computes otherwise when torch.compile traces it ahead of
time (``compile``)."""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from torchbp.verify.checks.compare import (
    exact_tensors,
    float_tensors,
    input_grads,
    require_close,
    same_values,
    shape_text,
    tolerances,
    unravel,
    zeros_for_none,
)
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.explain import explain_error, outcome_of
from torchbp.verify.checks.outcomes import CheckFailure, CheckSkip, CheckUnsupported, Passed
from torchbp.verify.checks.own_dtype import (
    grad_output_from_one_to_two,
    raised_in_own_dtype,
    require_finite_as_in_cast_dtype,
)
from torchbp.verify.checks.rng import (
    SameRandomNumbers,
    draws_random_numbers,
    require_gradients_of_own_forward,
)

__all__ = [
    "check_compile",
    "check_reference",
    "check_reference_dtype",
    "grads_or_none",
    "output_grads",
]

#: How much looser ``reference_dtype`` compares than ``reference``: fn and the reference
#: may round differently (another order of a sum, a fused op) in a low precision, where
#: a wrong formula or a lost precision (a float16 accumulator) is off by far more.
OWN_DTYPE_SLACK = 10.0


def _compare(
    ctx: CheckContext, a: torch.Tensor, b: torch.Tensor, what: str, label: str
) -> tuple[float, float]:
    """``(max abs, max rel)`` error of ``a`` against ``b``; a failed check naming
    ``what`` when the shapes differ or the values are out of tolerance."""
    if a.shape != b.shape:
        raise CheckFailure(f"{what} has shape {shape_text(a)} but {label} gives {shape_text(b)}")
    tolerance = ctx.parity_tolerances(b.dtype)
    return require_close(a, b, tolerance, f"{what} differs from {label}", show_index=True)


def _require_equal_exact(
    outs_a: list[torch.Tensor], outs_b: list[torch.Tensor], label: str
) -> None:
    """fn's integer and boolean outputs (indices, masks) must equal ``label``'s exactly."""
    if len(outs_a) != len(outs_b):
        raise CheckFailure(
            f"fn returned {len(outs_a)} integer or boolean output(s) but {label} returned "
            f"{len(outs_b)}"
        )
    for o, (a, b) in enumerate(zip(outs_a, outs_b)):
        kind = "boolean" if a.dtype == torch.bool else "integer"
        what = f"{kind} output {o} ({str(a.dtype).replace('torch.', '')})"
        if a.dtype != b.dtype:
            raise CheckFailure(f"{what} has dtype {a.dtype} but {label} gives {b.dtype}")
        if a.shape != b.shape:
            shapes = f"{shape_text(a)} but {label} gives {shape_text(b)}"
            raise CheckFailure(f"{what} has shape {shapes}")
        differ = (a.detach() != b.detach()).reshape(-1)
        if bool(differ.any()):
            flat = int(differ.nonzero()[0])
            index = unravel(flat, a.shape)
            raise CheckFailure(
                f"{what} differs from {label}: {int(differ.sum())} of {a.numel()} element(s), "
                f"first at index {index}: {a.reshape(-1)[flat].item()} vs "
                f"{b.reshape(-1)[flat].item()}"
            )


def output_grads(
    outs: Sequence[torch.Tensor], leaves: list[torch.Tensor], vs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Gradients of ``outs`` (weighted by ``vs``) for every leaf; zeros where unused."""
    return zeros_for_none(grads_or_none(outs, leaves, vs), leaves)


def grads_or_none(
    outs: Sequence[torch.Tensor], leaves: list[torch.Tensor], vs: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """Gradients of ``outs`` (weighted by ``vs``) for every leaf; None where unused."""
    live = [(o, v) for o, v in zip(outs, vs) if o.requires_grad]
    if not live:
        return [None for _ in leaves]
    return list(input_grads([o for o, _ in live], leaves, [v for _, v in live], allow_unused=True))


def _compare_runs(
    ctx: CheckContext,
    other: Callable[..., Any],
    label: str,
    *,
    raw_errors: bool = False,
    own_parameters: bool = False,
    undefined: list[str] | None = None,
    grad_output: Callable[[torch.Size, torch.dtype], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Run fn and ``other`` on the same inputs and grad_outputs (drawn by
    ``grad_output(shape, dtype)``, random normal ones by default); compare everything.

    fn's gradients are taken before ``other`` runs: other may update state in place that
    fn's graph saved (a compiled BatchNorm's running statistics, which eager BatchNorm
    saves for backward), and fn's backward would then raise for a write fn never made.
    fn's outputs are compared as its forward returned them, not as its backward may have
    left them (a backward writing into a saved output is the mutation check's finding).

    An exception raised by ``other`` becomes a failed check, or propagates unchanged with
    ``raw_errors`` (for the caller to judge). With ``own_parameters``, a module parameter
    of fn that ``other`` does not use (a reference module with its own parameters, of other
    names) has no gradient to compare against and is left out. With an ``undefined``
    list, gradient elements where ``other``'s is NaN and fn's finite are left out too,
    and each such gradient described in the list (:func:`_left_out_where_undefined`).
    """
    leaves_a, leaves_b = ctx.leaves(), ctx.leaves()
    raw_a = ctx.call(ctx.fn, leaves_a)
    outs_a = float_tensors(raw_a)
    vs = [(grad_output or ctx.randn)(a.shape, a.dtype) for a in outs_a]
    returned_a = [a.detach().clone() for a in outs_a]
    exact_a = [t.detach().clone() for t in exact_tensors(raw_a)]
    # fn's backward runs before other's forward, which may write into what fn's graph saved
    # (a compiled BatchNorm updates the running statistics eager BatchNorm saved)
    ga = output_grads(outs_a, leaves_a, vs)
    try:
        raw_b = ctx.call(other, leaves_b)
    except Exception as exc:  # noqa: BLE001
        if raw_errors:
            raise
        raise CheckFailure(f"{label} raised {explain_error(exc)}") from None
    outs_b = float_tensors(raw_b)
    if len(outs_a) != len(outs_b):
        raise CheckFailure(
            f"fn returned {len(outs_a)} floating-point output(s) but {label} returned {len(outs_b)}"
        )
    worst = (0.0, 0.0)
    for o, (a, b) in enumerate(zip(returned_a, outs_b)):
        if a.shape == b.shape and a.dtype != b.dtype:
            raise CheckFailure(f"output {o} has dtype {a.dtype} but {label} gives {b.dtype}")
        worst = max(worst, _compare(ctx, a, b, f"output {o}", label))
    _require_equal_exact(exact_a, exact_tensors(raw_b), label)
    try:
        gb = grads_or_none(outs_b, leaves_b, vs)
    except Exception as exc:  # noqa: BLE001
        if raw_errors:
            raise
        raise CheckFailure(f"backward of {label} raised {explain_error(exc)}") from None
    for k, (a, b) in enumerate(zip(ga, gb)):
        if b is None and own_parameters and ctx.grad_idx[k] in ctx.parameter_names:
            continue
        b = torch.zeros_like(leaves_b[k]) if b is None else b
        what = f"gradient of {ctx.input_name(k)}"
        if undefined is not None:
            a = _left_out_where_undefined(a, b, what, undefined)
        worst = max(worst, _compare(ctx, a, b, what, label))
    return worst


def _left_out_where_undefined(
    a: torch.Tensor, b: torch.Tensor, what: str, undefined: list[str]
) -> torch.Tensor:
    """``a`` with the reference's NaN where ``b`` (the reference's gradient) is NaN and
    ``a`` finite, each such ``what`` described in ``undefined``: a NaN gradient is one the
    reference leaves undefined (torch.logsumexp of a row of -inf: exp(-inf - (-inf))),
    where fn may give any value (0, as a masked attention row's), not one fn must match.
    Skipped when that is every element: such a reference (a ``torch.where`` whose branch
    not taken has a NaN derivative) decides none of them, and a pass would say nothing."""
    if a.shape != b.shape:
        return a  # _compare names the shapes
    where = b.isnan() & a.isfinite()
    count = int(where.sum())
    if count and count == where.numel():
        raise CheckSkip(
            f"the reference's {what} is NaN at every element, where fn's is finite: it "
            "gives no value to compare fn's with (is the reference differentiable at the "
            "inputs? a torch.where whose branch not taken has a NaN derivative, such as "
            "a sqrt of negative numbers, makes every gradient NaN); nothing compared"
        )
    if count:
        first = unravel(int(where.flatten().nonzero()[0]), where.shape)
        undefined.append(f"{count} element(s) of the {what} (first at {first})")
    return torch.where(where, b, a)


def _fresh_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of a Python function with its own code object (so Dynamo's cache starts empty)."""
    code = fn.__code__.replace(co_name=fn.__code__.co_name)
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


#: Dynamo's words for a Python ``if`` on a tensor's value it cannot trace (inside an
#: autograd.Function's forward, where it may not break the graph, it raises a UserError).
_DATA_DEPENDENT_GUARD = "Could not guard on data-dependent expression"


#: Dynamo's words for an ``.item()`` in an autograd.Function's forward under
#: ``fullgraph=True`` (torch 2.11 to 2.14: an ``InternalTorchDynamoError`` from the number's
#: unbacked symbol, which the Function's captured forward does not return).
_ITEM_IN_FUNCTION = "PendingUnbackedSymbolNotFound"


def _is_capture_limit(exc: BaseException) -> bool:
    """True if Dynamo could not capture fn in one graph (``fullgraph=True``): a graph break
    (Dynamo's ``Unsupported``), a Python ``if`` on a tensor's values (a Function's input
    check) or an ``.item()`` in a Function's forward (a scale read as a number), not a
    wrong or crashing computation; fn compiled with graph breaks is then compared with
    eager (:func:`_with_graph_breaks`)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    message = str(exc)
    return (
        "Unsupported" in names
        or ("UserError" in names and _DATA_DEPENDENT_GUARD in message)
        or ("InternalTorchDynamoError" in names and message.startswith(_ITEM_IN_FUNCTION))
    )


def _compiled(
    fn: Callable[..., Any], backend: Any, fullgraph: bool, dirty: Sequence[int]
) -> Callable[..., Any]:
    """fn compiled afresh (its own code object, so Dynamo's cache starts empty).

    The inputs at positions ``dirty``, which fn modifies in place (``mark_dirty``), are
    copied inside the compiled region: AOTAutograd mishandles the gradient of an output that
    aliases a mutated graph input (torch 2.13: a ``mark_dirty`` Function's gradient comes
    out as if it were the identity), a PyTorch bug, not the Function's. A fn whose calls
    draw the same random numbers (:class:`SameRandomNumbers`) is compiled without that
    wrapper, which then wraps the compiled fn.
    """

    seeded = fn if isinstance(fn, SameRandomNumbers) else None
    plain = fn if seeded is None else seeded.fn  # the generators are seeded outside the graph

    def compiled_target(*a):
        return plain(*[x.clone() if i in dirty else x for i, x in enumerate(a)])

    target = _fresh_code(compiled_target)
    try:
        compiled = torch.compile(target, backend=backend, fullgraph=fullgraph, dynamic=False)
    except Exception as exc:  # noqa: BLE001
        msg = f"torch.compile(backend={backend!r}) failed: {explain_error(exc)}"
        raise CheckFailure(msg) from None
    return compiled if seeded is None else seeded.around(compiled)


#: How to capture fn in one graph despite Dynamo's limitation for Functions with a jvp.
JVP_HINT = "apply a jvp-free twin of the Function while torch.compiler.is_compiling()"

#: How to capture fn in one graph despite Dynamo's limitation for ``ctx.mark_dirty``.
MARK_DIRTY_HINT = (
    "modify the input in one statement and return the input itself "
    "(x.mul_(s); return x, not return x.mul_(s))"
)

#: How to capture fn in one graph when fn itself breaks it.
GRAPH_BREAK_HINT = "remove what breaks the graph (TORCH_LOGS=graph_breaks shows where)"

#: How to capture a Function whose forward branches on a tensor's values in one graph.
DATA_DEPENDENT_HINT = (
    "branch with torch.where, or check the values before calling the Function, outside "
    "the compiled region"
)

#: How to capture a Function whose forward reads a number off a tensor in one graph.
ITEM_HINT = (
    "keep the value a tensor (x.abs().amax() rather than x.abs().max().item()), or read it "
    "before calling the Function, outside the compiled region"
)

#: How to capture a Function whose forward or backward Dynamo cannot bind: a classmethod.
CLASSMETHOD_HINT = (
    "declare the Function's forward and backward @staticmethod: Dynamo cannot bind the "
    "arguments of a @classmethod one (otherwise, " + GRAPH_BREAK_HINT + ")"
)


def _capture_limit(exc: BaseException) -> tuple[str, str]:
    """What kept Dynamo from capturing fn in one graph, in words, and how to avoid it.

    A Function with ``ctx.mark_dirty`` that passed eager's forward returns its dirty
    inputs (eager refuses one it does not return); Dynamo may not see it, e.g. in the
    result of an in-place method (``return x.mul_(s)``): its limitation, not fn's bug."""
    message = explain_error(exc)
    if "cannot capture a Function that defines jvp" in message:
        note = (
            "torch.compile(fullgraph=True) cannot capture a Function that defines jvp "
            "(a PyTorch limitation)"
        )
        return note, JVP_HINT
    if "mark_dirty input not returned" in message:
        note = (
            "torch.compile(fullgraph=True) cannot capture this Function with "
            "ctx.mark_dirty: Dynamo does not see the dirty input among forward's outputs, "
            "though eager checked that forward returns it (a Dynamo limitation, not a bug "
            f"in fn; Dynamo's words: {message})"
        )
        return note, MARK_DIRTY_HINT
    if _DATA_DEPENDENT_GUARD in message:
        note = (
            "torch.compile(fullgraph=True) cannot capture a Python if on a tensor's values "
            "(bool(x.any()), an input check) in fn or a Function it calls: one graph has "
            f"no branch for it (a PyTorch limitation, not a wrong result; {message})"
        )
        return note, DATA_DEPENDENT_HINT
    if _ITEM_IN_FUNCTION in message:
        words = message.split(" (FakeTensor", 1)[0]  # not the outputs' long repr
        note = (
            "torch.compile(fullgraph=True) cannot capture an .item() (a Python number read "
            "off a tensor's values) in the forward of a Function fn calls (a PyTorch "
            f"limitation, not a wrong result; {words})"
        )
        return note, ITEM_HINT
    hint = GRAPH_BREAK_HINT
    if "failed to bind arguments when attempting to inline" in message:
        hint = CLASSMETHOD_HINT
    return (
        f"torch.compile(fullgraph=True) cannot capture fn in one graph ({message})",
        hint,
    )


#: Backends that run eager's kernels, random ones included: a random fn compiled with one
#: draws eager's numbers (inductor generates its own random-number code, which draws others).
EAGER_RNG_BACKENDS = ("eager", "aot_eager")


def _other_draws(ctx: CheckContext, backend: Any) -> bool:
    """True if fn draws random numbers and ``backend`` may draw other ones than eager."""
    return backend not in EAGER_RNG_BACKENDS and draws_random_numbers(ctx)


def _compiled_self_consistency(
    ctx: CheckContext, compiled: Callable[..., Any], label: str
) -> tuple[tuple[float, float], str]:
    """For a random fn under a backend that draws other numbers than eager: the compiled
    fn must give the same outputs on two calls from one seed, and (float64) its gradients
    must be those of its own forward; ``((abs, rel) error, caveat)``."""
    first = [t.detach() for t in float_tensors(ctx.call(compiled, ctx.leaves()))]
    again = [t.detach() for t in float_tensors(ctx.call(compiled, ctx.leaves()))]
    if not all(map(same_values, first, again)):
        raise CheckFailure(f"{label} gives different outputs on two calls from the same seed")
    errors = require_gradients_of_own_forward(
        ctx, lambda *d: float_tensors(ctx.call(compiled, d)), label
    )
    compared = (
        "compared instead: two compiled calls from one seed, and the compiled gradients "
        "with central differences of the compiled forward"
        if errors is not None
        else "compared instead: two compiled calls from one seed only (the gradients need float64)"
    )
    caveat = (
        f"fn draws random numbers, and {label} draws other ones than eager (it generates "
        f"its own random-number code): its outputs and gradients were not compared with "
        f"eager's; {compared}"
    )
    return errors or (0.0, 0.0), caveat


def check_compile(ctx: CheckContext) -> Passed:
    """fn compiled afresh with the chosen backend against eager fn (outputs and gradients).

    When Dynamo cannot capture fn in one graph (a Function with a jvp, a graph break), fn is
    compiled again without ``fullgraph`` and compared the same way: unsupported (fullgraph
    capture) when the numbers match, failed when they do not. A random fn under a backend
    that draws other numbers than eager (inductor) is checked against itself instead
    (:func:`_compiled_self_consistency`), with a caveat saying so.
    """
    backend = ctx.options.compile_backend
    fullgraph = bool(ctx.options.compile_fullgraph)
    label = f"torch.compile(backend={backend!r}{', fullgraph=True' if fullgraph else ''})"
    dirty = sorted(ctx.dirty_inputs)
    compiled = _compiled(ctx.fn, backend, fullgraph, dirty)
    try:
        abs_err, rel_err = _compare_runs(ctx, compiled, label, raw_errors=True)
    except CheckFailure:
        if not _other_draws(ctx, backend):
            raise
        errors, caveat = _compiled_self_consistency(ctx, compiled, label)
        return Passed(f"backend={backend}", *errors, caveat=caveat)
    except Exception as exc:  # noqa: BLE001
        if not (fullgraph and _is_capture_limit(exc)):
            raise outcome_of(exc, f"{label} failed: ") from None
        raise _with_graph_breaks(ctx, exc, backend, dirty) from None
    return Passed(f"backend={backend}", abs_err, rel_err)


def _with_graph_breaks(
    ctx: CheckContext, exc: BaseException, backend: Any, dirty: Sequence[int]
) -> CheckUnsupported:
    """Unsupported (fullgraph capture failed with ``exc``) when fn compiled with graph
    breaks matches eager, or, for a random fn under a backend drawing other numbers,
    itself (:func:`_compiled_self_consistency`); a failed check otherwise."""
    note, hint = _capture_limit(exc)
    label = f"torch.compile(backend={backend!r}) with graph breaks"
    compiled = _compiled(ctx.fn, backend, False, dirty)
    matched = "outputs and gradients match eager"
    try:
        abs_err, rel_err = _compare_runs(ctx, compiled, label)
    except CheckFailure:
        if not _other_draws(ctx, backend):
            raise
        (abs_err, rel_err), caveat = _compiled_self_consistency(ctx, compiled, label)
        matched = f"not compared with eager: {caveat}"
    return CheckUnsupported(
        f"{note}; compiled with graph breaks, {matched}",
        hint,
        abs_err,
        rel_err,
    )


def check_reference(ctx: CheckContext) -> Passed:
    """fn against the reference (outputs and gradients); skipped without a reference."""
    if ctx.reference is None:
        raise CheckSkip("no reference given")
    undefined: list[str] = []
    abs_err, rel_err = _compare_runs(
        ctx, ctx.reference, "the reference", own_parameters=True, undefined=undefined
    )
    return Passed(
        "outputs and gradients match", abs_err, rel_err, caveat=_undefined_caveat(undefined)
    )


def _undefined_caveat(undefined: list[str]) -> str:
    """The caveat of a reference comparison that left out the gradient elements the
    reference gives NaN at (:func:`_left_out_where_undefined`), or ``""``."""
    if not undefined:
        return ""
    return (
        f"the reference's gradient is NaN where fn's is finite at {'; '.join(undefined)}: "
        "the reference leaves them undefined, so fn's values there were not compared with it "
        "(where gradcheck left them out too, as at an output that is a constant infinity, "
        "nothing checked them)"
    )


def check_reference_dtype(ctx: CheckContext) -> Passed:
    """fn in the dtypes the caller gave, where the ``dtype`` option cast them (float64 by
    default) for every other check, against the reference run in that cast dtype on the
    same values, its outputs and gradients rounded to fn's dtypes: a backward wrong only
    in float32 (a branch on the dtype, a float16 accumulator) passes every other check.
    Tolerances of the caller's dtype, :data:`OWN_DTYPE_SLACK` times looser (unless set by
    ``parity_atol`` / ``parity_rtol``). Without a reference, fn in the inputs' own dtypes
    is compared with fn itself in the cast dtype, only for values it loses to an
    overflow (:mod:`~torchbp.verify.checks.own_dtype`). Skipped when the reference
    check failed, when no input was cast or one was cast to a narrower dtype, and when fn
    or the reference holds tensors of the cast dtype (an ``nn.Module``'s parameters)."""
    if ctx.reference is not None and ctx.failed("reference"):
        raise CheckSkip("skipped because reference failed (fn differs in dtype already)")
    if not ctx.cast_from:
        if ctx.reference is None:
            raise CheckSkip("no reference given")
        raise CheckSkip("no input was cast: the reference check ran in their own dtypes")
    if any(_narrower(after, before) for before, after in ctx.cast_from.values()):
        raise CheckSkip("an input was cast to a narrower dtype: the reference check ran in it")
    if ctx.own_dtype_args is None:
        raise CheckSkip(
            "fn or the reference holds tensors of the cast dtype (an nn.Module's "
            "parameters, a closure's tensor): checked in that dtype only"
        )
    dtypes = ", ".join(
        sorted({str(before).removeprefix("torch.") for before, _ in ctx.cast_from.values()})
    )
    own = replace(ctx, args=ctx.own_dtype_args, options=_slackened(ctx))
    own.generator = ctx.generator  # the check's seeded grad_outputs
    if ctx.reference is None:
        return _without_reference(ctx, own, dtypes)
    try:
        out_dtypes = [t.dtype for t in float_tensors(own.call(own.fn, own.leaves()))]
    except Exception as exc:  # noqa: BLE001 - fn's own error, in words
        raise raised_in_own_dtype(exc, dtypes) from None
    cast = str(ctx.dtype).removeprefix("torch.")
    reference, label, caveat = (
        _in_cast_dtype(ctx, out_dtypes),
        f"the reference (run in {cast}, rounded)",
        "",
    )
    if draws_random_numbers(ctx):
        reference, label = ctx.reference, f"the reference (run in {dtypes} too)"
        caveat = RANDOM_DTYPE_CAVEAT.format(own=dtypes, cast=cast)
    try:
        undefined: list[str] = []
        abs_err, rel_err = _compare_runs(
            own,
            reference,
            label,
            own_parameters=True,
            undefined=undefined,
            # of magnitude 1 to 2: a derivative beyond the narrow range gives a gradient
            # beyond it in both runs, where a grad_output of 0.03 brings the reference's in
            grad_output=lambda shape, dtype: grad_output_from_one_to_two(own, shape, dtype),
        )
    except CheckFailure as failure:
        raise CheckFailure(f"in {dtypes} (the inputs' own dtype): {failure}") from None
    caveat = "; ".join(c for c in (caveat, _undefined_caveat(undefined)) if c)
    return Passed(f"in {dtypes}", abs_err, rel_err, caveat=caveat)


def _without_reference(ctx: CheckContext, own: CheckContext, dtypes: str) -> Passed:
    """``reference_dtype`` with no reference: fn in the inputs' own dtypes must be finite
    where fn in the cast dtype is, well inside their range
    (:func:`~torchbp.verify.checks.own_dtype.require_finite_as_in_cast_dtype`); skipped for
    a fn drawing random numbers, which draws other ones in another dtype."""
    if draws_random_numbers(ctx):
        raise CheckSkip(
            "no reference given (fn draws random numbers, other ones in another dtype: "
            "not compared with itself in float64)"
        )
    return require_finite_as_in_cast_dtype(ctx, own, dtypes)


#: What ``reference_dtype`` could not compare for a random fn.
RANDOM_DTYPE_CAVEAT = (
    "fn draws random numbers, and torch.rand* draws other ones in another dtype: fn in "
    "{own} was compared with the reference run in {own} too (same seed), not in {cast}"
)


def _narrower(dtype: torch.dtype, than: torch.dtype) -> bool:
    """True if ``dtype`` holds fewer significant bits than ``than``."""
    return torch.finfo(dtype).eps > torch.finfo(than).eps


def _in_cast_dtype(ctx: CheckContext, out_dtypes: list[torch.dtype]) -> Callable[..., Any]:
    """The reference run on the inputs ``ctx`` cast, put back in the cast dtype (exact:
    they came from it), its floating-point outputs rounded to ``out_dtypes`` (fn's, in
    the caller's dtypes), and its integer outputs as they are. Differentiable: autograd
    casts a grad_output up into the reference's backward and rounds its gradients down."""

    def reference(*args: Any) -> tuple[torch.Tensor, ...]:
        cast = [a.to(ctx.args[i].dtype) if i in ctx.cast_from else a for i, a in enumerate(args)]
        raw = ctx.reference(*cast)
        floats = float_tensors(raw)
        if len(floats) == len(out_dtypes):
            floats = [t.to(d) for t, d in zip(floats, out_dtypes)]
        return (*floats, *exact_tensors(raw))

    return reference


def _slackened(ctx: CheckContext):
    """The options with parity tolerances of the caller's dtype, made looser."""
    before = next(iter(ctx.cast_from.values()))[0]
    atol, rtol = tolerances(before.to_real() if before.is_complex else before)
    options = ctx.options
    return replace(
        options,
        parity_atol=OWN_DTYPE_SLACK * atol if options.parity_atol is None else options.parity_atol,
        parity_rtol=OWN_DTYPE_SLACK * rtol if options.parity_rtol is None else options.parity_rtol,
    )
