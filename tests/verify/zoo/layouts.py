"""Layouts: backward that assumes a contiguous grad_output or exactly two dims."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tests.verify.zoo.entry import ZooEntry, seeded
from tests.verify.zoo.numerics import Sigmoid


class BatchedLinear(torch.autograd.Function):
    """y = x W^T + b for x of shape (*, in)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b):
        return x @ w.t() + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ctx.save_for_backward(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        # dL/dx = g W, dL/dW = sum over all leading dims of g^T x, dL/db = sum of g
        return g @ w, g2.t() @ x.reshape(-1, x.shape[-1]), g2.sum(0)


class ViewLinear(BatchedLinear):
    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.view(-1, g.shape[-1])  # view: raises for a transposed or expanded grad_output
        return g @ w, g2.t() @ x.view(-1, x.shape[-1]), g2.sum(0)


class BroadcastWeightGradLinear(BatchedLinear):
    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        # one dW per leading index, never summed: autograd's silent sum hides it
        return g @ w, g.mT @ x, g.reshape(-1, g.shape[-1]).sum(0)


class StorageOrderSigmoid(Sigmoid):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # reads grad_output's storage in memory order, as a contiguous kernel would
        flat = torch.as_strided(g, (g.numel(),), (1,))
        return (flat * (y * (1 - y)).reshape(-1)).reshape(y.shape)


class FlatViewSigmoid(Sigmoid):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return (g.view(-1) * (y * (1 - y)).view(-1)).view(y.shape)  # view of an expanded g


class StorageOrderInputSigmoid(Sigmoid):
    @staticmethod
    def forward(x):
        # reads x's storage in memory order, as a kernel written for contiguous x would
        flat = torch.as_strided(x, (x.numel(),), (1,))
        return torch.sigmoid(flat).reshape(x.shape)


class LastDimSoftmax(torch.autograd.Function):
    """softmax over the last dim of x of shape (*, C)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.softmax(x, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # dL/dx = y (g - sum(g y)) over the last dim
        return y * (g - (g * y).sum(-1, keepdim=True))


class DimOneSoftmax(LastDimSoftmax):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(1, keepdim=True))  # dim 1: right only for 2-D inputs


def _batched_linear():
    return seeded(2, 3, 4), seeded(5, 4, seed=1), seeded(5, seed=2)


ENTRIES = [
    ZooEntry(
        "view_on_noncontiguous_grad_output",
        "layouts",
        "linear backward calls grad_output.view(-1, out): fails on strided grads",
        ViewLinear,
        BatchedLinear,
        _batched_linear,
        F.linear,
        frozenset({"grad_output_safety"}),
    ),
    ZooEntry(
        "view_on_expanded_grad_output",
        "layouts",
        "sigmoid backward flattens grad_output with .view(-1): fails for loss.sum()'s expand",
        FlatViewSigmoid,
        Sigmoid,
        lambda: (seeded(3, 4),),
        torch.sigmoid,
        frozenset({"grad_output_safety"}),
    ),
    ZooEntry(
        "grad_output_read_in_storage_order",
        "layouts",
        "sigmoid backward reads grad_output's storage as if contiguous (silently wrong)",
        StorageOrderSigmoid,
        Sigmoid,
        lambda: (seeded(3, 4),),
        torch.sigmoid,
        frozenset({"grad_output_safety"}),
    ),
    ZooEntry(
        "leading_dims_weight_grad_unreduced",
        "layouts",
        "linear dW = g^T x per leading index, not summed over leading dims",
        BroadcastWeightGradLinear,
        BatchedLinear,
        _batched_linear,
        F.linear,
        frozenset({"grad_shapes"}),
    ),
    ZooEntry(
        "leading_dims_softmax_sums_dim_one",
        "layouts",
        "softmax backward sums over dim 1, right only without leading batch dims",
        DimOneSoftmax,
        LastDimSoftmax,
        lambda: (seeded(2, 3, 4),),
        lambda x: torch.softmax(x, -1),
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "input_read_in_storage_order",
        "layouts",
        "sigmoid forward reads x's storage as if contiguous (silently wrong for x.t())",
        StorageOrderInputSigmoid,
        Sigmoid,
        lambda: (seeded(3, 4),),
        torch.sigmoid,
        frozenset({"grad_output_safety"}),
    ),
]
