"""What ``nll_loss``, ``cross_entropy`` and ``linear_cross_entropy`` of
:mod:`torchbp.functional` compute alike: the ``'mean'`` denominator of class-index targets
and the dtype of a probability-target loss."""

from __future__ import annotations

import math

import torch

from torchbp.autograd.cross_entropy import NO_IGNORE


def _target_weight_sum(target, weight, ignore_index, dtype) -> torch.Tensor:
    """Σ over non-ignored rows of ``w_{y_i}``: the denominator of ``reduction='mean'``.
    ``ignore_index`` None: the caller checked that no target is ignore_index (every one is
    a class index), so no row is masked."""
    if weight is not None and ignore_index is None:
        # the same terms, in the same order, as the masked sum below with no row masked:
        # the same bits, two ops instead of five
        return weight.to(dtype).index_select(0, target).sum()
    ignore = NO_IGNORE if ignore_index is None else ignore_index
    if weight is None:
        return (target != ignore).sum().to(dtype)
    if weight.shape[0] == 0:  # no class: every target is ignore_index (checked)
        return torch.zeros((), dtype=dtype, device=target.device)
    # (masked_fill, not where of a scalar: ~1 us less each on the CPU)
    ignored = target == ignore
    safe = target.masked_fill(ignored, 0)
    return weight.to(dtype).index_select(0, safe).masked_fill_(ignored, 0.0).sum()


def _mean_denominator(target, weight, ignore_index, dtype, smoothing: float) -> torch.Tensor:
    """The ``'mean'`` denominator ``W = Σ_i w_{y_i}`` (:func:`_target_weight_sum`;
    ``ignore_index`` None: no target ignored) of class-index targets, NaN where ``W = 0``
    with label smoothing and class weights.

    Native's smoothed mean is two means over the same ``W``::

        loss = (1 - ε) Σ_i w_{y_i} nll_i / W + (ε / C) Σ_i Σ_c w_c nll_ic / W

    At ``W = 0`` (every kept target a class of weight 0) its first term is 0 / 0 = NaN,
    so the loss and every kept row's gradient are NaN; torchbp's rows hold both terms
    (``ℓ_i = (1 - ε) w_{y_i} nll_i + (ε / C) Σ_c w_c nll_ic``), whose sum over 0 would be
    ±inf. (For negative weights summing to 0 native's first term may be ±inf instead, and
    the loss ±inf where both terms agree in sign; torchbp's is NaN there too.) Dividing by
    NaN instead gives native's NaN; without smoothing the rows' sum over 0 is native's own
    formula. One 0-dim ``where``, only on this path."""
    total = _target_weight_sum(target, weight, ignore_index, dtype)
    if not smoothing or weight is None:
        return total
    return torch.where(total == 0, math.nan, total)


def _one_index_of_unbatched(logits_shape, target, probabilities_possible: bool):
    """``target`` as a 0-dim class index where native reads it so: an unbatched ``(C,)``
    input takes a ``(1,)`` class-index target as its one index (native's "For 1D input,
    1D target must have size 1"; its ``'none'`` result is 0-dim too). Any other target
    is returned as it is, for the checks. ``probabilities_possible``: a target of the
    logits' shape holds probabilities (``cross_entropy``), so a ``(1,)`` one of a single
    class is left to be read as probabilities, as native's."""
    if (
        len(logits_shape) == 1
        and isinstance(target, torch.Tensor)
        and target.dim() == 1
        and target.shape[0] == 1
        and not target.is_floating_point()
        and not (probabilities_possible and tuple(logits_shape) == (1,))
    ):
        return target.reshape(())
    return target


def _probability_loss_dtype(logits, target, weight) -> torch.dtype:
    """The dtype of a probability-target loss: native's ``-Σ_c w_c t_c logp_c`` promotes
    the logits' dtype with the target's and the class weights'."""
    dtype = torch.promote_types(logits.dtype, target.dtype)
    return dtype if weight is None else torch.promote_types(dtype, weight.dtype)
