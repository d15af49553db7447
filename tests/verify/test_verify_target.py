"""Loading the user's target (``verify/target.py``): a file imports its sibling modules, as
when it is run with ``python path/to/file.py``."""

from __future__ import annotations

import sys

from torchbp.verify import cli
from torchbp.verify.target import load_symbol


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
