"""PyTorch's own OpInfo / ModuleInfo samples of the ops torchbp covers, run through torchbp and
native side by side: forward, backward, double backward, forward-mode AD and vmap must agree.

The samples come from ``torch.testing._internal`` (``op_db`` and ``module_db``, the tables
PyTorch tests its own ops with; ``expecttest`` must be installed). Each sample is checked in
float64 with every derivative, and in float32 for the forward and first-order backward.

:data:`SKIPPED_VARIANTS` and :data:`EXCLUSIONS` list, each with its reason, every class of
sample (or check of one) left out.

This file runs as a script (``python tests/opinfo_conformance.py``: the count per op and
source, exit status 1 if any check failed), which is how the suite runs it
(``tests/test_opinfo_conformance.py``, in a subprocess: importing ``torch.testing._internal``
freezes ``torch.backends`` flags for the rest of the process, which breaks Lightning's
``deterministic=True`` in later tests). ``pytest tests/opinfo_conformance.py`` runs the same
checks as one test per source and dtype.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

import torchbp.functional as TF
import torchbp.nn as bpnn

common_methods_invocations = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations",
    reason="needs torch.testing._internal (and expecttest)",
)
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

# native's linear_cross_entropy warns on every chunked-variant sample its chunked path cannot
# serve (K-dim weight, smoothing, probability targets) and takes its reference path: expected
warnings.filterwarnings("ignore", r"linear_cross_entropy: ``options`` ignored", UserWarning)

# op_db name -> torchbp.functional twin (every variant of that name)
FUNCTIONAL_TWINS: dict[str, Callable] = {
    "nn.functional.linear": TF.linear,
    "sigmoid": TF.sigmoid,
    "tanh": TF.tanh,
    "nn.functional.relu": TF.relu,
    "nn.functional.leaky_relu": TF.leaky_relu,
    "nn.functional.gelu": TF.gelu,
    "nn.functional.silu": TF.silu,
    "nn.functional.elu": TF.elu,
    "nn.functional.softplus": TF.softplus,
    "softmax": TF.softmax,
    "nn.functional.softmin": TF.softmin,
    "log_softmax": TF.log_softmax,
    "nn.functional.nll_loss": TF.nll_loss,
    "nn.functional.cross_entropy": TF.cross_entropy,
    "nn.functional.linear_cross_entropy": TF.linear_cross_entropy,
}

# module_db class -> torchbp.nn twin
MODULE_TWINS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.Linear: bpnn.Linear,
    torch.nn.Sigmoid: bpnn.Sigmoid,
    torch.nn.Tanh: bpnn.Tanh,
    torch.nn.ReLU: bpnn.ReLU,
    torch.nn.LeakyReLU: bpnn.LeakyReLU,
    torch.nn.GELU: bpnn.GELU,
    torch.nn.SiLU: bpnn.SiLU,
    torch.nn.ELU: bpnn.ELU,
    torch.nn.Softplus: bpnn.Softplus,
    torch.nn.Softmax: bpnn.Softmax,
    torch.nn.Softmin: bpnn.Softmin,
    torch.nn.Softmax2d: bpnn.Softmax2d,
    torch.nn.LogSoftmax: bpnn.LogSoftmax,
    torch.nn.NLLLoss: bpnn.NLLLoss,
    torch.nn.CrossEntropyLoss: bpnn.CrossEntropyLoss,
}
if hasattr(torch.nn, "LinearCrossEntropyLoss"):  # torch >= 2.13
    MODULE_TWINS[torch.nn.LinearCrossEntropyLoss] = bpnn.LinearCrossEntropyLoss

# op_db variants left out entirely, with the reason.
SKIPPED_VARIANTS: dict[str, str] = {
    "nn.functional.silu.complex": "complex dtypes only: torchbp's Functions are real-valued "
    "(no conjugate in the derivative formulas), and torchbp does not claim complex support",
}


def _has_nan_input(case) -> bool:
    first = next((t for t in case.leaves if isinstance(t, torch.Tensor)), None)
    return first is not None and first.is_floating_point() and bool(first.isnan().any())


@dataclass(frozen=True)
class Exclusion:
    """Samples of ``sources`` for which ``applies(case)`` holds skip ``checks``, because of
    ``reason``."""

    sources: tuple[str, ...]
    checks: tuple[str, ...]
    applies: Callable[[Case], bool]
    reason: str


EXCLUSIONS: tuple[Exclusion, ...] = (
    Exclusion(
        ("nn.functional.elu", "module:ELU"),
        ("backward", "double_backward", "forward_ad", "vmap"),
        _has_nan_input,
        "native ELU's gradient at a NaN input depends on the tensor's size: its vectorised "
        "CPU loop gives NaN (tensors of 16+ elements), its scalar loop passes the incoming "
        "gradient (e.g. 9 elements); torchbp passes the incoming gradient at any size, as "
        "native ReLU does",
    ),
)


_LCE = "nn.functional.linear_cross_entropy"
_LCE_CHUNKED = (f"{_LCE}.chunked", f"{_LCE}.chunked_none")
_LCE_SOURCES = (_LCE, *_LCE_CHUNKED, "module:LinearCrossEntropyLoss")

EXCLUSIONS += (
    Exclusion(
        _LCE_SOURCES,
        ("double_backward",),
        lambda case: True,
        "torchbp's linear_cross_entropy does not support double backward (documented): "
        "it computes its gradients chunk by chunk and keeps neither the logits nor, for "
        "'mean'/'sum', the inputs (saving them would double what it saves). Its first-order "
        "gradients sit behind a node that raises a clear error when backpropagated through "
        "(as once_differentiable); autograd.grad of them w.r.t. the inputs finds no path "
        "(autograd's 'not used in the graph' error, None under allow_unused=True). Native "
        "supports it on its reference path (options=None), not on its chunked path",
    ),
)

# (source, check) pairs whose native side is native's reference path (the sample's call,
# or module, without ``options``: linear + cross_entropy, which native's documentation
# defines the op as), with the reason. Samples without options are unaffected.
NATIVE_REFERENCE_PATH: dict[tuple[str, str], str] = {
    **{
        (source, "vmap"): "native's chunked path (a custom autograd op without a vmap rule) "
        "raises under torch.func.vmap; torchbp runs its unfused pair there"
        for source in (*_LCE_CHUNKED, "module:LinearCrossEntropyLoss")
    },
    ("module:LinearCrossEntropyLoss", "forward_ad"): "native's chunked path (options set) "
    "has no forward-mode AD and returns a zero tangent; torchbp runs its unfused pair",
}


def _without_options(native: Callable, *args, **kwargs):
    kwargs.pop("options", None)
    return native(*args, **kwargs)


def _excluded(source: str, case, check: str) -> bool:
    return any(source in e.sources and check in e.checks and e.applies(case) for e in EXCLUSIONS)


CHECKS_FLOAT64 = ("forward", "backward", "double_backward", "forward_ad", "vmap")
CHECKS_FLOAT32 = ("forward", "backward")


@dataclass
class Case:
    """One sample: ``ours(*args)`` and ``native(*args)`` with the differentiable tensors of
    ``args`` (a flat list: the pytree leaves of the sample) marked."""

    name: str
    description: str
    ours: Callable
    native: Callable
    leaves: list
    spec: object
    supports_forward_ad: bool = True
    supports_gradgrad: bool = True
    # native's reference path for this sample (for :data:`NATIVE_REFERENCE_PATH`)
    reference: Callable | None = None

    def call(self, fn, leaves):
        args, kwargs = tree_unflatten(leaves, self.spec)
        return fn(*args, **kwargs)


def _floats(out) -> list[torch.Tensor]:
    flat, _ = tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _diff_positions(leaves) -> list[int]:
    return [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]


def _fresh(leaves):
    """Leaves cloned (so in-place samples run on copies), differentiable ones as new leaves."""
    out = []
    for t in leaves:
        if isinstance(t, torch.Tensor):
            c = t.detach().clone()
            out.append(c.requires_grad_(t.requires_grad))
        else:
            out.append(t)
    return out


def _close(ours, native, what):
    assert (ours is None) == (native is None) or _is_zero(ours) or _is_zero(native), (
        f"{what}: torchbp {'None' if ours is None else 'a tensor'}, native "
        f"{'None' if native is None else 'a tensor'}"
    )
    if ours is None or native is None:
        assert _is_zero(ours) and _is_zero(native), (
            f"{what}: torchbp {'None' if ours is None else 'non-zero'}, native "
            f"{'None' if native is None else 'non-zero'}"
        )
        return
    torch.testing.assert_close(ours, native, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _is_zero(t) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and not bool(t.detach().ne(0).any()))


def _cotangents(outputs, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outputs]


def _grads(case, fn, leaves, create_graph, cotangents_require_grad=False):
    """``(outputs, cotangents, inputs, first-order grads w.r.t. the differentiable leaves)``."""
    out = _floats(case.call(fn, leaves))
    outs = [o for o in out if o.requires_grad]
    cts = [c.requires_grad_(cotangents_require_grad) for c in _cotangents(outs, 0)]
    inputs = [leaves[i] for i in _diff_positions(leaves)]
    grads = torch.autograd.grad(outs, inputs, cts, allow_unused=True, create_graph=create_graph)
    return out, cts, inputs, grads


def check_forward(case: Case) -> None:
    ours = _floats(case.call(case.ours, _fresh(case.leaves)))
    native = _floats(case.call(case.native, _fresh(case.leaves)))
    assert len(ours) == len(native)
    for o, n in zip(ours, native):
        assert o.dtype == n.dtype and o.shape == n.shape, (o.dtype, o.shape, n.dtype, n.shape)
        _close(o, n, "forward")


def check_backward(case: Case) -> None:
    if not _diff_positions(case.leaves):
        return
    _, _, _, ours = _grads(case, case.ours, _fresh(case.leaves), False)
    _, _, _, native = _grads(case, case.native, _fresh(case.leaves), False)
    for o, n in zip(ours, native):
        _close(o, n, "backward")


def check_double_backward(case: Case) -> None:
    """The first-order gradients, computed with ``create_graph=True``, differentiated again:
    once with cotangents that require grad (as gradgradcheck does) and once with plain ones
    (``autograd.grad(gx.sum(), x)``), where the gradient must still be differentiable w.r.t.
    the inputs wherever native's is."""
    if not _diff_positions(case.leaves):
        return
    for cotangents_require_grad in (True, False):
        _double_backward(case, cotangents_require_grad)


def _double_backward(case: Case, cotangents_require_grad: bool) -> None:
    results = []
    for fn in (case.ours, case.native):
        leaves = _fresh(case.leaves)
        _, cts, inputs, grads = _grads(case, fn, leaves, True, cotangents_require_grad)
        results.append((cts if cotangents_require_grad else [], inputs, grads))
    (cts_o, in_o, g_o), (cts_n, in_n, g_n) = results
    for i, (go, gn) in enumerate(zip(g_o, g_n)):
        native_diff = gn is not None and gn.requires_grad
        ours_diff = go is not None and go.requires_grad
        assert ours_diff or not native_diff, (
            f"double backward: the gradient of input {i} is differentiable in native, "
            f"not in torchbp (cotangents requiring grad: {cotangents_require_grad})"
        )
    pairs = [(go, gn) for go, gn in zip(g_o, g_n) if gn is not None and gn.requires_grad]
    if not pairs:
        return
    vs = _cotangents([gn for _, gn in pairs], 1)
    second = []
    for side, (cts, inputs) in enumerate(((cts_o, in_o), (cts_n, in_n))):
        outs = [p[side] for p in pairs]
        second.append(torch.autograd.grad(outs, inputs + cts, vs, allow_unused=True))
    for o, n in zip(*second):
        _close(o, n, "double backward")


def check_forward_ad(case: Case) -> None:
    positions = _diff_positions(case.leaves)
    if not positions or not case.supports_forward_ad:
        return
    results = []
    for fn in (case.ours, case.native):
        leaves = [t.detach() if isinstance(t, torch.Tensor) else t for t in _fresh(case.leaves)]
        tangents = _cotangents([leaves[i] for i in positions], 2)

        def of_primals(*primals, fn=fn, leaves=leaves):
            full = list(leaves)
            for i, p in zip(positions, primals):
                full[i] = p
            return tuple(_floats(case.call(fn, full)))

        results.append(
            torch.func.jvp(of_primals, tuple(leaves[i] for i in positions), tuple(tangents))
        )
    (out_o, tan_o), (out_n, tan_n) = results
    for o, n in zip(out_o, out_n):
        _close(o, n, "forward AD primal")
    for o, n in zip(tan_o, tan_n):
        _close(o, n, "forward AD tangent")


def check_vmap(case: Case) -> None:
    """vmap over a batch of two copies of the first floating-point tensor (the second one
    scaled), of the forward and of the gradient of ``Σ cotangent ⊙ output``."""
    first = next(
        (
            i
            for i, t in enumerate(case.leaves)
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        ),
        None,
    )
    if first is None:
        return
    base = case.leaves[first].detach()
    batch = torch.stack([base, base * 0.5 - 0.25])
    rest = [t.detach() if isinstance(t, torch.Tensor) else t for t in case.leaves]

    def forward(fn, x):
        full = list(rest)
        full[first] = x
        return tuple(_floats(case.call(fn, full)))

    ours = torch.func.vmap(functools.partial(forward, case.ours))(batch)
    native = torch.func.vmap(functools.partial(forward, case.native))(batch)
    for o, n in zip(ours, native):
        _close(o, n, "vmap forward")
    if not case.leaves[first].requires_grad:
        return
    cts = _cotangents(native, 3)
    if not cts:
        return

    def weighted(fn, x, *ct):
        return sum((o * c).sum() for o, c in zip(forward(fn, x), ct))

    grads = []
    for fn in (case.ours, case.native):
        grad = torch.func.grad(functools.partial(weighted, fn))
        grads.append(torch.func.vmap(grad)(batch, *cts))
    _close(grads[0], grads[1], "vmap grad")


CHECK_FUNCTIONS = {
    "forward": check_forward,
    "backward": check_backward,
    "double_backward": check_double_backward,
    "forward_ad": check_forward_ad,
    "vmap": check_vmap,
}


# --------------------------------------------------------------------------- sample sources
def op_infos():
    """The op_db entries of our ops, except :data:`SKIPPED_VARIANTS`."""
    return [
        op
        for op in common_methods_invocations.op_db
        if op.name in FUNCTIONAL_TWINS and _op_id(op) not in SKIPPED_VARIANTS
    ]


def module_infos():
    return [m for m in common_modules.module_db if m.module_cls in MODULE_TWINS]


def _op_id(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def op_cases(op, dtype) -> Iterator[Case]:
    ours = FUNCTIONAL_TWINS[op.name]
    for sample in op.reference_inputs("cpu", dtype, requires_grad=True):
        leaves, spec = tree_flatten(((sample.input, *sample.args), dict(sample.kwargs)))
        yield Case(
            _op_id(op),
            repr(sample)[:300],
            ours,
            op.op,
            leaves,
            spec,
            op.supports_forward_ad,
            op.supports_gradgrad,
            functools.partial(_without_options, op.op) if "options" in sample.kwargs else None,
        )


def module_cases(info, dtype) -> Iterator[Case]:
    twin = MODULE_TWINS[info.module_cls]
    inputs = info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=True, training=True
    )
    for module_input in inputs:
        if module_input.forward_input is None:
            continue
        c_args, c_kwargs = (
            module_input.constructor_input.args,
            module_input.constructor_input.kwargs,
        )
        native_module = info.module_cls(*c_args, **c_kwargs).to(dtype)
        our_module = twin(*c_args, **c_kwargs).to(dtype)
        our_module.load_state_dict(native_module.state_dict())
        params = [p for p in native_module.parameters()]
        names = [n for n, _ in native_module.named_parameters()]
        reference = None
        if c_kwargs.get("options") is not None:  # native's reference path: no options
            reference_module = info.module_cls(*c_args, **{**c_kwargs, "options": None})
            reference_module.to(dtype).load_state_dict(native_module.state_dict())
            reference = functools.partial(_call_module, reference_module, names)
        f_args, f_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
        leaves, spec = tree_flatten(((*f_args, *params), dict(f_kwargs)))

        yield Case(
            info.module_cls.__name__,
            f"{info.module_cls.__name__}(*{c_args}, **{c_kwargs}) on {module_input.forward_input}"[
                :300
            ],
            functools.partial(_call_module, our_module, names),
            functools.partial(_call_module, native_module, names),
            leaves,
            spec,
            reference=reference,
        )


def _call_module(module, names, *args, **kwargs):
    """``module(*inputs, **kwargs)`` with its parameters replaced by the last ``len(names)``
    positional arguments (so that they are leaves of the sample)."""
    split = len(args) - len(names)
    state = dict(zip(names, args[split:]))
    return torch.func.functional_call(module, state, args[:split], kwargs)


def cases_of(source: str, dtype) -> list[Case]:
    if source.startswith("module:"):
        info = next(m for m in module_infos() if m.module_cls.__name__ == source[7:])
        return list(module_cases(info, dtype))
    op = next(o for o in op_infos() if _op_id(o) == source)
    return list(op_cases(op, dtype))


SOURCES = [_op_id(o) for o in op_infos()] + [
    f"module:{m.module_cls.__name__}" for m in module_infos()
]


def run_source(source: str, dtype, checks) -> tuple[collections.Counter, list[str]]:
    """Run ``checks`` on every sample of ``source``: ``(passed per check, failures)``;
    ``passed["excluded"]`` counts the (sample, check) pairs :data:`EXCLUSIONS` skipped."""
    passed, failures = collections.Counter(), []
    for case in cases_of(source, dtype):
        for check in checks:
            if _excluded(source, case, check):
                passed["excluded"] += 1
                continue
            checked = case
            if (source, check) in NATIVE_REFERENCE_PATH and case.reference is not None:
                checked = dataclasses.replace(case, native=case.reference)
            try:
                CHECK_FUNCTIONS[check](checked)
            except Exception as error:  # noqa: BLE001 - every failure is reported
                failures.append(
                    f"{check} [{dtype}] {case.description}: {type(error).__name__}: {error}"[:800]
                )
            else:
                passed[check] += 1
    return passed, failures


@pytest.mark.parametrize("source", SOURCES)
def test_float64_samples_match_native(source):
    passed, failures = run_source(source, torch.float64, CHECKS_FLOAT64)
    assert not failures, f"{len(failures)} failed:\n" + "\n".join(failures[:10])
    assert passed["forward"] > 0, f"{source}: no sample ran"


@pytest.mark.parametrize("source", SOURCES)
def test_float32_samples_match_native(source):
    passed, failures = run_source(source, torch.float32, CHECKS_FLOAT32)
    assert not failures, f"{len(failures)} failed:\n" + "\n".join(failures[:10])
    assert passed["forward"] > 0, f"{source}: no sample ran"


if __name__ == "__main__":
    total, bad = collections.Counter(), 0
    for source in SOURCES:
        for dtype, checks in ((torch.float64, CHECKS_FLOAT64), (torch.float32, CHECKS_FLOAT32)):
            passed, failures = run_source(source, dtype, checks)
            total.update(passed)
            bad += len(failures)
            print(f"{source:40s} {str(dtype):14s} {dict(passed)} failed {len(failures)}")
            for f in failures[:3]:
                print("   ", f)
    excluded = total.pop("excluded", 0)
    print(f"passed {dict(total)}: {sum(total.values())} checks, {bad} failed, {excluded} excluded")
    raise SystemExit(1 if bad else 0)
