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
