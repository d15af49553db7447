"""Comparing tensors: dtype-aware tolerances, error figures and the worst mismatch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from torchbp.verify.checks.outcomes import CheckFailure

__all__ = [
    "dense",
    "dense_gradients",
    "difference",
    "leaves",
    "exact_tensors",
    "float_tensors",
    "input_grads",
    "max_errors",
    "mismatch",
    "require_close",
    "same_values",
    "shape_text",
    "tolerances",
    "unravel",
    "zeros_for_none",
]


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """Return ``(atol, rtol)`` used to compare two computations of the same op in ``dtype``.

    Args:
        dtype: the floating dtype of the tensors compared.

    Returns:
        ``(atol, rtol)``; a value ``a`` matches the expected ``b`` when
        ``|a - b| <= atol + rtol * |b|``.

    Examples:
        >>> tolerances(torch.float32)
        (1e-05, 1e-05)
    """
    return {
        torch.float64: (1e-7, 1e-7),
        torch.float32: (1e-5, 1e-5),
        torch.float16: (1e-3, 1e-3),
        torch.bfloat16: (1e-2, 1.6e-2),
    }.get(dtype, (1e-5, 1e-5))


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its values in a strided tensor: a sparse one (an input such as the sparse
    matrix of a sparse-dense product) made dense, so that it can be compared elementwise."""
    return t if t.layout == torch.strided else t.to_dense()


def input_grads(
    outputs: Any, inputs: Sequence[torch.Tensor], grad_outputs: Any = None, **options: Any
) -> tuple[torch.Tensor | None, ...]:
    """:func:`torch.autograd.grad` of ``outputs`` for ``inputs`` (``options`` passed on),
    each gradient :func:`dense`: a Function may return a sparse gradient for a dense input
    (``nn.Embedding(sparse=True)`` style), which the checks compare elementwise like any
    other (``to_dense`` is differentiable, so ``create_graph=True`` still holds)."""
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, **options)
    return tuple(None if g is None else dense(g) for g in grads)


class _DenseGradient(torch.autograd.Function):
    """The identity, whose backward passes the gradient on :func:`dense`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return dense(grad)


def dense_gradients(fn: Any) -> Any:
    """``fn`` of tensors, whose inputs receive their gradients :func:`dense`: a sparse
    gradient of a dense input is made dense before it reaches the caller's tensor (for
    torch's own tests, which read the gradients elementwise)."""

    def wrapped(*xs: torch.Tensor) -> Any:
        return fn(*[_DenseGradient.apply(x) for x in xs])

    return wrapped


def leaves(out: Any) -> list[Any]:
    """The leaves of ``out``: ``out`` itself, or, through nested tuples (named ones too),
    lists and dict values, what they hold, in order.

    Examples:
        >>> leaves((1, [2, {"a": 3}]))
        [1, 2, 3]
    """
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in leaves(item)]
    if isinstance(out, dict):
        return [leaf for item in out.values() for leaf in leaves(item)]
    return [out]


def float_tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors in ``out`` (a tensor or any nested structure of them),
    a sparse one made dense and a complex one as its real view ``(..., 2)`` (both
    differentiably: ``to_dense`` and ``view_as_real`` pass the gradient on)."""
    return [
        _real_dense(t)
        for t in leaves(out)
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
    ]


def _real_dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` dense, and a complex ``t`` as its real view."""
    t = dense(t)
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def zeros_for_none(
    grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``grads`` with each None (``allow_unused``: the outputs do not depend on that input)
    replaced by zeros shaped like the matching tensor of ``like``: the gradient it stands
    for, ready to compare."""
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def exact_tensors(out: Any) -> list[torch.Tensor]:
    """The integer and boolean tensors in ``out`` (indices, counts, masks): compared exactly."""
    return [
        t
        for t in leaves(out)
        if isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex()
    ]


def shape_text(t: torch.Tensor | torch.Size | Sequence[int]) -> str:
    """A shape written as a Python tuple, e.g. ``(3,)`` or ``(2, 4)``.

    Examples:
        >>> shape_text((3,)), shape_text(torch.zeros(2, 4))
        ('(3,)', '(2, 4)')
    """
    dims = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def difference(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``|actual - expected|`` elementwise, NaN-aware: 0 where both are NaN or the same
    infinity, infinite where only one is NaN (``NaN > tol`` is False: a plain difference
    would let a NaN on one side only pass any tolerance).

    Examples:
        >>> nan, inf = math.nan, math.inf
        >>> difference(torch.tensor([nan, nan, inf, 1.0]), torch.tensor([nan, 1.0, inf, 3.0]))
        tensor([0., inf, 0., 2.])
    """
    same = (actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
    gap = (actual - expected).abs().masked_fill(same, 0.0)
    return gap.masked_fill(torch.isnan(gap), math.inf)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (strided) hold the same values in the same shape and dtype,
    NaN where the other has NaN (``torch.equal`` calls two NaN different).

    Examples:
        >>> same_values(torch.tensor([math.nan, 1.0]), torch.tensor([math.nan, 1.0]))
        True
    """
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.layout != torch.strided or b.layout != torch.strided:
        return False
    return bool(torch.equal(a, b) or torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


def max_errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Max abs error and error relative to the expected tensor's largest magnitude."""
    if actual.numel() == 0:
        return 0.0, 0.0
    a = actual.detach().to(torch.float64)
    b = expected.detach().to(torch.float64)
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & (a == b)
    diff = (a - b).abs().masked_fill(both_nan | same_inf, 0.0)
    abs_err = float(diff.max())
    finite_b = b.abs().masked_fill(~torch.isfinite(b), 0.0)
    scale = float(finite_b.max())
    rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else math.inf)
    return abs_err, rel_err


def unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The multi-dimensional index of position ``flat`` in a row-major tensor of ``shape``.

    Examples:
        >>> unravel(5, (2, 3))
        (1, 2)
    """
    out = []
    for size in reversed(tuple(shape)):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def mismatch(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float
) -> tuple[float, float, tuple[int, ...]] | None:
    """Return None if close, else (abs_err, rel_err, index_of_worst) (NaNs must match)."""
    a = actual.detach().to(torch.float64)
    b = expected.detach().to(torch.float64)
    if a.numel() == 0:
        return None
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    inf_ok = torch.isinf(a) & (a == b)
    excess = (a - b).abs() - (atol + rtol * b.abs())
    excess = excess.masked_fill(inf_ok | (nan_a & nan_b), -1.0)
    excess = excess.masked_fill(nan_a ^ nan_b, math.inf)
    if float(excess.max()) <= 0:
        return None
    flat = int(excess.reshape(-1).argmax())
    index = unravel(flat, a.shape)
    abs_err, rel_err = max_errors(a, b)
    if bool((nan_a ^ nan_b).any()):
        abs_err = rel_err = math.nan
    return abs_err, rel_err, index


def require_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tolerance: tuple[float, float],
    problem: str,
    *,
    note: str = "",
    show_index: bool = False,
) -> tuple[float, float]:
    """``(max abs, max rel)`` error of ``actual`` against ``expected``, or a failed check.

    Args:
        actual: the values under test.
        expected: the values they must match.
        tolerance: ``(atol, rtol)``.
        problem: what went wrong, e.g. ``"vmap output 0 differs from a Python loop"``.
        note: appended to the message, e.g. a likely cause in parentheses.
        show_index: name the index of the worst mismatch in the message.

    Raises:
        CheckFailure: ``"<problem>: shape <actual's> instead of <expected's><note>"`` when
            the shapes differ (never broadcast), else ``"<problem>: max abs error <err>[ at
            index <i>]<note>"`` when some value is out of tolerance (NaNs must match).
    """
    if actual.shape != expected.shape:
        shapes = f"shape {shape_text(actual)} instead of {shape_text(expected)}"
        raise CheckFailure(f"{problem}: {shapes}{note}")
    bad = mismatch(actual, expected, *tolerance)
    if bad:
        where = f" at index {bad[2]}" if show_index else ""
        raise CheckFailure(f"{problem}: max abs error {bad[0]:.1e}{where}{note}", bad[0], bad[1])
    return max_errors(actual, expected)
