"""``torchbp.enable()``: route the covered functional calls of any model to torchbp.

:func:`torchbp.convert` swaps modules, but most models also call functions in their
``forward``: ``F.gelu`` passed as an activation, ``F.linear`` on a weight, ``x.softmax(-1)``,
``F.cross_entropy``. Under :func:`enable` (a :class:`torch.overrides.TorchFunctionMode`)
those calls run torchbp's Functions instead, so their backward nodes are torchbp's
(``<Name>FunctionBackward``), and everything else passes through untouched.

What is routed (the table is derived from the op registry, :mod:`torchbp.ops`):

* every op's native function (``torch.nn.functional.linear``, ``relu``, ``leaky_relu``,
  ``gelu``, ``silu``, ``elu``, ``softplus``, ``softmax``, ``log_softmax``, ``nll_loss``,
  ``cross_entropy``, ``linear_cross_entropy``, ``torch.sigmoid``, ``torch.tanh``),
  ``inplace=True`` included where torchbp supports it;
* the ``torch.*`` functions and tensor methods of the same names that take the same
  arguments: ``torch.relu``, ``torch.softmax``, ``torch.log_softmax``, ``x.relu()``,
  ``x.sigmoid()``, ``x.tanh()``, ``x.softmax(dim)``, ``x.log_softmax(dim)``
  (``F.sigmoid`` / ``F.tanh`` call the methods);
* the in-place variants torchbp supports: ``x.relu_()``, ``torch.relu_``,
  ``F.relu_``, ``F.leaky_relu_``, ``F.elu_``.

A covered function stays native, counted in :attr:`TorchbpMode.native` with the reason,
when torchbp does not take the call: an input that is not a floating-point tensor
(``torch.relu`` of an int tensor), an ``out=`` tensor (``out=None``, the default, is
routed), a keyword torchbp's function lacks, a sparse or nested tensor argument
(torchbp's functions take dense strided tensors), an argument of a tensor subclass with a
``__torch_function__`` of its own (it decides what the function means for it, e.g. a
quantized weight's ``F.linear``; ``nn.Parameter`` and subclasses keeping torch's default
are routed), or an in-place variant torchbp has no Function for (``sigmoid_``, ``tanh_``).
Calls torchbp takes but rejects raise torchbp's error (an instance of native's class).

Python-level ``torch.nn.functional`` functions that are not covered
(``multi_head_attention_forward``, ``softmin``, ``tanhshrink``, ...) reach the mode as a
whole; they are re-dispatched with the mode still active
(:func:`torch.overrides.redispatch_function`), so the covered calls inside them are routed
too: ``nn.MultiheadAttention``'s input/output projections, for example (unless an
argument is a tensor subclass with its own ``__torch_function__``: that receives the
whole call, as without the mode). On a torch without
``redispatch_function`` (2.11; it is public from 2.13) their bodies run natively (and
their warnings, e.g. ``F.softmin``'s implicit dim, point into torch's dispatch). What no mode can
reach is a fused native kernel: ``F.scaled_dot_product_attention`` (the attention
softmax of ``MultiheadAttention`` with ``need_weights=False``, as in
``TransformerEncoderLayer``) stays native. The fused fast paths of
``TransformerEncoderLayer`` / ``MultiheadAttention`` (eval mode or ``no_grad``:
``torch._transformer_encoder_layer_fwd``, ``torch._native_multi_head_attention``) would
bypass every functional call, but those modules skip them while any torch function mode
is active, so under :func:`enable` they take their functional path.

Only calls that record a backward are routed: under ``torch.no_grad()`` /
``torch.inference_mode()`` (and inside any Function's forward) covered calls run native
kernels, uncounted, since there is no backward to hand-write.

TorchScript: the calls of a ``ScriptModule`` (``torch.jit.script`` / ``torch.jit.trace``)
run in TorchScript's interpreter, where no mode reaches: under the mode they stay native,
uncounted. ``torch.jit.trace`` under the mode records the covered calls as native's,
uncounted, for the same reason (and torch's sanity check re-traces under ``no_grad``, so
the trace and the check see the same graph); the trace saves with ``torch.jit.save``. To
trace torchbp's Functions (in process only), trace a model converted with
:func:`torchbp.convert`. Likewise the module of a ``torch.export`` program calls ATen
operators (``torch.ops.aten.*``), not the functions the mode routes: it runs native.

Activation checkpointing: ``torch.utils.checkpoint`` recomputes the checkpointed
forward during backward, which runs outside the mode. With ``use_reentrant=True`` the
checkpointed forward runs under ``no_grad`` and so natively both times (its backward is
native's). With ``use_reentrant=False`` the first forward is routed but the recomputation
is not, and torch refuses the mismatch (``CheckpointError``: recomputed values have
different metadata); give the recomputation the mode too, with
``checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(),
torchbp.enable()))``, or convert the checkpointed modules with :func:`torchbp.convert`
(whose forward is torchbp's wherever it runs).

Semantics:

* The calls torchbp itself makes while running a routed op are never routed again (the
  mode is suspended inside ``__torch_function__`` and the calls of a routed op pass
  every torchbp mode, nested ones included). Backward passes do not run under the mode.
* Modes nest: the innermost one routes and counts a call.
* Warnings point where they do without the mode: the implicit-dim warning of
  ``F.softmax(x)`` / ``F.log_softmax(x)`` (routed or not, torchbp's own too, as in a
  converted ``nn.Softmax()``) and of the re-dispatched ``F.softmin(x)`` names the
  caller's line (``_stacklevel`` counted from the function called), not a frame of
  torchbp or of torch's dispatch. A warning with a fixed stack level raised in the body
  of another re-dispatched function (``F.mse_loss``'s broadcast warning, ``F.kl_div``'s
  ``'mean'`` warning) points into ``torch/overrides.py``, the frame that re-dispatched it.
* Like every ``TorchFunctionMode``, a mode is active in the thread that entered it only
  (the mode stack is thread-local); other threads are unaffected. One instance may be
  entered in several threads, but its counters are then updated without a lock (use
  one ``enable()`` per thread for exact counts).
* ``torch.compile``: a function compiled and called inside the mode traces through it
  (Dynamo inlines ``__torch_function__``; ``fullgraph=True`` works) and captures
  torchbp's Functions. Calls inside compiled code are not counted. Code compiled
  outside the mode is recompiled on its first call inside it (the mode stack is
  guarded), and ``enable()`` may also be entered inside the compiled function. Inside
  compiled code a Python-level function the mode does not route (``F.layer_norm``,
  ``F.multi_head_attention_forward``, ...) runs its body natively, as on a torch without
  ``redispatch_function`` (Dynamo cannot trace it): the covered calls inside it (the
  projections of ``nn.MultiheadAttention``, ``F.softmin``'s softmax) may stay native there
  (whether the mode still sees them is Dynamo's choice; gradients are right either way);
  the calls around it route.

Cost: each call the mode passes through pays torch's mode dispatch (about 1-2 µs on a
2-core Xeon; a Python-level ``torch.nn.functional`` function, re-dispatched, about twice
that), and each routed call about 5 µs on top of torchbp's own work
(``python -m experiments.bench_mode``). The graph is built by forward and loss, so
wrapping only those (not ``backward()`` and the optimizer step) keeps the cost to the
calls that matter: within 2% of a converted model for an MLP step.

Examples::

    >>> import torch, torchbp
    >>> layer = torch.nn.TransformerEncoderLayer(16, 2, activation="gelu", batch_first=True)
    >>> with torchbp.enable() as mode:
    ...     loss = layer(torch.randn(4, 5, 16)).logsumexp(-1).mean()
    >>> loss.backward()
    >>> mode.counts["gelu"], mode.counts["linear"] >= 2  # 4 with attention's (torch 2.13+)
    (1, True)
"""

from __future__ import annotations

import functools
import inspect
import threading
import types
from collections import Counter
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from torchbp.ops import OPS, Op

__all__ = ["enable", "TorchbpMode", "routed_functions"]

# ``redispatch_function`` is public from torch 2.13 (2.11 lacks it): without it, composite
# torch.nn.functional functions run their body natively under the mode (see the module doc)
_redispatch_function = getattr(torch.overrides, "redispatch_function", None)

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


@dataclass(frozen=True)
class _Route:
    """How one native function object is served under the mode.

    Attributes:
        op: the registry name (the key of :attr:`TorchbpMode.counts`).
        label: the native function as users write it, e.g. ``"Tensor.relu_"``.
        call: runs torchbp with the native function's arguments (``None``: always native).
        extra: keywords of the native function that torchbp's lacks: a call passing one
            stays native.
        reason: why a route without ``call`` stays native.
    """

    op: str
    label: str
    call: Callable[..., torch.Tensor] | None
    extra: tuple[str, ...] = ()
    reason: str = ""


def _one_argument(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.relu(input)`` / ``x.relu()``: the element-wise op with its defaults."""

    def call(input: torch.Tensor) -> torch.Tensor:
        return fn(input)

    return call


def _dim_and_dtype(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.softmax(input, dim, dtype=None)`` / ``x.softmax(dim)``: the third
    positional argument is ``dtype`` (``F.softmax``'s is ``_stacklevel``)."""

    def call(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return fn(input, dim, dtype=dtype)

    return call


def _in_place(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``F.leaky_relu_(input, negative_slope)`` and the like: the op with ``inplace=True``."""

    def call(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return fn(input, *args, inplace=True, **kwargs)

    return call


def _without(
    extra: tuple[str, ...], fn: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """``fn`` called with the native keywords it lacks dropped (they are ``None`` here)."""

    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        for name in extra:
            kwargs.pop(name, None)
        return fn(*args, **kwargs)

    return call


def _frames_up_to(code: types.CodeType) -> int | None:
    """How many frames above its caller the innermost frame running ``code`` is (``None``
    where none is)."""
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None  # the caller
        steps = 0
        while frame is not None and frame.f_code is not code:
            frame, steps = frame.f_back, steps + 1
        return None if frame is None else steps
    finally:
        del frame


#: the ``_stacklevel`` of a ``torch.nn.functional`` function that names its caller's line
#: (``_get_softmax_dim`` warns at it: 1 is that helper, 2 the function called)
_CALLER_STACKLEVEL = 3


def _stacklevel_below(stacklevel: int, between: int, runs_again: bool) -> int:
    """The ``_stacklevel`` for a function run ``between + 1`` frames below the frame of
    the function called (by :func:`_warning_as_native`), so that its warning points where
    the function called would: its caller or above (a level of at least
    :data:`_CALLER_STACKLEVEL`) raised by the frames between. A level inside the function
    (its helper, its own line) is kept when the function called runs again below
    (``runs_again``: that body has those frames); otherwise (torchbp's function runs
    instead of native's, whose helper never runs) it names the called function's own
    frame, the nearest one inside it."""
    if stacklevel < _CALLER_STACKLEVEL:
        if runs_again:
            return stacklevel
        stacklevel = _CALLER_STACKLEVEL - 1
    return stacklevel + between + 1


def _warning_as_native(
    native: Callable[..., torch.Tensor], fn: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """``F.softmax`` / ``F.log_softmax``: the implicit-dim warning points ``_stacklevel - 2``
    frames above native's function (its caller by default). Under the mode, ``fn``
    (torchbp's function, or native's passed on) runs below native's, torch's dispatch and
    this mode; the frames between are added to ``_stacklevel`` so that the warning points
    where native's does (the user's line), not into torchbp (see
    :func:`_stacklevel_below`)."""
    code = native.__code__

    def call(input, dim=None, _stacklevel=3, dtype=None):
        if dim is None and not torch.compiler.is_compiling():  # (Dynamo has no frames)
            between = _frames_up_to(code)
            if between is not None:  # fn runs one frame below this one
                _stacklevel = _stacklevel_below(_stacklevel, between, fn is native)
        return fn(input, dim, _stacklevel, dtype)

    return call


def _takes_stacklevel(native: Callable[..., Any]) -> bool:
    """Whether a native function warns at its ``_stacklevel`` (builtins take none)."""
    return isinstance(native, types.FunctionType) and "_stacklevel" in (
        inspect.signature(native).parameters
    )


def _takes_inplace(fn: Callable[..., Any]) -> bool:
    return "inplace" in inspect.signature(fn).parameters


def _keywords_torchbp_lacks(native: Callable[..., Any], fn: Callable[..., Any]) -> tuple[str, ...]:
    """Keyword-only parameters of a Python-level native function that ``fn`` does not take
    (builtins, whose signatures are not inspectable, share torchbp's)."""
    try:
        params = inspect.signature(native).parameters.values()
    except ValueError:
        return ()
    ours = inspect.signature(fn).parameters
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ours)


_OWNERS = (("torch", torch), ("Tensor", torch.Tensor), ("torch.nn.functional", F))


def _aliases(op: Op) -> list[tuple[Any, _Route]]:
    """The ``torch.*`` functions and tensor methods named like ``op`` (and their in-place
    ``<name>_`` variants) that take the same arguments."""
    found: list[tuple[Any, _Route]] = []
    if op.kind not in ("activation", "softmax"):
        return found
    adapt = _one_argument if op.kind == "activation" else _dim_and_dtype
    for owner_name, owner in _OWNERS:
        same = getattr(owner, op.name, None)
        if same is not None:
            label = f"{owner_name}.{op.name}"
            found.append((same, _Route(op.name, label, adapt(op.functional))))
        in_place = getattr(owner, op.name + "_", None)
        if in_place is None:
            continue
        label = f"{owner_name}.{op.name}_"
        if _takes_inplace(op.functional):
            found.append((in_place, _Route(op.name, label, _in_place(op.functional))))
        else:
            reason = f"torchbp has no in-place {op.name}"
            found.append((in_place, _Route(op.name, label, None, reason=reason)))
    return found


def _build_routes() -> dict[Any, _Route]:
    routes: dict[Any, _Route] = {}
    for op in OPS.values():
        if op.torch_functional is None:
            continue
        is_torch = op.torch_functional is getattr(torch, op.name, None)
        label = f"{'torch' if is_torch else 'torch.nn.functional'}.{op.name}"
        extra = _keywords_torchbp_lacks(op.torch_functional, op.functional)
        call = _without(extra, op.functional) if extra else op.functional
        if _takes_stacklevel(op.torch_functional):
            call = _warning_as_native(op.torch_functional, op.functional)
        routes[op.torch_functional] = _Route(op.name, label, call, extra)
    for op in OPS.values():
        for fn, route in _aliases(op):
            routes.setdefault(fn, route)
    return routes


#: native function object -> how it is served (built once, from :mod:`torchbp.ops`)
_ROUTES: dict[Any, _Route] = _build_routes()

#: the functions that warn at their ``_stacklevel`` (native's and torchbp's softmax and
#: log_softmax) -> the same function, called so that its warning points where it does
#: outside the mode when the mode hands the call on unchanged
_PASSED_ON: dict[Any, Callable[..., torch.Tensor]] = {
    fn: _warning_as_native(fn, fn)
    for op in OPS.values()
    for fn in (op.torch_functional, *op.functionals())
    if fn is not None and _takes_stacklevel(fn)
}


def _pass_on(func, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """``func(*args, **kwargs)``, for a call the mode does not route."""
    return _PASSED_ON.get(func, func)(*args, **kwargs)


#: the Python-level ``torch.nn.functional`` functions the mode does not route that warn
#: at their ``_stacklevel`` (``softmin``): they are re-dispatched, and their body then runs
#: below torch's dispatch and this mode instead of right below its caller
_WARN_AT_STACKLEVEL = frozenset(
    fn for fn in vars(F).values() if _takes_stacklevel(fn) and fn not in _ROUTES
)


def _stacklevel_past_dispatch(func, args: tuple[Any, ...], kwargs: dict[str, Any]):
    """``(args, kwargs)`` of a call of ``func`` (one of :data:`_WARN_AT_STACKLEVEL`)
    re-dispatched by :func:`_redispatch_as_native`, with ``_stacklevel`` raised by the
    frames that lie between its body and its caller, so that its warning points where it
    does without the mode (the caller's line by default; a level inside ``func``, below
    :data:`_CALLER_STACKLEVEL`, already does and is left as it is)."""
    # frames from _redispatch_as_native (this function's caller) up to func's own call
    between = _frames_up_to(func.__code__)
    if between is None:
        return args, kwargs
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    if bound.arguments["_stacklevel"] < _CALLER_STACKLEVEL:
        # a frame inside func (its warning helper, its own line): the body's is that frame
        return args, kwargs
    # the body runs below redispatch_function, which runs below _redispatch_as_native
    bound.arguments["_stacklevel"] += between + 1
    return bound.args, bound.kwargs


def _redispatch_as_native(mode: TorchbpMode, func, types_, args, kwargs):
    """Run the body of the Python-level ``torch.nn.functional`` function ``func`` (not
    routed) with ``mode`` active, so that the covered calls inside it are routed."""
    if func in _WARN_AT_STACKLEVEL:
        args, kwargs = _stacklevel_past_dispatch(func, args, kwargs)
    with mode:
        return _redispatch_function(func, types_, args, kwargs)


def routed_functions() -> dict[str, str]:
    """Every native function the mode knows, as written by users, and the torchbp op that
    serves it (or ``"native: <reason>"`` for the in-place variants torchbp lacks).

    Examples::

        >>> routed_functions()["Tensor.relu"]
        'relu'
    """
    return {
        r.label: r.op if r.call is not None else f"native: {r.reason}" for r in _ROUTES.values()
    }


def _routed_label(fn: object) -> str | None:
    """``fn`` as users write it (``"torch.nn.functional.gelu"``) if the mode routes it to
    torchbp, else ``None``."""
    try:
        route = _ROUTES.get(fn)
    except TypeError:  # an unhashable object: no function the mode knows
        return None
    return route.label if route is not None and route.call is not None else None


def _reaches_body_of(fn: object) -> bool:
    """Whether the mode routes the covered calls inside the Python-level
    ``torch.nn.functional`` function ``fn`` it does not route itself (re-dispatched on a
    torch with ``redispatch_function``, 2.13+; on older torch its body runs natively)."""
    return _redispatch_function is not None and isinstance(fn, types.FunctionType)


#: ``torch.Tensor``'s own ``__torch_function__`` (the one a subclass inherits by default)
_DEFAULT_TORCH_FUNCTION = torch.Tensor.__torch_function__.__func__


def _own_torch_function(types_: tuple[type, ...]) -> type | None:
    """The first argument type whose ``__torch_function__`` is its own, not torch's
    default (``nn.Parameter``, whose ``__torch_function__`` is disabled, is not among the
    types a mode receives)."""
    for cls in types_:
        handler = getattr(cls, "__torch_function__", None)
        if getattr(handler, "__func__", handler) is not _DEFAULT_TORCH_FUNCTION:
            return cls
    return None


def _unusual_layout(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The layout of the first tensor argument that is not a dense strided tensor
    (``"torch.sparse_coo"``, ``"nested tensor"``): torchbp's functions take only those."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if value.is_nested:
                return "nested tensor"
            if value.layout != torch.strided:
                return str(value.layout)
    return None


def _why_native(
    route: _Route, types_: tuple[type, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str | None:
    """Why torchbp does not take this call of a covered function (``None``: it does)."""
    if route.call is None:
        return route.reason
    layout = _unusual_layout(args, kwargs)
    if layout is not None:
        return f"{layout} argument"
    subclass = _own_torch_function(types_)
    if subclass is not None:
        # its __torch_function__ says what the function means for it (a quantized weight's
        # F.linear, say): the mode runs before it, so routing would silently bypass it
        return f"{subclass.__name__} argument has its own __torch_function__"
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        return "input is not a tensor"
    if not x.is_floating_point():
        return f"{x.dtype} input"
    if kwargs.get("out") is not None:
        return "out= given"
    for name in route.extra:
        if kwargs.get(name) is not None:
            return f"{name}= given"
    return None


class _RoutingState(threading.local):
    """Per thread: whether a torchbp mode is running a routed op right now."""

    def __init__(self) -> None:
        self.busy = False


_state = _RoutingState()


class TorchbpMode(TorchFunctionMode):
    """The mode :func:`enable` returns: a context manager and a decorator.

    Attributes:
        counts: routed calls per registry op name (``Counter``), e.g. ``{"linear": 3}``.
        native: calls of covered functions that stayed native, per
            ``"<function>: <reason>"`` (``Counter``).

    Both count the calls that returned: one that raised (a bad argument) is not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.native: Counter[str] = Counter()

    if TYPE_CHECKING:
        # torch's TorchFunctionMode.__enter__ (which returns the mode) is unannotated
        def __enter__(self) -> TorchbpMode: ...

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is None:
            if (
                _redispatch_function is not None
                and isinstance(func, types.FunctionType)
                and func.__module__ == F.__name__
                and _own_torch_function(types_) is None
                and not torch.compiler.is_compiling()
            ):
                # a Python-level composite (e.g. multi_head_attention_forward): run its
                # body with the mode active so that the covered calls inside it route
                # (not for an argument whose __torch_function__ is its own: that must see
                # the call itself, as without the mode; nor while torch.compile traces,
                # which cannot trace redispatch_function: the body runs natively there)
                return _redispatch_as_native(self, func, types_, args, kwargs)
            return _pass_on(func, args, kwargs)
        if _state.busy or not torch.is_grad_enabled() or torch.jit.is_tracing():
            # a call made by torchbp itself (under a nested mode), one that records no
            # backward (no_grad, inference_mode, inside a Function's forward), or one
            # torch.jit.trace records (as native's: the trace runs later, out of reach)
            return _pass_on(func, args, kwargs)
        reason = _why_native(route, types_, args, kwargs)
        # counters are not updated while torch.compile traces (each update would
        # invalidate the graph's guards and recompile it)
        counting = not torch.compiler.is_compiling()
        if reason is not None:
            result = _pass_on(func, args, kwargs)
            if counting:  # only once it returned: a call that raised is not counted
                self.native[f"{route.label}: {reason}"] += 1
            return result
        if "out" in kwargs:  # out=None, the default: torchbp's functions have no out=
            kwargs = {k: v for k, v in kwargs.items() if k != "out"}
        _state.busy = True
        try:
            result = route.call(*args, **kwargs)
        finally:
            _state.busy = False
        if counting:
            self.counts[route.op] += 1
        return result

    def __call__(self, fn: _Fn) -> _Fn:
        """Use the mode as a decorator: ``fn`` runs under it (counts accumulate here).

        A generator function or ``async def`` function runs each of its steps under the
        mode (from a resume to the next ``yield`` / ``await``), not the caller's code
        between them nor other tasks meanwhile, as ``torch.no_grad`` does for a
        generator. An async generator function and a class are refused (``TypeError``:
        a decorated class would become a function whose instances are made under the
        mode, their methods called later running without it)."""
        if inspect.isclass(fn):
            raise TypeError(
                f"enable() cannot decorate the class {fn.__name__!r}: only its construction "
                "would run under the mode. Decorate its forward (or the function that calls "
                "the model) instead"
            )
        if inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"enable() cannot decorate the async generator function {fn.__name__!r}: "
                "enter the mode with 'with torchbp.enable():' around the code between "
                "two of its yields / awaits instead"
            )
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def generator_under_mode(*args: Any, **kwargs: Any) -> Any:
                return (yield from _each_step_under(self, fn(*args, **kwargs)))

            return generator_under_mode  # type: ignore[return-value]
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def coroutine_under_mode(*args: Any, **kwargs: Any) -> Any:
                return await _StepsUnderMode(self, fn(*args, **kwargs))

            return coroutine_under_mode  # type: ignore[return-value]

        @functools.wraps(fn)
        def under_mode(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return under_mode  # type: ignore[return-value]

    def __repr__(self) -> str:
        routed = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"TorchbpMode(routed: {routed or 'nothing'})"


def _each_step_under(mode: TorchbpMode, steps: Generator[Any, Any, Any]):
    """Re-yield ``steps`` (a generator, or a coroutine's ``__await__``), running each of
    its steps (``send``, ``throw``, ``close``) under ``mode`` and nothing in between."""
    try:
        with mode:
            item = steps.send(None)
        while True:
            try:
                received = yield item
            except GeneratorExit:
                with mode:
                    steps.close()
                raise
            except BaseException as error:
                with mode:
                    item = steps.throw(error)
            else:
                with mode:
                    item = steps.send(received)
    except StopIteration as stop:
        return stop.value


class _StepsUnderMode:
    """Awaitable: a coroutine whose steps (up to each ``await`` that suspends) run under a
    mode."""

    def __init__(self, mode: TorchbpMode, coroutine: Coroutine[Any, Any, Any]) -> None:
        self.mode, self.coroutine = mode, coroutine

    def __await__(self):
        return _each_step_under(self.mode, self.coroutine.__await__())


def enable() -> TorchbpMode:
    """Run the covered ``torch.nn.functional`` calls, ``torch.*`` functions and tensor
    methods on torchbp's Functions (see the module docstring for the exact table).

    Returns:
        A :class:`TorchbpMode`: enter it with ``with`` or decorate a function with it;
        ``.counts`` says what it routed, ``.native`` which covered calls it left native
        and why.

    Examples::

        >>> import torch, torch.nn.functional as F, torchbp
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> with torchbp.enable() as mode:
        ...     y = F.gelu(x).softmax(-1)
        >>> type(y.grad_fn).__name__
        'SoftmaxFunctionBackward'
        >>> dict(mode.counts)
        {'gelu': 1, 'softmax': 1}

        >>> @torchbp.enable()
        ... def loss_fn(logits, target):
        ...     return F.cross_entropy(logits, target)
    """
    return TorchbpMode()
