"""What records a call of a :mod:`torchbp.functional` wrapper: autograd (a gradient for a
tensor, a view whose in-place write it must see) or :func:`torch.jit.trace`, by which the
in-place activations, the losses and ``linear_cross_entropy`` choose their path."""

from __future__ import annotations

import torch


def _differentiated(t: torch.Tensor | None) -> bool:
    """Whether autograd records a gradient for ``t`` in this call."""
    return isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()


def _traced() -> bool:
    """Whether :func:`torch.jit.trace` records the call. TorchScript cannot run a Function
    that marks its input dirty ("inplace ReLUFunction not supported in the JIT", at every
    call of the trace), and torch's check traces again under ``no_grad``, which must record
    the same graph: an in-place call there is the Function out of place, then a copy into
    ``input``, whether or not a gradient is recorded."""
    return torch.jit.is_tracing()


def _recorded_view(t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of another tensor (``t._base``, as torch's "Tensor Views"
    documentation checks it) and autograd records the call: autograd refuses a Function
    with several outputs (cross-entropy's) that modifies such a tensor in place."""
    return torch.is_grad_enabled() and t.requires_grad and t._base is not None
