"""Benchmark cases: shapes, inputs, and the implementations compared side by side.

A case owns its input tensors and a dict of implementations. Each implementation is a
zero-argument callable that runs one forward+backward (or one training step); the harness
times it, counts what it saves for backward and measures its peak memory. ``torchbp`` is
always the implementation under test; every other one is a reference.

Optional systems are looked up lazily and skipped when missing: torchbp itself (so the
harness runs before the core ops exist), torchbp's ``linear_cross_entropy`` and its
``cross_entropy(..., inplace=True)`` option, torch's chunked ``F.linear_cross_entropy``
(torch >= 2.13), Liger-Kernel and cut-cross-entropy (CUDA + Triton only).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from torchbp.ops import activations

# --------------------------------------------------------------------------- data types


@dataclass
class Impl:
    """One system's forward+backward for a case."""

    fn: Callable[[], None]
    pre: Callable[[], None] | None = None  # untimed, before every call (e.g. restore logits)
    compiled: bool = False  # first call includes torch.compile's compile time
    note: str = ""


@dataclass
class Case:
    name: str
    group: str  # loss | activation | linear | model | memory
    desc: str  # shapes and dtype, for the report
    impls: dict[str, Impl]
    # not counted as saved for backward: parameters, and a model's input batch. A single
    # op's inputs do count: inside a model they are the previous layer's activations.
    exclude: list[torch.Tensor]
    reset: Callable[[], None]  # drop gradients between calls (untimed)
    timed: bool = True  # memory-only cases are not timed
    peak_rss: bool = False  # CPU: measure peak RSS in a fresh subprocess per impl
    batch: int | None = None  # rows / samples, for bytes-per-sample figures
    logits_bytes: int | None = None  # size of the logits (CE targets are relative to it)
    notes: list[str] = field(default_factory=list)


@dataclass
class Options:
    device: str
    quick: bool
    compile: str  # auto | all | none
    peers: bool = True


# ------------------------------------------------------------------------ optional systems


def _torchbp_functional():
    try:
        return importlib.import_module("torchbp.functional")
    except Exception:  # noqa: BLE001 - the core may not exist yet
        return None


def tbp(name: str):
    """``torchbp.functional.<name>`` or None."""
    mod = _torchbp_functional()
    return getattr(mod, name, None) if mod is not None else None


def torchbp_version() -> str | None:
    try:
        return importlib.import_module("torchbp").__version__
    except Exception:  # noqa: BLE001
        return None


def _with_env(name: str, value: str, f):
    """``f`` called with the environment variable ``name`` set to ``value``."""

    def call(*args, **kwargs):
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return f(*args, **kwargs)
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before

    return call


def _accepts(fn, kw: str) -> bool:
    try:
        return kw in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_LIGER_MODULES = {
    "LigerCrossEntropyLoss": "liger_kernel.transformers.cross_entropy",
    "LigerFusedLinearCrossEntropyLoss": "liger_kernel.transformers.fused_linear_cross_entropy",
}


def _liger(name: str):
    try:
        return getattr(importlib.import_module(_LIGER_MODULES[name]), name)
    except Exception:  # noqa: BLE001 - needs triton + CUDA
        return None


def _cce():
    try:
        return importlib.import_module("cut_cross_entropy").linear_cross_entropy
    except Exception:  # noqa: BLE001
        return None


def peer_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("liger-kernel", "cut-cross-entropy", "triton"):
        try:
            from importlib.metadata import version

            out[dist] = version(dist)
        except Exception:  # noqa: BLE001
            out[dist] = None
    return out


def _use_compile(opts: Options, case: str) -> bool:
    """Whether ``case`` gets a ``torch.compile(native)`` reference: always (``all``),
    never (``none``), or (``auto``) where a target of this device compares with one (each
    compile takes tens of seconds of a time-limited GPU run)."""
    if opts.compile == "all":
        return True
    if opts.compile == "none":
        return False
    return compile_reference_wanted(case, opts.device)


def compile_reference_wanted(case: str, device: str) -> bool:
    """Whether a target of ``device`` compares ``case`` with ``torch.compile``."""
    from experiments.bench import targets

    return any(t.case == case and t.ref == "compile" for t in targets.targets_for(device))


def _compiled(f):
    return torch.compile(f, dynamic=False)


def _seed(opts: Options) -> None:
    torch.manual_seed(0)
    if opts.device == "cuda":
        torch.cuda.manual_seed(0)


# ----------------------------------------------------------------------------- cases


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def build_cross_entropy(opts: Options, dtype: torch.dtype, name: str) -> Case:
    """Cross-entropy on logits (N, C): loss.backward() -> logits.grad."""
    cuda = opts.device == "cuda"
    if opts.quick:
        N, C = (1024, 8192) if cuda else (256, 1024)
    else:
        N, C = (8192, 128256) if cuda else (4096, 32768)
    _seed(opts)
    logits = torch.randn(N, C, device=opts.device, dtype=torch.float32).mul_(2.0)
    logits = logits.to(dtype).requires_grad_()
    target = torch.randint(0, C, (N,), device=opts.device)
    shift = torch.zeros((), device=opts.device, dtype=dtype, requires_grad=True)
    # Liger's own copy of the logits (it writes into it) and the values it is restored from
    liger_logits: torch.Tensor | None = None
    pristine: torch.Tensor | None = None

    def fwd_bwd(f):
        def run():
            f(logits, target).backward()

        return run

    impls: dict[str, Impl] = {}
    ce = tbp("cross_entropy")
    if ce is not None:
        impls["torchbp"] = Impl(fwd_bwd(ce))
        if _accepts(ce, "inplace"):
            # Autograd forbids in-place writes into a leaf that requires grad, so the
            # logits are made a non-leaf (as a Linear's output is) untimed before each
            # call: a copy plus a scalar leaf. Backward reaches that leaf by one sum over
            # the gradient, and makes no logits-sized gradient of its own (nor does a
            # model's: a Linear's weight gets a gradient of the weight's size), so the
            # peak shows the allocation that inplace=True saves.
            holder: dict[str, torch.Tensor] = {}

            def fresh_non_leaf():
                holder["z"] = logits.detach() + shift

            def inplace_run():
                ce(holder.pop("z"), target, inplace=True).backward()

            impls["torchbp_inplace"] = Impl(
                inplace_run,
                pre=fresh_non_leaf,
                note="gradient written over the logits (non-leaf logits + a scalar leaf, "
                "made untimed; backward sums the gradient into the scalar)",
            )
        if cuda and importlib.util.find_spec("triton") is not None:
            impls["torchbp_triton"] = Impl(
                fwd_bwd(_with_env("TORCHBP_TRITON", "1", ce)),
                note="Triton forward kernel (opt-in: TORCHBP_TRITON=1)",
            )
    impls["native"] = Impl(fwd_bwd(F.cross_entropy))
    if dtype != torch.float32:
        impls["native_fp32"] = Impl(
            fwd_bwd(lambda z, t: F.cross_entropy(z.float(), t)), note="logits upcast to fp32"
        )
    if _use_compile(opts, name):
        impls["compile"] = Impl(fwd_bwd(_compiled(F.cross_entropy)), compiled=True)
    if cuda and opts.peers:
        liger_ce = _liger("LigerCrossEntropyLoss")
        if liger_ce is not None:
            # Liger writes the gradient over its input: it gets a leaf of its own, restored
            # untimed before each call, so the other systems never see its gradient values
            pristine = logits.detach().clone()
            liger_logits = pristine.clone().requires_grad_()

            def restore_liger():
                with torch.no_grad():
                    liger_logits.copy_(pristine)

            loss_mod = liger_ce()
            impls["liger"] = Impl(
                lambda: loss_mod(liger_logits, target).backward(),
                pre=restore_liger,
                note="writes the gradient into (its own copy of) the logits",
            )

    def reset():
        logits.grad = shift.grad = None
        if liger_logits is not None:
            liger_logits.grad = None

    return Case(
        name=name,
        group="loss",
        desc=f"N={N}, C={C}, {str(dtype).removeprefix('torch.')}",
        impls=impls,
        exclude=[t for t in (pristine, liger_logits) if t is not None],
        reset=reset,
        peak_rss=not cuda,
        batch=N,
        logits_bytes=logits.numel() * logits.element_size(),
    )


# activation name -> the native function it is timed against (every registry activation)
_ACTIVATIONS: dict[str, Callable] = {op.name: op.torch_functional for op in activations()}


def triton_backward_kernel_computes(op: str) -> bool:
    """Whether torchbp's Triton activation-backward kernel computes ``op`` (ELU and
    softplus keep the torch ops even with ``TORCHBP_TRITON=1``: no row for them)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from torchbp.kernels import triton_act

        return triton_act.supports(op)
    except Exception:  # noqa: BLE001 - a broken Triton install: no Triton row
        return False


def build_activation(opts: Options, op: str) -> Case:
    cuda = opts.device == "cuda"
    n = (2**20 if cuda else 2**16) if opts.quick else (2**28 if cuda else 2**24)
    _seed(opts)
    x = torch.randn(n, device=opts.device).requires_grad_()
    gout = torch.randn(n, device=opts.device)

    def fwd_bwd(f):
        def run():
            f(x).backward(gout)

        return run

    impls: dict[str, Impl] = {}
    f_bp = tbp(op)
    if f_bp is not None:
        impls["torchbp"] = Impl(fwd_bwd(f_bp))
        if cuda and triton_backward_kernel_computes(op):
            impls["torchbp_triton"] = Impl(
                # the kernel runs in backward: the flag is set around forward + backward
                _with_env("TORCHBP_TRITON", "1", fwd_bwd(f_bp)),
                note="Triton backward kernel (opt-in: TORCHBP_TRITON=1)",
            )
    impls["native"] = Impl(fwd_bwd(_ACTIVATIONS[op]))
    if _use_compile(opts, f"act_{op}"):
        impls["compile"] = Impl(fwd_bwd(_compiled(_ACTIVATIONS[op])), compiled=True)

    def reset():
        x.grad = None

    return Case(
        name=f"act_{op}",
        group="activation",
        desc=f"2^{n.bit_length() - 1} float32",
        impls=impls,
        exclude=[gout],
        reset=reset,
    )


def build_linear(opts: Options) -> Case:
    cuda = opts.device == "cuda"
    if opts.quick:
        N, K, M = (1024, 512, 512) if cuda else (128, 64, 64)
    else:
        N, K, M = (16384, 4096, 4096) if cuda else (4096, 1024, 1024)
    _seed(opts)
    x = torch.randn(N, K, device=opts.device).requires_grad_()
    w = (torch.randn(M, K, device=opts.device) * K**-0.5).requires_grad_()
    b = torch.randn(M, device=opts.device).requires_grad_()
    gout = torch.randn(N, M, device=opts.device)

    def fwd_bwd(f):
        def run():
            f(x, w, b).backward(gout)

        return run

    impls: dict[str, Impl] = {}
    f_bp = tbp("linear")
    if f_bp is not None:
        impls["torchbp"] = Impl(fwd_bwd(f_bp))
    impls["native"] = Impl(fwd_bwd(F.linear))
    if _use_compile(opts, "linear"):
        impls["compile"] = Impl(fwd_bwd(_compiled(F.linear)), compiled=True)

    def reset():
        x.grad = w.grad = b.grad = None

    return Case(
        name="linear",
        group="linear",
        desc=f"({N}x{K}) @ ({K}x{M})^T + bias, float32",
        impls=impls,
        exclude=[w, b, gout],
        reset=reset,
    )


_MODULES = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


def _mlp(sizes: list[int], act: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(_MODULES[act]())
    return nn.Sequential(*layers)


def _to_torchbp(model: nn.Module) -> tuple[nn.Module | None, str]:
    """A deep copy of ``model`` with its layers swapped for torchbp's (same weights)."""
    try:
        torchbp = importlib.import_module("torchbp")
        twin = torchbp.convert(copy.deepcopy(model), inplace=True)
    except Exception as e:  # noqa: BLE001
        return None, f"torchbp.convert unavailable: {type(e).__name__}: {e}"
    mods = [type(m).__module__ for m in twin.modules() if not isinstance(m, nn.Sequential)]
    if not any(m.startswith("torchbp") for m in mods):
        return None, "torchbp.convert left every layer native"
    return twin, ""


class _BareLinearFunction(torch.autograd.Function):
    """The least an ``autograd.Function`` linear layer can do (no checks, no options): the
    MLP step's floor for any hand-written Function, against which torchbp's own overhead
    can be told apart from the cost of leaving native autograd."""

    @staticmethod
    def forward(x, w, b):
        return torch.addmm(b, x, w.t())

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g.mm(w) if ctx.needs_input_grad[0] else None, g.t().mm(x), g.sum(0)


class _BareLinear(nn.Linear):
    def forward(self, x):
        return _BareLinearFunction.apply(x, self.weight, self.bias)


def _bare_linear_twin(model: nn.Sequential) -> nn.Sequential:
    """A deep copy of ``model`` with every Linear running :class:`_BareLinearFunction`."""
    twin = copy.deepcopy(model)
    for i, layer in enumerate(twin):
        if type(layer) is nn.Linear:
            bare = _BareLinear(layer.in_features, layer.out_features, device=layer.weight.device)
            bare.load_state_dict(layer.state_dict())
            twin[i] = bare
    return twin


def _model_impls(native: nn.Module, make: Callable) -> tuple[dict[str, Impl], list[str], list]:
    """``torchbp`` (the model converted, with torchbp's cross-entropy) and ``native``
    impls built by ``make(model, loss_fn)``, notes on what is unavailable, and every
    parameter involved (excluded from the memory figures)."""
    impls: dict[str, Impl] = {}
    notes: list[str] = []
    params = list(native.parameters())
    twin, why = _to_torchbp(native)
    ce = tbp("cross_entropy")
    if twin is not None and ce is not None:
        impls["torchbp"] = Impl(make(twin, ce))
        params += list(twin.parameters())
    elif why:
        notes.append(why)
    impls["native"] = Impl(make(native, F.cross_entropy))
    return impls, notes, params


def _mlp_shapes(opts: Options) -> tuple[list[int], int]:
    cuda = opts.device == "cuda"
    if opts.quick:
        return ([1024, 512, 512, 10], 1024) if cuda else ([784, 64, 64, 10], 32)
    return ([1024, 4096, 4096, 10], 16384) if cuda else ([784, 1024, 1024, 10], 256)


@contextlib.contextmanager
def _tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def build_mlp_step(opts: Options, precision: str = "fp32") -> Case:
    """One SGD training step: zero_grad, forward, cross-entropy, backward, step."""
    sizes, B = _mlp_shapes(opts)
    _seed(opts)
    native = _mlp(sizes, "relu").to(opts.device)
    x = torch.randn(B, sizes[0], device=opts.device)
    y = torch.randint(0, sizes[-1], (B,), device=opts.device)
    # TF32 is a global flag read when a matmul runs: it is on for the whole step, backward
    # included; autocast covers forward and loss only (backward follows forward's dtypes)
    step_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    forward_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if precision == "tf32":
        step_ctx = lambda: _tf32(True)  # noqa: E731
    elif precision == "bf16":
        forward_ctx = lambda: torch.autocast(opts.device, dtype=torch.bfloat16)  # noqa: E731

    def stepper(model, loss_fn):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def run():
            with step_ctx():
                opt.zero_grad(set_to_none=True)
                with forward_ctx():
                    loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()

        return run

    impls, notes, params = _model_impls(native, stepper)
    suffix = "" if precision == "fp32" else f"_{precision}"
    if precision == "fp32":
        bare = _bare_linear_twin(native)
        params += list(bare.parameters())
        impls["bare_function"] = Impl(
            stepper(bare, F.cross_entropy),
            note="native model, each Linear a minimal autograd.Function (addmm; mm, mm, sum)",
        )
    if _use_compile(opts, f"mlp_step{suffix}"):
        other = copy.deepcopy(native)
        params += list(other.parameters())
        impls["compile"] = Impl(stepper(_compiled(other), F.cross_entropy), compiled=True)
    return Case(
        name=f"mlp_step{suffix}",
        group="model",
        desc=f"{'-'.join(map(str, sizes))}, batch {B}, ReLU, SGD, {precision}",
        impls=impls,
        exclude=params + [x],
        reset=lambda: None,
        batch=B,
        notes=notes,
    )


def build_mlp_saved(opts: Options, act: str, with_loss: bool = True) -> Case:
    """Memory only: bytes an MLP (+ cross-entropy unless ``with_loss`` is False; the
    model alone is then backpropagated from ``out.sum()``, which saves nothing) saves for
    backward, per sample."""
    sizes = [784, 64, 64, 10] if opts.quick else [784, 1024, 1024, 10]
    B = 32 if opts.quick else 256
    _seed(opts)
    native = _mlp(sizes, act).to(opts.device)
    x = torch.randn(B, sizes[0], device=opts.device)
    y = torch.randint(0, sizes[-1], (B,), device=opts.device)

    def fwd_bwd(model, loss_fn):
        def run():
            out = model(x)
            (loss_fn(out, y) if with_loss else out.sum()).backward()

        return run

    impls, notes, params = _model_impls(native, fwd_bwd)

    def reset():
        for p in params:
            p.grad = None

    return Case(
        name=f"mlp_saved_{act}" if with_loss else f"mlp_layers_saved_{act}",
        group="memory",
        desc=f"{'-'.join(map(str, sizes))}, batch {B}, {act}"
        + (", cross-entropy" if with_loss else ", layers only (no loss)"),
        impls=impls,
        exclude=params + [x],
        reset=reset,
        timed=False,
        batch=B,
        notes=notes,
    )


def build_linear_cross_entropy(opts: Options) -> Case:
    """Linear + cross-entropy (issue 6): grads of the hidden states and the weight."""
    cuda = opts.device == "cuda"
    if opts.quick:
        N, d, C = (1024, 512, 8192) if cuda else (256, 64, 1024)
    else:
        N, d, C = (8192, 4096, 128256) if cuda else (4096, 512, 32768)
    dtype = torch.bfloat16 if cuda else torch.float32
    _seed(opts)
    h = torch.randn(N, d, device=opts.device).to(dtype).requires_grad_()
    w = (torch.randn(C, d, device=opts.device) * d**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, C, (N,), device=opts.device)

    def fwd_bwd(f):
        def run():
            f(h, w, t).backward()

        return run

    def naive(h_, w_, t_):
        z = F.linear(h_, w_)
        return F.cross_entropy(z.float() if z.dtype != torch.float32 else z, t_)

    impls: dict[str, Impl] = {}
    notes: list[str] = []
    lce = tbp("linear_cross_entropy")
    if lce is not None:
        impls["torchbp"] = Impl(fwd_bwd(lce))
    elif _torchbp_functional() is not None:
        notes.append("torchbp.functional.linear_cross_entropy not available yet")
    impls["native"] = Impl(fwd_bwd(naive), note="linear then cross_entropy (fp32 logits)")
    if hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions"):
        opt = nn.LinearCrossEntropyOptions()
        impls["torch_chunked"] = Impl(
            fwd_bwd(lambda a, b, c: F.linear_cross_entropy(a, b, c, options=opt)),
            note="F.linear_cross_entropy(options=LinearCrossEntropyOptions())",
        )
    else:
        notes.append(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
    if _use_compile(opts, "linear_cross_entropy"):
        impls["compile"] = Impl(fwd_bwd(_compiled(naive)), compiled=True)
    if cuda and opts.peers:
        flce = _liger("LigerFusedLinearCrossEntropyLoss")
        if flce is not None:
            mod = flce()
            impls["liger"] = Impl(fwd_bwd(lambda a, b, c: mod(b, a, c)))
        cce = _cce()
        if cce is not None:
            impls["cce"] = Impl(fwd_bwd(cce))

    def reset():
        h.grad = w.grad = None

    return Case(
        name="linear_cross_entropy",
        group="loss",
        desc=f"N={N}, d={d}, C={C}, {str(dtype).removeprefix('torch.')}",
        impls=impls,
        exclude=[w],
        reset=reset,
        peak_rss=not cuda,
        batch=N,
        logits_bytes=N * C * 4,
        notes=notes,
    )


# --------------------------------------------------------------------------- registry

BUILDERS: dict[str, Callable[[Options], Case]] = {
    "cross_entropy": lambda o: build_cross_entropy(o, torch.float32, "cross_entropy"),
    "cross_entropy_bf16": lambda o: build_cross_entropy(o, torch.bfloat16, "cross_entropy_bf16"),
    **{f"act_{op}": (lambda o, op=op: build_activation(o, op)) for op in _ACTIVATIONS},
    "linear": build_linear,
    "mlp_step": lambda o: build_mlp_step(o, "fp32"),
    "mlp_step_tf32": lambda o: build_mlp_step(o, "tf32"),
    "mlp_step_bf16": lambda o: build_mlp_step(o, "bf16"),
    "linear_cross_entropy": build_linear_cross_entropy,
    **{f"mlp_saved_{a}": (lambda o, a=a: build_mlp_saved(o, a)) for a in _MODULES},
    "mlp_layers_saved_leaky_relu": lambda o: build_mlp_saved(o, "leaky_relu", with_loss=False),
}

_CUDA_ONLY = {"cross_entropy_bf16", "mlp_step_tf32", "mlp_step_bf16"}


# on CUDA the headline cases go first: a run cut short by a time limit still has them
_CUDA_ORDER = [
    "cross_entropy_bf16",
    "cross_entropy",
    "linear_cross_entropy",
    "mlp_step",
    "mlp_step_tf32",
    "mlp_step_bf16",
]


def default_cases(device: str) -> list[str]:
    if device == "cuda":
        return _CUDA_ORDER + [n for n in BUILDERS if n not in _CUDA_ORDER]
    return [n for n in BUILDERS if n not in _CUDA_ONLY]


def build(name: str, opts: Options) -> Case:
    if name not in BUILDERS:
        raise KeyError(f"unknown case {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name](opts)
