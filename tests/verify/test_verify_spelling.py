"""How messages spell check_function's options: Python keyword arguments by default, the
torchbp-verify flags inside command_line_spelling (the CLI's runs)."""

from __future__ import annotations

import pytest
import torch

from torchbp.verify.checks.spelling import command_line_spelling, keep_dtype, option, option_name


@pytest.mark.parametrize(
    ("name", "value", "python", "command_line"),
    [
        ("skip", ["gradcheck"], "skip=['gradcheck']", "--skip gradcheck"),
        (
            "skip",
            ["gradcheck", "forward_ad"],
            "skip=['gradcheck', 'forward_ad']",
            "--skip gradcheck,forward_ad",
        ),
        ("grad_inputs", (0,), "grad_inputs=(0,)", "--grad-inputs 0"),
        ("grad_inputs", (0, 2), "grad_inputs=(0, 2)", "--grad-inputs 0,2"),
        ("dtype", torch.float32, "dtype=torch.float32", "--dtype float32"),
    ],
)
def test_an_option_is_spelled_as_its_reader_passes_it(name, value, python, command_line):
    assert option(name, value) == python
    with command_line_spelling():
        assert option(name, value) == command_line
    assert option(name, value) == python  # the Python spelling is back after the block


def test_an_option_named_without_a_value():
    assert option("reference") == "reference="
    assert option_name("require") == "require"
    with command_line_spelling():
        assert option("reference") == "--reference module:Symbol naming"
        assert option_name("require") == "--require"
        assert option_name("checks") == "checks"  # no flag: keeps its name
        assert option_name("nondet_tol") == "--nondet-tol"


def test_keeping_the_inputs_dtype_has_no_dtype_none_on_the_command_line():
    assert keep_dtype(torch.float32).startswith("dtype=None")
    with command_line_spelling():
        assert keep_dtype(torch.float32) == "--dtype float32"


def test_the_python_spelling_is_back_after_an_error_in_the_block():
    with pytest.raises(RuntimeError), command_line_spelling():
        raise RuntimeError
    assert option("skip", ["compile"]) == "skip=['compile']"
