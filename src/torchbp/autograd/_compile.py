"""Choosing between a Function and its jvp-free twin.

Every public ``XFunction`` in :mod:`torchbp.autograd` subclasses a twin that has the same
``forward`` / ``setup_context`` / ``backward`` but no ``jvp``, recorded as
``XFunction.jvp_free_twin``. Dynamo cannot capture a Function that defines ``jvp``
(``torch.compile(fullgraph=True)`` raises "Unsupported custom jvp"), so while
torch.compile traces, the wrappers apply the twin instead.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


def pair(function: type[Function]) -> tuple[type[Function], type[Function]]:
    """``(function, its jvp-free twin)``, built once at import: Dynamo can index a tuple of
    Functions but not look up attributes on one."""
    return function, function.jvp_free_twin


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


def register_twins(namespace: dict) -> None:
    """Set ``jvp_free_twin`` on every public ``XFunction`` of a module namespace: the class
    it directly subclasses."""
    for name, obj in list(namespace.items()):
        if name.endswith("Function") and isinstance(obj, type) and issubclass(obj, Function):
            if "jvp" in vars(obj):
                obj.jvp_free_twin = obj.__bases__[0]
