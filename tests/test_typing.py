"""Static typing of the public API: mypy reads tests/typing_check/user_code.py (the API as
README.md and docs/*.md use it) as a user's strict project would.

torchbp ships ``py.typed``, so its annotations are what users' type checkers see: a public
function that loses its return annotation (an implicit ``Any``), an overload that stops
matching, or a module base that is no valid type fails here. Runs only where mypy is
installed (the ``dev`` extra).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import torchbp

pytest.importorskip("mypy.api")

USER_CODE = Path(__file__).parent / "typing_check" / "user_code.py"

#: a user's strict settings, with the imported package checked as installed code (its own
#: internals unreported) and torch's own unannotated functions (``Tensor.backward``)
#: allowed, since only torchbp's annotations are under test
MYPY_FLAGS = (
    "--strict",
    "--follow-imports=silent",
    "--untyped-calls-exclude=torch",
    "--show-error-codes",
    "--no-error-summary",
)


def test_user_code_type_checks_strictly_against_torchbp(tmp_path):
    env = dict(os.environ)
    root = Path(torchbp.__file__).parents[1]
    if root.name not in ("site-packages", "dist-packages"):  # (mypy refuses those here)
        # the torchbp under test: a checkout's src/, ahead of any installed copy
        env["MYPYPATH"] = str(root)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *MYPY_FLAGS, "--cache-dir", str(tmp_path), str(USER_CODE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
