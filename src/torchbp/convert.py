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
  has one) and is switched to the combined class when loaded. (``MultiheadAttention``
  itself never calls ``out_proj``'s ``forward``: it passes the weight to ``F.linear``,
  which only :func:`torchbp.enable` reaches.)
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
  torchbp's Functions: a traced converted model). A class convert
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
``INFO`` level on the ``torchbp.convert`` logger.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import types
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import nn
from torch.nn.utils import parametrize

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
            own), e.g. ``("conv", "Conv2d", "no torchbp op")``; plain containers are not
            listed.
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
    ``__reduce__`` / ``__reduce_ex__`` included), with the combined class, which is made at
    run time and cannot be found by name, replaced by the user class wherever the
    reduction's callable, arguments and state name it (an attribute holding
    ``type(module)``, say; see :func:`_naming`); the object rebuilt
    from it is switched to the combined class again (:func:`_rebuilt_combined`)."""
    cls = _combined_class_of(type(self))
    original, twin = getattr(cls, _ORIGINAL), cls.__bases__[1]
    # renamed as one, so that an object shared by its parts stays one
    make, args, *rest = _naming(original.__reduce_ex__(self, protocol), cls, original)
    return (_rebuilt_combined, (make, args, original, twin), *rest)


#: the containers :func:`_naming` looks into (exact types: a subclass may rebuild its own
#: way; named tuples are looked into too)
_CONTAINERS = (tuple, list, dict, set, frozenset, OrderedDict, defaultdict)


def _is_container(value) -> bool:
    """Whether :func:`_naming` looks into ``value``: one of :data:`_CONTAINERS` or a named
    tuple."""
    kind = type(value)
    return kind in _CONTAINERS or (isinstance(value, tuple) and hasattr(kind, "_make"))


def _naming(value, cls: type, original: type):
    """``value`` (part of a reduction) with the combined class ``cls`` replaced by its
    user class ``original``: ``cls`` itself, a method bound to it (``type(self).rebuild``)
    and either of them inside tuples (named ones too), lists, dicts (``OrderedDict``,
    ``defaultdict``), sets and frozensets, at any depth. Containers without it
    are returned as they are (the same objects: no copy of a large one), and a container
    met twice (shared, or holding itself) is renamed once, so that sharing and cycles
    pickle as before."""
    if not _names(value, cls, set()):
        return value
    return _renamed(value, cls, original, {})


def _is_named(value, cls: type) -> bool:
    """Whether ``value`` is ``cls`` or a method bound to it."""
    return value is cls or (isinstance(value, types.MethodType) and value.__self__ is cls)


def _contents(container):
    """The items of a container (a dict's keys and values)."""
    if isinstance(container, dict):
        return itertools.chain.from_iterable(container.items())
    return container


def _names(value, cls: type, seen: set[int]) -> bool:
    """Whether ``value`` names ``cls`` (see :func:`_is_named`) or is a container holding
    one at any depth; ``seen``: the ids of the containers looked into (each once, so a
    cycle ends)."""
    if _is_named(value, cls):
        return True
    if not _is_container(value) or id(value) in seen:
        return False
    seen.add(id(value))
    return any(_names(item, cls, seen) for item in _contents(value))


def _renamed(value, cls: type, original: type, memo: dict[int, Any]):
    """:func:`_naming`'s work; ``memo``: the id of each container renamed so far -> its
    renamed copy (a mutable one is registered before its items are renamed, so that a
    cycle through it closes on the copy)."""
    if value is cls:
        return original
    if isinstance(value, types.MethodType) and value.__self__ is cls:
        return types.MethodType(value.__func__, original)
    if id(value) in memo:
        return memo[id(value)]
    if not _is_container(value) or not _names(value, cls, set()):
        return value
    if isinstance(value, (list, set, dict)):
        renamed = memo[id(value)] = copy.copy(value)  # (a defaultdict keeps its factory)
        renamed.clear()
        if isinstance(value, dict):
            for key, item in value.items():
                renamed[_renamed(key, cls, original, memo)] = _renamed(item, cls, original, memo)
        else:
            items = [_renamed(item, cls, original, memo) for item in value]
            if isinstance(value, list):
                renamed.extend(items)
            else:
                renamed.update(items)
        return renamed
    # a tuple or frozenset cannot be made before its items: one reached again through
    # itself stays as it is
    memo[id(value)] = value
    items = [_renamed(item, cls, original, memo) for item in value]
    made = type(value)._make(items) if hasattr(type(value), "_make") else type(value)(items)
    memo[id(value)] = made
    return made


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


@functools.cache
def _combined_class(original: type[nn.Module], twin: type[nn.Module]) -> type[nn.Module]:
    """``class <Name>(original, twin)``: ``original``'s methods, the twin's ``forward``.

    A lazy module (``nn.LazyLinear``) switches its class to its ``cls_to_become``
    (``nn.Linear``) once initialised: the combined class names that class's twin there
    instead, so that the module stays converted."""
    namespace = {
        "__module__": __name__,
        "__qualname__": original.__qualname__,
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


def _new_class(module: nn.Module, choose) -> tuple[type[nn.Module] | None, str]:
    """``choose`` applied to ``module``'s class, or for a parametrized module to the class
    under torch's parametrized one (which is then rebuilt on the new class). Not converted
    to torchbp: a module whose ``forward`` is set on the instance (it shadows the twin's)
    or with a parameter or buffer of a tensor subclass with its own
    ``__torch_function__``. Not converted to torch: a TorchScript module (reported when
    its compiled code runs torchbp's Functions)."""
    if choose is _to_torch and isinstance(module, torch.jit.ScriptModule):
        return None, _torchscript_to_torch(module)
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


def _computes_itself(module: nn.Module) -> bool:
    """A leaf, or a module with parameters or buffers of its own (not a mere container)."""
    has_own_state = any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )
    return has_own_state or not any(True for _ in module.children())


@overload
def convert(
    module: nn.Module, inplace: bool = ..., to: str = ..., *, report: Literal[False] = ...
) -> nn.Module: ...
@overload
def convert(
    module: nn.Module, inplace: bool = ..., to: str = ..., *, report: Literal[True]
) -> tuple[nn.Module, ConvertReport]: ...


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
        >>> print(report)
        torchbp.convert(to='torchbp'): converted 1: NonDynamicallyQuantizableLinear x1
        kept 1: MultiheadAttention x1 (no torchbp op)
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
        elif _computes_itself(sub) and reason != "not torchbp":
            done.kept.append((path, cls.__name__, reason))
    logger.info("%s", done.summary())
    return (module, done) if report else module
