"""The package itself: public surface, version, and no Lightning on `import torchbp`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torchbp


def test_import_torchbp_does_not_import_lightning():
    code = (
        "import sys, torchbp, torchbp.functional, torchbp.nn, torchbp.verify\n"
        "bad = sorted(m for m in sys.modules if 'lightning' in m or m.startswith('sklearn'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_surface():
    assert torchbp.__version__
    for name in ["autograd", "functional", "nn", "convert", "verify"]:
        assert hasattr(torchbp, name), name
    for name in torchbp.functional.__all__ + torchbp.nn.__all__ + torchbp.autograd.__all__:
        for module in (torchbp.functional, torchbp.nn, torchbp.autograd):
            if name in module.__all__:
                assert getattr(module, name).__doc__, f"{module.__name__}.{name} has no docstring"


def test_typed_marker_ships():
    assert (Path(torchbp.__file__).parent / "py.typed").is_file()
