"""The hand-written autograd Functions, one file per op family.

Every ``XFunction`` is written once: ``forward``, ``setup_context``, ``backward`` and
``jvp`` together, with ``generate_vmap_rule = True``; the derivative formula sits in a
comment above the line that computes it. The jvp-free twin that torch.compile needs is
generated from it (:func:`torchbp.autograd._compile.jvp_free_twin`).

Examples::

    >>> import torch
    >>> from torchbp.autograd import LinearFunction, SigmoidFunction
    >>> x = torch.tensor([0.0, 2.0], requires_grad=True)
    >>> SigmoidFunction.apply(x).sum().backward()
    >>> x.grad  # sigma'(x) = y (1 - y)
    tensor([0.2500, 0.1050])
    >>> LinearFunction.apply(torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)).shape
    torch.Size([5, 4])
"""

from torchbp.autograd import activations
from torchbp.autograd.activations import *  # noqa: F403 (the activation Functions)
from torchbp.autograd.linear import LinearFunction
from torchbp.autograd.linear_cross_entropy import LinearCrossEntropyFunction
from torchbp.autograd.losses import CrossEntropyFunction, NLLLossFunction
from torchbp.autograd.softmax import LogSoftmaxFunction, SoftmaxFunction

__all__ = [
    "LinearFunction",
    *activations.__all__,
    "SoftmaxFunction",
    "LogSoftmaxFunction",
    "NLLLossFunction",
    "CrossEntropyFunction",
    "LinearCrossEntropyFunction",
]
