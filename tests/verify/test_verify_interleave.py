"""The ``interleave`` check: each backward gives gradients of its own, whatever ran after."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from torchbp.verify import check_function

_WORKSPACE = torch.zeros(3, 4, dtype=torch.float64)


class _DoubleIntoWorkspace(torch.autograd.Function):
    """``2x`` whose backward writes the gradient into one module-level buffer and returns
    it: each gradient is right, but the next backward overwrites the one returned before
    (two micro-batches' gradients, or a gradient kept for a later step, alias)."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        _WORKSPACE.zero_()
        return _WORKSPACE.add_(2 * g)


def test_a_gradient_returned_in_a_reused_buffer_fails():
    # before: every check passed or was unsupported (no double backward, no vmap rule;
    # vmap's refusal of the in-place write into the unbatched buffer is unsupported):
    # each gradient is right until the next backward overwrites it
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    report = check_function(_DoubleIntoWorkspace, x, reference=lambda x: 2 * x, skip="compile")
    result = report["interleave"]
    assert result.failed, report
    assert "changed when another backward ran" in result.message
    assert [r.name for r in report.failures] == ["interleave"], report
