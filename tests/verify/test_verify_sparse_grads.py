"""A Function returning a sparse gradient for a dense input (``nn.Embedding(sparse=True)``
style): every check reads the gradient densely, torch's gradcheck (which cannot check
it) is unsupported, and a wrong sparse gradient still fails."""

from __future__ import annotations

import pytest
import torch

from torchbp.verify import check_function


class SparseGradIndexSelect(torch.autograd.Function):
    """``weight.index_select(0, index)`` whose backward returns the gradient of
    ``weight`` as a sparse COO tensor (one row per index, repeats summed on use)."""

    @staticmethod
    def forward(ctx, weight, index):
        ctx.save_for_backward(index)
        ctx.weight_shape = weight.shape
        return weight.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(index.unsqueeze(0), grad, ctx.weight_shape), None


class WrongRows(SparseGradIndexSelect):
    """The gradient rows scattered to the wrong rows (the indices reversed)."""

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(index.flip(0).unsqueeze(0), grad, ctx.weight_shape), None


class WrongValues(SparseGradIndexSelect):
    """The right rows with twice the values."""

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.sparse_coo_tensor(index.unsqueeze(0), 2 * grad, ctx.weight_shape), None


def _index_select(weight, index):
    return weight.index_select(0, index)


def _inputs():
    weight = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return weight, torch.tensor([0, 2, 2, 4])


@pytest.fixture(autouse=True)
def _quiet_sparse_invariants():
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        yield


def test_a_correct_sparse_gradient_passes_every_check_that_reads_it():
    report = check_function(SparseGradIndexSelect.apply, *_inputs(), reference=_index_select)
    assert report.ok, report
    for name in ("grad_output_safety", "mutation", "interleave", "reference", "undefined_grad"):
        assert report[name].passed, report[name]


def test_batched_grad_of_a_sparse_gradient_is_unsupported_as_pytorchs_limit():
    result = check_function(SparseGradIndexSelect.apply, *_inputs(), checks=["batched_grad"])
    result = result["batched_grad"]
    assert result.unsupported, result
    assert "sparse gradient of a dense input (input 0)" in result.message, result


@pytest.mark.parametrize("name", ["gradcheck", "gradgradcheck"])
def test_torchs_gradcheck_of_a_correct_sparse_gradient_is_unsupported_naming_why(name):
    result = check_function(SparseGradIndexSelect.apply, *_inputs(), checks=[name])[name]
    assert result.unsupported, result
    assert "a sparse gradient of a dense input (input 0)" in result.message, result
    assert f"torch's {name} cannot check it" in result.message, result


@pytest.mark.parametrize("wrong", [WrongRows, WrongValues])
def test_a_wrong_sparse_gradient_fails_gradcheck_naming_the_input(wrong):
    result = check_function(wrong.apply, *_inputs(), checks=["gradcheck"])["gradcheck"]
    assert result.failed, result
    assert "input 0" in result.message, result


@pytest.mark.parametrize("wrong", [WrongRows, WrongValues])
def test_a_wrong_sparse_gradient_fails_the_reference_check_naming_the_input(wrong):
    report = check_function(wrong.apply, *_inputs(), reference=_index_select)
    result = report["reference"]
    assert result.failed, result
    assert "input 0" in result.message, result
    for check in report.checks:
        assert not (check.failed and "SparseCPU" in check.message), check


def test_a_sparse_embedding_module_passes_with_its_weight_named():
    embedding = torch.nn.Embedding(5, 3, sparse=True).double()
    report = check_function(embedding, torch.tensor([0, 2, 2, 4]))
    assert report.ok, report
    result = report["gradcheck"]
    assert result.unsupported, result
    assert "parameter 'weight'" in result.message, result
