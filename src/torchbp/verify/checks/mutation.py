"""The ``mutation`` check: fn changes no tensor it was given (unless it declares the write
with ``ctx.mark_dirty`` and returns the input), backward changes neither the inputs nor the
outputs, and two backward passes through the same graph agree.

Each tensor's values and autograd version counter are recorded before and compared after,
so the message tells a write autograd saw (``x.mul_(...)`` without ``mark_dirty``) from one
it did not see (through ``.data``, ``.numpy()`` or the storage: the version counter did not
move, and autograd cannot even raise its "modified by an inplace operation" error).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch

from torchbp.verify.checks.compare import (
    dense,
    float_tensors,
    input_grads,
    leaves,
    require_close,
    zeros_for_none,
)
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.explain import explain_error
from torchbp.verify.checks.outcomes import CheckFailure, Passed

__all__ = ["check_mutation"]


class Snapshot(NamedTuple):
    """A tensor's values and version counter at one moment."""

    values: torch.Tensor
    version: int


def _snapshot(t: torch.Tensor) -> Snapshot:
    return Snapshot(dense(t.detach()).clone(), t._version)


def _values_changed(t: torch.Tensor, before: Snapshot) -> bool:
    """True if ``t``'s values differ from the snapshot (NaNs at the same places agree)."""
    now = dense(t.detach())
    if now.shape != before.values.shape:
        return True
    same = (now == before.values) | (now.isnan() & before.values.isnan())
    return not bool(same.all())


def _write_problem(t: torch.Tensor, before: Snapshot, what: str, when: str) -> str | None:
    """How ``what`` was written to during ``when``, in words, or None if it was not."""
    changed = _values_changed(t, before)
    if t._version != before.version:
        return (
            f"{when} wrote into {what} in place (its autograd version counter moved from "
            f"{before.version} to {t._version}"
            + ("" if changed else ", although the values are unchanged")
            + "): autograd's other uses of it now see the new values or raise; write into a "
            "copy (x = x.clone()), or, in forward, declare the write with ctx.mark_dirty(x) "
            "and return x"
        )
    if changed:
        return (
            f"{when} changed the values of {what} behind autograd's back (a write the "
            "autograd version counter did not see: through .data, .numpy(), a storage or "
            "another non-autograd alias), so nothing can detect the stale values; compute "
            "into a new tensor instead"
        )
    return None


#: What a message on a write into a floating-point input adds: it may be state fn
#: updates on purpose.
STATE_INPUT_HINT = (
    " (if it is state fn updates on purpose, such as the running statistics "
    "F.batch_norm updates, make it a buffer of an nn.Module whose forward calls fn and "
    "check the module: its buffers are put back after every call, and are not "
    "differentiated)"
)


def _check_unchanged(
    tensors: Sequence[tuple[str, torch.Tensor, Snapshot]],
    when: str,
    state_names: frozenset[str] = frozenset(),
) -> None:
    """Fail on the first of ``tensors`` written during ``when``; for one named in
    ``state_names`` (a floating-point input) the message adds :data:`STATE_INPUT_HINT`."""
    for what, t, before in tensors:
        problem = _write_problem(t, before, what, when)
        if problem:
            raise CheckFailure(problem + (STATE_INPUT_HINT if what in state_names else ""))


def _grads(outs: list[torch.Tensor], leaves: list[torch.Tensor], vs: list[torch.Tensor]):
    try:
        gs = input_grads(outs, leaves, vs, retain_graph=True, allow_unused=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"backward failed: {explain_error(exc)}") from None
    return zeros_for_none(gs, leaves)


def _write(t: torch.Tensor) -> None:
    """Write into ``t`` in place, outside autograd, as a caller may between forward and
    backward: + 1 for a floating tensor, its elements reversed for another (an index
    tensor keeps its values in range)."""
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.add_(1)
        elif t.dim():
            t.copy_(t.flip(tuple(range(t.dim()))))


@contextmanager
def _written(t: torch.Tensor) -> Iterator[None]:
    """:func:`_write` into ``t`` for the duration, then its values put back: an output may
    be state fn keeps (a module's buffer, a tensor in a closure, or a view of one) that the
    next call of fn reads again, and must not see this call's write."""
    before = t.detach().clone()
    _write(t)
    try:
        yield
    finally:
        with torch.no_grad():
            t.copy_(before)


def _strided(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided


class _Run(NamedTuple):
    """One call of fn on fresh copies of every tensor input: the leaves differentiated,
    fn's inputs and its outputs (as returned, and the floating ones that require grad)."""

    leaves: list[torch.Tensor]
    inputs: list
    returned: list
    live: list[torch.Tensor]


def _fresh_run(ctx: CheckContext) -> _Run:
    """fn called on copies of every tensor input (the grad inputs as non-leaf copies of
    fresh leaves), so that any of them can be written into afterwards."""
    diff = ctx.leaves()
    tensors = frozenset(i for i, a in enumerate(ctx.args) if _strided(a))
    inputs = ctx.full_inputs(diff, copied=tensors)
    out = ctx.fn(*inputs)
    live = [o for o in float_tensors(out) if o.requires_grad]
    return _Run(diff, inputs, leaves(out), live)


def _write_targets(ctx: CheckContext, run: _Run) -> list[tuple[str, int]]:
    """``(kind, position)`` of each tensor to write into after forward: every strided
    tensor input fn does not modify itself (mark_dirty) and every strided output."""
    inputs = [
        ("input", i) for i, a in enumerate(run.inputs) if _strided(a) and i not in ctx.dirty_inputs
    ]
    return inputs + [("output", o) for o, t in enumerate(run.returned) if _strided(t)]


def _require_writes_after_forward_seen(ctx: CheckContext) -> tuple[float, float]:
    """Write into each tensor input and output in turn after forward, outside autograd (as
    a caller's ``x.add_(1)`` or ``relu_`` between forward and backward): backward must
    raise autograd's "modified by an inplace operation" error or give the gradients it
    gives without the write. A backward that reads a tensor kept as a ctx attribute
    (``ctx.x = x``) instead of ``ctx.save_for_backward`` silently uses the new values."""
    clean = _fresh_run(ctx)
    if not clean.live:
        return 0.0, 0.0
    vs = ctx.randn_like_outputs(clean.live)
    expected = _grads(clean.live, clean.leaves, vs)
    tolerance = ctx.parity_tolerances()
    worst = (0.0, 0.0)
    for kind, position in _write_targets(ctx, clean):
        run = _fresh_run(ctx)
        target = (run.inputs if kind == "input" else run.returned)[position]
        try:
            with _written(target):
                got = input_grads(run.live, run.leaves, vs, allow_unused=True)
        except Exception:  # noqa: BLE001, S112 - autograd noticed the write, or refused it
            continue
        for k, (a, b) in enumerate(zip(zeros_for_none(got, run.leaves), expected)):
            problem = (
                f"gradient of {ctx.input_name(k)} changes when {kind} {position} is written "
                "into in place after forward, and autograd does not notice"
            )
            note = (
                " (backward reads it from a ctx attribute, e.g. ctx.x = x, where "
                "ctx.save_for_backward would make autograd raise 'modified by an inplace "
                "operation'; save every tensor backward reads with ctx.save_for_backward; "
                "or backward reads memory it never wrote, e.g. torch.empty filled in part)"
            )
            worst = max(worst, require_close(a, b, tolerance, problem, note=note))
    return worst


def check_mutation(ctx: CheckContext) -> Passed:
    """Records values and version counters of every input before fn's forward, of every
    output before backward, and compares after each; then runs backward a second time on
    the same graph, which must give the same gradients (a backward that modifies what it
    saved does not); then writes into each input and output after forward
    (:func:`_require_writes_after_forward_seen`)."""
    leaves = ctx.leaves()
    grad_pos = set(ctx.grad_idx)
    watched = [(ctx.input_name(k), x, _snapshot(x)) for k, x in enumerate(leaves)]
    others = [
        (f"input {i}", a, _snapshot(a))
        for i, a in enumerate(ctx.args)
        if isinstance(a, torch.Tensor) and i not in grad_pos
    ]
    watched += others
    state_names = frozenset(what for what, a, _ in watched if a.is_floating_point())
    # inputs declared with mark_dirty are given as copies by ctx.call (see checks.forward)
    outs = [o for o in float_tensors(ctx.call(ctx.fn, leaves)) if o.requires_grad]
    _check_unchanged(watched, "forward", state_names)
    if not outs:
        return Passed("forward leaves its inputs intact (no output requires grad)")
    watched += [(f"output {o}", t, _snapshot(t)) for o, t in enumerate(outs)]
    vs = ctx.randn_like_outputs(outs)
    first = _grads(outs, leaves, vs)
    _check_unchanged(watched, "backward")
    second = _grads(outs, leaves, vs)
    _check_unchanged(watched, "a second backward")
    tolerance = ctx.parity_tolerances()
    worst = (0.0, 0.0)
    for k, (a, b) in enumerate(zip(second, first)):
        problem = (
            f"a second backward through the same graph gives another gradient of "
            f"{ctx.input_name(k)}"
        )
        note = " (backward modifies a tensor it saved, or keeps state between calls)"
        worst = max(worst, require_close(a, b, tolerance, problem, note=note))
    worst = max(worst, _require_writes_after_forward_seen(ctx))
    return Passed(
        "inputs and outputs intact; backward repeatable; writes after forward seen", *worst
    )
