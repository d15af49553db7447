"""Swap the supported :mod:`torch.nn` modules of a model for torchbp's twins and back.

A module is converted by switching its class, so parameters, buffers, hooks and the
training flag stay the very same objects:

* an exact supported class (``nn.Linear``, ``nn.GELU``, ...) becomes its twin
  (``torchbp.nn.Linear``, ...), which subclasses it and overrides only ``forward``;
* a subclass of a supported class that does not override ``forward`` (e.g.
  ``torch.nn.modules.linear.NonDynamicallyQuantizableLinear``, the output projection of
  ``nn.MultiheadAttention``) becomes ``class <Name>(<its class>, <the twin>)``, made
  once per class and cached: it keeps its name, its other methods and every
  ``isinstance`` answer, and runs the twin's ``forward``. ``to="torch"`` switches it back
  to the original class; it pickles as that class does (by its own ``__reduce__`` if it
  has one) and is switched to the combined class when loaded; the class itself pickles
  by a name this module resolves (wherever the user class can be pickled by name).
  (``MultiheadAttention`` itself never calls ``out_proj``'s ``forward``: it passes the
  weight to ``F.linear``, which only :func:`torchbp.enable` reaches.)
* a subclass that overrides ``forward`` stays as it is (its forward is the user's code;
  :func:`torchbp.enable` routes the functional calls inside it), and so does a module
  whose ``forward`` is set on the instance (by a library's hooks, say: it would shadow
  the twin's), one with a parameter or buffer of a tensor subclass with its own
  ``__torch_function__`` (a quantized weight: that decides what ``F.linear`` means for
  it, and the twin would call torchbp's function instead), and every module without a
  torchbp op (``Conv2d``, ``LayerNorm``, ...), and a TorchScript module (compiled code
  no class switch reaches: convert before ``torch.jit.trace``; ``torch.jit.script``
  cannot compile torchbp's Functions, so convert and use ``torch.compile`` or
  ``torch.jit.trace`` instead; with ``to="torch"`` it is reported when its code runs
  torchbp's Functions: a traced converted model). Likewise ``to="torch"`` leaves a
  ``torch.fx`` GraphModule as it is, reported when its graph calls torchbp's functions
  (a converted model traced with ``torch.fx.symbolic_trace``). A class convert
  would make that cannot be made (an MRO the twin does not fit, or the class's
  ``__init_subclass__`` / metaclass refusing it) also leaves its module as it is,
  reported with the error, and the others are converted.
* a parametrized module (:mod:`torch.nn.utils.parametrize`: ``weight_norm``,
  ``orthogonal``, ...) is an instance of a class torch made for it on top of its own
  class; the class underneath is converted by the rules above and torch's class is rebuilt
  on the result (same name, same properties), so ``remove_parametrizations`` leaves the
  converted module and ``type_before_parametrizations`` names it.

``convert(model, report=True)`` also returns a :class:`ConvertReport` saying which
modules were converted and which stayed native, and why; the same summary is logged at
``INFO`` level on the ``torchbp.convert`` logger. Calls in a ``forward`` that only
:func:`torchbp.enable` reaches are named: a module without a twin whose forward calls
covered functions (``MultiheadAttention``'s ``F.multi_head_attention_forward``,
``AdaptiveLogSoftmaxWithLoss``'s ``F.log_softmax``), and one holding a covered function
as an attribute to call (``TransformerEncoderLayer(activation="gelu")``'s ``F.gelu``);
both are listed even when the module is a plain container.
"""

from __future__ import annotations

import copy
import functools
import importlib
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, TypeVar, overload

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchbp.mode import _reaches_body_of, _routed_label
from torchbp.ops import module_twins

__all__ = ["convert", "ConvertReport"]

logger = logging.getLogger(__name__)

_TO_TORCHBP: dict[type[nn.Module], type[nn.Module]] = module_twins()
_TO_TORCH = {v: k for k, v in _TO_TORCHBP.items()}
_TWINS = tuple(_TO_TORCH)

#: the attribute a combined class (user subclass + twin) carries: the user's class
_ORIGINAL = "_torchbp_original_class"


@dataclass
class ConvertReport:
    """What :func:`convert` did, module by module.

    Attributes:
        to: the direction, ``"torchbp"`` or ``"torch"``.
        converted: ``(path, class name before, class after)`` of every switched module,
            e.g. ``("fc", "Linear", "torchbp.nn.Linear")`` (``path`` as in
            ``named_modules()``; ``""`` is the root).
        kept: ``(path, class name, reason)`` of every module left as it is that does
            computing of its own (a leaf, or a module with parameters or buffers of its
            own), e.g. ``("conv", "Conv2d", "no torchbp op")``, or that holds a function
            only :func:`torchbp.enable` reaches (see the module docstring); other plain
            containers are not listed.
    """

    to: str
    converted: list[tuple[str, str, str]] = field(default_factory=list)
    kept: list[tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """Two lines: the converted classes and the kept ones with their reasons, e.g.
        ``converted 3: Linear x2, GELU x1`` / ``kept 1: LayerNorm x1 (no torchbp op)``."""
        done = Counter(before for _, before, _ in self.converted)
        kept = Counter((name, reason) for _, name, reason in self.kept)
        done_text = ", ".join(f"{name} x{n}" for name, n in done.items()) or "nothing"
        kept_text = ", ".join(f"{name} x{n} ({why})" for (name, why), n in kept.items())
        return (
            f"torchbp.convert(to={self.to!r}): converted {len(self.converted)}: {done_text}\n"
            f"kept {len(self.kept)}: {kept_text or 'nothing'}"
        )

    def __str__(self) -> str:
        return self.summary()


def _reduce_combined(self: nn.Module, protocol: int):
    """Pickle a combined-class instance the way its user class pickles (its own
    ``__reduce__`` / ``__reduce_ex__`` included); the object rebuilt from it is switched to
    the combined class again if the user's reduction made the user class
    (:func:`_rebuilt_combined`). The combined class itself pickles by name (see
    :func:`__getattr__`)."""
    cls = _combined_class_of(type(self))
    original, twin = getattr(cls, _ORIGINAL), cls.__bases__[1]
    make, args, *rest = original.__reduce_ex__(self, protocol)
    return (_rebuilt_combined, (make, args, original, twin), *rest)


def _combined_class_of(cls: type[nn.Module]) -> type[nn.Module]:
    """The combined class ``cls`` is or derives from (torch's parametrized class of a
    converted module is made on top of it)."""
    return next(c for c in cls.__mro__ if _ORIGINAL in c.__dict__)


def _rebuilt_combined(make, args: tuple, original: type[nn.Module], twin: type[nn.Module]):
    """``make(*args)`` (the user class's reduction), switched to the combined class of
    ``original`` and ``twin`` if it is an ``original``."""
    module = make(*args)
    if type(module) is original:
        module.__class__ = _combined_class(original, twin)
    return module


def _new_combined(original: type[nn.Module], twin: type[nn.Module]) -> nn.Module:
    # what pickles made before _rebuilt_combined name: kept so that they still load
    cls = _combined_class(original, twin)
    return cls.__new__(cls)


#: the prefix of a combined class's ``__qualname__`` (see :func:`_combined_name`)
_COMBINED = "_torchbp_combined__"
#: how :func:`_combined_name` escapes ``_`` and ``.`` and separates module from qualname
_ESCAPES = {"_": "_0", ".": "_1"}
_SEPARATOR = "_2"


def _combined_name(original: type) -> str:
    """The name a combined class is found by in this module: ``original``'s module and
    qualname as one identifier (``_`` -> ``_0``, ``.`` -> ``_1``, ``_2`` between them); a
    local class keeps its qualname, so that pickle refuses it as it refuses the class."""
    if "<locals>" in original.__qualname__.split("."):
        return original.__qualname__
    module, qualname = (
        "".join(_ESCAPES.get(c, c) for c in name)
        for name in (original.__module__, original.__qualname__)
    )
    return f"{_COMBINED}{module}{_SEPARATOR}{qualname}"


def _split_combined_name(name: str) -> tuple[str, str] | None:
    """The module and qualname :func:`_combined_name` made ``name`` of, or ``None``."""
    if not name.startswith(_COMBINED):
        return None
    unescape = {code: char for char, code in _ESCAPES.items()}
    parts: list[str] = []
    current: list[str] = []
    codes = iter(name[len(_COMBINED) :])
    for char in codes:
        code = char + next(codes, "") if char == "_" else char
        if code == _SEPARATOR:
            parts.append("".join(current))
            current = []
        elif code.startswith("_") and code not in unescape:
            return None
        else:
            current.append(unescape.get(code, code))
    parts.append("".join(current))
    return (parts[0], parts[1]) if len(parts) == 2 else None


def __getattr__(name: str) -> type[nn.Module]:
    """The combined class named ``name`` by :func:`_combined_name` (made if need be), so
    that pickle, which stores a class by module and qualname, finds it (PEP 562)."""
    split = _split_combined_name(name)
    if split is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, qualname = split
    original = importlib.import_module(module)
    for part in qualname.split("."):
        original = getattr(original, part)
    combined, _ = _to_torchbp(original) if isinstance(original, type) else (None, "")
    if combined is None or _ORIGINAL not in combined.__dict__:
        raise AttributeError(f"{module}.{qualname} is no class convert combines with a twin")
    return combined


@functools.cache
def _combined_class(original: type[nn.Module], twin: type[nn.Module]) -> type[nn.Module]:
    """``class <Name>(original, twin)``: ``original``'s methods, the twin's ``forward``.

    A lazy module (``nn.LazyLinear``) switches its class to its ``cls_to_become``
    (``nn.Linear``) once initialised: the combined class names that class's twin there
    instead, so that the module stays converted."""
    namespace = {
        "__module__": __name__,
        "__qualname__": _combined_name(original),
        "__doc__": original.__doc__,
        "__reduce_ex__": _reduce_combined,
        _ORIGINAL: original,
    }
    becomes = getattr(original, "cls_to_become", None)
    if becomes in _TO_TORCHBP:
        namespace["cls_to_become"] = _TO_TORCHBP[becomes]
    return type(original.__name__, (original, twin), namespace)


def _supported_base(cls: type[nn.Module]) -> type[nn.Module] | None:
    """The nearest class in ``cls``'s MRO that has a torchbp twin."""
    return next((base for base in cls.__mro__ if base in _TO_TORCHBP), None)


def _to_torchbp(cls: type[nn.Module]) -> tuple[type[nn.Module] | None, str]:
    """``(new class, "")`` or ``(None, why it stays)``."""
    if cls in _TO_TORCHBP:
        return _TO_TORCHBP[cls], ""
    if issubclass(cls, _TWINS):
        return None, "already torchbp"
    if issubclass(cls, torch.jit.TracedModule):
        return None, (
            "a traced TorchScript module (compiled code no class switch reaches): convert "
            "the model before torch.jit.trace"
        )
    if issubclass(cls, torch.jit.ScriptModule):
        # torch.jit.script refuses torchbp's modules: scripting after convert is no way out
        return None, (
            "a scripted TorchScript module (compiled code no class switch reaches, and "
            "TorchScript cannot compile torchbp's Functions): convert the model and use "
            "torch.compile or torch.jit.trace instead of torch.jit.script"
        )
    base = _supported_base(cls)
    if base is None:
        return None, "no torchbp op"
    if cls.forward is not base.forward:
        return None, f"overrides forward of {base.__name__}"
    try:
        return _combined_class(cls, _TO_TORCHBP[base]), ""
    except Exception as e:  # any: see _refusal
        return None, f"cannot combine with torchbp.nn.{base.__name__}: {_refusal(e)}"


def _to_torch(cls: type[nn.Module]) -> tuple[type[nn.Module] | None, str]:
    if cls in _TO_TORCH:
        return _TO_TORCH[cls], ""
    original = cls.__dict__.get(_ORIGINAL)
    if original is not None:
        return original, ""
    if issubclass(cls, _TWINS):
        twin = next(t for t in cls.__mro__ if t in _TO_TORCH)
        return None, f"a user subclass of torchbp.nn.{twin.__name__}"
    return None, "not torchbp"


def _refusal(error: Exception) -> str:
    """Why making a class failed: an MRO or layout that cannot take the twin as a base
    (``TypeError``), or the user's ``__init_subclass__`` / metaclass refusing the new class
    (a registry of subclasses, say: any exception), so that convert keeps that module and
    goes on instead of stopping half-way."""
    return str(error) if isinstance(error, TypeError) else f"{type(error).__name__}: {error}"


def _parametrized_on(cls: type[nn.Module], base: type[nn.Module]) -> type[nn.Module]:
    """torch's parametrized class ``cls`` (made for one module; its own namespace holds
    the parametrized tensors' properties) rebuilt on ``base`` instead of its original."""
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__, (base,), body)


#: the ``__torch_function__`` of ``torch.Tensor`` (inherited by default) and of
#: ``nn.Parameter`` (disabled): tensors with either compute as torch's do
_TORCH_HANDLERS = (torch.Tensor.__torch_function__.__func__, nn.Parameter.__torch_function__)


def _tensor_with_own_torch_function(module: nn.Module) -> str | None:
    """``"<name> is a <class> with its own __torch_function__"`` for the first own
    parameter or buffer of ``module`` whose class says what functions mean for it (a
    quantized weight's ``F.linear``); ``None`` if there is none."""
    tensors = itertools.chain(
        module.named_parameters(recurse=False), module.named_buffers(recurse=False)
    )
    for name, tensor in tensors:
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            continue  # a lazy module's placeholder: it becomes a Parameter / a tensor
        handler = type(tensor).__torch_function__
        if getattr(handler, "__func__", handler) not in _TORCH_HANDLERS:
            return f"{name} is a {type(tensor).__name__} with its own __torch_function__"
    return None


def _torchbp_functions_traced_in(module: torch.jit.ScriptModule) -> list[str]:
    """The torchbp Functions that the forward of a traced module calls (the Python
    operators of its graph; a scripted module cannot call them)."""
    try:
        graph = module.graph
    except (AttributeError, RuntimeError):  # a module without a forward of its own
        return []
    names: list[str] = []
    for node in graph.nodes():
        if node.kind() != "prim::PythonOp":
            continue
        function = getattr(node.pyobj(), "__self__", None)  # Function.apply's class
        if isinstance(function, type) and function.__module__.startswith("torchbp."):
            if function.__name__ not in names:
                names.append(function.__name__)
    return names


def _torchscript_to_torch(module: torch.jit.ScriptModule) -> str:
    """Why ``to="torch"`` keeps a TorchScript module: ``"not torchbp"`` (not reported)
    unless its compiled code runs torchbp's Functions (a traced converted model), which
    no class switch reaches."""
    functions = _torchbp_functions_traced_in(module)
    if not functions:
        return "not torchbp"
    return (
        f"a TorchScript module running torchbp's {', '.join(functions)} (compiled code no "
        "class switch reaches): convert the model to torch before torch.jit.trace"
    )


def _torchbp_functions_in_graph(module: torch.fx.GraphModule) -> list[str]:
    """The torchbp functions (or Functions' ``apply``) that the graph of a ``torch.fx``
    GraphModule calls: those a model traced after :func:`convert` records."""
    names: list[str] = []
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        called = getattr(node.target, "__self__", node.target)  # Function.apply's class
        if (getattr(called, "__module__", None) or "").startswith("torchbp."):
            name = getattr(called, "__name__", str(called))
            if name not in names:
                names.append(name)
    return names


def _graph_module_to_torch(module: torch.fx.GraphModule) -> str:
    """Why ``to="torch"`` keeps a ``torch.fx`` GraphModule: ``"not torchbp"`` (not
    reported) unless its graph calls torchbp's functions (a converted model traced with
    ``torch.fx.symbolic_trace``), which no class switch reaches."""
    functions = _torchbp_functions_in_graph(module)
    if not functions:
        return "not torchbp"
    return (
        f"a torch.fx GraphModule whose graph calls torchbp's {', '.join(functions)} (code no "
        "class switch reaches): convert the model to torch before torch.fx.symbolic_trace"
    )


def _new_class(module: nn.Module, choose) -> tuple[type[nn.Module] | None, str]:
    """``choose`` applied to ``module``'s class, or for a parametrized module to the class
    under torch's parametrized one (which is then rebuilt on the new class). Not converted
    to torchbp: a module whose ``forward`` is set on the instance (it shadows the twin's)
    or with a parameter or buffer of a tensor subclass with its own
    ``__torch_function__``. Not converted to torch: a TorchScript module (reported when
    its compiled code runs torchbp's Functions), and a ``torch.fx`` GraphModule (reported
    when its graph calls torchbp's functions)."""
    if choose is _to_torch and isinstance(module, torch.jit.ScriptModule):
        return None, _torchscript_to_torch(module)
    if choose is _to_torch and isinstance(module, torch.fx.GraphModule):
        return None, _graph_module_to_torch(module)
    if not parametrize.is_parametrized(module):
        new, reason = choose(type(module))
    else:
        base, reason = choose(parametrize.type_before_parametrizations(module))
        new = None
        if base is not None:
            try:
                new = _parametrized_on(type(module), base)
            except Exception as e:  # any: see _refusal
                reason = f"cannot rebuild {type(module).__name__} on {_describe(base)}: "
                reason += _refusal(e)
    if new is None or choose is not _to_torchbp:
        return new, reason
    if "forward" in vars(module):
        return None, "forward set on the instance"
    # the twin calls torchbp's functions, which such a tensor's __torch_function__ does
    # not know: it would silently compute torchbp's op instead of its own
    own = _tensor_with_own_torch_function(module)
    return (None, own) if own is not None else (new, "")


def _describe(cls: type[nn.Module]) -> str:
    """``torchbp.nn.Linear``, ``torch.nn.modules.linear.Linear`` or, for a combined class,
    ``NonDynamicallyQuantizableLinear + torchbp.nn.Linear``."""
    original = cls.__dict__.get(_ORIGINAL)
    if original is not None:
        return f"{original.__name__} + {_describe(cls.__bases__[1])}"
    if cls.__module__ == parametrize.__name__:
        return f"{cls.__name__} of {_describe(cls.__bases__[0])}"
    return f"{cls.__module__}.{cls.__qualname__}"


#: torch.nn classes without a twin whose forward calls a Python-level ``torch.nn.functional``
#: function with covered calls inside (``torchbp.enable()`` routes those), or a covered one
_FUNCTIONS_CALLED_BY = {
    nn.MultiheadAttention: (
        torch.nn.functional.multi_head_attention_forward,
        "the F.linear calls inside it (and its softmax unless need_weights=False)",
    ),
    # a container (head / tail Linears, which convert swaps) with log_softmax calls of its own
    nn.AdaptiveLogSoftmaxWithLoss: (torch.nn.functional.log_softmax, "those calls"),
}


def _enable_reaches_forward_of(module: nn.Module) -> str | None:
    """For a module of a class in :data:`_FUNCTIONS_CALLED_BY` (its ``forward`` not
    overridden): which function its forward calls and what ``torchbp.enable()`` routes
    there; ``None`` if no such class, or the mode cannot reach into it on this torch."""
    for cls, (function, routed) in _FUNCTIONS_CALLED_BY.items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            if _routed_label(function) is None and not _reaches_body_of(function):
                return None
            name = f"{function.__module__}.{function.__name__}"
            return f"no module twin; its forward calls {name}: torchbp.enable() routes {routed}"
    return None


def _covered_functions_held(module: nn.Module) -> str | None:
    """``"torch.nn.functional.gelu (.activation)"`` for the functions ``torchbp.enable()``
    routes that ``module`` holds as attributes, to call in its forward
    (``TransformerEncoderLayer(activation="gelu")``); ``None`` if it holds none."""
    held = [
        f"{label} (.{name})"
        for name, value in vars(module).items()
        if (label := _routed_label(value)) is not None
    ]
    return ", ".join(held) or None


def _why_kept(module: nn.Module, reason: str) -> str | None:
    """The report's reason for a module ``convert(to="torchbp")`` leaves as it is, with
    the functional calls it makes that only ``torchbp.enable()`` reaches; ``None`` for a
    module not listed (a plain container holding or calling no such function)."""
    called = _enable_reaches_forward_of(module) if reason == "no torchbp op" else None
    reason = called or reason
    held = _covered_functions_held(module)
    if held is None:
        return reason if called or _computes_itself(module) else None
    calls = f"holds {held}, which no module swap reaches: torchbp.enable() routes its calls"
    return calls if reason == "no torchbp op" else f"{reason}; {calls}"


def _computes_itself(module: nn.Module) -> bool:
    """A leaf, or a module with parameters or buffers of its own (not a mere container)."""
    has_own_state = any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )
    return has_own_state or not any(True for _ in module.children())


#: the class of the module converted: to torchbp, it stays an instance of it (a torch.nn
#: class becomes its torchbp subclass); back to torch, a torchbp class does not
_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


@overload
def convert(
    module: _ModuleT,
    inplace: bool = ...,
    to: Literal["torchbp"] = ...,
    *,
    report: Literal[False] = ...,
) -> _ModuleT: ...
@overload
def convert(
    module: _ModuleT, inplace: bool = ..., to: Literal["torchbp"] = ..., *, report: Literal[True]
) -> tuple[_ModuleT, ConvertReport]: ...
@overload
def convert(
    module: nn.Module, inplace: bool = ..., to: str = ..., *, report: Literal[False] = ...
) -> nn.Module: ...
@overload
def convert(
    module: nn.Module, inplace: bool = ..., to: str = ..., *, report: Literal[True]
) -> tuple[nn.Module, ConvertReport]: ...
@overload
def convert(
    module: nn.Module, inplace: bool = ..., to: str = ..., *, report: bool
) -> nn.Module | tuple[nn.Module, ConvertReport]: ...


def convert(
    module: nn.Module, inplace: bool = True, to: str = "torchbp", *, report: bool = False
) -> nn.Module | tuple[nn.Module, ConvertReport]:
    """Replace every supported submodule of ``module`` (recursively, in any container,
    ``module`` itself included) with its twin.

    Each torchbp module subclasses its torch.nn namesake with the same state, so a module
    is converted by switching its class: parameters, buffers, hooks and the training flag
    stay the very same objects. Subclasses of supported modules that keep their base's
    ``forward`` are converted too (see the module docstring); subclasses that override
    ``forward``, modules whose ``forward`` is set on the instance or that hold a tensor
    subclass with its own ``__torch_function__``, and modules without a torchbp op are
    left alone. With ``to="torch"``,
    exactly the classes converted before are switched back (a user subclass of a
    ``torchbp.nn`` class stays).

    Args:
        module: the model.
        inplace: convert ``module`` itself (default); with ``False``, convert a deep copy
            (whose parameters are then copies, not shared).
        to: ``"torchbp"`` (default) or ``"torch"``.
        report: also return a :class:`ConvertReport` (keyword only).

    Returns:
        The converted module, or ``(module, report)`` with ``report=True``.

    Examples::

        >>> import torch, torchbp
        >>> model = torchbp.convert(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()))
        >>> type(model[0]).__module__
        'torchbp.nn'
        >>> attention = torch.nn.MultiheadAttention(8, 2)
        >>> _, report = torchbp.convert(attention, report=True)
        >>> [(path, before) for path, before, _ in report.converted]
        [('out_proj', 'NonDynamicallyQuantizableLinear')]
        >>> report.kept[0][:2]  # and why: here, what torchbp.enable() routes instead
        ('', 'MultiheadAttention')
    """
    if to not in ("torchbp", "torch"):
        raise ValueError(f"convert: to must be 'torchbp' or 'torch', got {to!r}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(module).__name__}")
    choose = _to_torchbp if to == "torchbp" else _to_torch
    if not inplace:
        module = copy.deepcopy(module)
    done = ConvertReport(to)
    for path, sub in module.named_modules():
        cls = type(sub)
        new, reason = _new_class(sub, choose)
        if new is not None:
            try:
                sub.__class__ = new
            except TypeError as e:  # e.g. a subclass with __slots__
                new, reason = None, f"class cannot be switched: {e}"
        if new is not None:
            done.converted.append((path, cls.__name__, _describe(new)))
        elif choose is _to_torch:
            # (a GraphModule's graph is its own computing, its parameters held by children)
            computes = _computes_itself(sub) or isinstance(sub, torch.fx.GraphModule)
            if computes and reason != "not torchbp":
                done.kept.append((path, cls.__name__, reason))
        elif (why := _why_kept(sub, reason)) is not None:
            done.kept.append((path, cls.__name__, why))
    logger.info("%s", done.summary())
    return (module, done) if report else module
