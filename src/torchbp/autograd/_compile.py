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
    """``Function.apply(*args)`` of the pair's first, or its twin while torch.compile traces."""
    return functions[1 if torch.compiler.is_compiling() else 0].apply(*args)


def register_twins(namespace: dict) -> None:
    """Set ``jvp_free_twin`` on every public ``XFunction`` of a module namespace: the class
    it directly subclasses."""
    for name, obj in list(namespace.items()):
        if name.endswith("Function") and isinstance(obj, type) and issubclass(obj, Function):
            if "jvp" in vars(obj):
                obj.jvp_free_twin = obj.__bases__[0]
