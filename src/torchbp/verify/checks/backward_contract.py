"""Checks of what backward owes autograd beyond correct values: ``undefined_grad`` (None
grad_outputs), ``grad_shapes`` (raw gradient shapes, dtypes and devices of each custom
Function),
``needs_input_grad`` (the same gradients when only some inputs require grad) and
``grad_output_safety`` (no in-place writes, any grad_output or input memory layout).

gradcheck (as the ``gradcheck`` check runs it) differentiates with every input requiring
grad and contiguous grad_outputs, one output at a time, and eager autograd sums a gradient
of a broadcast shape and casts one of a narrower dtype on its way: a backward that fails
on a None grad_output, returns such a gradient, branches on ``ctx.needs_input_grad`` with
the wrong index, writes into grad_output or assumes contiguous memory passes it."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from torchbp.verify.checks.compare import (
    dense,
    dense_gradients,
    float_tensors,
    input_grads,
    require_close,
    same_values,
    shape_text,
)
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.explain import explain_error, first_line
from torchbp.verify.checks.mutation import STATE_INPUT_HINT
from torchbp.verify.checks.outcomes import CheckFailure, CheckSkip, Passed
from torchbp.verify.checks.rng import draws_random_numbers, require_gradients_of_own_forward
from torchbp.verify.checks.spelling import option

__all__ = [
    "check_grad_output_safety",
    "check_grad_shapes",
    "check_needs_input_grad",
    "check_undefined_grad",
    "require_jvp_layout_independent",
]


def check_undefined_grad(ctx: CheckContext) -> Passed:
    """torch's undefined-grad test: backward with some output grads None must treat them
    as zeros; skipped when gradcheck failed."""
    if ctx.failed("gradcheck"):
        raise CheckSkip("skipped because gradcheck failed")
    diff = ctx.leaves()
    # torch's own test of this lives in a private helper of its gradcheck module; without
    # it, the public gradcheck runs it too, but only in float64
    gc_module = sys.modules.get("torch.autograd.gradcheck")
    private = getattr(gc_module, "_test_undefined_backward_mode", None)
    # torch's test reads the gradients elementwise: a sparse one is handed on dense
    fn = dense_gradients(ctx.diff_fn) if ctx.sparse_gradient_inputs() else ctx.diff_fn
    try:
        if private is not None:
            private(fn, fn(*diff), tuple(diff))
        elif ctx.dtype == torch.float64:
            torch.autograd.gradcheck(fn, tuple(diff), fast_mode=True, check_undefined_grad=True)
        else:
            raise CheckSkip("needs float64 inputs with this torch version")
    except CheckSkip:
        raise
    except Exception as exc:  # noqa: BLE001
        msg = explain_error(exc)
        if "undefined" not in msg:
            msg = f"backward fails when an output gradient is undefined (None): {msg}"
        raise CheckFailure(msg) from None
    return Passed("undefined output grads treated as zeros")


def _function_nodes(outs: list[torch.Tensor]) -> list[Any]:
    """The custom autograd.Function nodes in the graph of ``outs``."""
    nodes, seen, stack = [], set(), [o.grad_fn for o in outs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            nodes.append(node)
        stack.extend(nf for nf, _ in node.next_functions if nf is not None)
    return nodes


def _materialized(node: Any, grad_outputs: tuple) -> tuple | None:
    """``grad_outputs`` as autograd hands them to backward: an output that got no gradient
    (it was not used, e.g. ``Function.apply(x)[0]`` of a two-output Function) is None in
    what the node's pre-hook sees, and zeros of that output's shape in backward (zeros are
    also what a backward that handles None, ``set_materialize_grads(False)``, must accept).
    None when the node does not tell those shapes."""
    if all(g is not None for g in grad_outputs):
        return grad_outputs
    metadata = getattr(node, "_input_metadata", None)
    if metadata is None or len(metadata) != len(grad_outputs):
        return None
    return tuple(
        torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None else g
        for g, m in zip(grad_outputs, metadata)
    )


def _gradient_edges(node: Any) -> list[tuple[int, Any, int]]:
    """``(argument position, next node, its input slot)`` for each argument of a custom
    Function ``node`` that requires grad. Autograd lists edges for its tensor arguments
    only (``None`` for one that needs no gradient), while backward returns one gradient
    per argument, scalars included: the i-th argument that needs a gradient
    (``ctx.needs_input_grad``) owns the i-th edge that leads somewhere."""
    positions = [i for i, needed in enumerate(node.needs_input_grad) if needed]
    edges = [(nf, slot) for nf, slot in node.next_functions if nf is not None]
    return [(i, nf, slot) for i, (nf, slot) in zip(positions, edges)]


def _input_metadata(node: Any, slot: int) -> Any | None:
    """What autograd expects of the gradient ``node`` receives in ``slot``: an object with
    the ``shape``, ``dtype`` and ``device`` of that input (the leaf itself for a leaf), or
    None when the node does not tell."""
    if hasattr(node, "variable"):
        return node.variable
    meta = getattr(node, "_input_metadata", None)
    return None if meta is None else meta[slot]


def _narrower(grad_dtype: torch.dtype, input_dtype: torch.dtype) -> bool:
    """True if a gradient of ``grad_dtype`` cannot hold every value of ``input_dtype``
    (it is not the input's dtype, nor one the input's promotes to)."""
    return torch.promote_types(grad_dtype, input_dtype) != grad_dtype


def _shape_mismatch(grad: torch.Tensor, shape: tuple[int, ...], i: int) -> str:
    """How ``grad``, of a shape input ``i``'s ``shape`` broadcasts to (autograd refuses any
    other before this check sees it), is wrong, as the end of a sentence: autograd sums it
    back without a word, so its values reach the input right, but PyTorch's contract (each
    gradient w.r.t. its input) is broken and backward built a tensor larger than the
    input, by the bytes the message names (a weight gradient unreduced over B*T tokens
    holds B*T copies)."""
    size = math.prod(shape)
    extra = (grad.numel() - size) * grad.element_size()
    times = f" ({grad.numel() / size:.3g} times the input's size)" if size else ""
    return (
        f"a gradient of shape {shape_text(grad)} for its input {i}, which has shape "
        f"{shape_text(shape)}: reduce it over the broadcast (leading) dims yourself "
        "(grad.sum_to_size(shape)) - autograd sums a gradient it can broadcast from the "
        "input's shape on its way without a word (the values reaching the input are then "
        f"right, gradcheck cannot see it), but backward built a gradient {_bytes_text(extra)} "
        f"larger than needed{times}; if you rely on that sum on "
        "purpose, as a fused bias-activation's bias gradient may, pass "
        f"{option('skip', ['grad_shapes'])}"
    )


def _bytes_text(n: int) -> str:
    """``n`` bytes in words: ``"96 bytes"``, ``"1.5 KiB"``, ``"3.2 GiB"``."""
    value, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{value:.3g} {unit}"


def _gradient_mismatch(grad: torch.Tensor, expected: Any, i: int) -> str | None:
    """How ``grad`` differs from input ``i`` it is for (``expected``: that input's shape,
    dtype and device), as the end of a sentence; None if it does not. Eager autograd hides
    a wrong shape (it sums) and a wrong dtype (it casts: a float32 gradient for a float64
    input has lost precision; a wider one, float32 for bfloat16, loses nothing)."""
    if tuple(grad.shape) != tuple(expected.shape):
        return _shape_mismatch(grad, tuple(expected.shape), i)
    if _narrower(grad.dtype, expected.dtype):
        return (
            f"a {grad.dtype} gradient for its input {i}, which is {expected.dtype}: "
            "return it in the input's dtype (compute in it, or end with "
            ".to(x.dtype)) - autograd silently casts it in eager mode, which hides the "
            "lost precision until a second derivative or a low-tolerance check sees it"
        )
    if grad.device != expected.device:
        return (
            f"a gradient on device {grad.device} for its input {i}, which is on "
            f"{expected.device}: return it on the input's device (e.g. .to(x.device))"
        )
    return None


def check_grad_shapes(ctx: CheckContext) -> Passed:
    """Replays each custom Function node's backward on the grad_outputs it received and
    compares the raw gradients' shapes, dtypes and devices with its inputs' (eager autograd
    would sum a wrong shape and cast a narrower dtype without a word)."""
    leaves = ctx.leaves()
    outs = [o for o in ctx.diff_fn(*leaves) if o.requires_grad]
    nodes = _function_nodes(outs)
    if not nodes:
        raise CheckSkip("no custom autograd.Function in the graph")
    captured: dict[Any, tuple] = {}
    handles = [
        n.register_prehook(lambda go, n=n: captured.__setitem__(n, tuple(go))) for n in nodes
    ]
    try:
        vs = ctx.randn_like_outputs(outs)
        input_grads(outs, leaves, vs, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    checked = 0
    for node, go in captured.items():
        cls_name = getattr(node, "_forward_cls", type(node)).__name__
        grad_outputs = _materialized(node, go)
        if grad_outputs is None:
            continue
        try:
            raw = node.apply(*grad_outputs)
        except Exception as exc:  # noqa: BLE001
            msg = f"backward of {cls_name} failed: {explain_error(exc)}"
            raise CheckFailure(msg) from None
        raw = raw if isinstance(raw, tuple) else (raw,)
        for i, nf, slot in _gradient_edges(node):
            grad = raw[i] if i < len(raw) else None
            if not isinstance(grad, torch.Tensor):
                continue
            expected = _input_metadata(nf, slot)
            if expected is None:
                continue
            checked += 1
            problem = _gradient_mismatch(grad, expected, i)
            if problem:
                raise CheckFailure(f"backward of {cls_name} returned {problem}")
    return Passed(f"{checked} gradient(s) of {len(captured)} Function node(s) checked")


def _gradient_alone(ctx: CheckContext, k: int | None, vs: list[torch.Tensor]):
    """fn's outputs and the gradient of its ``k``-th grad input when that input is the only
    one that requires grad (the others are passed as plain tensors); with ``k`` None, no
    input requires grad and the gradient is None."""
    inputs = [x.detach().clone() for x in ctx.leaves()]
    if k is None:
        return ctx.diff_fn(*inputs), None
    inputs[k].requires_grad_(True)
    outs = ctx.diff_fn(*inputs)
    live = [(o, v) for o, v in zip(outs, vs) if o.requires_grad]
    if not live:
        return outs, None
    (grad,) = input_grads(
        [o for o, _ in live], [inputs[k]], [v for _, v in live], allow_unused=True
    )
    return outs, grad


def check_needs_input_grad(ctx: CheckContext) -> Passed:
    """No input, and each grad input alone, requiring grad (inference; a frozen weight, a
    first layer's input that needs no gradient) must give the outputs, and that input the
    gradient, fn gives when all of them require grad: a backward that branches on
    ``ctx.needs_input_grad`` with the wrong index, or saves a tensor only under another
    input's flag, is wrong or crashes only then."""
    leaves = ctx.leaves()
    outs = ctx.diff_fn(*leaves)
    vs = ctx.randn_like_outputs(outs)
    live = [(o, v) for o, v in zip(outs, vs) if o.requires_grad]
    expected = input_grads([o for o, _ in live], leaves, [v for _, v in live], allow_unused=True)
    tolerance = ctx.parity_tolerances()
    worst = (0.0, 0.0)
    alone = list(range(len(leaves))) if len(leaves) > 1 else []
    for k in [None, *alone]:
        when = (
            "when no input requires grad"
            if k is None
            else (f"when only {ctx.input_name(k)} requires grad")
        )
        try:
            outs_k, grad = _gradient_alone(ctx, k, vs)
        except Exception as exc:  # noqa: BLE001
            raise CheckFailure(
                f"fn or its backward fails {when}: {explain_error(exc)} (a tensor saved or a "
                "gradient computed under another input's ctx.needs_input_grad flag?)"
            ) from None
        for o, (got, full) in enumerate(zip(outs_k, outs)):
            worst = max(worst, require_close(got, full, tolerance, f"output {o} differs {when}"))
        if k is not None:
            worst = max(worst, _require_same_gradient(ctx, k, grad, expected[k], when))
    checked = f"each of {len(alone)} grad inputs alone and " if alone else ""
    return Passed(f"{checked}no input requiring grad", *worst)


def _require_same_gradient(
    ctx: CheckContext, k: int, grad: torch.Tensor | None, expected: torch.Tensor | None, when: str
) -> tuple[float, float]:
    """The error of ``grad`` (input ``k`` alone requiring grad) against ``expected`` (all
    requiring grad); a failed check when they differ (None counts as zeros)."""
    like = ctx.args[ctx.grad_idx[k]]
    expected = torch.zeros_like(like) if expected is None else expected
    name = ctx.input_name(k)
    if grad is None and bool(expected.ne(0).any()):
        raise CheckFailure(
            f"backward returns no gradient (None) for {name} {when}, although it gets one "
            "when all inputs do (computed under another input's ctx.needs_input_grad flag?)"
        )
    grad = torch.zeros_like(like) if grad is None else grad
    problem = f"gradient of {name} {when} differs from the one it gets when all do"
    note = " (a ctx.needs_input_grad branch with the wrong index?)"
    return require_close(grad, expected, ctx.parity_tolerances(), problem, note=note)


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout (transposed storage); an empty
    ``t`` as a plain copy: it has no memory order to change, and torch takes its odd
    strides for contiguous (``view_as_complex`` of the real view then refuses them)."""
    if t.numel() == 0:
        return t.clone()
    if t.dim() >= 2:
        buf = torch.empty(tuple(reversed(t.shape)), dtype=t.dtype, device=t.device)
        out = buf.permute(*reversed(range(t.dim())))
        out.copy_(t)
        return out
    if t.dim() == 1 and t.numel() > 0:
        buf = torch.empty(t.shape[0] * 2, dtype=t.dtype, device=t.device)
        out = buf[::2]
        out.copy_(t)
        return out
    return t.clone()


def _row_padded_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout that keeps the contiguous order
    of the elements: each row a slice of a row one element longer (a 1-d ``t``: every
    other element of a buffer twice its size). Such a tensor is not dense, so
    ``rand_like`` and ``empty_like`` give it contiguous strides, and a random fn draws
    for it the numbers it draws for a contiguous ``t``."""
    if t.dim() < 2 or t.numel() == 0:
        return _strided_copy(t)
    buf = torch.empty((*t.shape[:-1], t.shape[-1] + 1), dtype=t.dtype, device=t.device)
    out = buf[..., : t.shape[-1]]
    out.copy_(t)
    return out


def _offset_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t``, contiguous, but not at the start of its storage: the
    layout of a slice of one larger buffer, as torch.cat's or split's backward hands on:
    the second half of a buffer twice its size (an offset of ``t.numel()`` elements keeps
    the real view of a complex tensor viewable as complex, which an odd one would not)."""
    buf = torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)
    out = buf[t.numel() :].view(t.shape)
    out.copy_(t)
    return out


def _other_layouts(vs: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """The grad_outputs ``vs`` in other layouts than a fresh contiguous tensor's, by a
    label for messages."""
    return {
        "non-contiguous (strided)": [_strided_copy(v) for v in vs],
        "offset in its storage (a slice of a larger buffer, as from torch.cat's backward)": [
            _offset_copy(v) for v in vs
        ],
        "expanded (stride-0, as from .sum())": [
            v.reshape(-1)[:1].reshape(()).expand(v.shape) if v.numel() else v for v in vs
        ],
    }


def _strided(a: Any) -> bool:
    """True if ``a`` is a tensor with a memory layout to change (not a sparse one)."""
    return isinstance(a, torch.Tensor) and a.layout == torch.strided


def _contiguous_copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _input_layout(ctx: CheckContext, i: int, layout: Any) -> Any:
    """``layout`` for fn's input ``i``; for a complex input, which the checks hold as its
    real view, applied to the complex tensor (a transposed real view would move the real
    and imaginary parts apart, and fn would get a contiguous copy of it)."""
    if i not in ctx.complex_inputs:
        return layout
    return lambda t: torch.view_as_real(layout(torch.view_as_complex(t.contiguous())))


def _laid_out(ctx: CheckContext, layout: Any) -> tuple[list[torch.Tensor], list[Any]]:
    """``(leaves, inputs)``: fn's inputs with every tensor input copied by ``layout`` (the
    same values in some memory layout), the grad inputs as the fresh ``leaves``; a
    module's parameters keep the module's layout (the caller does not choose it)."""
    diff = [
        ctx.args[i].detach().clone()
        if i in ctx.parameter_names
        else _input_layout(ctx, i, layout)(ctx.args[i].detach())
        for i in ctx.grad_idx
    ]
    diff = [d.requires_grad_(True) for d in diff]
    full = ctx.full_inputs(diff)
    others = [
        _input_layout(ctx, i, layout)(a) if _strided(a) and i not in ctx.grad_idx else a
        for i, a in enumerate(full)
    ]
    return diff, others


def _outputs_and_grads(ctx: CheckContext, layout: Any, label: str, vs: list | None):
    """fn's floating outputs and the gradients of its inputs (for the grad_outputs ``vs``,
    drawn here when None) with every tensor input in ``layout``; a failed check when fn
    or backward raises for them (``label`` names the layout)."""
    diff, full = _laid_out(ctx, layout)
    try:
        outs = float_tensors(ctx.fn(*full))
        live = [o for o in outs if o.requires_grad]
        vs = ctx.randn_like_outputs(live) if vs is None else vs
        grads = input_grads(live, diff, vs, allow_unused=True)
    except Exception as exc:  # noqa: BLE001 - fn's own error, in words
        raise CheckFailure(
            f"fn or backward fails for {label} inputs: {explain_error(exc)}"
        ) from None
    return outs, grads, vs


def _reference_rejects(ctx: CheckContext, layout: Any) -> bool:
    """True if the reference raises for fn's inputs copied by ``layout``: a fn that raises
    for them too keeps the reference's contract (``x.view(-1)`` refuses a transposed ``x``)."""
    if ctx.reference is None:
        return False
    _, full = _laid_out(ctx, layout)
    try:
        ctx.reference(*full)
    except Exception:  # noqa: BLE001 - any refusal of these inputs
        return True
    return False


#: What the grad_output_safety check could not compare for a random fn.
RANDOM_LAYOUT_CAVEAT = (
    "fn draws random numbers, and a transposed input gets other ones (rand_like fills a "
    "tensor in its memory order): its outputs and gradients for transposed inputs were "
    "not compared with those for contiguous ones; compared instead: those for inputs "
    "sliced from wider rows (non-contiguous, drawn for in the contiguous order) with "
    "them, and, in float64, the gradients for transposed inputs with central "
    "differences of the same forward"
)


def _require_input_layout_independent(ctx: CheckContext) -> tuple[tuple[float, float], str]:
    """``((max abs, max rel) error, caveat)``: fail unless fn gives the same outputs and
    gradients for non-contiguous (strided) tensor inputs as for contiguous ones: a
    Function written for contiguous tensors (a ``.view`` of an input, a kernel reading
    its storage in memory order) is silently wrong or crashes on a transposed input;
    raising for them passes when the reference raises too. A fn that draws random
    numbers gets other ones for a transposed input (``rand_like`` fills a tensor in
    memory order: a dropout's right too), so when its outputs differ
    :func:`_require_random_layouts_consistent` checks what stays comparable, and the
    caveat says what was not."""
    given = [a for i, a in enumerate(ctx.args) if i not in ctx.parameter_names]
    if not any(_strided(a) and a.dim() >= 1 and a.numel() > 1 for a in given):
        return (0.0, 0.0), ""
    label = "non-contiguous (strided)"
    dense_outs, dense_grads, vs = _outputs_and_grads(ctx, _contiguous_copy, "contiguous", None)
    try:
        outs, grads, _ = _outputs_and_grads(ctx, _strided_copy, label, vs)
    except CheckFailure:
        if _reference_rejects(ctx, _strided_copy):
            return (0.0, 0.0), ""  # fn refuses these inputs as the op it re-implements does
        raise
    try:
        return _require_same(ctx, (outs, grads), (dense_outs, dense_grads), label), ""
    except CheckFailure:
        if not draws_random_numbers(ctx):
            raise
    expected = (dense_outs, dense_grads)
    return _require_random_layouts_consistent(ctx, expected, vs), RANDOM_LAYOUT_CAVEAT


def _require_random_layouts_consistent(
    ctx: CheckContext, expected: tuple, vs: list[torch.Tensor]
) -> tuple[float, float]:
    """For a fn drawing random numbers: its outputs and gradients for inputs in a
    non-contiguous layout that keeps the contiguous order (:func:`_row_padded_copy`, for
    which ``rand_like`` draws what it draws for contiguous inputs) must equal
    ``expected``, those for contiguous inputs (a kernel reading an input's storage as if
    contiguous fails); and, in float64, its gradients for transposed inputs must be those
    of its own forward for them (a mask drawn in forward in the input's layout and again
    in backward in another fails)."""
    label = "non-contiguous (rows sliced from wider ones, in the contiguous order)"
    try:
        outs, grads, _ = _outputs_and_grads(ctx, _row_padded_copy, label, vs)
    except CheckFailure:
        if not _reference_rejects(ctx, _row_padded_copy):
            raise
        worst = (0.0, 0.0)
    else:
        worst = _require_same(ctx, (outs, grads), expected, label)

    def transposed_call(*diff: torch.Tensor) -> list[torch.Tensor]:
        laid = [
            _input_layout(ctx, i, _strided_copy)(d) if i not in ctx.parameter_names else d
            for i, d in zip(ctx.grad_idx, diff)
        ]
        full = ctx.full_inputs(laid)
        others = [
            _input_layout(ctx, i, _strided_copy)(a) if _strided(a) and i not in ctx.grad_idx else a
            for i, a in enumerate(full)
        ]
        return float_tensors(ctx.fn(*others))

    own = require_gradients_of_own_forward(ctx, transposed_call, "for transposed inputs")
    return max(worst, own or (0.0, 0.0))


def _require_same(ctx: CheckContext, got: tuple, expected: tuple, label: str):
    """``(max abs, max rel)`` error of fn's outputs and gradients ``got`` for inputs in
    the layout ``label`` against those for contiguous ones, or a failed check."""
    (outs, grads), (dense_outs, dense_grads) = got, expected
    tolerance = ctx.parity_tolerances()
    note = " (fn assumes contiguous inputs: call .contiguous() on them, or use reshape, not view)"
    worst = (0.0, 0.0)
    for o, (a, e) in enumerate(zip(outs, dense_outs)):
        problem = f"output {o} changes when the inputs are {label}"
        worst = max(worst, require_close(a, e, tolerance, problem, note=note, show_index=True))
    for k, (a, e) in enumerate(zip(grads, dense_grads)):
        if a is None or e is None:
            continue
        problem = f"gradient of {ctx.input_name(k)} changes when the inputs are {label}"
        worst = max(worst, require_close(a, e, tolerance, problem, note=note, show_index=True))
    return worst


def _tensor_args(ctx: CheckContext) -> list[torch.Tensor]:
    """fn's tensor inputs as they are now, dense."""
    return [dense(a.detach()) for a in ctx.args if isinstance(a, torch.Tensor)]


def _changed(tensors: list[torch.Tensor], before: list[torch.Tensor]) -> set[int]:
    """Positions of the ``tensors`` whose values differ from their copies ``before``."""
    return {k for k, (t, b) in enumerate(zip(tensors, before)) if not same_values(t.detach(), b)}


def check_grad_output_safety(ctx: CheckContext) -> Passed:
    """backward must not write into grad_output or the inputs, and must give the same
    gradients for strided, offset and expanded grad_outputs as for contiguous ones; fn must give
    the same outputs and gradients for non-contiguous inputs as for contiguous ones."""
    tolerance = ctx.parity_tolerances()
    inputs_before = [dense(a.detach()).clone() for a in ctx.args if isinstance(a, torch.Tensor)]
    leaves = ctx.leaves()
    leaves_before = [x.detach().clone() for x in leaves]
    outs = [o for o in ctx.diff_fn(*leaves) if o.requires_grad]
    # which inputs forward wrote (state, maybe on purpose), told from backward's writes
    forward_wrote = _changed(leaves, leaves_before)
    forward_wrote_args = _changed(_tensor_args(ctx), inputs_before)
    vs = ctx.randn_like_outputs(outs)
    vs_copy = [v.clone() for v in vs]
    try:
        input_grads(outs, leaves, vs, retain_graph=True, allow_unused=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"backward failed: {explain_error(exc)}") from None
    for o, (v, vc) in enumerate(zip(vs, vs_copy)):
        if not same_values(v, vc):
            raise CheckFailure(
                f"backward modified grad_output {o} in place: never write into grad_output "
                "(it may be shared with other nodes or be an expanded tensor)"
            )
    worst = (0.0, 0.0)
    for label, strided in _other_layouts(vs).items():
        contiguous_vs = [_contiguous_copy(s) for s in strided]
        try:
            got = input_grads(outs, leaves, strided, retain_graph=True, allow_unused=True)
        except Exception as exc:  # noqa: BLE001
            raise CheckFailure(
                f"backward fails for a {label} grad_output: {explain_error(exc)}"
            ) from None
        exp = input_grads(outs, leaves, contiguous_vs, retain_graph=True, allow_unused=True)
        for k, (a, e) in enumerate(zip(got, exp)):
            if a is None or e is None:
                continue
            problem = f"gradient of {ctx.input_name(k)} changes when grad_output is {label}"
            note = " (backward depends on memory layout)"
            worst = max(worst, require_close(a, e, tolerance, problem, note=note))
    for k in sorted(_changed(leaves, leaves_before)):
        if k in forward_wrote:
            raise CheckFailure(f"forward modified {ctx.input_name(k)} in place" + STATE_INPUT_HINT)
        raise CheckFailure(
            f"backward modified {ctx.input_name(k)} in place: never write into an input "
            "(or a tensor saved for backward) in backward, it is the caller's"
        )
    if _changed(_tensor_args(ctx), inputs_before):
        hint = STATE_INPUT_HINT if forward_wrote_args else ""
        raise CheckFailure("fn modified one of its (non-differentiable) inputs in place" + hint)
    layout_errors, caveat = _require_input_layout_independent(ctx)
    return Passed(
        "grad_output intact; strided, offset and expanded grads and strided inputs accepted",
        *max(worst, layout_errors),
        caveat=caveat,
    )


#: What a jvp given a non-contiguous tangent likely assumes, and how to write it instead.
CONTIGUOUS_TANGENT_NOTE = (
    " (forward AD hands jvp each tangent in its primal's layout, as torch.func.jvp does "
    "for a transposed input: jvp assumes contiguous tangents; use t.reshape, not t.view, "
    "or t.contiguous() before a kernel reading memory in order)"
)


def _tangents(
    ctx: CheckContext, layout: Any, tangents: list[torch.Tensor]
) -> list[torch.Tensor | None]:
    """The tangents of fn's floating outputs for the grad inputs' ``tangents``, with every
    tensor input and tangent copied by ``layout`` (a module's parameters keep theirs)."""
    layouts = {i: _input_layout(ctx, i, layout) for i in range(len(ctx.args))}
    primals = [
        ctx.args[i].detach() if i in ctx.parameter_names else layouts[i](ctx.args[i].detach())
        for i in ctx.grad_idx
    ]
    with fwAD.dual_level():
        duals = [
            fwAD.make_dual(p, layouts[i](t)) for i, p, t in zip(ctx.grad_idx, primals, tangents)
        ]
        full = ctx.full_inputs(duals)
        laid = [
            layouts[i](a) if _strided(a) and i not in ctx.grad_idx else a
            for i, a in enumerate(full)
        ]
        found = [fwAD.unpack_dual(o).tangent for o in float_tensors(ctx.fn(*laid))]
        return [None if t is None else t.detach().clone() for t in found]


def _forward_accepts(ctx: CheckContext, layout: Any) -> bool:
    """True if fn runs (without forward AD) on its inputs copied by ``layout``."""
    _, full = _laid_out(ctx, layout)
    try:
        with torch.no_grad():
            ctx.fn(*full)
    except Exception:  # noqa: BLE001 - grad_output_safety judges fn's refusal of the layout
        return False
    return True


def require_jvp_layout_independent(ctx: CheckContext) -> None:
    """Fail unless jvp gives the same tangents for non-contiguous inputs and tangents as
    for contiguous ones. Forward AD hands jvp each tangent in its primal's layout (a
    transposed one for a transposed input), and gradcheck's tangents are contiguous: a
    jvp calling ``t.view(-1)`` raises for a transposed tangent, one reading memory in
    order reads the wrong elements. Transposed inputs, or, for a fn drawing random
    numbers (other ones for a transposed input), rows sliced from wider ones, which it
    draws for in the contiguous order. Nothing to compare when no input has a layout to
    change or fn's forward refuses the layout (``grad_output_safety`` judges that)."""
    given = [ctx.args[i] for i in ctx.grad_idx if i not in ctx.parameter_names]
    if not any(_strided(a) and a.dim() >= 1 and a.numel() > 1 for a in given):
        return
    random = draws_random_numbers(ctx)
    layout = _row_padded_copy if random else _strided_copy
    label = (
        "non-contiguous (rows sliced from wider ones)" if random else "non-contiguous (transposed)"
    )
    if not _forward_accepts(ctx, layout):
        return
    tangents = [ctx.randn(ctx.args[i].shape, ctx.args[i].dtype) for i in ctx.grad_idx]
    expected = _tangents(ctx, _contiguous_copy, tangents)
    try:
        got = _tangents(ctx, layout, tangents)
    except Exception as exc:  # noqa: BLE001 - jvp's own error, in words
        raise CheckFailure(
            f"jvp fails for {label} inputs and tangents: {type(exc).__name__}: "
            f"{first_line(str(exc))}" + CONTIGUOUS_TANGENT_NOTE
        ) from None
    for o, (a, e) in enumerate(zip(got, expected)):
        if a is None or e is None:
            continue
        require_close(
            a,
            e,
            ctx.parity_tolerances(),
            f"the tangent of output {o} changes when the inputs and their tangents are {label}",
            note=CONTIGUOUS_TANGENT_NOTE,
            show_index=True,
        )
