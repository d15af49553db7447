"""What the running backward pass allows a Function to do with its saved buffers."""

from __future__ import annotations

import torch

from torchbp._checks import values_inspectable


def graph_retained() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); ``True`` when
    this torch cannot tell, which is the safe answer."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if probe is None:
        return True
    try:
        return bool(probe())
    except RuntimeError:
        return True


def may_reuse_saved(*tensors: torch.Tensor) -> bool:
    """Whether backward may scale a buffer it saved (and owns) in place and hand it over as
    the gradient: only for a first-order eager backward that frees the graph afterwards,
    so nothing can read the buffer again."""
    return (
        not torch.is_grad_enabled()
        and all(values_inspectable(t) for t in tensors)
        and not graph_retained()
    )
