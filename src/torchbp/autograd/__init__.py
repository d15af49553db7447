"""The hand-written autograd Functions, one file per op family.

Every ``XFunction`` uses separate ``forward`` / ``setup_context``, has
``generate_vmap_rule = True`` and a ``jvp``; it subclasses a jvp-free twin that the
wrappers in :mod:`torchbp.functional` apply while torch.compile traces.
"""

from torchbp.autograd.activations import (
    GELUFunction,
    LeakyReLUFunction,
    ReLUFunction,
    SigmoidFunction,
    SiLUFunction,
    TanhFunction,
)
from torchbp.autograd.linear import LinearFunction
from torchbp.autograd.linear_cross_entropy import LinearCrossEntropyFunction
from torchbp.autograd.losses import CrossEntropyFunction, NLLLossFunction
from torchbp.autograd.softmax import LogSoftmaxFunction, SoftmaxFunction

__all__ = [
    "LinearFunction",
    "SigmoidFunction",
    "TanhFunction",
    "ReLUFunction",
    "LeakyReLUFunction",
    "GELUFunction",
    "SiLUFunction",
    "SoftmaxFunction",
    "LogSoftmaxFunction",
    "NLLLossFunction",
    "CrossEntropyFunction",
    "LinearCrossEntropyFunction",
]
