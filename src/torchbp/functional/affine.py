"""``linear``: the drop-in :func:`torch.nn.functional.linear`, with autocast in the
low-precision dtype, as native's."""

from __future__ import annotations

import torch
from torch.overrides import handle_torch_function, has_torch_function

from torchbp import _checks, _native
from torchbp.autograd import LinearFunction
from torchbp.autograd._compile import apply, pair
from torchbp.functional._autocast import _autocast_dtype, _cast_low, _run_without_autocast

_LINEAR = pair(LinearFunction)


def linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Affine map :math:`y = x W^T + b` (as :func:`torch.nn.functional.linear`).

    Args:
        input: ``(*, in_features)``, at least 1-D.
        weight: ``(out_features, in_features)``, or ``(in_features,)`` for an output
            without the feature dim.
        bias: ``None``, or any shape that broadcasts to the output's: ``(out_features,)``,
            ``(1,)``, 0-dim, ``(1, out_features)``, ... (its gradient is summed back to it).
            With a 1-D weight too, for every input (``x @ w + b``): native takes a bias
            there only for some inputs (a non-contiguous one, or a 0-dim bias on one of 3+
            dims), and its addmm path refuses the others; see docs/ops.md.

    Shape:
        Output ``(*, out_features)``; ``(*,)`` for a 1-D weight.

    Examples::

        >>> y = linear(torch.randn(2, 5, 3), torch.randn(4, 3), torch.randn(4))
        >>> y.shape
        torch.Size([2, 5, 4])
        >>> linear(torch.randn(5, 3), torch.randn(3)).shape
        torch.Size([5])
    """
    if has_torch_function((input, weight, bias)):
        return handle_torch_function(linear, (input, weight, bias), input, weight, bias)
    if _checks.plain_linear(input, weight, bias):  # the common call: every check passes
        return _linear_apply(*_autocast_cast(input, weight, bias))
    if _checks.nested(input) or _checks.nested(weight):  # (strided or jagged): native's op
        return _native.linear(input, weight, bias)
    op = "linear"
    _checks.validate_linear(input, weight, bias)
    amp, input, weight, bias = _autocast_cast(input, weight, bias)
    _checks.check_linear_dtypes(op, input, weight, bias, "weight", "bias")
    if input.dim() == 1 and bias is not None and bias.dim() > 1:
        # an unbatched input with a (1, out)-like bias: as native, computed as one row
        return linear(input.unsqueeze(0), weight, bias).squeeze(0)
    if weight.dim() == 1:
        # y = x w + b = (x Wᵀ + b)[..., 0] with W = w as one row (1, in): the bias gains
        # the output's dim of size 1 (a 0-dim bias broadcasts as it is)
        weight = weight.unsqueeze(0)
        bias = bias if bias is None or bias.dim() == 0 else bias.unsqueeze(-1)
        return _linear_apply(amp, input, weight, bias).squeeze(-1)
    return _linear_apply(amp, input, weight, bias)


def _autocast_cast(input, weight, bias):
    """``(amp, input, weight, bias)``: autocast's dtype on ``input``'s device (``None``
    where autocast is off) and the three as autocast casts them for native's linear."""
    amp = _autocast_dtype(input)
    if amp is None:
        return None, input, weight, bias
    return amp, _cast_low(input, amp), _cast_low(weight, amp), _cast_low(bias, amp)


def _linear_apply(amp, input, weight, bias):
    if amp is not None:
        return _run_without_autocast(input.device.type, apply, _LINEAR, input, weight, bias)
    return apply(_LINEAR, input, weight, bias)
