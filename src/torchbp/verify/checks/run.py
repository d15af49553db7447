""":func:`check_function`: run the table of checks on a callable and collect a report."""

from __future__ import annotations

import functools
import math
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from torchbp.verify.checks.compare import dense
from torchbp.verify.checks.complex_views import complex_positions, real_function
from torchbp.verify.checks.context import FULL_JACOBIAN_ELEMENTS, CheckContext
from torchbp.verify.checks.custom_op import as_custom_op, custom_op_name
from torchbp.verify.checks.domain import constant_infinities, refuse_inputs_near_domain_edge
from torchbp.verify.checks.explain import outcome_of
from torchbp.verify.checks.left_out import infinite_elements
from torchbp.verify.checks.options import (
    SCALAR_TYPES,
    Options,
    prepare_inputs,
    resolve_arguments,
)
from torchbp.verify.checks.outcomes import (
    CheckFailure,
    CheckSkip,
    CheckUnsupported,
    Passed,
    UsageError,
)
from torchbp.verify.checks.parameters import (
    differentiated_parameters,
    module_of,
    require_initialized,
    with_parameters,
)
from torchbp.verify.checks.rng import SameRandomNumbers, seeded_rng
from torchbp.verify.checks.table import CHECK_TABLE, Check
from torchbp.verify.checks.transforms import own_vmap_rule
from torchbp.verify.checks.unimplemented import refuse_unimplemented_gradients
from torchbp.verify.report import FAIL, PASS, SKIP, UNSUPPORTED, CheckResult, Report

__all__ = ["check_function", "run_check"]


#: The checks comparing with central differences of fn's outputs, which have none at an
#: output that is a constant infinity (``inf - inf``). gradgradcheck's are of backward's
#: gradients, finite there: it compares the second derivatives at those elements too.
OUTPUT_DIFFERENCE_CHECKS = frozenset({"gradcheck", "forward_ad"})


def _check_seed(seed: int, name: str) -> int:
    """The seed of the random grad_outputs of check ``name``: the run's seed mixed with the
    check's name, so that each check draws the same values whichever checks ran before it,
    and not the values of inputs the caller drew with the same seed (a grad_output equal to
    an input can hide a bug, e.g. a transposed weight gradient ``xᵀx``)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def run_check(check: Check, ctx: CheckContext) -> CheckResult:
    """Run one check with the run's seed and turn how it ended into a result.

    The CPU generator, the generator of the inputs' device and the context's generator
    (the random grad_outputs) start from the seed (:func:`_check_seed`), so a check draws
    the same values whichever checks ran before it; the first two are put back after.

    Nothing escapes: an unexpected exception is unsupported when it says a capability is
    missing, else a failure with a plain-word message
    (:func:`~torchbp.verify.checks.explain.outcome_of`). An unsupported check named in
    ``require`` fails.
    """
    start = time.perf_counter()
    abs_err = rel_err = None
    caveat = ""
    try:
        with seeded_rng(ctx.device, int(ctx.options.seed)):
            ctx.generator.manual_seed(_check_seed(int(ctx.options.seed), check.name))
            ctx.refused_inputs = None
            try:
                passed = _run_masking_constant_infinities(check, ctx)
            except CheckFailure as failure:
                refuse_inputs_near_domain_edge(ctx, check.name, failure)
                refuse_unimplemented_gradients(ctx, failure)
                raise
            except (CheckUnsupported, CheckSkip, UsageError):
                raise
            except Exception as exc:  # noqa: BLE001 - never leak a deep traceback
                refuse_inputs_near_domain_edge(ctx, check.name, exc)
                refuse_unimplemented_gradients(ctx, exc)
                raise outcome_of(exc) from None
        status, message, abs_err, rel_err = PASS, passed.note, passed.abs_err, passed.rel_err
        caveat = passed.caveat
    except CheckFailure as fail:
        status, message = FAIL, fail.message
        abs_err, rel_err = fail.abs_err, fail.rel_err
    except CheckUnsupported as gap:
        status, message = UNSUPPORTED, gap.message
        abs_err, rel_err = gap.abs_err, gap.rel_err
        if check.name in ctx.options.require:
            status, message = FAIL, f"required but unsupported: {gap.message}"
    except CheckSkip as skip:
        status, message = SKIP, str(skip)
    seconds = time.perf_counter() - start
    return CheckResult(check.name, status, message, abs_err, rel_err, seconds, caveat)


def _run_masking_constant_infinities(check: Check, ctx: CheckContext) -> Passed:
    """``check.run(ctx)``, with the derivatives at fn's outputs that are a constant
    infinity near the given inputs
    (:func:`~torchbp.verify.checks.domain.constant_infinities`) left out when the check
    compares with central differences of fn's outputs (:data:`OUTPUT_DIFFERENCE_CHECKS`);
    a pass then says so in its caveat."""
    if check.name not in OUTPUT_DIFFERENCE_CHECKS:
        return check.run(ctx)
    masks = ctx.constant_infinities = constant_infinities(ctx)
    try:
        passed = check.run(ctx)
    finally:
        ctx.constant_infinities = None
    if masks is None:
        return passed
    caveat = _constant_infinities_caveat(ctx, masks, check.name)
    return passed._replace(caveat="; ".join(c for c in (passed.caveat, caveat) if c))


def _constant_infinities_caveat(ctx: CheckContext, masks: list[torch.Tensor], name: str) -> str:
    """What check ``name``, passing with the derivatives at fn's constant infinities
    (``masks``) left out, did not compare, and what decides them: the reference, whose
    check compares fn's gradients there with its own (and fn's infinite values with its
    values) when it runs, or, without one, nothing (equal functions have different
    derivatives there, and a forward overflowing to ``inf`` reads as such a constant
    too)."""
    held = "; jvp was held to backward there" if name == "forward_ad" else ""
    left_out = (
        f"{infinite_elements(masks)} are the same infinity at and near the given inputs: "
        "their derivatives were not compared with central differences (which cannot "
        "measure them, and equal functions differ there: autograd gives 0 after "
        f"masked_fill(mask, -inf), 1 after adding a -inf mask){held}"
    )
    if ctx.reference is not None and _runs(ctx, "reference"):
        return f"{left_out}; the reference check decides them, with the reference's gradients"
    if ctx.reference is not None:
        return f"{left_out}; run the reference check (skipped here) to decide them"
    return (
        f"{left_out}; give a reference (reference=, --reference) to decide them, and "
        "whether fn should be infinite there at all rather than overflow"
    )


def _runs(ctx: CheckContext, name: str) -> bool:
    """Whether the check ``name`` is among those this run runs."""
    opts = ctx.options
    selected = _selected(opts.checks, opts.skip, opts.require, ctx.custom_op is not None)
    return any(check.name == name for check in selected)


def _selected(checks: Any, skip: Any, require: Any, custom_op: bool) -> list[Check]:
    """The checks to run, in table order: ``forward`` always, the required ones, and the
    others as chosen (by default every check, ``opcheck`` only for a custom op)."""
    default = [c.name for c in CHECK_TABLE if custom_op or c.name != "opcheck"]
    chosen = (set(checks or default) | set(require)) - set(skip or ())
    return [c for c in CHECK_TABLE if c.name == "forward" or c.name in chosen]


def _run_all(ctx: CheckContext, checks: list[Check]) -> list[CheckResult]:
    """Run ``checks``, of which the first is ``forward``: when it fails, skip the others."""
    forward, *others = checks
    first = run_check(forward, ctx)
    ctx.results[forward.name] = first
    for check in others:
        if first.passed:
            ctx.results[check.name] = run_check(check, ctx)
        else:
            ctx.results[check.name] = CheckResult(
                check.name, SKIP, "skipped because forward failed"
            )
    return list(ctx.results.values())


def _modules_of(*callables: Any) -> list[torch.nn.Module]:
    """The ``nn.Module``s the ``callables`` call (:func:`module_of`), each once."""
    found = {id(m): m for m in map(module_of, callables) if m is not None}
    return list(found.values())


def _require_module_dtype(fn: Any, reference: Any, dtype: torch.dtype | None) -> None:
    """Refuse an ``nn.Module`` fn or reference whose floating parameters or buffers are not
    of ``dtype``, the one the inputs are cast to: every call would mix dtypes and fail."""
    if dtype is None:
        return
    for role, callable_ in (("fn", fn), ("reference", reference)):
        for module in _modules_of(callable_):
            found = {t.dtype for t in (*module.parameters(), *module.buffers())}
            other = sorted(str(d) for d in found if d.is_floating_point and d != dtype)
            if other:
                raise ValueError(
                    f"check_function: {role} is an nn.Module with {', '.join(other)} "
                    f"parameters, but the inputs are cast to dtype={dtype}: convert the "
                    f"module with .to({dtype}) (float64 for the numerical checks), or pass "
                    "dtype=None to keep the inputs' own dtype"
                )


def _globals_named(callable_: Any) -> list[Any]:
    """The values of the module globals a Python function's code names: a script's or
    notebook's ``lambda x: model(x)`` reaches ``model`` so, not through a closure cell."""
    code = getattr(callable_, "__code__", None)
    namespace = getattr(callable_, "__globals__", None)
    if code is None or not isinstance(namespace, dict):
        return []
    return [namespace[name] for name in code.co_names if name in namespace]


def _held(callable_: Any) -> list[Any]:
    """What ``callable_`` holds that a call may update in place: itself, the object of a
    bound method, the values in a closure's cells, the globals its code names, a
    ``functools.partial``'s function and arguments (one level deep)."""
    held = [callable_, getattr(callable_, "__self__", None), *_globals_named(callable_)]
    for cell in getattr(callable_, "__closure__", None) or ():
        try:
            held.append(cell.cell_contents)
        except ValueError:  # an empty cell (a name not yet bound)
            continue
    if isinstance(callable_, functools.partial):
        held += [callable_.func, *callable_.args, *callable_.keywords.values()]
    return held


def _held_tensors(*callables: Any) -> list[torch.Tensor]:
    """The tensors the ``callables`` hold: the parameters and buffers of the modules among
    what they hold (:func:`_held`), and the tensors held directly; not those on the meta
    device (they hold no values to put back)."""
    found: dict[int, torch.Tensor] = {}
    for value in (v for c in callables for v in _held(c)):
        if isinstance(value, torch.nn.Module):
            for t in (*value.parameters(), *value.buffers()):
                found[id(t)] = t
        elif isinstance(value, torch.Tensor):
            found[id(value)] = value
    return [t for t in found.values() if not t.is_meta]


@contextmanager
def _state_kept(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Put back ``tensors`` (what fn and the reference hold: module parameters and
    buffers, tensors in a closure, a global it names or a partial) as they were on entry:
    the checks call fn many times, and one that updates state in forward (BatchNorm's
    running statistics) must not leave it changed for the caller."""
    saved = [(t, t.detach().clone()) for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, before in saved:
                if not torch.equal(dense(t), dense(before)):
                    t.copy_(before)


def _with_parameter_inputs(
    args: list[Any], grad_idx: list[int], fn: Any, opts: Options
) -> tuple[list[Any], list[int]]:
    """``args`` and ``grad_idx`` with fn's differentiated parameters appended, prepared as
    the inputs are (detached copies, in ``dtype``, on ``device``): every check
    differentiates them as it does the inputs."""
    params = tuple(p for _, p in differentiated_parameters(fn))
    prepared, _ = prepare_inputs(params, replace(opts, grad_inputs=None))
    n = len(args)
    return [*args, *prepared], [*grad_idx, *range(n, n + len(prepared))]


def _cast_from(
    inputs: Sequence[Any], given: Sequence[Any]
) -> dict[int, tuple[torch.dtype, torch.dtype]]:
    """``(the caller's dtype, the dtype fn is given)`` of each input the ``dtype`` option
    cast, by position (``given``: the prepared inputs as fn receives them, a complex one
    as a complex tensor, not the real view the checks differentiate)."""
    return {
        i: (x.dtype, g.dtype)
        for i, (x, g) in enumerate(zip(inputs, given))
        if isinstance(x, torch.Tensor) and x.dtype != g.dtype
    }


def _in_own_dtypes(
    args: list[Any], cast_from: dict[int, tuple[torch.dtype, torch.dtype]]
) -> list[Any]:
    """``args`` with each cast input back in the caller's dtype (a complex input, which
    the checks see as its real view, in its real counterpart)."""
    own = list(args)
    for i, (before, _) in cast_from.items():
        dtype = before if args[i].is_complex() == before.is_complex else before.to_real()
        own[i] = args[i].detach().to(dtype)
    return own


def _draw_the_same_numbers(ctx: CheckContext) -> None:
    """Make every call of fn and of the reference start torch's generators from the
    run's seed (and put them back after): a Function drawing a dropout mask in forward
    and saving it for backward draws the same mask in every call the checks compare."""
    seed = int(ctx.options.seed)
    ctx.fn = SameRandomNumbers(ctx.fn, ctx.device, seed)
    if ctx.reference is not None:
        ctx.reference = SameRandomNumbers(ctx.reference, ctx.device, seed)


def _describe(value: Any) -> Any:
    """How the report's meta shows an input: shape/dtype/layout of a tensor, else its value."""
    if isinstance(value, torch.Tensor):
        return {
            "shape": list(value.shape),
            "dtype": str(value.dtype).replace("torch.", ""),
            "contiguous": value.is_contiguous(),
        }
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "nan": JSON has no such numbers
    if isinstance(value, SCALAR_TYPES):
        return value if isinstance(value, bool | int | float | str | type(None)) else str(value)
    return repr(value)


def _fn_name(fn: Any) -> str:
    """The report's name for fn: a custom op's ``namespace::name``, else the name of the
    function or the class of the object fn (or the function of a partial) is."""
    if as_custom_op(fn) is not None:
        return custom_op_name(fn)
    while isinstance(fn, functools.partial):
        fn = fn.func
    for attr in ("__qualname__", "__name__"):
        name = getattr(fn, attr, None)
        if isinstance(name, str):
            return name
    return type(fn).__name__


def check_function(
    fn: Callable[..., Any] | type[torch.autograd.Function],
    *inputs: Any,
    reference: Callable[..., Any] | None = None,
    require: Sequence[str] = (),
    **options: Any,
) -> Report:
    """Verify the gradients of ``fn`` (any differentiable callable or autograd.Function).

    Runs, on the example ``inputs``: fn twice (every call of fn and of the reference
    starts torch's generators from ``seed``, and puts them back after: a dropout drawing
    its mask with ``torch.rand*`` passes; a fn keeping state between calls fails
    ``forward``: every check compares calls), ``gradcheck`` (for each output and, for
    several, all at once), ``gradgradcheck``, forward-mode AD (where an input sits at a
    point fn is not differentiable, such as relu at 0 or a tie in a max, a derivative must
    lie between the one-sided differences),
    ``vmap`` (forward and per-sample grads), batched backward, undefined-grad handling, the
    shape of every custom Function's raw gradients, the same outputs and gradients when no
    input or one input alone requires grad, grad_output safety (no in-place writes,
    strided/expanded grad_outputs, the same outputs and gradients for strided inputs),
    input/output mutation (including writes the version
    counter never sees), two interleaved calls before backward, ``vmap`` over a non-zero
    ``in_dims``, ``torch.compile`` parity with eager, extreme-value probes against
    ``reference``,
    ``torch.library.opcheck`` when fn is a custom op and, if ``reference`` is given, parity
    of outputs and all gradients with it (``reference_dtype``: also in the inputs' own
    dtypes when the ``dtype`` option cast them, against the reference run in ``dtype`` and
    rounded; without a reference, fn there must stay finite where fn in ``dtype`` is
    finite and inside their range: no overflowing intermediate). Floating inputs are cast to
    ``dtype`` (float64 by default); the numerical checks run only in float64, the others use
    dtype-aware tolerances (:func:`~torchbp.verify.tolerances`). Nothing raises from inside
    torch: every problem becomes a check result with a plain-word message.

    Each check ends ``pass``, ``fail`` (a wrong number, a silent wrong behaviour, a crash in
    a path fn supports), ``unsupported`` (fn does not offer the capability: no jvp, no
    ``setup_context`` / vmap rule, ``once_differentiable`` backward, a double backward,
    jvp or vmap rule that raises ``NotImplementedError`` or a ``RuntimeError`` saying
    "not implemented", a PyTorch limitation such as
    capturing a Function with a jvp in one graph; the message says how to add it) or
    ``skipped`` (does not apply). A Function that modifies an input in place and says so
    with ``ctx.mark_dirty`` gets a fresh copy of that input on every call (a non-leaf one
    when it is differentiated), also of an ``out=`` buffer left out of ``grad_inputs``,
    so that no call sees what another wrote. The caller's tensors are never written: the
    checks run on copies of the inputs, and what fn or reference holds - the parameters
    and buffers of an ``nn.Module`` fn or reference, or of one in a closure or a global
    its code names (``lambda x: model(x)``) or a ``functools.partial``, and the tensors
    held there
    (e.g. BatchNorm's running statistics, which every call in training mode updates) - is
    put back as it was.

    Args:
        fn: a callable taking ``*inputs`` and returning a tensor (or a tuple/structure of
            tensors; a sparse one is checked through ``.to_dense()``), an ``nn.Module``,
            a bound method of one or a ``functools.partial`` of either (its parameters of
            ``dtype``: ``module.double()`` by default; those that
            require grad are differentiated as inputs after ``inputs``, through
            :func:`torch.func.functional_call`, and named in the messages, e.g.
            ``parameter 'weight' (input 1)``; the reference runs with the same values in
            place of them, and of its own when it is a module with parameters of the same
            names; a parameter the reference does not use is not compared with it), a
            ``torch.autograd.Function`` subclass (its ``apply`` is used) or a
            ``torch.library.custom_op``, or a ``functools.partial`` of one binding its
            keyword-only arguments (then the ``opcheck`` check also runs
            ``torch.library.opcheck``, with the bound arguments).
        *inputs: example inputs: tensors plus plain Python constants (a ``dim``, a
            complex number, a string, None, an enum member, a slice or ``Ellipsis``, a
            dtype, device, layout or memory format) and tuples or lists of them (e.g.
            ``dims``; each call gets its own copy of a list), and ``torch.Generator``s
            (each call gets a copy in the given state, so a random fn drawing from it
            draws the same numbers every call; the caller's is not advanced).
            Integer tensors (class targets) are passed through and never differentiated.
            Complex tensors are differentiated as their real views ``(..., 2)``, and
            complex outputs compared so: a backward in PyTorch's convention (the
            conjugate Wirtinger derivative, e.g. ``g * b.conj()`` for ``a * b``) passes.
        reference: optional callable with the same signature whose outputs and gradients
            ``fn`` must match (e.g. the ``torch.nn.functional`` op ``fn`` re-implements);
            integer and boolean outputs (indices, masks) must be equal.
        require: names of checks whose capability fn promises (e.g. ``["forward_ad",
            "vmap"]``): for these, ``unsupported`` counts as ``fail``. A required check runs
            even when ``checks`` leaves it out.
        **options: any of

            - ``dtype`` (``torch.float64``): dtype floating inputs are cast to; ``None``
              keeps each input's dtype.
            - ``device`` (None): move all inputs there.
            - ``grad_inputs`` (all floating tensors but sparse ones): positions of the
              inputs to differentiate (a sparse input is passed through, never
              differentiated, and compared by its values).
            - ``checks`` (None: all) / ``skip`` (none): names from
              :data:`~torchbp.verify.CHECKS` to run / leave out (an empty ``checks``
              raises: it would select nothing).
            - ``eps``, ``atol``, ``rtol``, ``nondet_tol``, ``fast_mode``: as in
              :func:`torch.autograd.gradcheck` (``fast_mode`` is True by default when
              the differentiated inputs, an ``nn.Module``'s parameters included, hold
              more than :data:`FULL_JACOBIAN_ELEMENTS` elements; besides torch's projections,
              which are the same on every run, it compares one drawn from ``seed``).
            - ``parity_atol``, ``parity_rtol``: override the dtype-aware tolerances of the
              vmap/compile/reference comparisons and of backward and jvp against
              themselves (linear in their vectors: a backward computing in float32 on
              purpose needs them, not ``atol`` / ``rtol``).
            - ``compile_backend`` (``"aot_eager"``), ``compile_fullgraph`` (True).
            - ``vmap_batch`` (3), ``seed`` (0), ``name`` (a str, the label of the report).

    Returns:
        A :class:`~torchbp.verify.report.Report`; ``report.ok`` is True only if no check
        failed (unsupported and skipped checks do not count against it). ``print(report)``
        shows a table, ``report.to_dict()`` is JSON-serialisable.

    Raises:
        TypeError / ValueError: on bad arguments (non-callable ``fn``, non-tensor inputs,
            integer or sparse inputs in ``grad_inputs``, inputs on the meta device, an
            ``nn.Module`` whose parameters are not of ``dtype`` or not initialized (a lazy
            module), unknown option or check names, an empty ``checks``, a check both
            selected or required and skipped, a ``device`` that is not one or not
            available here, a negative tolerance, ``eps`` not above 0, ``vmap_batch``
            below 1, a ``name`` that is not a str).

    Examples:
        >>> import torch
        >>> from torchbp.verify import check_function
        >>> x = torch.randn(3, 4)
        >>> report = check_function(torch.tanh, x, reference=torch.tanh, skip=["compile"])
        >>> report.ok
        True
    """
    require_initialized("fn", fn)
    require_initialized("reference", reference)
    fn, reference, opts = resolve_arguments(fn, inputs, reference, {**options, "require": require})
    # the checks differentiate: the caller's no_grad / inference_mode must not reach them
    with torch.inference_mode(False), torch.enable_grad():
        return _check(fn, inputs, reference, opts, auto_fast_mode="fast_mode" not in options)


def _check(
    fn: Callable[..., Any], inputs: tuple, reference: Any, opts: Options, *, auto_fast_mode: bool
) -> Report:
    """The body of :func:`check_function`, on validated arguments, with grad enabled;
    ``auto_fast_mode``: the caller left ``fast_mode`` to the size of the inputs."""
    parameters = bool(differentiated_parameters(fn))
    args, grad_idx = prepare_inputs(inputs, opts, parameters=parameters)
    _require_module_dtype(fn, reference, opts.dtype)
    checked, checked_reference, parameter_names = with_parameters(fn, reference, len(args))
    complex_idx = complex_positions(inputs)
    if complex_idx:
        checked = real_function(checked, complex_idx)
        if checked_reference is not None:
            checked_reference = real_function(checked_reference, complex_idx)
    if parameter_names:
        args, grad_idx = _with_parameter_inputs(args, grad_idx, fn, opts)
    if auto_fast_mode and sum(args[i].numel() for i in grad_idx) > FULL_JACOBIAN_ELEMENTS:
        opts = replace(opts, fast_mode=True)
    ctx = CheckContext(checked, args, grad_idx, checked_reference, opts, custom_op=as_custom_op(fn))
    _draw_the_same_numbers(ctx)
    ctx.own_vmap_rule = own_vmap_rule(fn)
    ctx.complex_inputs = frozenset(complex_idx)
    ctx.parameter_names = {len(inputs) + j: name for j, name in enumerate(parameter_names)}
    given = [
        torch.view_as_complex(a.contiguous()) if i in complex_idx else a
        for i, a in enumerate(args[: len(inputs)])
    ]
    ctx.cast_from = _cast_from(inputs, given)
    held = _held_tensors(fn, reference)
    if ctx.cast_from and not any(t.dtype == ctx.dtype for t in held):
        ctx.own_dtype_args = _in_own_dtypes(args, ctx.cast_from)
    meta = {
        "inputs": [_describe(a) for a in given],
        "grad_inputs": grad_idx,
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "device": str(ctx.device),
        "torch": torch.__version__,
        "fast_mode": bool(opts.fast_mode),
    }
    if parameter_names:
        meta["parameters"] = parameter_names  # differentiated as inputs after the given ones
    if complex_idx:
        meta["complex_inputs"] = sorted(complex_idx)  # checked as their real views
    selected = _selected(opts.checks, opts.skip, opts.require, ctx.custom_op is not None)
    with _state_kept(held):
        results = _run_all(ctx, selected)
    return Report(opts.name or _fn_name(fn), results, meta)
