"""Loading the user's target (``verify/target.py``): a file imports its sibling modules, as
when it is run with ``python path/to/file.py``."""

from __future__ import annotations

import sys

import pytest
import torch

from torchbp.verify import cli
from torchbp.verify.target import TargetError, load_symbol, parse_inputs


def _write_package(root):
    (root / "sub").mkdir()
    (root / "sub" / "hunt_helpers.py").write_text("FACTOR = 2.0\n")
    (root / "sub" / "hunt_scaled.py").write_text(
        "import torch\n"
        "from hunt_helpers import FACTOR\n"
        "class Scaled(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x):\n"
        "        return x * FACTOR\n"
        "    @staticmethod\n"
        "    def backward(ctx, g):\n"
        "        return g * FACTOR\n"
    )
    return root / "sub" / "hunt_scaled.py"


def test_a_target_file_imports_its_sibling_modules(tmp_path, monkeypatch, capsys):
    # before: 'cannot import .../hunt_scaled.py: ModuleNotFoundError: No module named
    # hunt_helpers' (exit 2), although python runs the file
    path = _write_package(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "hunt_helpers", raising=False)
    monkeypatch.delitem(sys.modules, "hunt_scaled", raising=False)
    assert load_symbol(f"{path}:Scaled").__name__ == "Scaled"
    argv = ["sub/hunt_scaled.py:Scaled", "--inputs", "3,4", "--no-compile"]
    assert cli.main(argv) == 0, capsys.readouterr()


def test_target_and_reference_from_one_file_import_it_once(tmp_path, monkeypatch, capsys):
    # before, the file ran twice: an op it defines with torch.library was registered twice
    # ('cannot import ...: Tried to register an operator ... multiple times', exit 2)
    (tmp_path / "hunt_libops.py").write_text(
        "import torch\n"
        'torch.library.define("torchbp_verify_test_once::twice", "(Tensor x) -> Tensor")\n'
        '@torch.library.impl("torchbp_verify_test_once::twice", "cpu")\n'
        "def _twice(x):\n"
        "    return x * 2\n"
        'torch.library.register_autograd("torchbp_verify_test_once::twice", '
        "lambda ctx, g: g * 2)\n"
        "twice = torch.ops.torchbp_verify_test_once.twice.default\n"
        "def reference(x):\n"
        "    return x * 2\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "hunt_libops", raising=False)
    argv = ["hunt_libops.py:twice", "--inputs", "3,4", "--reference", "hunt_libops.py:reference"]
    assert cli.main([*argv, "--no-compile", "--skip", "opcheck"]) == 0, capsys.readouterr()
    assert load_symbol("hunt_libops.py:reference") is load_symbol("./hunt_libops.py:reference")


def test_a_bool_mask_input_is_specified_with_bool():
    # masks (x.masked_fill(~mask, 0)) had no spec: int:SHAPE<2 gives int64 0/1, which ~
    # turns into -1/-2 and masked_fill refuses
    x, mask = parse_inputs("3,4;bool:3,4")
    assert mask.dtype == torch.bool and tuple(mask.shape) == (3, 4)
    assert parse_inputs("bool:3,4", seed=1)[0].equal(parse_inputs("bool:3,4", seed=1)[0])
    assert parse_inputs("bool:()")[0].shape == ()


def test_a_masked_function_is_checked_from_the_command_line(capsys):
    argv = ["torch:masked_fill", "--inputs", "3,4;bool:3,4;=0.0", "--no-compile"]
    assert cli.main(argv) == 0, capsys.readouterr()


def test_a_complex_function_is_checked_from_the_command_line(capsys):
    # complex inputs had no spec: complex:3 was read as a shape and refused (exit 2)
    z, w = parse_inputs("complex:3;complex:2,3")
    assert z.dtype == torch.complex128 and tuple(w.shape) == (2, 3)
    argv = ["torch:mul", "--inputs", "complex:3;complex:3", "--reference", "torch:mul"]
    assert cli.main([*argv, "--no-compile"]) == 0, capsys.readouterr()


def test_a_spec_with_no_inputs_says_so(tmp_path):
    """An empty spec, or a spec file of comments only, was "empty input in '...' (two ';'
    in a row?)", a cause that is not there."""
    comments = tmp_path / "spec.txt"
    comments.write_text("# inputs of my op\n\n")
    for spec in ("", "  ", f"@{comments}"):
        with pytest.raises(TargetError, match="lists no inputs") as info:
            parse_inputs(spec)
        assert "two ';'" not in str(info.value)


@pytest.mark.parametrize("item", ["float8:3", "Float32:3", "double:4,5"])
def test_an_input_with_an_unknown_prefix_names_the_prefixes_it_takes(item):
    # was "a shape is comma-separated sizes", sending the user after the shape
    with pytest.raises(TargetError, match="unknown prefix") as info:
        parse_inputs(item)
    assert "float32:" in str(info.value) and "complex:" in str(info.value)
