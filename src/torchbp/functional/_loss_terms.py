"""What ``nll_loss``, ``cross_entropy`` and ``linear_cross_entropy`` of
:mod:`torchbp.functional` compute alike: the ``'mean'`` denominator of class-index targets
and the dtype of a probability-target loss."""

from __future__ import annotations

import torch


def _target_weight_sum(target, weight, ignore_index, dtype) -> torch.Tensor:
    """Σ over non-ignored rows of ``w_{y_i}``: the denominator of ``reduction='mean'``."""
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    if weight.shape[0] == 0:  # no class: every target is ignore_index (checked)
        return torch.zeros((), dtype=dtype, device=target.device)
    safe = torch.where(valid, target, 0)
    return torch.where(valid, weight.to(dtype)[safe], 0.0).sum()


def _probability_loss_dtype(logits, target, weight) -> torch.dtype:
    """The dtype of a probability-target loss: native's ``-Σ_c w_c t_c logp_c`` promotes
    the logits' dtype with the target's and the class weights'."""
    dtype = torch.promote_types(logits.dtype, target.dtype)
    return dtype if weight is None else torch.promote_types(dtype, weight.dtype)
