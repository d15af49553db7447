"""Checks of batching: ``vmap`` (torch.func.vmap of the forward and of per-sample grads)
and ``batched_grad`` (backward with batched grad_outputs); both must equal a Python loop.

gradcheck runs fn on one unbatched set of inputs with one grad_output at a time: it never
calls a ``vmap`` staticmethod, nor a backward on a batch of grad_outputs, so a wrong vmap
rule (or a backward that breaks under one) passes it."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from torchbp.verify.checks.compare import dense, input_grads, require_close, zeros_for_none
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.custom_op import custom_ops_reached, no_torch_func
from torchbp.verify.checks.domain import batch_scales
from torchbp.verify.checks.explain import explain_error, outcome_of
from torchbp.verify.checks.outcomes import CheckFailure, CheckUnsupported, Passed
from torchbp.verify.checks.rng import draws_random_numbers

__all__ = [
    "SAME_DRAWS",
    "VMAP",
    "check_batched_grad",
    "check_vmap",
    "own_vmap_rule",
    "own_vmap_rules_reached",
]

#: vmap's randomness mode for fn: the forward check made sure that two calls of fn on the
#: same inputs agree, so whatever fn draws comes from a generator or seed among its inputs,
#: and every call of the loop a vmap is compared with draws the same numbers: "same" is
#: that ("error", vmap's default, refuses any random op, even one from a given generator).
SAME_DRAWS = "same"

#: The capability vmap exercises and how to add it (a NotImplementedError raised under
#: vmap says it is absent: unsupported, not failed).
VMAP = (
    "vmap",
    "write the vmap staticmethod for these inputs (or set generate_vmap_rule = True)",
)


def _sparse_input_gap(
    ctx: CheckContext,
    exc: BaseException,
    what: str,
    attempt: Callable[[CheckContext], object],
) -> CheckUnsupported | None:
    """Unsupported for ``exc``, raised by ``what`` (a vmap, run by ``attempt`` on a
    context), when fn has a sparse input and the vmap is only the sparse input's problem:
    PyTorch's vmap has no batching rule for most operations on sparse tensors (``expand
    is unsupported for Sparse tensors``), a limitation of PyTorch, not of fn. None when
    every input is strided, or when the same vmap raises with the sparse inputs given
    dense: fn's own failure (a vmap rule returning wrong out_dims), or its own limitation
    (an ``.item()``), whose explanation must not be hidden behind the sparse input's."""
    if not any(_is_sparse(a) for a in ctx.args):
        return None
    if _fails_with_dense_inputs(ctx, attempt):
        return None
    return CheckUnsupported(
        f"{what} failed with a sparse input, as PyTorch's vmap cannot batch most "
        f"operations on sparse tensors ({explain_error(exc)})",
        "pass the input dense (.to_dense()) where vmap is needed",
    )


def _sparse_gradient_gap(ctx: CheckContext, exc: BaseException) -> CheckUnsupported | None:
    """Unsupported for ``exc`` of the batched backward when backward returns a sparse
    gradient for a dense input (``nn.Embedding(sparse=True)`` style): PyTorch's vmap
    cannot batch sparse tensors, so no batched backward can build one; None otherwise."""
    sparse = ctx.sparse_gradient_inputs()
    if not sparse:
        return None
    names = ", ".join(ctx.input_name(k) for k in sparse)
    return CheckUnsupported(
        f"backward returns a sparse gradient of a dense input ({names}): batched backward "
        "(is_grads_batched, a vmap over grad_outputs) is unsupported, as PyTorch's vmap "
        f"cannot batch sparse tensors ({explain_error(exc)})",
        "return grad.to_dense() from backward if batched gradients are needed",
    )


def _is_sparse(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.layout != torch.strided


def _fails_with_dense_inputs(ctx: CheckContext, attempt: Callable[[CheckContext], object]) -> bool:
    """Whether ``attempt`` raises on ``ctx`` with every sparse input given dense, while fn
    itself accepts them dense (a fn that needs its sparse input tells nothing so)."""
    dense_ctx = replace(ctx, args=[dense(a) if _is_sparse(a) else a for a in ctx.args])
    try:
        dense_ctx.diff_fn(*dense_ctx.leaves())
    except Exception:  # noqa: BLE001 - fn needs the sparse layout: nothing to tell
        return False
    try:
        attempt(dense_ctx)
    except Exception:  # noqa: BLE001 - the vmap fails whatever the layout: fn's failure
        return True
    return False


def _batched_inputs(ctx: CheckContext, batch: int) -> list[torch.Tensor]:
    """The grad inputs stacked ``batch`` times, each copy scaled differently, inside fn's
    domain (:func:`~torchbp.verify.checks.domain.batch_scales`)."""
    scales = batch_scales(ctx, batch)
    return [torch.stack([ctx.args[i].detach() * s for s in scales]) for i in ctx.grad_idx]


def _vmapped_forward(ctx: CheckContext, xs: Sequence[torch.Tensor]) -> Any:
    """``vmap`` of fn over the batched grad inputs ``xs``."""
    return torch.func.vmap(ctx.diff_fn, randomness=SAME_DRAWS)(*xs)


def _weighted_sum(ctx: CheckContext, weights: Sequence[torch.Tensor]) -> Callable[..., Any]:
    """fn's floating outputs, each weighted elementwise by ``weights`` and summed."""

    def scalar(*d: torch.Tensor) -> Any:
        outs = ctx.diff_fn(*d)
        return sum((o * w).sum() for o, w in zip(outs, weights) if o.is_floating_point())

    return scalar


def _vmapped_grad(
    ctx: CheckContext, xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]
) -> Any:
    """``vmap(grad)`` of :func:`_weighted_sum` over the batched grad inputs ``xs``."""
    argnums = tuple(range(len(xs)))
    grad = torch.func.grad(_weighted_sum(ctx, weights), argnums=argnums)
    return torch.func.vmap(grad, randomness=SAME_DRAWS)(*xs)


def _batched_backward(
    outs: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]
) -> Any:
    """The gradients of ``outs`` for a batch ``vs`` of grad_outputs (is_grads_batched)."""
    return input_grads(
        outs, leaves, vs, retain_graph=True, allow_unused=True, is_grads_batched=True
    )


#: What the vmap check could not compare for a random fn whose vmap draws other numbers.
RANDOM_VMAP_CAVEAT = (
    "fn draws random numbers, and vmap of fn drew other ones than its calls one by one "
    "(PyTorch's batching rule of a random op may draw in another order or kernel): its "
    "outputs and per-sample gradients were compared with vmap over one sample at a time, "
    "which draws as the batched vmap does, not with plain calls"
)


def _calls_one_by_one(ctx: CheckContext, xs: Sequence[torch.Tensor], b: int) -> Any:
    """fn's floating outputs for sample ``b`` of the batched inputs ``xs``."""
    return ctx.diff_fn(*[x[b] for x in xs])


def _vmap_of_one_sample(ctx: CheckContext, xs: Sequence[torch.Tensor], b: int) -> Any:
    """vmap of fn over sample ``b`` alone (a batch of one), unbatched: it draws random
    numbers as vmap over the whole batch does (``randomness='same'``)."""
    return [o[0] for o in _vmapped_forward(ctx, [x[b : b + 1] for x in xs])]


def _require_forward_like(
    ctx: CheckContext, batched: Any, xs: Sequence[torch.Tensor], sample: Callable[..., Any]
) -> tuple[float, float]:
    """vmap's outputs ``batched`` against ``sample(ctx, xs, b)`` stacked over the batch."""
    looped = [sample(ctx, xs, b) for b in range(len(xs[0]))]
    worst = (0.0, 0.0)
    for o, out in enumerate(batched):
        exp = torch.stack([lp[o] for lp in looped]).detach()
        problem = f"vmap output {o} differs from a Python loop"
        worst = max(worst, require_close(out, exp, ctx.parity_tolerances(), problem))
    return worst


def _gradients_one_by_one(
    ctx: CheckContext, xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], b: int
) -> list[torch.Tensor]:
    """The gradients of :func:`_weighted_sum` at sample ``b``, by one backward call."""
    leaves = [x[b].detach().clone().requires_grad_(True) for x in xs]
    gs = input_grads(_weighted_sum(ctx, weights)(*leaves), leaves, allow_unused=True)
    return zeros_for_none(gs, leaves)


def _gradients_of_one_sample_vmap(
    ctx: CheckContext, xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], b: int
) -> list[torch.Tensor]:
    """vmap(grad) of :func:`_weighted_sum` over sample ``b`` alone, unbatched."""
    return [g[0] for g in _vmapped_grad(ctx, [x[b : b + 1] for x in xs], weights)]


def _vmap_failure(ctx: CheckContext, exc: BaseException, xs, weights) -> Exception:
    """What a raising vmap(grad) is: unsupported for a custom op, a sparse input or a
    missing vmap rule, else a failure."""
    calls_custom_op = ctx.custom_op is not None or custom_ops_reached(
        ctx.diff_fn, [x[0] for x in xs]
    )
    custom_op_gap = no_torch_func(exc) if calls_custom_op else None
    sparse_gap = _sparse_input_gap(
        ctx, exc, "vmap(grad) (per-sample gradients)", lambda c: _vmapped_grad(c, xs, weights)
    )
    return (
        custom_op_gap
        or sparse_gap
        or outcome_of(exc, "vmap(grad) (per-sample gradients) failed: ", VMAP)
    )


#: PyTorch's error for a random op drawing from a batched tensor under randomness='same'.
_SAME_RANDOMNESS_REFUSED = "does not currently support same randomness with a batched tensor"


def _same_randomness_gap(exc: BaseException) -> CheckUnsupported | None:
    """Unsupported when vmap refused a random op of fn that draws from a batched tensor
    (``torch.bernoulli(probs)`` of a tensor computed from the inputs) under
    ``randomness='same'``, the mode a comparison with a loop of calls needs: a limitation
    of PyTorch's vmap, not of fn. Only PyTorch's own ``RuntimeError`` counts."""
    if type(exc) is not RuntimeError or _SAME_RANDOMNESS_REFUSED not in str(exc):
        return None
    return CheckUnsupported(
        "vmap(randomness='same'), which a comparison with a loop of calls needs, cannot "
        f"run a random op of fn on a batched tensor ({explain_error(exc)})",
        "draw from a tensor that does not depend on the inputs (torch.rand(x.shape) < p "
        "for torch.bernoulli(probs))",
    )


def own_vmap_rule(fn: Any) -> str | None:
    """``"Name.vmap"`` when ``fn`` is a Function (or its ``apply``) with its own ``vmap``
    staticmethod, a rule written by hand; None otherwise (PyTorch's batching rules, a
    generated rule)."""
    cls = fn if isinstance(fn, type) else getattr(fn, "__self__", None)
    if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
        return None
    if cls.vmap is torch.autograd.Function.vmap:
        return None
    return f"{cls.__name__}.vmap"


def _function_of_node(node: Any) -> type | None:
    """The Function class whose ``apply`` made the autograd graph ``node``, or None for
    PyTorch's own nodes. The node's class records it (``_forward_cls``, set by
    ``torch.autograd.Function``'s metaclass; no public accessor exists): the class
    itself, not its name, which another Function may bear too."""
    cls = getattr(node, "_forward_cls", None)
    return cls if isinstance(cls, type) else None


def own_vmap_rules_reached(ctx: CheckContext) -> list[str]:
    """The hand-written vmap rules (``"Name.vmap"``) of the Functions in fn's autograd
    graph at the example inputs: fn may call them inside an ``nn.Module`` or a wrapper,
    where :func:`own_vmap_rule` of fn sees none. A graph node is matched to the Function
    class that made it, by identity (two classes of one name in different modules or
    closures, one with a rule and one without, are told apart); a Function none of whose
    outputs requires grad leaves no node and is not found."""
    outs = ctx.diff_fn(*ctx.leaves())
    nodes = [o.grad_fn for o in outs if o.grad_fn is not None]
    found, seen = [], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes += [parent for parent, _ in node.next_functions]
        cls = _function_of_node(node)
        rule = None if cls is None else own_vmap_rule(cls)
        if rule is not None and rule not in found:
            found.append(rule)
    return sorted(found)


def _own_rule_note(ctx: CheckContext) -> str:
    """Why vmap of a random fn with a hand-written vmap rule (fn's own, or one of a
    Function it calls) is compared with calls one by one anyway: vmap compared with
    itself would pass a wrong rule. Empty when no such rule is found."""
    if ctx.own_vmap_rule is not None:
        whose = f"has its own vmap rule, {ctx.own_vmap_rule}"
    else:
        reached = own_vmap_rules_reached(ctx)
        if not reached:
            return ""
        rules = ", ".join(reached)
        whose = (
            f"calls a Function with its own vmap rule, {rules}"
            if len(reached) == 1
            else f"calls Functions with their own vmap rules, {rules}"
        )
    return (
        f" (fn draws random numbers and {whose}: it must draw what fn's calls one by one "
        "draw - under randomness='same' one draw of the unbatched shape for the whole "
        "batch - for vmap to be compared with them; compared with vmap over one sample at "
        "a time, the rule would only be checked against itself)"
    )


def check_vmap(ctx: CheckContext) -> Passed:
    """``vmap(fn)`` and ``vmap(grad(fn))`` over a batch of scaled inputs against a loop;
    unsupported when the vmap rule raises ``NotImplementedError``, or vmap raises for a fn
    with a sparse input (:func:`_sparse_input_gap`). A random fn whose vmap draws other
    numbers than its plain calls is compared with vmap over one sample at a time
    instead, with a caveat saying so."""
    batch = int(ctx.options.vmap_batch)
    xs = _batched_inputs(ctx, batch)
    try:
        batched = _vmapped_forward(ctx, xs)
    except Exception as exc:  # noqa: BLE001
        gap = _sparse_input_gap(ctx, exc, "vmap of the forward", lambda c: _vmapped_forward(c, xs))
        gap = gap or _same_randomness_gap(exc)
        raise gap or outcome_of(exc, "vmap of the forward failed: ", VMAP) from None
    sample, gradients, caveat = _calls_one_by_one, _gradients_one_by_one, ""
    try:
        worst = _require_forward_like(ctx, batched, xs, sample)
    except CheckFailure as failure:
        if not draws_random_numbers(ctx):
            raise
        note = _own_rule_note(ctx)
        if note:
            raise CheckFailure(failure.message + note, failure.abs_err, failure.rel_err) from None
        sample, gradients, caveat = (
            _vmap_of_one_sample,
            _gradients_of_one_sample_vmap,
            RANDOM_VMAP_CAVEAT,
        )
        worst = _require_forward_like(ctx, batched, xs, sample)
    with torch.no_grad():
        weights = [ctx.randn(o.shape[1:], o.dtype) for o in batched]
    try:
        per_sample = _vmapped_grad(ctx, xs, weights)
    except Exception as exc:  # noqa: BLE001
        raise _vmap_failure(ctx, exc, xs, weights) from None
    for b in range(batch):
        for k, (exp, ps) in enumerate(zip(gradients(ctx, xs, weights, b), per_sample)):
            problem = (
                f"per-sample gradient of {ctx.input_name(k)} under vmap(grad) differs "
                "from a loop of backward calls"
            )
            worst = max(worst, require_close(ps[b], exp, ctx.parity_tolerances(), problem))
    return Passed(f"batch of {batch}: forward and vmap(grad)", *worst, caveat=caveat)


class _DataWatch(torch.Tensor):
    """A grad_output that notes when ``.data`` is read of it or of a tensor computed from
    it (the subclass passes through the ops backward applies)."""

    data_read = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__self__", None) is torch.Tensor.data:
            cls.data_read = True
        return super().__torch_function__(func, types, args, kwargs or {})


def _reads_data_of_grad_outputs(
    outs: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]
) -> bool:
    """Whether one ordinary backward (for the first of the batch of grad_outputs ``vs``)
    reads ``.data`` of a grad_output or of a tensor computed from one: PyTorch's batched
    backward crashes the process on that (a segmentation fault), so it must not run. A
    backward that fails on the watching subclass tells nothing (False)."""
    _DataWatch.data_read = False
    watched = [v[0].clone().as_subclass(_DataWatch) for v in vs]
    try:
        input_grads(outs, leaves, watched, retain_graph=True, allow_unused=True)
    except Exception:  # noqa: BLE001 - the batched backward will tell its own error
        return False
    finally:
        read, _DataWatch.data_read = _DataWatch.data_read, False
    return read


#: PyTorch's whole message (its older vmap, which ``is_grads_batched`` runs) for an op it
#: cannot batch, naming the op: for a view or out= op, or any other it has no fallback for.
_NO_BATCHING_RULE = re.compile(
    r"Batching rule not implemented for (aten::[\w.]+)"
    r"(?:; the fallback path doesn't work on out= or view ops\.|\. We could not generate a "
    r"fallback\.)"
)

#: Ops that read a tensor's values into Python (``.item()``; ``bool()`` of a tensor in an
#: ``if`` is ``aten::is_nonzero``): no vmap can batch them, as a batch has no single value.
_VALUE_READS = ("aten::item", "aten::_local_scalar_dense")


def _value_read_gap(op: str) -> CheckUnsupported:
    """Unsupported for backward's ``.item()`` (``op``) under the batched backward: the
    gradient may be right for every grad_output, but a batch of them has no single
    Python value, so no vmap can run it (as the ``vmap`` check says of fn's forward)."""
    return CheckUnsupported(
        f"batched backward (is_grads_batched, as jacobian(vectorize=True) runs) failed: "
        f"backward reads a tensor's value into Python ({op}, an .item()), which no vmap "
        "can batch: a batch of grad_outputs has no single value (a PyTorch limitation, "
        "not a wrong gradient)",
        "keep the value a tensor (g.abs().amax() rather than g.abs().max().item())",
    )


def _unbatchable_op_gap(exc: BaseException) -> CheckUnsupported | None:
    """Unsupported when the batched backward raised because PyTorch has no batching rule
    for an op backward uses (``g.flatten()``, ``torch.einsum``, ``.detach()``):
    ``is_grads_batched`` runs PyTorch's older vmap (``torch._vmap_internals``), which lacks
    rules that ``torch.func.vmap`` has, a limitation of PyTorch, not a wrong gradient of
    fn; and for an op reading values into Python (``.item()``, :func:`_value_read_gap`).
    Only PyTorch's own error counts: a ``RuntimeError`` whose whole message is its
    message, not an error fn raised while handling one (a fallback of fn's own that
    fails) nor one of fn's that quotes it. None for any other error."""
    found = _NO_BATCHING_RULE.fullmatch(str(exc)) if type(exc) is RuntimeError else None
    if found is None:
        return None
    if found.group(1) in _VALUE_READS:
        return _value_read_gap(found.group(1))
    return CheckUnsupported(
        f"batched backward (is_grads_batched, as jacobian(vectorize=True) runs) failed: "
        f"PyTorch's batched backward has no batching rule for {found.group(1)}, which "
        "backward uses (a limitation of the older vmap it runs, not a wrong gradient)",
        "write that step of backward with ops it batches (reshape for flatten, matmul or "
        "mul and sum for einsum, no .detach()), or batch with torch.func.vmap over "
        "torch.func.vjp",
    )


#: PyTorch's error for a random op under the vmap that ``is_grads_batched`` runs.
_RANDOM_UNDER_VMAP = "We do not yet support calling random operations inside of vmap"


def _random_in_backward_gap(exc: BaseException) -> CheckUnsupported | None:
    """Unsupported when the batched backward raised because backward draws random numbers
    (a dropout drawing its mask again from a saved generator state, to save memory):
    PyTorch's batched backward cannot run a random op, a limitation of PyTorch, not a
    wrong gradient (the other checks compare that backward). Only PyTorch's own
    ``RuntimeError`` counts; None for any other error."""
    if type(exc) is not RuntimeError or _RANDOM_UNDER_VMAP not in str(exc):
        return None
    return CheckUnsupported(
        "batched backward (is_grads_batched, as jacobian(vectorize=True) runs) failed: "
        "backward draws random numbers, which PyTorch's batched backward cannot do "
        f"({explain_error(exc)})",
        "save what forward drew (ctx.save_for_backward(mask)) instead of drawing it again "
        "in backward",
    )


def check_batched_grad(ctx: CheckContext) -> Passed:
    """``autograd.grad(..., is_grads_batched=True)`` against one backward per grad_output;
    failed without running it when backward reads ``.data`` of a grad_output (PyTorch
    would crash the process); unsupported through a sparse output (PyTorch's vmap cannot
    batch sparse tensors), when it raises for a fn with a sparse input
    (:func:`_sparse_input_gap`) or a sparse gradient of a dense input
    (:func:`_sparse_gradient_gap`), or for an op of backward that PyTorch's batched
    backward cannot batch (:func:`_unbatchable_op_gap`) or a random op in backward
    (:func:`_random_in_backward_gap`)."""
    if ctx.sparse_outputs:
        raise CheckUnsupported(
            "fn returns a sparse tensor: batched backward (is_grads_batched, a vmap over "
            "grad_outputs) is unsupported, as PyTorch's vmap cannot batch sparse tensors",
            "return a dense tensor (.to_dense()) if batched gradients are needed",
        )
    batch = int(ctx.options.vmap_batch)
    leaves = ctx.leaves()
    outs = [o for o in ctx.diff_fn(*leaves) if o.requires_grad]
    vs = [torch.stack([ctx.randn(o.shape, o.dtype) for _ in range(batch)]) for o in outs]
    tolerance = ctx.parity_tolerances()
    if _reads_data_of_grad_outputs(outs, leaves, vs):
        raise CheckFailure(
            "backward reads .data of grad_output (or of a tensor computed from it): a "
            "batched backward (is_grads_batched, a vmap over grad_outputs, as jacobian("
            "vectorize=True) runs) crashes the process on it (a segmentation fault in "
            "PyTorch), so it was not run; use the tensor itself (backward runs without "
            "grad unless create_graph=True)"
        )
    try:
        batched = _batched_backward(outs, leaves, vs)
    except Exception as exc:  # noqa: BLE001

        def again(c: CheckContext) -> object:
            d = c.leaves()
            return _batched_backward([o for o in c.diff_fn(*d) if o.requires_grad], d, vs)

        what = "batched backward (is_grads_batched, a vmap)"
        gap = _sparse_input_gap(ctx, exc, what, again)
        gap = gap or _sparse_gradient_gap(ctx, exc) or _unbatchable_op_gap(exc)
        gap = gap or _random_in_backward_gap(exc)
        raise gap or outcome_of(exc, "batched backward failed: ") from None
    worst = (0.0, 0.0)
    for b in range(batch):
        gs = input_grads(outs, leaves, [v[b] for v in vs], retain_graph=True, allow_unused=True)
        for k, (gb, bg) in enumerate(zip(gs, batched)):
            if gb is None and bg is None:
                continue
            exp = torch.zeros_like(leaves[k]) if gb is None else gb
            got = torch.zeros_like(leaves[k]) if bg is None else bg[b]
            problem = (
                f"batched backward (vmap over grad_outputs) of {ctx.input_name(k)} "
                "differs from a loop"
            )
            worst = max(worst, require_close(got, exp, tolerance, problem))
    return Passed(f"batch of {batch} grad_outputs", *worst)
