"""What the Triton kernel tests share: running the ``interp`` tests in Triton's interpreter.

Triton fixes interpreted vs compiled for the whole process when it is first imported, so
tests marked ``interp`` run only in a process started with ``TRITON_INTERPRET=1``; each
test file's ``test_interpreter_suite`` starts one with :func:`run_interpreter_suite`, so
that a plain ``pytest`` run covers them without putting the rest of the session (CUDA,
torch.compile) in interpreter mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(
    not INTERPRETING, reason="interpreter tests: run by test_interpreter_suite (subprocess)"
)
not_interp = pytest.mark.skipif(INTERPRETING, reason="needs compiled Triton")
# significant bits (including the implicit one) per dtype
BITS = {torch.float16: 11, torch.bfloat16: 8}


def run_interpreter_suite(test_file: str) -> None:
    """Run ``test_file``'s ``interp`` tests (named ``test_interpreter_*``) in a fresh
    process under ``TRITON_INTERPRET=1`` and assert that they all ran and passed."""
    path = Path(test_file).resolve()
    root = path.parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("TORCHBP_TRITON", None)
    cmd = [sys.executable, "-m", "pytest", str(path), "-q"]
    cmd += ["-k", "interpreter_ and not suite"]
    cmd += ["-p", "no:cacheprovider", "-m", "not cuda"]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]
