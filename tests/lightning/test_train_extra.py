"""Without the ``train`` extra: ``torchbp.lightning`` and ``torchbp-train`` say what to install.

Each test runs a fresh interpreter in which one of the extra's modules cannot be imported:
``sys.modules[name] = None`` makes ``import name`` raise ModuleNotFoundError and
``importlib.util.find_spec(name)`` return None, as for a module that is not installed (torch
probes numpy that way).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK = """
import sys

sys.modules[{missing!r}] = None  # import raises ModuleNotFoundError; find_spec returns None
"""

#: modules of the extra: the first the package imports, and one the CLI needs
MISSING = ["numpy", "jsonargparse"]


def _run(missing: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK.format(missing=missing) + code],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _message(missing: str) -> str:
    return (
        f"torchbp.lightning and torchbp-train need the train extra ({missing} is not "
        "installed): pip install 'torchbp[train]'"
    )


@pytest.mark.parametrize("missing", MISSING)
def test_import_names_the_train_extra(missing):
    code = (
        "try:\n"
        "    import torchbp.lightning\n"
        "except ModuleNotFoundError as e:\n"
        # sys.modules[name] = None fails the import of a submodule first (a real missing
        # package fails at its top-level name): compare top-level names
        "    print(e.name.partition('.')[0])\n"
        "    print(str(e).replace(e.name, e.name.partition('.')[0]))\n"
        "    assert e.__cause__ is None and e.__suppress_context__\n"
        "else:\n"
        "    raise SystemExit('imported')\n"
    )
    out = _run(missing, code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [missing, _message(missing)]


def test_console_script_prints_one_line_and_exits_1():
    """The console script's entry point (``torchbp._train_command.main``, outside the
    package whose import fails) prints the error as one line on stderr (no traceback), and
    the status is 1 (an installation problem; 2 is a bad command line)."""
    code = (
        "sys.argv = ['/venv/bin/torchbp-train', 'fit']\n"
        "from torchbp._train_command import main\n"
        "sys.exit(main())\n"
    )
    out = _run("jsonargparse", code)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"error: {_message('jsonargparse')}"]
    assert out.stdout == ""


def test_other_programs_keep_the_traceback():
    """Only ``torchbp-train`` prints the error as one line: a user's script importing the
    package without the extra gets Python's usual traceback, ending with the same message."""
    out = _run("jsonargparse", "sys.argv = ['train.py']\nimport torchbp.lightning\n")
    assert out.returncode == 1
    assert "Traceback" in out.stderr
    assert out.stderr.splitlines()[-1] == f"ModuleNotFoundError: {_message('jsonargparse')}"


def test_a_missing_torchbp_module_is_not_blamed_on_the_extra():
    out = _run("torchbp.lightning.module", "import torchbp.lightning\n")
    assert out.returncode == 1
    assert "train extra" not in out.stderr
