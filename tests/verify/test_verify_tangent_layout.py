"""forward_ad: forward AD hands a Function's jvp each tangent in its primal's memory layout
(a transposed input gets a transposed tangent, from torch.func.jvp as from
forward_ad.make_dual); a jvp written for contiguous tangents fails, one using reshape
passes."""

from __future__ import annotations

import torch

from torchbp.verify import check_function


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class _Double(torch.autograd.Function):
    """2 x, with a jvp written by the subclasses."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        # d(2x)/dx = 2
        return g * 2


class ReshapeJvpDouble(_Double):
    @staticmethod
    def jvp(ctx, t):
        return (t.reshape(-1) * 2).reshape(t.shape)


class ViewJvpDouble(_Double):
    """jvp flattens the tangent with .view: raises for a transposed one."""

    @staticmethod
    def jvp(ctx, t):
        return (t.view(-1) * 2).view(t.shape)


class StorageOrderJvpDouble(_Double):
    """jvp reads the tangent's storage as if contiguous (a kernel on its data pointer):
    silently the wrong elements for a transposed tangent."""

    @staticmethod
    def jvp(ctx, t):
        return torch.as_strided(t, t.shape, _contiguous_strides(t.shape)) * 2


def _x() -> torch.Tensor:
    return torch.randn(3, 4, dtype=torch.float64)


def _forward_ad(fn) -> object:
    return check_function(fn, _x(), checks=["forward_ad"])["forward_ad"]


def test_a_jvp_using_reshape_passes_for_transposed_tangents():
    result = _forward_ad(ReshapeJvpDouble)
    assert result.passed, result.message


def test_a_jvp_using_view_fails_naming_the_tangents_layout():
    result = _forward_ad(ViewJvpDouble)
    assert result.failed, result.message
    assert "non-contiguous (transposed)" in result.message, result.message
    assert "reshape" in result.message, result.message


def test_a_jvp_reading_storage_in_memory_order_fails_naming_the_tangents_layout():
    result = _forward_ad(StorageOrderJvpDouble)
    assert result.failed, result.message
    assert "non-contiguous (transposed)" in result.message, result.message


def test_a_jvp_of_a_fn_refusing_transposed_inputs_is_not_blamed_for_them():
    class FlatDouble(ViewJvpDouble):
        @staticmethod
        def forward(x):
            return x.view(-1).view(x.shape) * 2

    result = _forward_ad(FlatDouble)
    assert result.passed, result.message


class DoubleAndTriple(torch.autograd.Function):
    """(2 x, 3 x), whose jvp reads the tangent's storage as if contiguous for the second
    output only."""

    @staticmethod
    def forward(x):
        return x * 2, x * 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g2, g3):
        # d(2x)/dx = 2, d(3x)/dx = 3
        return g2 * 2 + g3 * 3

    @staticmethod
    def jvp(ctx, t):
        return t * 2, torch.as_strided(t, t.shape, _contiguous_strides(t.shape)) * 3


def test_every_outputs_tangent_is_compared_for_transposed_tangents():
    result = _forward_ad(DoubleAndTriple)
    assert result.failed, result.message
    assert "the tangent of output 1 changes" in result.message, result.message


class _Dropout(torch.autograd.Function):
    """Half the elements dropped (mask drawn with rand_like, so in the input's memory
    order), the others doubled; returns the mask too."""

    @staticmethod
    def forward(x):
        mask = (torch.rand_like(x) > 0.5).to(x.dtype)
        return x * mask * 2, mask

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])

    @staticmethod
    def backward(ctx, g, _):
        (mask,) = ctx.saved_tensors
        # d(2 x mask)/dx = 2 mask
        return g * mask * 2


class ReshapeJvpDropout(_Dropout):
    @staticmethod
    def jvp(ctx, t):
        (mask,) = ctx.saved_tensors
        return (t.reshape(-1) * mask.reshape(-1) * 2).reshape(t.shape), None


class ViewJvpDropout(_Dropout):
    @staticmethod
    def jvp(ctx, t):
        (mask,) = ctx.saved_tensors
        return (t.view(-1) * mask.view(-1) * 2).view(t.shape), None


def test_a_random_fn_gets_non_contiguous_tangents_in_the_contiguous_drawing_order():
    # a transposed input draws another mask (rand_like fills memory in order): a correct
    # random jvp passes, compared for rows sliced from wider ones; a .view one still fails
    assert _forward_ad(ReshapeJvpDropout).passed
    result = _forward_ad(ViewJvpDropout)
    assert result.failed, result.message
    assert "non-contiguous (rows sliced from wider ones)" in result.message, result.message
