"""torchbp: hand-written backpropagation for PyTorch.

Public surface: :mod:`torchbp.functional`, :mod:`torchbp.nn`, :func:`torchbp.convert`,
:mod:`torchbp.autograd` (the Functions), :mod:`torchbp.ops` (the op registry) and
:mod:`torchbp.verify` (checks for any autograd Function). Importing torchbp never imports
Lightning.
"""

from torchbp import autograd, functional, nn, ops, verify
from torchbp.convert import convert

__version__ = "0.1.0"

__all__ = ["autograd", "functional", "nn", "ops", "convert", "verify", "__version__"]
