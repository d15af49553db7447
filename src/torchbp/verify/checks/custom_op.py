"""``torch.library.custom_op`` support: recognising a custom op, its name, the ``opcheck``
check (``torch.library.opcheck``: schema, autograd registration, fake tensor, AOT dispatch)
and the capabilities PyTorch does not give custom ops (forward-mode AD, torch.func).

gradcheck calls the op eagerly, with real tensors: a schema that hides a mutation or an
alias, a missing or wrong fake (meta) implementation, or an autograd formula registered so
that tracing misses it shows only under ``opcheck``."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.explain import capability_gap, first_line
from torchbp.verify.checks.outcomes import CheckFailure, CheckSkip, CheckUnsupported, Passed

__all__ = [
    "as_custom_op",
    "check_opcheck",
    "custom_op_name",
    "custom_ops_reached",
    "no_forward_ad",
    "no_torch_func",
    "without_custom_ops",
]

#: What ``torch.library.opcheck`` runs, in order.
OPCHECK_TESTS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


def as_custom_op(fn: Any) -> Any | None:
    """``fn`` when it is a custom operator (what ``torch.library.custom_op`` returns, or an
    ``OpOverload`` / ``OpOverloadPacket`` such as ``torch.ops.mylib.op``) or a
    ``functools.partial`` of one (the way to give it a keyword-only argument), else None.

    Examples:
        >>> as_custom_op(torch.tanh) is None
        True
    """
    if isinstance(fn, functools.partial):
        return fn if as_custom_op(fn.func) is not None else None
    if isinstance(fn, torch.library.CustomOpDef | torch.library.OpOverload):
        return fn
    if isinstance(getattr(fn, "default", None), torch.library.OpOverload):
        return fn  # an OpOverloadPacket: torch.ops.<namespace>.<name>
    return None


def custom_op_name(op: Any) -> str:
    """``"namespace::name"`` of a custom op (for the report's title)."""
    if isinstance(op, functools.partial):
        return custom_op_name(op.func)
    overload = op if isinstance(op, torch.library.OpOverload) else getattr(op, "default", None)
    if isinstance(overload, torch.library.OpOverload):
        return overload.name()
    match = re.search(r"\(([\w.]+::[\w.]+)\)", str(op))
    return match.group(1) if match else type(op).__name__


#: Namespaces of the operators PyTorch itself defines (with their derivative formulas).
_TORCH_NAMESPACES = frozenset({"aten", "prim", "prims"})


class _CustomOpRecorder(TorchFunctionMode):
    """Records the names of the custom operators (``torch.ops.<namespace>`` ops outside
    PyTorch's own namespaces) called, while it is active, on a tensor that requires grad
    (one a differentiated input flows into)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[str, None] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_custom_op(func) and _requires_grad(*args, *kwargs.values()):
            self.names[custom_op_name(as_custom_op(func))] = None
        return func(*args, **kwargs)


def _requires_grad(*values: Any) -> bool:
    """Whether one of ``values`` (or of the lists and tuples among them) is a tensor that
    requires grad."""
    for value in values:
        if isinstance(value, list | tuple) and _requires_grad(*value):
            return True
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return True
    return False


def custom_ops_reached(fn: Any, inputs: Sequence[torch.Tensor]) -> list[str]:
    """``"namespace::name"`` of each custom operator ``fn(*inputs)`` calls on a tensor
    computed from ``inputs`` (differentiated: fresh copies requiring grad), in the order
    of first call: those whose zero forward-AD tangents and missing torch.func support
    are PyTorch's, not fn's. A custom op on a constant (a buffer, a mask) is not one: its
    zero tangents are right. An exception fn raises is left for the checks to report.

    Examples:
        >>> custom_ops_reached(torch.tanh, [torch.zeros(2)])
        []
    """
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    recorder = _CustomOpRecorder()
    try:
        with recorder:
            fn(*leaves)
    except Exception:  # noqa: BLE001, S110 - what fn raises, the checks report
        pass
    return list(recorder.names)


class _CustomOpDetacher(TorchFunctionMode):
    """Detaches the outputs of the custom operators called while it is active (no
    gradient and no tangent flows through them)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _is_custom_op(func):
            return out
        if isinstance(out, torch.Tensor):
            return out.detach()
        if isinstance(out, tuple | list):
            return type(out)(o.detach() if isinstance(o, torch.Tensor) else o for o in out)
        return out


def _is_custom_op(func: Any) -> bool:
    """Whether ``func`` is a custom operator outside PyTorch's own namespaces."""
    op = as_custom_op(func)
    return op is not None and custom_op_name(op).split("::")[0] not in _TORCH_NAMESPACES


def without_custom_ops(fn: Any) -> Any:
    """``fn`` with the outputs of the custom operators it calls detached: the rest of its
    derivatives, which forward and reverse mode must agree on (forward AD through a
    custom op is PyTorch's zero tangents, reverse mode its registered backward)."""

    def detached(*args: Any) -> Any:
        with _CustomOpDetacher():
            return fn(*args)

    return detached


def no_forward_ad(called: Sequence[str] = ()) -> CheckUnsupported:
    """Forward-mode AD of a custom op, or of a fn that calls the custom ops ``called``:
    PyTorch has no way to register a jvp for one (and ``torch.func.jvp`` silently returns
    zero tangents, torch 2.13)."""
    through = f" (fn calls {', '.join(called)})" if called else ""
    return CheckUnsupported(
        "forward-mode AD of a torch.library.custom_op is not available in PyTorch (jvp gives "
        f"zero tangents without an error){through}",
        "wrap the computation in an autograd.Function with a jvp staticmethod (PyTorch has "
        "no jvp registration for custom ops yet)",
    )


def no_torch_func(exc: BaseException) -> CheckUnsupported | None:
    """The unsupported outcome when torch.func (grad, vmap of grad) refused a custom op's
    registered autograd, else None."""
    gap = capability_gap(exc)
    if gap is None or "setup_context" not in gap[1]:
        return None
    return CheckUnsupported(
        "torch.func transforms (grad, jacrev, vmap of grad) cannot differentiate a "
        "torch.library.custom_op through its registered autograd (a PyTorch limitation)",
        "use an autograd.Function (forward without ctx plus setup_context) where torch.func "
        "is needed (PyTorch offers no registration for this yet)",
    )


def _bound_arguments(op: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """``(the op, the arguments, the keyword arguments)`` a ``functools.partial`` of a
    custom op binds (none for the op itself)."""
    if isinstance(op, functools.partial):
        return op.func, tuple(op.args), dict(op.keywords)
    return op, (), {}


def check_opcheck(ctx: CheckContext) -> Passed:
    """``torch.library.opcheck`` on the example inputs (the differentiable ones requiring
    grad); skipped unless fn is a custom op."""
    if ctx.custom_op is None:
        raise CheckSkip("fn is not a torch.library custom op")
    op, bound, keywords = _bound_arguments(ctx.custom_op)
    args = ctx.call(lambda *a: a, ctx.leaves())
    results = torch.library.opcheck(op, (*bound, *args), keywords, raise_exception=False)
    problems: list[str] = []
    gaps: list[tuple[str, str]] = []
    for test in OPCHECK_TESTS:
        outcome = results.get(test, "SUCCESS")
        if outcome == "SUCCESS":
            continue
        gap = capability_gap(outcome) if isinstance(outcome, BaseException) else None
        if gap is not None:
            gaps.append(gap)
        else:
            problems.append(f"{test}: {first_line(str(outcome), 200)}")
    if problems:
        raise CheckFailure(f"torch.library.opcheck failed {'; '.join(problems)}")
    if gaps:
        missing = "; ".join(dict.fromkeys(g[0] for g in gaps))
        how = "; ".join(dict.fromkeys(g[1] for g in gaps))
        raise CheckUnsupported(missing, how)
    return Passed(f"torch.library.opcheck: {', '.join(OPCHECK_TESTS)}")
