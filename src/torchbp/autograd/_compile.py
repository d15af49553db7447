"""Choosing between a Function and its jvp-free twin.

Every public ``XFunction`` in :mod:`torchbp.autograd` subclasses a twin that has the same
``forward`` / ``setup_context`` / ``backward`` but no ``jvp``. Dynamo cannot capture a
Function that defines ``jvp`` (``torch.compile(fullgraph=True)`` raises "Unsupported
custom jvp"), so while torch.compile traces, the wrappers apply the twin instead.
"""

from __future__ import annotations

import torch
from torch.autograd import Function


def apply(function: type[Function], *args):
    """``function.apply(*args)``, or its jvp-free base class while torch.compile traces."""
    if torch.compiler.is_compiling():
        function = function.__bases__[0]
    return function.apply(*args)
