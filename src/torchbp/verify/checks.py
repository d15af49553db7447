"""``check_function``: verify any differentiable callable or ``torch.autograd.Function``.

Each check is a small function of a :class:`_Runner` (which holds the prepared inputs) and
returns a :class:`~torchbp.verify.report.CheckResult`. Exceptions raised by torch inside a
check are turned into plain-word messages by :func:`explain_error`; they never escape
:func:`check_function`.
"""

from __future__ import annotations

import math
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from torchbp.verify.report import FAIL, PASS, SKIP, CheckResult, Report

__all__ = ["CHECKS", "DEFAULT_OPTIONS", "check_function", "explain_error", "tolerances"]

#: Every check, in the order it runs.
CHECKS: tuple[str, ...] = (
    "forward",
    "gradcheck",
    "gradgradcheck",
    "forward_ad",
    "vmap",
    "batched_grad",
    "undefined_grad",
    "grad_shapes",
    "grad_output_safety",
    "compile",
    "reference",
)

#: What each check verifies, in one line (used by the CLI's legend and the docs).
CHECK_DESCRIPTIONS: dict[str, str] = {
    "forward": "fn runs and returns floating-point tensors that require grad",
    "gradcheck": "backward agrees with the numerical (finite-difference) Jacobian",
    "gradgradcheck": "double backward agrees with numerical second derivatives",
    "forward_ad": "forward-mode AD (jvp) agrees with the numerical Jacobian",
    "vmap": "torch.func.vmap of the forward and of per-sample grads equals a loop",
    "batched_grad": "backward with batched grad_outputs (is_grads_batched) equals a loop",
    "undefined_grad": "backward treats undefined (None) output grads as zeros",
    "grad_shapes": "each autograd.Function backward returns grads of exactly its inputs' shapes",
    "grad_output_safety": "backward leaves grad_output/inputs intact, accepts strided grads",
    "compile": "torch.compile (fullgraph) forward and backward equal eager",
    "reference": "outputs and all gradients equal the reference callable's",
}

NUMERICAL_CHECKS = ("gradcheck", "gradgradcheck", "forward_ad")

#: Options accepted by :func:`check_function` and their defaults.
DEFAULT_OPTIONS: dict[str, Any] = {
    "dtype": torch.float64,
    "device": None,
    "grad_inputs": None,
    "checks": None,
    "skip": (),
    "eps": 1e-6,
    "atol": 1e-5,
    "rtol": 1e-3,
    "fast_mode": False,
    "nondet_tol": 0.0,
    "parity_atol": None,
    "parity_rtol": None,
    "compile_backend": "aot_eager",
    "compile_fullgraph": True,
    "vmap_batch": 3,
    "seed": 0,
    "name": None,
}

# Beyond this many Jacobian entries, errors are measured on random projections v^T J u
# instead of the full Jacobian (the pass/fail verdict still comes from torch's gradcheck).
_FULL_JACOBIAN_LIMIT = 4096

_SCALAR_TYPES = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.Size)


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


# --------------------------------------------------------------------------------------------
# error messages
# --------------------------------------------------------------------------------------------

_EXPLANATIONS: tuple[tuple[str, str], ...] = (
    (
        "override the setup_context staticmethod",
        "Function lacks setup_context: torch.func transforms cannot use it (write "
        "forward(*args) without ctx plus a setup_context(ctx, inputs, output) staticmethod)",
    ),
    (
        "does not have vmap support",
        "Function has no vmap rule: set generate_vmap_rule = True (or write a vmap staticmethod)",
    ),
    (
        "must implement the jvp function",
        "Function has no jvp: forward-mode AD (torch.func.jvp, jacfwd, check_forward_ad) is "
        "unsupported",
    ),
    (
        "differentiate twice",
        "backward is not differentiable: double backward unsupported (once_differentiable?)",
    ),
    (
        "Expected backward function to handle undefined output grads",
        "backward does not handle undefined output gradients: treat a None grad_output as "
        "zeros (or return None for it)",
    ),
    (
        "Expected all input grads to be undefined or zero",
        "backward returns non-zero gradients when every output gradient is undefined/zero",
    ),
    (
        "Unsupported custom jvp",
        "torch.compile cannot capture a Function that defines jvp (a PyTorch limitation): "
        "use a jvp-free twin class when torch.compiler.is_compiling()",
    ),
    (
        "refers to a single memory location",
        "backward writes in place into grad_output, which may be an expanded (stride-0) "
        "tensor: never modify grad_output in place",
    ),
    (
        "view size is not compatible with input tensor's size and stride",
        "backward calls .view() on a non-contiguous tensor (e.g. a transposed grad_output): "
        "use .reshape()",
    ),
    (
        "modified by an inplace operation",
        "a tensor saved for backward was modified in place before backward ran",
    ),
    (
        "returned an incorrect number of gradients",
        "backward returned the wrong number of gradients: return one per forward input "
        "(None for non-tensor or non-differentiable inputs)",
    ),
    (
        "returned an invalid gradient at index",
        "backward returned a gradient whose shape cannot be summed to its input's shape",
    ),
    (
        "has_fw_view",
        "jvp returned a view of a tangent (e.g. tangent.expand(...)) for an output that is not "
        "a view: return a new tensor (e.g. add .clone())",
    ),
    (
        "does not require grad and does not have a grad_fn",
        "an output or gradient is detached from the graph (computed under no_grad, "
        ".detach() or once_differentiable)",
    ),
)


def _first_line(text: str, limit: int = 240) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def explain_error(exc: BaseException) -> str:
    """Turn an exception raised by torch while checking into a one-line plain-word message.

    Args:
        exc: the exception.

    Returns:
        A known cause with its fix where the message is recognised, followed by torch's
        own first line; otherwise ``"<ExceptionType>: <first line>"``.

    Examples:
        >>> explain_error(RuntimeError("... must override the setup_context staticmethod ..."))[:33]
        'Function lacks setup_context: tor'
    """
    text = str(exc)
    chain = [text]
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(chain) < 5:
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    full = "\n".join(chain)
    for needle, message in _EXPLANATIONS:
        if needle in full:
            return message
    message = f"{type(exc).__name__}: {_first_line(text)}"
    if "Explanation:" in text:  # Dynamo errors put the cause on a later line
        explanation = text.split("Explanation:", 1)[1].strip().split(". ")[0]
        message += f" ({_first_line(explanation, 200)})"
    return message


class _CheckFailure(Exception):
    """Raised inside a check to fail it with a message (and optional error figures)."""

    def __init__(self, message: str, abs_err: float | None = None, rel_err: float | None = None):
        super().__init__(message)
        self.message = message
        self.abs_err = abs_err
        self.rel_err = rel_err


class _CheckSkip(Exception):
    """Raised inside a check to skip it with a reason."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _float_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _shape(t: torch.Tensor | torch.Size | Sequence[int]) -> str:
    dims = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


def _err(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
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


def _unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for size in reversed(tuple(shape)):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def _mismatch(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float):
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
    index = _unravel(flat, a.shape)
    abs_err, rel_err = _err(a, b)
    if bool((nan_a ^ nan_b).any()):
        abs_err = rel_err = math.nan
    return abs_err, rel_err, index


def _zeros_jac(outs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]):
    return [[torch.zeros(o.numel(), x.numel(), dtype=torch.float64) for o in outs] for x in inputs]


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout (transposed storage)."""
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


def _fresh_code(fn: Callable) -> Callable:
    """A copy of a Python function with its own code object (so Dynamo's cache starts empty)."""
    code = fn.__code__.replace(co_name=fn.__code__.co_name)
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return new


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {
            "shape": list(value.shape),
            "dtype": str(value.dtype).replace("torch.", ""),
            "contiguous": value.is_contiguous(),
        }
    if isinstance(value, _SCALAR_TYPES):
        return value if isinstance(value, bool | int | float | str | type(None)) else str(value)
    return repr(value)


def _fn_name(fn: Any) -> str:
    for attr in ("__qualname__", "__name__"):
        name = getattr(fn, attr, None)
        if isinstance(name, str):
            return name
    return type(fn).__name__


# --------------------------------------------------------------------------------------------
# the runner: prepared inputs + one method per check
# --------------------------------------------------------------------------------------------


class _Runner:
    def __init__(self, fn: Callable, args: list[Any], grad_idx: list[int], opts: dict[str, Any]):
        self.fn = fn
        self.args = args  # prepared (cast / moved) positional inputs, detached
        self.grad_idx = grad_idx
        self.opts = opts
        self.reference = opts.get("reference")
        self.device = next(a.device for a in args if isinstance(a, torch.Tensor))
        self.dtype = args[grad_idx[0]].dtype
        self._gen = torch.Generator().manual_seed(int(opts["seed"]))
        self._numerical_cache: list[list[torch.Tensor]] | None = None
        self.gradcheck_failed = False

    # -- inputs / outputs -------------------------------------------------------------------
    def randn(self, shape: torch.Size | Sequence[int], dtype: torch.dtype | None = None):
        dtype = dtype or self.dtype
        t = torch.randn(tuple(shape), generator=self._gen, dtype=torch.float64)
        return t.to(device=self.device, dtype=dtype)

    def leaves(self) -> list[torch.Tensor]:
        """Fresh differentiable copies of the grad inputs."""
        return [self.args[i].detach().clone().requires_grad_(True) for i in self.grad_idx]

    def call(self, fn: Callable, diff: Sequence[torch.Tensor]) -> Any:
        full = list(self.args)
        for i, t in zip(self.grad_idx, diff):
            full[i] = t
        return fn(*full)

    def g(self, *diff: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """fn of the differentiable inputs only, returning its floating-point outputs."""
        return tuple(_float_tensors(self.call(self.fn, diff)))

    def name_input(self, k: int) -> str:
        return f"input {self.grad_idx[k]}"

    def randn_like_outputs(self, outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.randn(o.shape, o.dtype) for o in outs]

    # -- Jacobians ----------------------------------------------------------------------------
    def _jac_size(self, func: Callable, inputs: Sequence[torch.Tensor], grad_mode=False) -> int:
        with torch.set_grad_enabled(grad_mode):
            outs = func(*[x.detach() for x in inputs])
        n_out = sum(o.numel() for o in outs)
        return n_out * sum(x.numel() for x in inputs)

    @staticmethod
    def numerical_jacobian(
        func: Callable, inputs: Sequence[torch.Tensor], eps: float, grad_mode: bool = False
    ):
        """J[k][o] of shape (out_o.numel(), in_k.numel()) by central differences."""
        base = [x.detach().clone() for x in inputs]
        with torch.set_grad_enabled(grad_mode):
            outs = func(*base)
            jac = _zeros_jac(outs, base)
            for k, x in enumerate(base):
                flat = x.reshape(-1).clone()
                for j in range(flat.numel()):
                    vals = []
                    for sign in (1.0, -1.0):
                        pert = flat.clone()
                        pert[j] += sign * eps
                        args = list(base)
                        args[k] = pert.reshape(x.shape)
                        vals.append(func(*args))
                    for o, (hi, lo) in enumerate(zip(*vals)):
                        hi, lo = hi.detach(), lo.detach()
                        d = (hi.to(torch.float64) - lo.to(torch.float64)) / (2 * eps)
                        jac[k][o][:, j] = d.reshape(-1).cpu()
        return jac

    @staticmethod
    def analytical_jacobian(func: Callable, inputs: Sequence[torch.Tensor]):
        """J[k][o] by one backward per output element."""
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        outs = func(*leaves)
        jac = _zeros_jac(outs, leaves)
        for o, out in enumerate(outs):
            if not out.requires_grad:
                continue
            for m in range(out.numel()):
                v = torch.zeros_like(out).reshape(-1)
                v[m] = 1
                grads = torch.autograd.grad(
                    out, leaves, v.reshape(out.shape), retain_graph=True, allow_unused=True
                )
                for k, gk in enumerate(grads):
                    if gk is not None:
                        jac[k][o][m] = gk.detach().to(torch.float64).reshape(-1).cpu()
        return jac

    @staticmethod
    def forward_jacobian(func: Callable, inputs: Sequence[torch.Tensor]):
        """J[k][o] by one jvp (dual numbers) per input element."""
        import torch.autograd.forward_ad as fwAD

        base = [x.detach().clone() for x in inputs]
        with torch.no_grad():
            outs = func(*base)
        jac = _zeros_jac(outs, base)
        for k, x in enumerate(base):
            for j in range(x.numel()):
                tangent = torch.zeros_like(x).reshape(-1)
                tangent[j] = 1
                with fwAD.dual_level():
                    duals = [
                        fwAD.make_dual(b, tangent.reshape(x.shape)) if i == k else b
                        for i, b in enumerate(base)
                    ]
                    outs = func(*duals)
                    for o, out in enumerate(outs):
                        t = fwAD.unpack_dual(out).tangent
                        if t is not None:
                            jac[k][o][:, j] = t.detach().to(torch.float64).reshape(-1).cpu()
        return jac

    def numerical(self) -> list[list[torch.Tensor]]:
        if self._numerical_cache is None:
            self._numerical_cache = self.numerical_jacobian(
                self.g, [self.args[i] for i in self.grad_idx], self.opts["eps"]
            )
        return self._numerical_cache

    def compare_jacobians(self, actual, expected, what, input_names, out_shapes):
        """Return (abs_err, rel_err, failure message or None) comparing J lists."""
        atol, rtol = self.opts["atol"], self.opts["rtol"]
        worst_abs, worst_rel, message = 0.0, 0.0, None
        for k, (act_k, exp_k) in enumerate(zip(actual, expected)):
            for o, (a, e) in enumerate(zip(act_k, exp_k)):
                if a.numel() == 0:
                    continue
                abs_err, rel_err = _err(a, e)
                worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
                bad = _mismatch(a, e, atol, rtol)
                if bad is not None and message is None:
                    m, j = bad[2]
                    in_shape = self.jac_input_shapes[k]
                    idx = _unravel(j, in_shape)
                    out_idx = _unravel(m, out_shapes[o])
                    where = f"at index {idx}" if in_shape else "(0-dim input)"
                    if len(out_shapes) > 1 or len(out_shapes[o]) > 0:
                        where += f" of {input_names[k]}, output {o} element {out_idx}"
                    message = (
                        f"{what} of {input_names[k]} disagrees with numerical gradient: "
                        f"max abs error {float((a - e).abs().max()):.1e} {where}; "
                        f"analytical {float(a[m, j]):.4g} vs numerical {float(e[m, j]):.4g}"
                    )
        return worst_abs, worst_rel, message

    # -- checks -------------------------------------------------------------------------------
    def check_forward(self):
        leaves = self.leaves()
        out = self.call(self.fn, leaves)
        outs = _float_tensors(out)
        if not outs:
            raise _CheckFailure(
                f"fn returned no floating-point tensor (got {type(out).__name__}); nothing to "
                "differentiate"
            )
        if not any(t.requires_grad for t in outs):
            raise _CheckFailure(
                "no output requires grad although the inputs do: fn detached its result or "
                "computed it under torch.no_grad()"
            )
        self.out_shapes = [tuple(t.shape) for t in outs]
        shapes = ", ".join(_shape(t) for t in outs)
        return None, None, f"{len(outs)} output(s) of shape {shapes}"

    def _numerics_guard(self):
        if self.dtype != torch.float64:
            raise _CheckSkip(
                f"numerical differentiation needs float64 inputs (got {self.dtype}); "
                "run with dtype=torch.float64"
            )

    def _diff_inputs(self):
        """Fresh leaves of the inputs that get gradients, and their names."""
        diff = [self.args[i].detach().clone().requires_grad_(True) for i in self.grad_idx]
        self.jac_input_shapes = [tuple(x.shape) for x in diff]
        return diff, [self.name_input(k) for k in range(len(diff))]

    def _torch_gradcheck(self, diff, **mode) -> str | None:
        """torch's gradcheck in ``mode``: None if it passed, its first line on a Jacobian
        mismatch (our own comparison then says where), a failed check for anything else."""
        try:
            torch.autograd.gradcheck(
                self.g,
                tuple(diff),
                eps=self.opts["eps"],
                atol=self.opts["atol"],
                rtol=self.opts["rtol"],
                nondet_tol=self.opts["nondet_tol"],
                fast_mode=self.opts["fast_mode"],
                check_undefined_grad=False,
                **mode,
            )
        except Exception as exc:  # noqa: BLE001 - any failure is reported
            if mode.get("check_forward_ad") and "not enough values to unpack" in str(exc):
                raise _CheckFailure(
                    "jvp found no saved tensors: save what jvp reads with ctx.save_for_forward "
                    f"in setup_context, for every grad mode ({explain_error(exc)})"
                ) from None
            if "Jacobian mismatch" not in str(exc):
                raise _CheckFailure(explain_error(exc)) from None
            return _first_line(str(exc))
        return None

    def check_gradcheck(self):
        self._numerics_guard()
        diff, names = self._diff_inputs()
        try:
            torch_msg = self._torch_gradcheck(diff)
        except _CheckFailure:
            self.gradcheck_failed = True
            raise
        self.gradcheck_failed = torch_msg is not None
        if self._jac_size(self.g, diff) <= _FULL_JACOBIAN_LIMIT or torch_msg:
            ana = self.analytical_jacobian(self.g, diff)
            num = self.numerical()
            abs_err, rel_err, msg = self.compare_jacobians(
                ana, num, "backward", names, self.out_shapes
            )
            if msg or torch_msg:
                self.gradcheck_failed = True
                raise _CheckFailure(msg or f"gradcheck: {torch_msg}", abs_err, rel_err)
            return abs_err, rel_err, "full Jacobian compared"
        abs_err, rel_err = self._projected_backward_error(self.g, diff)
        return abs_err, rel_err, "random projections v^T J u compared (large inputs)"

    def _projected_backward_error(self, func, diff, grad_mode: bool = False):
        eps = self.opts["eps"]
        us = [self.randn(x.shape, x.dtype) for x in diff]
        with torch.set_grad_enabled(grad_mode):
            hi = [t.detach() for t in func(*[x.detach() + eps * u for x, u in zip(diff, us)])]
            lo = [t.detach() for t in func(*[x.detach() - eps * u for x, u in zip(diff, us)])]
        leaves = [x.detach().clone().requires_grad_(True) for x in diff]
        outs = func(*leaves)
        vs = self.randn_like_outputs(outs)
        num = sum(float(((h - l) / (2 * eps) * v).sum()) for h, l, v in zip(hi, lo, vs))
        pairs = [(o, v) for o, v in zip(outs, vs) if o.requires_grad]
        grads = torch.autograd.grad(
            [p[0] for p in pairs], leaves, [p[1] for p in pairs], allow_unused=True
        )
        ana = sum(float((g * u).sum()) for g, u in zip(grads, us) if g is not None)
        abs_err = abs(ana - num)
        return abs_err, abs_err / max(abs(num), 1e-12)

    def check_gradgradcheck(self):
        self._numerics_guard()
        if self.gradcheck_failed:
            raise _CheckSkip("skipped because gradcheck failed (first derivatives are wrong)")
        diff = [self.args[i].detach().clone().requires_grad_(True) for i in self.grad_idx]
        outs = self.g(*diff)
        outs_rg = [o for o in outs if o.requires_grad]
        vs = [self.randn(o.shape, o.dtype).requires_grad_(True) for o in outs_rg]
        # Probe: is backward itself differentiable?
        grads = torch.autograd.grad(outs_rg, diff, vs, create_graph=True, allow_unused=True)
        live = [g for g in grads if g is not None]
        if live and not any(g.requires_grad for g in live):
            raise _CheckFailure(
                "backward is not differentiable: double backward unsupported "
                "(once_differentiable, or backward runs under no_grad / uses .detach())"
            )
        if any(type(g.grad_fn).__name__ in ("Error", "DelayedError") for g in live):
            raise _CheckFailure(
                "backward is not differentiable: double backward unsupported (once_differentiable?)"
            )
        if live:
            weights = [self.randn(g.shape, g.dtype) for g in live]
            try:
                second = torch.autograd.grad(
                    [g for g in live if g.requires_grad],
                    [*diff, *vs],
                    [w for g, w in zip(live, weights) if g.requires_grad],
                    allow_unused=True,
                )
            except Exception as exc:  # noqa: BLE001
                raise _CheckFailure(explain_error(exc)) from None
            if all(s is None for s in second):
                raise _CheckFailure(
                    "backward is not differentiable: its gradients are not connected to the "
                    "inputs or grad_output in the autograd graph (once_differentiable, .detach() "
                    "or a non-torch computation in backward?)"
                )
        n_in = len(diff)

        def first_grad(*xs_and_vs):
            xs, vv = xs_and_vs[:n_in], xs_and_vs[n_in:]
            xs = [x if x.requires_grad else x.detach().requires_grad_(True) for x in xs]
            o = [t for t in self.g(*xs) if t.requires_grad]
            gs = torch.autograd.grad(o, xs, vv, create_graph=True, allow_unused=True)
            return tuple(torch.zeros_like(x) if gi is None else gi for gi, x in zip(gs, xs))

        vs_plain = [v.detach() for v in vs]
        inputs2 = [*[x.detach() for x in diff], *vs_plain]
        torch_msg = None
        try:
            torch.autograd.gradgradcheck(
                lambda *xs: tuple(o for o in self.g(*xs) if o.requires_grad),
                tuple(x.detach().clone().requires_grad_(True) for x in diff),
                tuple(vs_plain),
                eps=self.opts["eps"],
                atol=self.opts["atol"],
                rtol=self.opts["rtol"],
                nondet_tol=self.opts["nondet_tol"],
                fast_mode=self.opts["fast_mode"],
                check_undefined_grad=False,
            )
        except Exception as exc:  # noqa: BLE001
            if "Jacobian mismatch" not in str(exc):
                raise _CheckFailure(explain_error(exc)) from None
            torch_msg = _first_line(str(exc))
        names = [f"d(grad)/d({self.name_input(k)})" for k in range(n_in)]
        names += [f"d(grad)/d(grad_output {o})" for o in range(len(vs))]
        saved = getattr(self, "jac_input_shapes", None)
        self.jac_input_shapes = [tuple(x.shape) for x in inputs2]
        try:
            if self._jac_size(first_grad, inputs2, True) <= _FULL_JACOBIAN_LIMIT or torch_msg:
                ana = self.analytical_jacobian(first_grad, inputs2)
                num = self.numerical_jacobian(first_grad, inputs2, self.opts["eps"], True)
                grad_shapes = [tuple(x.shape) for x in diff]
                abs_err, rel_err, msg = self.compare_jacobians(
                    ana, num, "double backward", names, grad_shapes
                )
                if msg or torch_msg:
                    raise _CheckFailure(msg or f"gradgradcheck: {torch_msg}", abs_err, rel_err)
                return abs_err, rel_err, "full second-order Jacobian compared"
            abs_err, rel_err = self._projected_backward_error(first_grad, inputs2, True)
            return abs_err, rel_err, "random projections compared (large inputs)"
        finally:
            self.jac_input_shapes = saved

    def check_forward_ad(self):
        self._numerics_guard()
        diff, names = self._diff_inputs()
        torch_msg = self._torch_gradcheck(diff, check_forward_ad=True, check_backward_ad=False)
        if self._jac_size(self.g, diff) <= _FULL_JACOBIAN_LIMIT or torch_msg:
            fwd = self.forward_jacobian(self.g, diff)
            abs_err, rel_err, msg = self.compare_jacobians(
                fwd, self.numerical(), "forward-mode AD (jvp)", names, self.out_shapes
            )
            if msg or torch_msg:
                raise _CheckFailure(msg or f"forward AD: {torch_msg}", abs_err, rel_err)
            return abs_err, rel_err, "full forward Jacobian compared"
        return None, None, "torch gradcheck(check_forward_ad=True) passed"

    def _batched_inputs(self, batch: int) -> list[torch.Tensor]:
        scales = [1.0 + 0.25 * b for b in range(batch)]
        return [torch.stack([self.args[i].detach() * s for s in scales]) for i in self.grad_idx]

    def check_vmap(self):
        batch = int(self.opts["vmap_batch"])
        xs = self._batched_inputs(batch)
        atol, rtol = self.parity_tol()
        try:
            batched = torch.func.vmap(self.g)(*xs)
        except Exception as exc:  # noqa: BLE001
            raise _CheckFailure(f"vmap of the forward failed: {explain_error(exc)}") from None
        looped = [self.g(*[x[b] for x in xs]) for b in range(batch)]
        worst = (0.0, 0.0)
        for o, out in enumerate(batched):
            exp = torch.stack([lp[o] for lp in looped]).detach()
            bad = _mismatch(out, exp, atol, rtol)
            worst = max(worst, _err(out, exp))
            if bad:
                raise _CheckFailure(
                    f"vmap output {o} differs from a Python loop: max abs error {bad[0]:.1e}",
                    bad[0],
                    bad[1],
                )
        with torch.no_grad():
            weights = [self.randn(o.shape[1:], o.dtype) for o in batched]

        def scalar(*d):
            return sum((o * w).sum() for o, w in zip(self.g(*d), weights) if o.is_floating_point())

        argnums = tuple(range(len(xs)))
        try:
            per_sample = torch.func.vmap(torch.func.grad(scalar, argnums=argnums))(*xs)
        except Exception as exc:  # noqa: BLE001
            raise _CheckFailure(
                f"vmap(grad) (per-sample gradients) failed: {explain_error(exc)}"
            ) from None
        for b in range(batch):
            leaves = [x[b].detach().clone().requires_grad_(True) for x in xs]
            gs = torch.autograd.grad(scalar(*leaves), leaves, allow_unused=True)
            for k, (gb, ps) in enumerate(zip(gs, per_sample)):
                exp = torch.zeros_like(leaves[k]) if gb is None else gb
                bad = _mismatch(ps[b], exp, atol, rtol)
                worst = max(worst, _err(ps[b], exp))
                if bad:
                    raise _CheckFailure(
                        f"per-sample gradient of {self.name_input(k)} under vmap(grad) differs "
                        f"from a loop of backward calls: max abs error {bad[0]:.1e}",
                        bad[0],
                        bad[1],
                    )
        return worst[0], worst[1], f"batch of {batch}: forward and vmap(grad)"

    def check_batched_grad(self):
        batch = int(self.opts["vmap_batch"])
        leaves = self.leaves()
        outs = [o for o in self.g(*leaves) if o.requires_grad]
        vs = [torch.stack([self.randn(o.shape, o.dtype) for _ in range(batch)]) for o in outs]
        atol, rtol = self.parity_tol()
        try:
            batched = torch.autograd.grad(
                outs, leaves, vs, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        except Exception as exc:  # noqa: BLE001
            raise _CheckFailure(f"batched backward failed: {explain_error(exc)}") from None
        worst = (0.0, 0.0)
        for b in range(batch):
            gs = torch.autograd.grad(
                outs, leaves, [v[b] for v in vs], retain_graph=True, allow_unused=True
            )
            for k, (gb, bg) in enumerate(zip(gs, batched)):
                if gb is None and bg is None:
                    continue
                exp = torch.zeros_like(leaves[k]) if gb is None else gb
                got = torch.zeros_like(leaves[k]) if bg is None else bg[b]
                bad = _mismatch(got, exp, atol, rtol)
                worst = max(worst, _err(got, exp))
                if bad:
                    raise _CheckFailure(
                        f"batched backward (vmap over grad_outputs) of {self.name_input(k)} "
                        f"differs from a loop: max abs error {bad[0]:.1e}",
                        bad[0],
                        bad[1],
                    )
        return worst[0], worst[1], f"batch of {batch} grad_outputs"

    def check_undefined_grad(self):
        if self.gradcheck_failed:
            raise _CheckSkip("skipped because gradcheck failed")
        diff = [self.args[i].detach().clone().requires_grad_(True) for i in self.grad_idx]
        gc_module = sys.modules.get("torch.autograd.gradcheck")
        private = getattr(gc_module, "_test_undefined_backward_mode", None)
        try:
            if private is not None:
                private(self.g, self.g(*diff), tuple(diff))
            elif self.dtype == torch.float64:
                torch.autograd.gradcheck(
                    self.g, tuple(diff), fast_mode=True, check_undefined_grad=True
                )
            else:
                raise _CheckSkip("needs float64 inputs with this torch version")
        except _CheckSkip:
            raise
        except Exception as exc:  # noqa: BLE001
            msg = explain_error(exc)
            if "undefined" not in msg:
                msg = f"backward fails when an output gradient is undefined (None): {msg}"
            raise _CheckFailure(msg) from None
        return None, None, "undefined output grads treated as zeros"

    def check_grad_shapes(self):
        leaves = self.leaves()
        outs = [o for o in self.g(*leaves) if o.requires_grad]
        nodes, seen, stack = [], set(), [o.grad_fn for o in outs if o.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                nodes.append(node)
            stack.extend(nf for nf, _ in node.next_functions if nf is not None)
        if not nodes:
            raise _CheckSkip("no custom autograd.Function in the graph")
        captured: dict[Any, tuple] = {}
        handles = [
            n.register_prehook(lambda go, n=n: captured.__setitem__(n, tuple(go))) for n in nodes
        ]
        try:
            vs = self.randn_like_outputs(outs)
            torch.autograd.grad(outs, leaves, vs, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        checked = 0
        for node, go in captured.items():
            cls_name = getattr(node, "_forward_cls", type(node)).__name__
            try:
                raw = node.apply(*go)
            except Exception as exc:  # noqa: BLE001
                msg = f"backward of {cls_name} failed: {explain_error(exc)}"
                raise _CheckFailure(msg) from None
            raw = raw if isinstance(raw, tuple) else (raw,)
            for i, ((nf, slot), grad) in enumerate(zip(node.next_functions, raw)):
                if nf is None or not isinstance(grad, torch.Tensor):
                    continue
                if hasattr(nf, "variable"):
                    expected = tuple(nf.variable.shape)
                else:
                    meta = getattr(nf, "_input_metadata", None)
                    if meta is None:
                        continue
                    expected = tuple(meta[slot].shape)
                checked += 1
                if tuple(grad.shape) != expected:
                    raise _CheckFailure(
                        f"backward of {cls_name} returned a gradient of shape {_shape(grad)} for "
                        f"its input {i}, which has shape {_shape(expected)}: reduce it over the "
                        "broadcast (leading) dims yourself - autograd silently sums it in eager "
                        "mode, which hides the bug"
                    )
        return None, None, f"{checked} gradient(s) of {len(captured)} Function node(s) checked"

    def check_grad_output_safety(self):
        atol, rtol = self.parity_tol()
        inputs_before = [a.detach().clone() for a in self.args if isinstance(a, torch.Tensor)]
        leaves = self.leaves()
        leaves_before = [x.detach().clone() for x in leaves]
        outs = [o for o in self.g(*leaves) if o.requires_grad]
        vs = self.randn_like_outputs(outs)
        vs_copy = [v.clone() for v in vs]
        try:
            ref = torch.autograd.grad(outs, leaves, vs, retain_graph=True, allow_unused=True)
        except Exception as exc:  # noqa: BLE001
            raise _CheckFailure(f"backward failed: {explain_error(exc)}") from None
        for o, (v, vc) in enumerate(zip(vs, vs_copy)):
            if not torch.equal(v, vc) and not (v.isnan() | vc.isnan()).any():
                raise _CheckFailure(
                    f"backward modified grad_output {o} in place: never write into grad_output "
                    "(it may be shared with other nodes or be an expanded tensor)"
                )
        worst = (0.0, 0.0)
        layouts = {
            "non-contiguous (strided)": [_strided_copy(v) for v in vs],
            "expanded (stride-0, as from .sum())": [
                v.reshape(-1)[:1].reshape(()).expand(v.shape) if v.numel() else v for v in vs
            ],
        }
        for label, strided in layouts.items():
            dense = [s.contiguous() for s in strided]
            try:
                got = torch.autograd.grad(
                    outs, leaves, strided, retain_graph=True, allow_unused=True
                )
            except Exception as exc:  # noqa: BLE001
                raise _CheckFailure(
                    f"backward fails for a {label} grad_output: {explain_error(exc)}"
                ) from None
            exp = torch.autograd.grad(outs, leaves, dense, retain_graph=True, allow_unused=True)
            for k, (a, e) in enumerate(zip(got, exp)):
                if a is None or e is None:
                    continue
                bad = _mismatch(a, e, atol, rtol)
                worst = max(worst, _err(a, e))
                if bad:
                    raise _CheckFailure(
                        f"gradient of {self.name_input(k)} changes when grad_output is {label}: "
                        f"max abs error {bad[0]:.1e} (backward depends on memory layout)",
                        bad[0],
                        bad[1],
                    )
        for k, (x, xb) in enumerate(zip(leaves, leaves_before)):
            if not torch.equal(x.detach(), xb) and not x.isnan().any():
                raise _CheckFailure(f"forward or backward modified {self.name_input(k)} in place")
        after = [a for a in self.args if isinstance(a, torch.Tensor)]
        for a, b in zip(after, inputs_before):
            if not torch.equal(a, b) and not a.isnan().any():
                raise _CheckFailure("fn modified one of its (non-differentiable) inputs in place")
        del ref
        return worst[0], worst[1], "grad_output intact; strided and expanded grads accepted"

    def parity_tol(self, dtype: torch.dtype | None = None) -> tuple[float, float]:
        atol, rtol = tolerances(dtype or self.dtype)
        if self.opts["parity_atol"] is not None:
            atol = float(self.opts["parity_atol"])
        if self.opts["parity_rtol"] is not None:
            rtol = float(self.opts["parity_rtol"])
        return atol, rtol

    def _compare_runs(self, other: Callable, label: str, check_dtype: bool = True):
        """Run fn and ``other`` on the same inputs and grad_outputs; compare everything."""
        leaves_a, leaves_b = self.leaves(), self.leaves()
        outs_a = list(self.g(*leaves_a))
        try:
            outs_b = _float_tensors(self.call(other, leaves_b))
        except Exception as exc:  # noqa: BLE001
            raise _CheckFailure(f"{label} raised {explain_error(exc)}") from None
        if len(outs_a) != len(outs_b):
            raise _CheckFailure(
                f"fn returned {len(outs_a)} floating-point output(s) but {label} returned "
                f"{len(outs_b)}"
            )
        worst = (0.0, 0.0)
        for o, (a, b) in enumerate(zip(outs_a, outs_b)):
            if check_dtype and a.shape == b.shape and a.dtype != b.dtype:
                raise _CheckFailure(f"output {o} has dtype {a.dtype} but {label} gives {b.dtype}")
            worst = max(worst, self._compare(a, b, f"output {o}", label))
        pairs = [
            (a, b, self.randn(a.shape, a.dtype))
            for a, b in zip(outs_a, outs_b)
            if a.requires_grad or b.requires_grad
        ]
        if not pairs:
            return worst
        ga = self._grads([p[0] for p in pairs], leaves_a, [p[2] for p in pairs])
        gb = self._grads([p[1] for p in pairs], leaves_b, [p[2] for p in pairs])
        for k, (a, b) in enumerate(zip(ga, gb)):
            worst = max(worst, self._compare(a, b, f"gradient of {self.name_input(k)}", label))
        return worst

    def _compare(self, a, b, what: str, label: str) -> tuple[float, float]:
        """``(max abs, max rel)`` error of ``a`` against ``b``; a failed check naming
        ``what`` when the shapes differ or the values are out of tolerance."""
        if a.shape != b.shape:
            raise _CheckFailure(f"{what} has shape {_shape(a)} but {label} gives {_shape(b)}")
        atol, rtol = self.parity_tol(b.dtype)
        bad = _mismatch(a, b, atol, rtol)
        if bad:
            raise _CheckFailure(
                f"{what} differs from {label}: max abs error {bad[0]:.1e} at index {bad[2]}",
                bad[0],
                bad[1],
            )
        return _err(a, b)

    @staticmethod
    def _grads(outs, leaves, vs):
        live = [(o, v) for o, v in zip(outs, vs) if o.requires_grad]
        if not live:
            return [torch.zeros_like(x) for x in leaves]
        gs = torch.autograd.grad(
            [o for o, _ in live], leaves, [v for _, v in live], allow_unused=True
        )
        return [torch.zeros_like(x) if gi is None else gi for gi, x in zip(gs, leaves)]

    def check_compile(self):
        backend = self.opts["compile_backend"]
        fullgraph = bool(self.opts["compile_fullgraph"])
        fn = self.fn

        def compiled_target(*a):
            return fn(*a)

        target = _fresh_code(compiled_target)
        try:
            compiled = torch.compile(target, backend=backend, fullgraph=fullgraph, dynamic=False)
        except Exception as exc:  # noqa: BLE001
            msg = f"torch.compile(backend={backend!r}) failed: {explain_error(exc)}"
            raise _CheckFailure(msg) from None
        label = f"torch.compile(backend={backend!r}{', fullgraph=True' if fullgraph else ''})"
        try:
            abs_err, rel_err = self._compare_runs(compiled, label)
        except _CheckFailure as fail:
            if fail.message.startswith(f"{label} raised"):
                fail.message = fail.message.replace(" raised ", " failed: ", 1)
            raise
        return abs_err, rel_err, f"backend={backend}"

    def check_reference(self):
        if self.reference is None:
            raise _CheckSkip("no reference given")
        abs_err, rel_err = self._compare_runs(self.reference, "the reference")
        return abs_err, rel_err, "outputs and gradients match"


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def _validate(fn: Any, inputs: tuple, reference: Any, options: dict[str, Any]):
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise TypeError(
            f"check_function got unknown option(s) {', '.join(unknown)}; valid options: "
            f"{', '.join(sorted(DEFAULT_OPTIONS))}"
        )
    opts = {**DEFAULT_OPTIONS, **options, "reference": reference}
    if isinstance(fn, type) and issubclass(fn, torch.autograd.Function):
        opts["name"] = opts["name"] or fn.__name__
        fn = fn.apply
    if not callable(fn):
        raise TypeError(
            "check_function: fn must be callable (a function, an nn.Module or a "
            f"torch.autograd.Function subclass); got {type(fn).__name__}"
        )
    if isinstance(reference, type) and issubclass(reference, torch.autograd.Function):
        opts["reference"] = reference.apply
    if reference is not None and not callable(opts["reference"]):
        raise TypeError(
            f"check_function: reference must be callable or None; got {type(reference).__name__}"
        )
    if not inputs:
        raise ValueError("check_function: give at least one example input tensor after fn")
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            if x.is_complex():
                raise ValueError(f"check_function: input {i} is complex; only real tensors work")
            continue
        if isinstance(x, _SCALAR_TYPES):
            continue
        if isinstance(x, tuple) and all(isinstance(e, _SCALAR_TYPES) for e in x):
            continue
        raise TypeError(
            f"check_function: input {i} is a {type(x).__name__}; inputs must be tensors (or "
            "plain Python scalars such as a dim argument). Convert it with torch.as_tensor(...)"
        )
    if not any(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("check_function: none of the inputs is a tensor")
    unknown_checks = sorted(set(opts["checks"] or ()) | set(opts["skip"] or ()))
    bad = [c for c in unknown_checks if c not in CHECKS]
    if bad:
        raise ValueError(
            f"check_function: unknown check(s) {', '.join(bad)}; valid checks: {', '.join(CHECKS)}"
        )
    dtype = opts["dtype"]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"check_function: dtype must be a floating torch.dtype or None: {dtype}")
    backend = opts["compile_backend"]
    if not (isinstance(backend, str) or callable(backend)):
        raise TypeError("check_function: compile_backend must be a backend name or callable")
    return fn, opts


def _prepare(inputs: tuple, opts: dict[str, Any]) -> tuple[list[Any], list[int]]:
    dtype, device = opts["dtype"], opts["device"]
    args: list[Any] = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            t = x.detach()
            if device is not None:
                t = t.to(device)
            if t.is_floating_point() and dtype is not None:
                t = t.to(dtype)
            args.append(t.clone() if t is x.detach() else t)
        else:
            args.append(x)
    grad_inputs = opts["grad_inputs"]
    if grad_inputs is None:
        grad_idx = [
            i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()
        ]
        if not grad_idx:
            raise ValueError(
                "check_function: no floating-point tensor input to differentiate (integer "
                "tensors such as class targets cannot require gradients)"
            )
    else:
        if isinstance(grad_inputs, int):
            grad_inputs = (grad_inputs,)
        grad_idx = []
        for i in grad_inputs:
            if not isinstance(i, int) or not -len(args) <= i < len(args):
                raise ValueError(
                    f"check_function: grad_inputs entry {i!r} is not a valid input position "
                    f"(there are {len(args)} inputs)"
                )
            i = i % len(args)
            a = args[i]
            if not isinstance(a, torch.Tensor):
                raise ValueError(
                    f"check_function: input {i} is a {type(a).__name__}, not a tensor; it cannot "
                    "require gradients"
                )
            if not a.is_floating_point():
                raise ValueError(
                    f"check_function: input {i} is an integer tensor ({a.dtype}); integer "
                    "tensors cannot require gradients - leave it out of grad_inputs"
                )
            grad_idx.append(i)
        if not grad_idx:
            raise ValueError("check_function: grad_inputs is empty; nothing to differentiate")
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(
            f"check_function: inputs are on different devices ({', '.join(map(str, devices))}); "
            "pass device=... to move them all"
        )
    dtypes = {args[i].dtype for i in grad_idx}
    if len(dtypes) > 1 and dtype is None:
        raise ValueError(
            "check_function: differentiable inputs have different dtypes; pass dtype=..."
        )
    return args, grad_idx


def check_function(
    fn: Callable[..., Any] | type[torch.autograd.Function],
    *inputs: Any,
    reference: Callable[..., Any] | None = None,
    **options: Any,
) -> Report:
    """Verify the gradients of ``fn`` (any differentiable callable or autograd.Function).

    Runs, on the example ``inputs``: ``gradcheck``, ``gradgradcheck``, forward-mode AD,
    ``vmap`` (forward and per-sample grads), batched backward, undefined-grad handling, the
    shape of every custom Function's raw gradients, grad_output safety (no in-place writes,
    strided/expanded grad_outputs), ``torch.compile`` parity with eager and, if ``reference``
    is given, parity of outputs and all gradients with it. Floating inputs are cast to
    ``dtype`` (float64 by default); the numerical checks run only in float64, the others use
    dtype-aware tolerances (:func:`tolerances`). Nothing raises from inside torch: every
    problem becomes a failed (or skipped) check with a plain-word message.

    Args:
        fn: a callable taking ``*inputs`` and returning a tensor (or a tuple/structure of
            tensors), an ``nn.Module``, or a ``torch.autograd.Function`` subclass (its
            ``apply`` is used).
        *inputs: example inputs: tensors plus plain Python scalars (e.g. a ``dim``).
            Integer tensors (class targets) are passed through and never differentiated.
        reference: optional callable with the same signature whose outputs and gradients
            ``fn`` must match (e.g. the ``torch.nn.functional`` op ``fn`` re-implements).
        **options: any of

            - ``dtype`` (``torch.float64``): dtype floating inputs are cast to; ``None``
              keeps each input's dtype.
            - ``device`` (None): move all inputs there.
            - ``grad_inputs`` (all floating tensors): positions of the inputs to differentiate.
            - ``checks`` (all) / ``skip`` (none): names from :data:`CHECKS` to run / leave out.
            - ``eps``, ``atol``, ``rtol``, ``nondet_tol``, ``fast_mode``: as in
              :func:`torch.autograd.gradcheck`.
            - ``parity_atol``, ``parity_rtol``: override the dtype-aware tolerances of the
              vmap/compile/reference comparisons.
            - ``compile_backend`` (``"aot_eager"``), ``compile_fullgraph`` (True).
            - ``vmap_batch`` (3), ``seed`` (0), ``name`` (label of the report).

    Returns:
        A :class:`~torchbp.verify.report.Report`; ``report.ok`` is True only if no check
        failed. ``print(report)`` shows a table, ``report.to_dict()`` is JSON-serialisable.

    Raises:
        TypeError / ValueError: on bad arguments (non-callable ``fn``, non-tensor inputs,
            integer inputs in ``grad_inputs``, unknown option or check names).

    Examples:
        >>> import torch
        >>> from torchbp.verify import check_function
        >>> x = torch.randn(3, 4)
        >>> report = check_function(torch.tanh, x, reference=torch.tanh, skip=["compile"])
        >>> report.ok
        True
    """
    fn, opts = _validate(fn, inputs, reference, options)
    args, grad_idx = _prepare(inputs, opts)
    runner = _Runner(fn, args, grad_idx, opts)
    selected = [c for c in (opts["checks"] or CHECKS) if c not in set(opts["skip"] or ())]
    selected = [c for c in CHECKS if c in selected]
    report = Report(
        opts["name"] or _fn_name(fn),
        meta={
            "inputs": [_describe(a) for a in args],
            "grad_inputs": grad_idx,
            "dtype": str(runner.dtype).replace("torch.", ""),
            "device": str(runner.device),
            "torch": torch.__version__,
            "fast_mode": bool(opts["fast_mode"]),
        },
    )
    forward_ok = True
    for name in ["forward", *[c for c in selected if c != "forward"]]:
        if name != "forward" and not forward_ok:
            report.checks.append(CheckResult(name, SKIP, "skipped because forward failed"))
            continue
        start = time.perf_counter()
        abs_err = rel_err = None
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(opts["seed"]))
                abs_err, rel_err, note = getattr(runner, f"check_{name}")()
            status, message = PASS, note or ""
        except _CheckFailure as fail:
            status, message = FAIL, fail.message
            abs_err, rel_err = fail.abs_err, fail.rel_err
        except _CheckSkip as skip:
            status, message = SKIP, str(skip)
        except Exception as exc:  # noqa: BLE001 - never leak a deep traceback
            status, message = FAIL, explain_error(exc)
        if name == "forward" and status != PASS:
            forward_ok = False
            if not message.startswith("fn "):
                message = f"fn raised {message}"
        if name == "gradcheck" and status == FAIL:
            runner.gradcheck_failed = True
        report.checks.append(
            CheckResult(name, status, message, abs_err, rel_err, time.perf_counter() - start)
        )
    return report
