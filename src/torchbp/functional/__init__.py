"""Drop-in replacements for :mod:`torch.nn.functional`, backed by torchbp's Functions.

Every function has the signature, defaults and semantics of its native namesake
(``torch.sigmoid`` / ``torch.tanh`` for those two), plus two keyword-only extras,
``cross_entropy(..., inplace=)`` and ``linear_cross_entropy(..., chunk_size=)``, and a few
deliberate differences: a negative or NaN ``label_smoothing`` is refused (native
extrapolates a negative one and silently reads NaN as 0), and ``linear`` takes a 1-D
weight with a bias for 2-D input and ``linear_cross_entropy`` a ``(*, in)`` input, which
native refuses. The wrappers check arguments (clear errors instead
of failures deep inside), apply autocast the way native ops are listed
(``linear`` in the low-precision dtype; ``nll_loss`` / ``cross_entropy``, and on CUDA
also ``softmax`` / ``log_softmax``, in float32), move the class dim of K-dimensional
losses last, and reduce per-row losses. A sparse (COO, CSR, CSC, BSR, BSC) or strided
nested tensor argument runs the native op instead, with its result and gradients, or its
own error where it has none (torchbp's Functions take dense and jagged nested tensors; as
under ``torchbp.enable()``); ``linear`` runs native's for any nested input, jagged too,
and takes sparse ones itself, as ``linear_cross_entropy`` does. Like native's, each takes part in
``__torch_function__``: a tensor subclass or mode that overrides it sees the call
(``torch.fx`` records it as one node, so a traced torchbp module keeps its backward).

Examples::

    >>> import torch, torchbp.functional as TF
    >>> x = torch.randn(8, 4, requires_grad=True)
    >>> loss = TF.cross_entropy(TF.linear(x, torch.randn(3, 4)), torch.randint(3, (8,)))
    >>> loss.backward()
"""

from __future__ import annotations

from torchbp.functional.activations import (
    elu,
    elu_,
    gelu,
    leaky_relu,
    leaky_relu_,
    relu,
    relu_,
    sigmoid,
    silu,
    softplus,
    tanh,
)
from torchbp.functional.affine import linear
from torchbp.functional.fused_linear_loss import linear_cross_entropy
from torchbp.functional.losses import cross_entropy, nll_loss
from torchbp.functional.softmax_family import log_softmax, softmax, softmin

__all__ = [
    "linear",
    "sigmoid",
    "tanh",
    "relu",
    "relu_",
    "leaky_relu",
    "leaky_relu_",
    "gelu",
    "silu",
    "elu",
    "elu_",
    "softplus",
    "softmax",
    "softmin",
    "log_softmax",
    "nll_loss",
    "cross_entropy",
    "linear_cross_entropy",
]
