"""The ``vmap_in_dims`` check (``checks/vmap_dims.py``): a vmap rule that says it does not
batch along other dims (``NotImplementedError``) is unsupported there, not wrong."""

from __future__ import annotations

from tests.verify.correct_functions import CustomVmapTanh
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function


class Dim0OnlyTanh(CustomVmapTanh):
    """tanh with a vmap staticmethod that batches along dim 0 only, and says so."""

    @staticmethod
    def vmap(info, in_dims, x):
        if in_dims[0] != 0:
            raise NotImplementedError("Dim0OnlyTanh batches along dim 0 only")
        return Dim0OnlyTanh.apply(x), 0


def test_vmap_rule_refusing_other_dims_is_unsupported_with_how_to_add_it():
    # before: vmap_in_dims failed with the NotImplementedError as if the rule were wrong
    report = check_function(Dim0OnlyTanh, seeded(3, 4), checks=["vmap", "vmap_in_dims"])
    result = report["vmap_in_dims"]
    assert report["vmap"].passed and result.unsupported, report
    assert "Dim0OnlyTanh batches along dim 0 only" in result.message
    assert "to add it:" in result.message and "in_dims" in result.message
    required = check_function(Dim0OnlyTanh, seeded(3, 4), checks="vmap", require="vmap_in_dims")
    assert required["vmap_in_dims"].failed


class BatchLastTanh(CustomVmapTanh):
    """tanh whose vmap staticmethod moves the batch dim last but says it is at 0."""

    @staticmethod
    def vmap(info, in_dims, x):
        return BatchLastTanh.apply(x.movedim(in_dims[0], -1)), 0


def test_vmap_output_of_the_wrong_shape_is_named_as_such():
    # before: torch's broadcasting error ("The size of tensor a (4) must match the size of
    # tensor b (3) ...") from inside the comparison, instead of the shapes compared
    report = check_function(BatchLastTanh, seeded(4, 5), checks=["vmap"], vmap_batch=3)
    result = report["vmap"]
    assert result.failed, report
    assert "vmap output 0 differs from a Python loop: shape (4, 5, 3) instead of (3, 4, 5)" in (
        result.message
    ), result.message
