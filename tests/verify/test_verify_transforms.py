"""The vmap checks (``checks/transforms.py``): ``vmap`` and ``batched_grad`` of a fn with a
sparse input, which PyTorch's vmap cannot batch through."""

from __future__ import annotations

import pytest
import torch

from torchbp.verify import check_function


def _sparse_times_dense(adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A graph convolution's product with its sparse adjacency matrix, in native ops."""
    return torch.sparse.mm(adjacency, x)


def test_vmap_of_a_correct_fn_with_a_sparse_input_is_unsupported_not_failed():
    # PyTorch's vmap raises "expand is unsupported for Sparse tensors" for torch.sparse.mm:
    # both checks failed a correct fn for PyTorch's limitation
    g = torch.Generator().manual_seed(0)
    adjacency = torch.randn(4, 4, generator=g, dtype=torch.float64).relu().to_sparse()
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    report = check_function(_sparse_times_dense, adjacency, x, checks=["vmap", "batched_grad"])
    assert report.ok, report
    for name in ("vmap", "batched_grad"):
        result = report[name]
        assert result.unsupported, result
        assert "sparse input" in result.message and "; to add it: " in result.message


class ScaleByFirstElement(torch.autograd.Function):
    """``x * x[0]`` with the scale taken by ``.item()``: a data-dependent Python number,
    which vmap cannot batch, whatever the other inputs' layout."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x.reshape(-1)[0].item()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[0].reshape(-1)[0].item()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale


def _sparse_graph(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse adjacency matrix and dense node features."""
    g = torch.Generator().manual_seed(seed)
    adjacency = torch.randn(4, 4, generator=g, dtype=torch.float64).relu().to_sparse()
    return adjacency, torch.randn(4, 3, generator=g, dtype=torch.float64)


def test_an_item_vmap_cannot_run_is_named_not_hidden_by_a_sparse_input():
    # vmap of the forward raises for .item() with dense inputs too: fn's own .item(), not
    # PyTorch's missing batching rules for sparse tensors. It is unsupported, not FAILED
    # (this test said FAILED before): under vmap one call of fn sees the whole batch,
    # which has no single Python number, so vmap cannot run any .item() - a limitation of
    # vmap, not a wrong result; FAILED is kept for wrong values, which the vmap check
    # finds by comparing with a loop of calls. The message names the .item() and how to
    # avoid it, not the sparse input.
    adjacency, x = _sparse_graph()
    result = check_function(
        lambda a, x: torch.sparse.mm(a, ScaleByFirstElement.apply(x)), adjacency, x, checks="vmap"
    )["vmap"]
    assert result.unsupported, result
    assert ".item()" in result.message and "amax()" in result.message, result.message
    assert "sparse" not in result.message, result.message


class ScaleWithWrongOutDims(ScaleByFirstElement):
    """``2 x`` whose vmap staticmethod returns out_dims for two outputs, fn having one."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = 2.0

    @staticmethod
    def vmap(info, in_dims, x):
        return 2 * x, (in_dims[0], in_dims[0])


def test_a_vmap_failure_of_fn_itself_is_not_hidden_by_a_sparse_input():
    # a wrong vmap rule raises whatever the inputs' layout: fn's own failure, not
    # PyTorch's missing batching rules for sparse tensors
    adjacency, x = _sparse_graph()
    result = check_function(
        lambda a, x: torch.sparse.mm(a, ScaleWithWrongOutDims.apply(x)), adjacency, x, checks="vmap"
    )["vmap"]
    assert result.failed, result
    assert "vmap of the forward failed" in result.message, result.message


class DoubleWithItemInBackward(torch.autograd.Function):
    """``2 x``, right, whose backward reads a Python number off grad_output (a guard
    against overflow): d(2 x)/dx = 2."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        if g.abs().max().item() > 1e30:
            raise OverflowError("grad_output too large")
        return 2 * g


def test_an_item_in_backward_makes_the_vmap_checks_unsupported_not_failed():
    # before: batched_grad FAILED ("Batching rule not implemented for aten::item"), and so
    # did vmap's vmap(grad): a batch of grad_outputs has no single Python number, a
    # limitation of vmap; the gradient is right (gradcheck passes)
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    report = check_function(
        DoubleWithItemInBackward, x, checks=["gradcheck", "vmap", "batched_grad"]
    )
    assert report.ok and report["gradcheck"].passed, report
    for name in ("vmap", "batched_grad"):
        result = report[name]
        assert result.unsupported and ".item()" in result.message, result


class SquareReadingGradOutputData(torch.autograd.Function):
    """x², textbook style, whose backward reads ``grad_output.data`` (an old idiom): right
    for every single grad_output, but PyTorch's batched backward crashes the process on it
    (a segmentation fault reading ``.data`` of a batched tensor)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x.data * (g * 1).data


def test_a_backward_reading_data_of_grad_output_fails_batched_grad_without_a_crash():
    # check_function ran the batched backward and the whole process died (SIGSEGV)
    x = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64).reshape(3, 4)
    report = check_function(SquareReadingGradOutputData, x, checks=["gradcheck", "batched_grad"])
    assert report["gradcheck"].passed, report
    result = report["batched_grad"]
    assert result.failed, result
    assert "reads .data of grad_output" in result.message
    assert "segmentation fault" in result.message


class ScaleFlatteningGradOutput(torch.autograd.Function):
    """``2 x``, textbook style, whose backward flattens grad_output: right, but PyTorch's
    batched backward (is_grads_batched runs the legacy torch._vmap_internals vmap) has
    no batching rule for ``aten::flatten``, so it raises for any such Function."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return (2 * g.flatten()).reshape(ctx.shape)


class ScaleByEinsumInBackward(ScaleFlatteningGradOutput):
    """The same with the backward written as an einsum (no batching rule there either)."""

    @staticmethod
    def backward(ctx, g):
        return torch.einsum("ij,jk->ik", g, 2 * torch.eye(g.shape[1], dtype=g.dtype))


@pytest.mark.parametrize("fn", [ScaleFlatteningGradOutput, ScaleByEinsumInBackward])
def test_an_op_the_batched_backward_cannot_batch_is_unsupported_not_failed(fn):
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    report = check_function(fn, x)
    result = report["batched_grad"]
    assert result.unsupported, result
    assert "no batching rule" in result.message and "aten::" in result.message, result
    assert report.ok, report


class ScaleWithWrongBatchingFallback(ScaleFlatteningGradOutput):
    """Falls back, when flatten cannot be batched, on a step with a real bug (a product
    of mismatched shapes). The batching error is only the context of that failure and
    must not excuse it."""

    @staticmethod
    def backward(ctx, g):
        try:
            return (2 * g.flatten()).reshape(ctx.shape)
        except RuntimeError:
            return (2 * g) @ torch.eye(ctx.shape[0], dtype=g.dtype)


class RaisesTheBatchingTextItself(ScaleFlatteningGradOutput):
    """Raises its own error quoting PyTorch's words in a sentence of its own."""

    @staticmethod
    def backward(ctx, g):
        raise ValueError("my backward: Batching rule not implemented for aten::mine")


@pytest.mark.parametrize("fn", [ScaleWithWrongBatchingFallback, RaisesTheBatchingTextItself])
def test_a_real_error_mentioning_a_missing_batching_rule_still_fails(fn):
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = check_function(fn, x, checks=["batched_grad"])["batched_grad"]
    assert result.failed, result
