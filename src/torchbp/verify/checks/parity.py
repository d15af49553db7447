"""Checks that fn equals another computation of it on the same inputs and grad_outputs:
``compile`` (torch.compile of fn) and ``reference`` (the reference callable)."""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchbp.verify.checks.compare import float_tensors, require_close, shape_text
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.explain import explain_error
from torchbp.verify.checks.outcomes import CheckFailure, CheckSkip, Passed

__all__ = ["check_compile", "check_reference"]


def _compare(
    ctx: CheckContext, a: torch.Tensor, b: torch.Tensor, what: str, label: str
) -> tuple[float, float]:
    """``(max abs, max rel)`` error of ``a`` against ``b``; a failed check naming
    ``what`` when the shapes differ or the values are out of tolerance."""
    if a.shape != b.shape:
        raise CheckFailure(f"{what} has shape {shape_text(a)} but {label} gives {shape_text(b)}")
    tolerance = ctx.parity_tolerances(b.dtype)
    return require_close(a, b, tolerance, f"{what} differs from {label}", show_index=True)


def _grads(
    outs: Sequence[torch.Tensor], leaves: list[torch.Tensor], vs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Gradients of ``outs`` (weighted by ``vs``) for every leaf; zeros where unused."""
    live = [(o, v) for o, v in zip(outs, vs) if o.requires_grad]
    if not live:
        return [torch.zeros_like(x) for x in leaves]
    gs = torch.autograd.grad([o for o, _ in live], leaves, [v for _, v in live], allow_unused=True)
    return [torch.zeros_like(x) if gi is None else gi for gi, x in zip(gs, leaves)]


def _compare_runs(ctx: CheckContext, other: Callable[..., Any], label: str) -> tuple[float, float]:
    """Run fn and ``other`` on the same inputs and grad_outputs; compare everything."""
    leaves_a, leaves_b = ctx.leaves(), ctx.leaves()
    outs_a = list(ctx.diff_fn(*leaves_a))
    try:
        outs_b = float_tensors(ctx.call(other, leaves_b))
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(f"{label} raised {explain_error(exc)}") from None
    if len(outs_a) != len(outs_b):
        raise CheckFailure(
            f"fn returned {len(outs_a)} floating-point output(s) but {label} returned {len(outs_b)}"
        )
    worst = (0.0, 0.0)
    for o, (a, b) in enumerate(zip(outs_a, outs_b)):
        if a.shape == b.shape and a.dtype != b.dtype:
            raise CheckFailure(f"output {o} has dtype {a.dtype} but {label} gives {b.dtype}")
        worst = max(worst, _compare(ctx, a, b, f"output {o}", label))
    pairs = [
        (a, b, ctx.randn(a.shape, a.dtype))
        for a, b in zip(outs_a, outs_b)
        if a.requires_grad or b.requires_grad
    ]
    if not pairs:
        return worst
    ga = _grads([p[0] for p in pairs], leaves_a, [p[2] for p in pairs])
    gb = _grads([p[1] for p in pairs], leaves_b, [p[2] for p in pairs])
    for k, (a, b) in enumerate(zip(ga, gb)):
        worst = max(worst, _compare(ctx, a, b, f"gradient of {ctx.input_name(k)}", label))
    return worst


def _fresh_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of a Python function with its own code object (so Dynamo's cache starts empty)."""
    code = fn.__code__.replace(co_name=fn.__code__.co_name)
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def check_compile(ctx: CheckContext) -> Passed:
    """fn compiled afresh with the chosen backend against eager fn (outputs and gradients)."""
    backend = ctx.options.compile_backend
    fullgraph = bool(ctx.options.compile_fullgraph)
    fn = ctx.fn

    def compiled_target(*a):
        return fn(*a)

    target = _fresh_code(compiled_target)
    try:
        compiled = torch.compile(target, backend=backend, fullgraph=fullgraph, dynamic=False)
    except Exception as exc:  # noqa: BLE001
        msg = f"torch.compile(backend={backend!r}) failed: {explain_error(exc)}"
        raise CheckFailure(msg) from None
    label = f"torch.compile(backend={backend!r}{', fullgraph=True' if fullgraph else ''})"
    try:
        abs_err, rel_err = _compare_runs(ctx, compiled, label)
    except CheckFailure as fail:
        if fail.message.startswith(f"{label} raised"):
            fail.message = fail.message.replace(" raised ", " failed: ", 1)
        raise
    return Passed(f"backend={backend}", abs_err, rel_err)


def check_reference(ctx: CheckContext) -> Passed:
    """fn against the reference (outputs and gradients); skipped without a reference."""
    if ctx.reference is None:
        raise CheckSkip("no reference given")
    abs_err, rel_err = _compare_runs(ctx, ctx.reference, "the reference")
    return Passed("outputs and gradients match", abs_err, rel_err)
