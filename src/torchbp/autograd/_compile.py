"""Applying a Function: eagerly without argument binding, and its generated jvp-free twin
while torch.compile traces.

Dynamo cannot capture a Function that defines ``jvp`` (``torch.compile(fullgraph=True)``
raises "Unsupported custom jvp"), so every Function is written once, with its ``jvp``,
and :func:`pair` generates the twin Dynamo can capture: the same class body minus ``jvp``.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

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
    """``Function.apply(*args)`` of the pair's first, or its twin while torch.compile traces.

    The wrappers pass every argument positionally, so in plain eager mode this skips the
    ``inspect.signature`` binding that ``Function.apply`` does on each call (it costs
    more than a small layer's matmul); under torch.func transforms and torch.compile it
    goes through ``Function.apply`` itself.
    """
    if torch.compiler.is_compiling():
        return functions[1].apply(*args)
    function = functions[0]
    if _base_apply is None or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return _base_apply(function, *_unwrap_dead_wrappers(args))


def _find_base_apply():
    """``Function.apply`` minus the argument binding: the C ``_FunctionBase.apply``, as
    ``Function.apply`` itself calls it in eager mode (None if this torch lays it out
    differently, and then the public path is used)."""
    try:
        from torch._functorch.utils import unwrap_dead_wrappers
    except ImportError:  # pragma: no cover - other torch layouts
        return None, None

    def base_apply(function, *args):
        return super(Function, function).apply(*args)

    return base_apply, unwrap_dead_wrappers


_base_apply, _unwrap_dead_wrappers = _find_base_apply()
