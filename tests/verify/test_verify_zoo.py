"""The bug zoo (``tests/verify/zoo/``): check_function flags every bug with the check that
diagnoses it, and passes every correct twin.

A bug is checked with the checks that diagnose it (``entry.expected``), which keeps this
file fast; the table ``experiments/results/verify_zoo.md`` runs every default check on
every bug and twin. Here each twin runs the checks that flag its bug plus ``reference``
and ``extreme_values``; the first twin of each family runs every default check
(``compile`` included).
"""

from __future__ import annotations

import pytest
import torch
from tests.verify.zoo import FAMILIES, ZOO, ZooEntry

from torchbp.verify import CHECKS, check_function

FIRST_OF_FAMILY = {family: next(e.name for e in ZOO if e.family == family) for family in FAMILIES}


def _ids(entries):
    return [e.name for e in entries]


def test_zoo_has_at_least_30_bugs_in_every_family():
    assert len(ZOO) >= 30
    assert len({e.name for e in ZOO}) == len(ZOO), "bug names must be unique"
    assert {e.family for e in ZOO} == set(FAMILIES)
    for family in FAMILIES:
        assert sum(e.family == family for e in ZOO) >= 4, family
    for e in ZOO:
        assert e.expected and e.expected <= set(CHECKS), e.name
        assert e.bug is not e.twin, e.name


@pytest.mark.parametrize("entry", ZOO, ids=_ids(ZOO))
def test_bug_is_flagged_by_the_expected_check(entry: ZooEntry):
    checks = sorted(entry.expected)
    report = check_function(
        entry.bug, *entry.inputs(), reference=entry.reference, checks=checks, **entry.kwargs
    )
    failed = {c.name for c in report.failures}
    assert not report.ok, str(report)
    assert failed & entry.expected, f"expected one of {sorted(entry.expected)}:\n{report}"
    for c in report.failures:
        assert c.message, c.name


@pytest.mark.parametrize("entry", ZOO, ids=_ids(ZOO))
def test_twin_passes(entry: ZooEntry):
    if FIRST_OF_FAMILY[entry.family] == entry.name:
        selection = {}  # every default check, compile included
    else:  # the checks that flag its bug, and parity with the reference
        selection = {"checks": sorted(entry.expected | {"reference", "extreme_values"})}
    report = check_function(
        entry.twin, *entry.inputs(), reference=entry.reference, **selection, **entry.kwargs
    )
    assert report.ok, str(report)
    assert not report.failures, str(report)
    assert {c.name for c in report if c.passed} >= entry.expected, str(report)
    if entry.reference is not None:
        assert report["reference"].passed and report["extreme_values"].passed, str(report)


def _entry(name: str) -> ZooEntry:
    return next(e for e in ZOO if e.name == name)


def _report(name: str, which: str = "bug", **kwargs):
    e = _entry(name)
    fn = e.bug if which == "bug" else e.twin
    return check_function(fn, *e.inputs(), reference=e.reference, **{**e.kwargs, **kwargs})


def test_mutation_tells_a_counted_write_from_one_the_version_counter_missed():
    seen = _report("forward_overwrites_input", checks=["mutation"])["mutation"]
    assert seen.failed and "forward wrote into input 0 in place" in seen.message
    assert "mark_dirty" in seen.message
    missed = _report("forward_overwrites_input_via_data", checks=["mutation"])["mutation"]
    assert missed.failed and "version counter did not see" in missed.message
    assert ".data" in missed.message
    output = _report("backward_squares_saved_output", checks=["mutation"])["mutation"]
    assert output.failed and "backward wrote into output 0" in output.message
    again = _report("backward_squares_saved_output_via_data", checks=["mutation"])["mutation"]
    assert again.failed and "backward changed the values of output 0" in again.message


def test_interleave_names_state_outside_ctx():
    result = _report("state_on_the_class", checks=["interleave"])["interleave"]
    assert result.failed
    assert "of the first of two calls made before backward" in result.message
    assert "outside ctx" in result.message


def test_vmap_in_dims_catches_a_rule_that_assumes_dim_0():
    report = _report("vmap_rule_ignores_in_dims", checks=["vmap", "vmap_in_dims"])
    assert report["vmap"].passed, str(report)  # in_dims=0 hides the bug
    assert report["vmap_in_dims"].failed
    assert "in_dims=(2,)" in report["vmap_in_dims"].message


def test_vmap_in_dims_is_skipped_when_vmap_is_unsupported():
    report = _report("saved_tensor_modified_after_saving", "twin", checks=["vmap", "vmap_in_dims"])
    assert report["vmap"].unsupported and report["vmap_in_dims"].skipped, str(report)


def test_extreme_values_names_the_probe_and_is_skipped_without_reference():
    result = _report("softmax_without_max_trick", checks=["extreme_values"])["extreme_values"]
    assert result.failed and "inputs scaled by 1e3" in result.message
    assert "max trick" in result.message
    kink = _report("relu_grad_one_at_kink", checks=["extreme_values"])["extreme_values"]
    assert kink.failed and "inputs set to zero" in kink.message
    edge = _report("hardtanh_grad_one_at_boundary", checks=["extreme_values"])["extreme_values"]
    assert edge.failed and "inputs rounded to integers" in edge.message
    e = _entry("softmax_without_max_trick")
    report = check_function(e.bug, *e.inputs(), checks=["extreme_values"])
    assert report["extreme_values"].skipped and "no reference" in report["extreme_values"].message


def test_extreme_values_leaves_out_probes_where_the_reference_raises():
    def picky_reference(x):
        if x.abs().max() > 100:
            raise ValueError("out of domain")
        return torch.sigmoid(x)

    e = _entry("backward_writes_grad_output")
    report = check_function(
        e.twin, *e.inputs(), reference=picky_reference, checks=["extreme_values"]
    )
    assert report["extreme_values"].passed
    assert report["extreme_values"].message.startswith("3 probe(s)")


NEW_CHECKS = ["vmap_in_dims", "mutation", "interleave", "extreme_values", "needs_input_grad"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_new_checks_pass_every_twin_in_low_precision(dtype):
    # rounding differs between a twin and native in float32/bfloat16; large scaled-up
    # terms that cancel must not count as a bug
    for e in ZOO:
        if "dtype" in e.kwargs:
            continue
        report = check_function(
            e.twin, *e.inputs(), reference=e.reference, checks=NEW_CHECKS, dtype=dtype, **e.kwargs
        )
        assert report.ok, f"{e.name}:\n{report}"
