"""Applying a Function: eagerly without argument binding, and its generated jvp-free twin
while torch.compile traces.

Dynamo cannot capture a Function that defines ``jvp`` (``torch.compile(fullgraph=True)``
raises "Unsupported custom jvp"), so every Function is written once, with its ``jvp``,
and :func:`pair` generates the twin Dynamo can capture: the same class body minus ``jvp``.

Private-API exception (the house rule is public API only). :func:`apply` skips the
``inspect.signature`` binding ``Function.apply`` does on every call (a no-op for these
Functions: every argument is passed positionally and no ``forward`` has defaults) by doing
what ``Function.apply`` itself does outside torch.func transforms, through three torch
internals: ``torch._C._are_functorch_transforms_active``,
``torch._functorch.utils.unwrap_dead_wrappers`` (asked only when a tensor argument lacks
storage, as every torch.func wrapper does) and the C base class's ``apply``
(``super(Function, cls).apply``). No public API skips the binding. Measured (torch 2.13,
CPU, 1 thread, A/B interleaved in one process, median of 41 rounds of 200 steps): a
training step of a 64-64-10 MLP (torchbp linear, relu, linear, cross_entropy, backward),
batch 64, takes 477 us this way and 647 us through ``Function.apply`` (+36 %); one
``LinearFunction`` call 10.8 us against 31 us. Each internal is looked up with a feature
test at import (:func:`_find_base_apply`): if any is missing, every call goes through the
public ``Function.apply``.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from torchbp._execution import any_without_storage, exporting

# Class attributes the twin does not copy: ``jvp`` itself, and what ``type()`` and
# Function's metaclass make anew for each class (the backward node class among them).
_NOT_COPIED = ("jvp", "__dict__", "__weakref__", "_backward_cls")


def jvp_free_twin(function: type[Function]) -> type[Function]:
    """A Function with ``function``'s ``forward`` / ``setup_context`` / ``backward`` (and
    everything else in its class body) but no ``jvp``. ``function`` itself if it has none."""
    if "jvp" not in vars(function):
        return function
    body = {k: v for k, v in vars(function).items() if k not in _NOT_COPIED}
    bases = tuple(b if b is Function else jvp_free_twin(b) for b in function.__bases__)
    return type(function.__name__, bases, body)


def pair(function: type[Function]) -> tuple[type[Function], type[Function]]:
    """``(function, its jvp-free twin)``, built once at import: Dynamo can index a tuple of
    Functions but not look up attributes on one."""
    return function, jvp_free_twin(function)


def apply(functions: tuple[type[Function], type[Function]], *args):
    """``Function.apply(*args)`` of the pair's first, or its twin while torch.compile traces,
    or while :func:`torch.export.export` traces its ``forward`` alone.

    An exported program holds ATen operators and no ``autograd.Function``: its gradients
    are autograd's of the operators it records. Strict export (Dynamo) records a
    Function's forward under ``no_grad``, so the exported module's outputs required no
    grad (its parameters got none, silently where a native layer followed) and an
    in-place activation's gradient passed through it unchanged; non-strict export records
    the forward's operators. Each ``forward`` is differentiable torch ops, so calling it
    directly gives both modes the gradients of what it computes, as native's ops do.

    The wrappers pass every argument positionally, so in plain eager mode this skips the
    ``inspect.signature`` binding that ``Function.apply`` does on each call (it costs
    more than a small layer's matmul); under torch.func transforms and torch.compile, and
    on a torch without the internals this needs, it goes through ``Function.apply``.
    """
    if exporting():
        return functions[0].forward(*args)
    if torch.compiler.is_compiling():
        return functions[1].apply(*args)
    function = functions[0]
    if _base_apply is None:
        return function.apply(*args)
    return _base_apply(function, args)


def _find_base_apply():
    """``Function.apply`` minus the argument binding, built from torch internals (see the
    module docstring), or None when this torch lacks any of them: then the public
    ``Function.apply`` is used."""
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
    try:
        from torch._functorch.utils import unwrap_dead_wrappers
    except ImportError:  # pragma: no cover - other torch layouts
        return None
    if transforms_active is None or not _base_class_applies():
        return None  # pragma: no cover - other torch layouts

    def base_apply(function, args):
        if transforms_active():
            return function.apply(*args)
        # what Function.apply does outside torch.func transforms, after binding: the dead
        # torch.func wrappers among args unwrapped. A wrapper has no storage, so a call
        # whose tensors all have some (the common one) has none to unwrap, and skips
        # building the unwrapped tuple (which costs more than asking)
        if any_without_storage(args):
            args = unwrap_dead_wrappers(args)
        return super(Function, function).apply(*args)

    return base_apply


def _base_class_applies() -> bool:
    """Whether ``super(Function, cls).apply`` is the C base class's ``apply`` (the one
    ``Function.apply`` calls), not some other class's between them."""
    base = getattr(torch._C, "_FunctionBase", None)
    if base is None or base not in Function.__mro__:
        return False
    between = Function.__mro__[1 : Function.__mro__.index(base)]
    return "apply" in vars(base) and not any("apply" in vars(c) for c in between)


_base_apply = _find_base_apply()
