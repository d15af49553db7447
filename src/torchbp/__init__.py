"""torchbp: hand-written backpropagation for PyTorch.

Public surface: :mod:`torchbp.functional`, :mod:`torchbp.nn`, :func:`torchbp.convert`,
:mod:`torchbp.autograd` (the Functions), :mod:`torchbp.ops` (the op registry),
:func:`torchbp.enable` (route functional calls to torchbp), :func:`torchbp.per_sample_grads`
(per-sample gradients, norms and DP-SGD clipping in one backward) and :mod:`torchbp.verify`
(checks for any autograd Function). Importing torchbp never imports
Lightning.
"""

from torchbp import autograd, functional, nn, ops, verify
from torchbp.convert import convert
from torchbp.mode import enable
from torchbp.per_sample import per_sample_grads

__version__ = "0.1.0"

__all__ = [
    "autograd",
    "functional",
    "nn",
    "ops",
    "convert",
    "enable",
    "per_sample_grads",
    "verify",
    "__version__",
]
