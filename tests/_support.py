"""Helpers shared by the tests: devices, dtype tolerances, seeded inputs, and the op tables
derived from the registry (:mod:`torchbp.ops`)."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import torchbp.functional as TF
from torchbp.ops import OPS, Op, of_kind

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The native twin of every torchbp.functional op, by the same name (those this torch has),
# extra functionals included (``softmin``: ``F.softmin``).
NATIVE = SimpleNamespace(
    **{op.name: op.torch_functional for op in OPS.values() if op.torch_functional is not None},
    **{ours.__name__: native for op in OPS.values() for ours, native in op.extra_functionals},
)


@dataclass
class Variant:
    """A registry op called with one keyword set (one of ``op.variants``, or an extra one),
    through its functional ``name``: ``op.name``, or one of ``op.extra_functionals``
    (``softmin``, which runs softmax's Function).

    ``str()`` is its test id: the functional's name, followed by the keywords where there
    are any, e.g. ``leaky_relu(negative_slope=0.2)``.
    """

    op: Op
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.op.name
        if self.name not in {f.__name__ for f in self.op.functionals()}:
            raise ValueError(f"{self.name!r} is not a functional of the op {self.op.name!r}")

    def __str__(self) -> str:
        return call_id(self.name, self.kwargs)

    def call(self, ns, *args, **kwargs):
        """``ns.<name>(*args, **self.kwargs, **kwargs)``, ``ns`` torchbp.functional or
        NATIVE."""
        return getattr(ns, self.name)(*args, **self.kwargs, **kwargs)

    def ours(self, *args, **kwargs):
        return self.call(TF, *args, **kwargs)

    def native(self, *args, **kwargs):
        return self.call(NATIVE, *args, **kwargs)

    def modules(self):
        """``(torchbp module, torch.nn module)`` constructors with these keywords: the op's
        own pair, or for an extra functional the pair of ``op.extra_modules`` whose native
        class is named alike (``softmin``: ``Softmin``)."""
        if self.name == self.op.name:
            ours, native = self.op.module, self.op.torch_module
        else:
            ours, native = next(
                pair for pair in self.op.extra_modules if pair[1].__name__.lower() == self.name
            )
        bind = functools.partial
        return bind(ours, **self.kwargs), bind(native, **self.kwargs)

    @property
    def args(self) -> dict[str, Any]:
        """The functional's keyword parameters after the input, ``inplace`` aside: their
        defaults, overridden by ``kwargs``. For an activation these are, in order, the extra
        arguments of its derivative formula (``tests/test_ops.py`` checks the count)."""
        params = list(inspect.signature(self.op.functional).parameters.values())[1:]
        return {p.name: self.kwargs.get(p.name, p.default) for p in params if p.name != "inplace"}

    @property
    def saves(self) -> str:
        """What backward keeps with these keywords (``op.saves_for``)."""
        return self.op.saves_for(self.kwargs)


def call_id(name: str, kwargs: dict[str, Any]) -> str:
    """A readable test id of a call: ``name``, or ``name(key=value, ...)``."""
    if not kwargs:
        return name
    return f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"


def variants(*kinds: str) -> list[Variant]:
    """Every registry op of ``kinds`` with each of its ``op.variants``, through its own
    functional and then each of its ``op.extra_functionals`` (softmax's ``softmin``), in
    registry order."""
    return [
        Variant(op, dict(kwargs), name)
        for op in of_kind(*kinds)
        for name in (op.name, *(ours.__name__ for ours, _ in op.extra_functionals))
        for kwargs in op.variants
    ]


# Every element-wise activation with each of its variants.
ACTIVATIONS = variants("activation")
# The ops of one tensor: the activations and softmax / softmin / log_softmax, with their
# variants.
UNARY = variants("activation", "softmax")
# Each activation variant's modules: id -> (torchbp's constructor, its torch.nn twin's).
ACTIVATION_MODULES = {str(v): v.modules() for v in ACTIVATIONS}


def takes_inplace(op: Op) -> bool:
    """Whether the activation has an ``inplace`` argument."""
    return "inplace" in inspect.signature(op.functional).parameters


def build_module(cls: type[torch.nn.Module]) -> torch.nn.Module:
    """An instance of a registry module class (torchbp's or its torch.nn twin): with the
    keywords of its op's last variant (a non-default one where there is one), and size 3
    for each required argument (Linear's features)."""
    op = next(op for op in OPS.values() if cls in (op.module, op.torch_module))
    params = inspect.signature(cls).parameters.values()
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return cls(**{p.name: 3 for p in required}, **op.variants[-1])


def saved_and_args(variant: Variant, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """``(saved, args)``: what ``variant``'s Function hands its derivative formula for the
    input ``x`` -- the tensor its backward keeps (read off the graph) and the formula's extra
    arguments (``variant.args``)."""
    y = variant.ours(x.detach().requires_grad_())
    (saved,) = y.grad_fn.saved_tensors
    return saved.detach(), tuple(variant.args.values())


def piecewise_linear(variant: Variant) -> bool:
    """Whether the activation is piecewise linear: its derivative takes only a few values
    (so ``g · f'`` is ``g`` times one of a few constants, which a kernel can match bit for
    bit)."""
    x = torch.linspace(-4, 4, 801, dtype=torch.float64)
    saved, args = saved_and_args(variant, x)
    slopes = variant.op.formula(torch.ones_like(saved), saved, *args)
    return slopes.unique().numel() <= 3


# CPU always; CUDA where a GPU exists (marked, so `pytest -m cuda` selects the GPU runs).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]

# Tolerances for comparing with native torch, per dtype: float64 agrees to rounding,
# bfloat16 results may differ by a couple of roundings (8 significant bits).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=4e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=1e-2),
}


def make(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    """A reproducible random tensor."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def grads(fn, *inputs, grad_output=None):
    """(output, [grad of each input]) of ``fn(*inputs)`` with a random or given grad_output."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    if grad_output is None:
        grad_output = make(out.shape, out.dtype, out.device, seed=99)
    out.backward(grad_output)
    return out.detach(), [t.grad for t in leaves]


def run_on_another_thread(work: Callable[[], object]) -> None:
    """Run ``work`` on a new thread and wait for it; its exception, if any, is raised again
    on the calling thread (as CUDA's autograd engine runs a backward on a device thread)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - raised again on the caller's thread
            errors.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
