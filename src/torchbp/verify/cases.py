"""Verification cases: realistic and edge-case inputs for every op of the registry.

Each :class:`Case` names a torchbp functional op, the keyword arguments it is called with,
how to build its example inputs and which native callable it must match. The CLI
(:mod:`torchbp.verify.cli`) runs :func:`torchbp.verify.check_function` on every case, device
and dtype. The ops and their references come from :mod:`torchbp.ops`; an element-wise
activation's cases are built from its registry entry (variants, kink), other kinds have a
case builder here (an op listed in ``torchbp.functional.__all__`` without cases is
reported).

Examples:
    >>> from torchbp.verify.cases import cases_for
    >>> [c.name for c in cases_for("relu")][:2]
    ['2d', 'leading-dims']
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from torchbp import _native
from torchbp.ops import OPS as REGISTRY
from torchbp.ops import activations

__all__ = ["Case", "CASES", "OPS", "UNSUPPORTED", "cases_for", "op_names", "unregistered_ops"]

Builder = Callable[[torch.Generator], tuple[Any, ...]]

#: Capabilities an op lacks by design (documented in its Function's docstring): the CLI
#: runs these checks without requiring them (unsupported does not fail) and puts the reason
#: before an unsupported one's message.
UNSUPPORTED: dict[str, dict[str, str]] = {
    "linear_cross_entropy": {
        "gradgradcheck": "by design: gradients are computed chunk-wise, double backward raises",
    },
}

#: Checks run on low-precision dtypes (the numerical ones need float64).
LOW_PRECISION_CHECKS = ("forward", "reference")


@dataclass(frozen=True)
class Case:
    """One verification case of one op.

    Args:
        op: the torchbp.functional name, e.g. ``"cross_entropy"``.
        name: short label of the case, e.g. ``"k-dim"``.
        build: ``build(generator) -> inputs`` in float64 on CPU (integers stay integers).
        kwargs: keyword arguments passed to both the torchbp op and the native reference.
        grad_inputs: positions of inputs to differentiate (None: all floating inputs).
        checks: restrict to these checks (None: all); e.g. NaN-producing edge cases only
            compare with native.
        compile: whether the torch.compile check runs on this case (one per op by default,
            to keep the CLI fast).
        note: one line describing the case.
    """

    op: str
    name: str
    build: Builder
    kwargs: dict[str, Any] = field(default_factory=dict)
    grad_inputs: tuple[int, ...] | None = None
    checks: tuple[str, ...] | None = None
    compile: bool = False
    note: str = ""

    @property
    def unsupported(self) -> dict[str, str]:
        """Checks this op does not support by design, with the reason."""
        return UNSUPPORTED.get(self.op, {})

    @property
    def label(self) -> str:
        """``op/name``."""
        return f"{self.op}/{self.name}"

    def fn(self) -> Callable[..., Any]:
        """The torchbp op with this case's keyword arguments bound."""
        return _Bound(self.op, _torchbp_op(self.op), self.kwargs)

    def reference(self) -> Callable[..., Any]:
        """The native op with this case's keyword arguments bound."""
        return _Bound(f"native {self.op}", OPS[self.op], self.kwargs)

    def inputs(self, seed: int = 0) -> tuple[Any, ...]:
        """Build the example inputs (float64 / int64 on CPU)."""
        return self.build(torch.Generator().manual_seed(seed))


class _Bound:
    """A callable with bound keyword arguments and a readable name (unlike a lambda)."""

    def __init__(self, name: str, fn: Callable[..., Any], kwargs: dict[str, Any]):
        self.fn, self.kwargs = fn, dict(kwargs)
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        self.__name__ = self.__qualname__ = f"{name}({args})" if args else name

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args, **self.kwargs)

    def __repr__(self) -> str:
        return self.__name__


def _torchbp_op(op: str) -> Callable[..., Any]:
    import torchbp.functional as F

    return getattr(F, op)


def _native_linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, **kwargs):
    """Reference for the fused op: materialise the logits, then cross_entropy."""
    kwargs.pop("chunk_size", None)
    logits = _native.linear(input, linear_weight, linear_bias)
    return _native.cross_entropy(logits, target, **kwargs)


def _reference(op) -> Callable[..., Any]:
    """The native reference of a registered op (the fused loss: its unfused pair)."""
    if op.kind == "fused_loss":
        return _native_linear_cross_entropy
    return op.torch_functional


#: torchbp.functional name -> native reference callable: each registered op's, then those
#: of its extra functionals (softmax's softmin), named alike.
OPS: dict[str, Callable[..., Any]] = {name: _reference(op) for name, op in REGISTRY.items()} | {
    ours.__name__: native for op in REGISTRY.values() for ours, native in op.extra_functionals
}


# ---------------------------------------------------------------------------------------------
# input builders (float64 on CPU; the runner casts and moves them)
# ---------------------------------------------------------------------------------------------


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _away_from_kink(x: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Shift values away from 0 so finite differences never straddle the ReLU kink."""
    return x + margin * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _targets(g: torch.Generator, classes: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, classes, shape, generator=g)


def _probs(g: torch.Generator, *shape: int, dim: int = 1) -> torch.Tensor:
    return torch.softmax(_randn(g, *shape), dim=dim)


def _elementwise(shape: tuple[int, ...], kink: bool = False, transpose=False, scale=1.0):
    def build(g: torch.Generator):
        x = _randn(g, *shape, scale=scale)
        if kink:
            x = _away_from_kink(x)
        if transpose:
            x = x.t()
        return (x,)

    return build


def _activation_cases(op: str, kink: bool, **kwargs: Any) -> list[Case]:
    label = "-".join(f"{k}={v}" for k, v in kwargs.items())

    def name(base: str) -> str:
        return f"{base}[{label}]" if label else base

    cases = [
        Case(op, name("2d"), _elementwise((3, 4), kink), kwargs, compile=True),
        Case(op, name("leading-dims"), _elementwise((2, 2, 3), kink), kwargs),
        Case(op, name("non-contiguous"), _elementwise((4, 3), kink, transpose=True), kwargs),
        Case(op, name("0-dim"), _elementwise((), kink), kwargs),
        Case(op, name("empty"), _elementwise((0, 3), kink), kwargs),
        Case(
            op,
            name("large-magnitude"),
            _elementwise((4, 5), scale=30.0),
            kwargs,
            checks=("forward", "reference"),
            note="|x| up to ~100: no overflow, same saturation as native",
        ),
    ]
    if kink:
        cases.append(
            Case(
                op,
                name("at-kink"),
                lambda g: (
                    torch.tensor([[-1.0, 0.0, 1.0], [0.0, -0.0, 2.0]], dtype=torch.float64),
                ),
                kwargs,
                checks=("forward", "reference"),
                note="exact zeros: value and subgradient must equal native",
            )
        )
    return cases


def _linear_cases() -> list[Case]:
    def build(x_shape, bias=True, transpose=False):
        def b(g):
            x = _randn(g, *x_shape)
            if transpose:
                x = x.t()
            w = _randn(g, 4, x.shape[-1])
            return (x, w, _randn(g, 4)) if bias else (x, w)

        return b

    return [
        Case("linear", "2d", build((3, 3)), compile=True),
        Case("linear", "leading-dims", build((2, 3, 3))),
        Case("linear", "no-bias", build((3, 3), bias=False)),
        Case("linear", "non-contiguous", build((3, 2), transpose=True), note="x transposed"),
        Case("linear", "1d-input", build((3,))),
        Case("linear", "empty-batch", build((0, 3))),
    ]


def _softmax_cases(op: str) -> list[Case]:
    def build(shape, scale=1.0):
        return lambda g: (_randn(g, *shape, scale=scale),)

    return [
        Case(op, "dim=-1", build((3, 5)), {"dim": -1}, compile=True),
        Case(op, "dim=0", build((4, 3)), {"dim": 0}),
        Case(op, "3d-dim=1", build((2, 3, 2)), {"dim": 1}),
        Case(op, "0-dim", build(()), {"dim": 0}),
        Case(op, "empty", build((0, 4)), {"dim": -1}),
        Case(
            op,
            "large-logits",
            build((3, 6), scale=50.0),
            {"dim": -1},
            checks=("forward", "reference"),
            note="logits up to ~150: log-sum-exp must not overflow",
        ),
    ]


def _loss_inputs(n: int, c: int, *extra: int, probs=False, ignore=None, log=True, scale=1.0):
    def build(g: torch.Generator):
        x = _randn(g, n, c, *extra, scale=scale)
        if log:
            x = torch.log_softmax(x, dim=1 if x.dim() > 1 else 0)
        if probs:
            return (x, _probs(g, n, c, *extra))
        t = _targets(g, c, n, *extra)
        if ignore is not None and t.numel():
            t.view(-1)[::2] = ignore
        return (x, t)

    return build


def _class_weight(c: int) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, c, dtype=torch.float64)


def _with_weight(build: Builder, c: int) -> Builder:
    """Pass class weights positionally (they must be cast/moved like the other inputs)."""

    def b(g: torch.Generator):
        return (*build(g), _class_weight(c))

    return b


def _class_index_loss_cases(op: str, inputs: Callable[..., Builder]) -> list[Case]:
    """The cases ``nll_loss`` and ``cross_entropy`` share; ``inputs(n, c, *extra, ...)``
    builds ``(input, target)`` (log-probabilities or logits)."""

    def all_ignored(g):
        x, t = inputs(3, 4)(g)
        return x, torch.full_like(t, -100)

    return [
        Case(op, "mean", inputs(4, 5), grad_inputs=(0,), compile=True),
        Case(op, "sum", inputs(4, 5), {"reduction": "sum"}, grad_inputs=(0,)),
        Case(op, "none", inputs(4, 5), {"reduction": "none"}, grad_inputs=(0,)),
        Case(op, "weight", _with_weight(inputs(4, 5), 5), grad_inputs=(0,)),
        Case(op, "ignore_index", inputs(4, 5, ignore=2), {"ignore_index": 2}, grad_inputs=(0,)),
        Case(op, "k-dim", inputs(2, 3, 2, 2), grad_inputs=(0,), note="(N, C, d1, d2)"),
        Case(
            op,
            "all-ignored",
            all_ignored,
            grad_inputs=(0,),
            checks=("forward", "reference"),
            note="mean over zero targets: nan, zero grads",
        ),
        Case(op, "empty-batch", inputs(0, 4), grad_inputs=(0,), checks=("forward", "reference")),
    ]


def _nll_cases() -> list[Case]:
    op = "nll_loss"
    return _class_index_loss_cases(op, _loss_inputs) + [
        Case(
            op,
            "k-dim-weight-none",
            _with_weight(_loss_inputs(2, 3, 2), 3),
            {"reduction": "none"},
            grad_inputs=(0,),
        ),
        Case(
            op,
            "unbatched",
            lambda g: (torch.log_softmax(_randn(g, 5), 0), torch.tensor(3)),
            {},
            (0,),
        ),
    ]


def _ce_cases(op: str = "cross_entropy") -> list[Case]:
    raw = functools.partial(_loss_inputs, log=False)
    return _class_index_loss_cases(op, raw) + [
        Case(op, "label_smoothing", raw(4, 5), {"label_smoothing": 0.1}, grad_inputs=(0,)),
        Case(
            op,
            "smoothing+weight+ignore",
            _with_weight(raw(4, 5, ignore=-100), 5),
            {"label_smoothing": 0.2},
            grad_inputs=(0,),
        ),
        Case(op, "prob-targets", raw(4, 5, probs=True), grad_inputs=(0,)),
        Case(
            op,
            "prob-targets+smoothing+weight",
            _with_weight(raw(3, 4, probs=True), 4),
            {"label_smoothing": 0.1, "reduction": "sum"},
            grad_inputs=(0,),
        ),
        Case(op, "k-dim-probs", raw(2, 3, 2, probs=True), {"reduction": "none"}, (0,)),
        Case(op, "unbatched", lambda g: (_randn(g, 5), torch.tensor(1)), {}, (0,)),
        Case(
            op,
            "confident-logits",
            raw(4, 6, scale=20.0),
            grad_inputs=(0,),
            checks=("forward", "reference"),
            note="softmax(z)_y - 1 must keep precision in low dtypes",
        ),
    ]


def _lce_cases() -> list[Case]:
    op = "linear_cross_entropy"

    def build(n, d, c, ignore=None):
        def b(g):
            x, w = _randn(g, n, d), _randn(g, c, d)
            t = _targets(g, c, n)
            if ignore is not None:
                t[::2] = ignore
            return (x, w, t)

        return b

    return [
        Case(op, "mean", build(4, 3, 5), grad_inputs=(0, 1), compile=True),
        Case(op, "sum", build(4, 3, 5), {"reduction": "sum"}, grad_inputs=(0, 1)),
        Case(op, "none", build(4, 3, 5), {"reduction": "none"}, grad_inputs=(0, 1)),
        Case(op, "ignore_index", build(4, 3, 5, ignore=-100), grad_inputs=(0, 1)),
        Case(op, "label_smoothing", build(4, 3, 5), {"label_smoothing": 0.1}, grad_inputs=(0, 1)),
        Case(op, "chunked", build(5, 3, 4), {"chunk_size": 2}, grad_inputs=(0, 1)),
    ]


def _all_activation_cases() -> list[Case]:
    """Every case for each activation's default variant; for the other variants (other
    slopes, the tanh GELU) the 2-D case and the edge cases (large values, the kink)."""
    cases: list[Case] = []
    for op in activations():
        default, *others = op.variants
        kink = op.kink is not None
        cases += _activation_cases(op.name, kink, **default)
        for variant in others:
            more = _activation_cases(op.name, kink, **variant)
            cases += [c for c in more if c.name.startswith(("2d", "large", "at-kink"))]
    return cases


def _all_cases() -> list[Case]:
    cases: list[Case] = []
    cases += _linear_cases()
    cases += _all_activation_cases()
    cases += _softmax_cases("softmax")
    cases += _softmax_cases("softmin")
    cases += _softmax_cases("log_softmax")
    cases += _nll_cases()
    cases += _ce_cases()
    cases += _lce_cases()
    return cases


#: Every registered case.
CASES: tuple[Case, ...] = tuple(_all_cases())


def op_names(available_only: bool = True) -> list[str]:
    """Ops with registered cases, in registry order.

    Args:
        available_only: keep only ops that exist in the installed ``torchbp.functional``.

    Returns:
        The op names.
    """
    import torchbp.functional as F

    names = list(dict.fromkeys(c.op for c in CASES))
    return [n for n in names if not available_only or hasattr(F, n)]


def unregistered_ops() -> list[str]:
    """Public ``torchbp.functional`` ops that have no verification case yet (an in-place
    wrapper such as ``relu_`` is its op called with ``inplace=True``: its op's cases
    cover it)."""
    import torchbp.functional as F

    public = getattr(F, "__all__", [])
    registered = set(op_names(available_only=False))
    in_place = {op.in_place.__name__ for op in REGISTRY.values() if op.in_place is not None}
    return [n for n in public if n not in registered | in_place]


def cases_for(op: str) -> list[Case]:
    """All cases of one op.

    Args:
        op: a torchbp.functional name.

    Returns:
        Its cases (empty if none are registered).
    """
    return [c for c in CASES if c.op == op]
