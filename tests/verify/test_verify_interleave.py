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


def _buckets(xq: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
    """The interval of the sorted sample points ``xp`` each query point lies in (by its
    upper end, 1 .. len(xp) - 1); ``ValueError`` when ``xp`` is not increasing."""
    if bool((xp[1:] <= xp[:-1]).any()):
        raise ValueError("xp must be increasing")
    return torch.searchsorted(xp.contiguous(), xq.contiguous()).clamp(1, xp.numel() - 1)


def _interp_grads(xq, xp, fp, i, g):
    # y = f0 + w (f1 - f0), w = (xq - x0) / (x1 - x0), slope s = (f1 - f0) / (x1 - x0):
    # dy/dxq = s, dy/df0 = 1 - w, dy/df1 = w, dy/dx0 = s (w - 1), dy/dx1 = -s w
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w, s = (xq - x0) / (x1 - x0), (f1 - f0) / (x1 - x0)
    gfp = torch.zeros_like(fp).index_add(0, i - 1, g * (1 - w)).index_add(0, i, g * w)
    gxp = torch.zeros_like(xp).index_add(0, i - 1, g * s * (w - 1)).index_add(0, i, -g * s * w)
    return g * s, gxp, gfp


class _Interp(torch.autograd.Function):
    """Correct: piecewise-linear interpolation of (xp, fp) at xq, xp increasing."""

    @staticmethod
    def forward(ctx, xq, xp, fp):
        i = _buckets(xq, xp)
        ctx.save_for_backward(xq, xp, fp, i)
        w = (xq - xp[i - 1]) / (xp[i] - xp[i - 1])
        return fp[i - 1] + w * (fp[i] - fp[i - 1])

    @staticmethod
    def backward(ctx, g):
        return _interp_grads(*ctx.saved_tensors, g)


class _InterpBucketsOnTheClass(_Interp):
    """Wrong: the buckets kept on the class, not on ctx: backward reads the last call's."""

    @staticmethod
    def forward(ctx, xq, xp, fp):
        _InterpBucketsOnTheClass.buckets = i = _buckets(xq, xp)
        ctx.save_for_backward(xq, xp, fp)
        w = (xq - xp[i - 1]) / (xp[i] - xp[i - 1])
        return fp[i - 1] + w * (fp[i] - fp[i - 1])

    @staticmethod
    def backward(ctx, g):
        return _interp_grads(*ctx.saved_tensors, _InterpBucketsOnTheClass.buckets, g)


def _interp_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    xq = torch.rand(6, generator=g, dtype=torch.float64) * 4 + 0.5
    xp = torch.arange(6, dtype=torch.float64) + 0.3 * torch.rand(
        6, generator=g, dtype=torch.float64
    )
    return xq, xp, torch.randn(6, generator=g, dtype=torch.float64)


def test_state_on_the_class_of_a_function_refusing_flipped_inputs_fails():
    # before: fn refusing the sample points flipped, every input's second values were
    # the first's scaled by 1/1.25, whose buckets are the same: the wrong twin passed;
    # now only the sample points stay unflipped
    right = check_function(_Interp, *_interp_inputs(), checks=["interleave"])
    assert right["interleave"].passed, right
    wrong = check_function(_InterpBucketsOnTheClass, *_interp_inputs(), checks=["interleave"])
    assert wrong["interleave"].failed, wrong
    assert "outside ctx" in wrong["interleave"].message, wrong
