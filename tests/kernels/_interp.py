"""What the Triton kernel tests share: running the ``interp`` tests in Triton's interpreter.

Triton fixes interpreted vs compiled for the whole process when it is first imported, so
tests marked ``interp`` run only in a process started with ``TRITON_INTERPRET=1``; each
test file's ``test_interpreter_suite`` starts one with :func:`run_interpreter_suite`, so
that a plain ``pytest`` run covers them without putting the rest of the session (CUDA,
torch.compile) in interpreter mode.
"""

from __future__ import annotations

import operator
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


def interpreter_index_broken() -> bool:
    """Whether this Triton's interpreter fails to turn a runtime scalar into a Python int.

    Triton < 3.7 (3.6 is what torch 2.11 and the GPU image bring) implements an interpreted
    ``tensor.__index__`` as ``int(handle.data)`` on a 1-element array, which numpy >= 2.4
    refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every
    ``range(0, n, BLOCK)`` over a runtime ``n`` in a kernel fails; Triton 3.7+ squeezes the
    array first. Detected by trying exactly that (no version compare); False where the
    interpreter's internals are not the ones this knows (the tests then run as they are).
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as ti

        # a scalar kernel argument as the interpreter holds it: a 1-element array
        scalar = tl.core.tensor(ti.TensorHandle(np.array([3], np.int32), tl.int32), tl.int32)
        scope = ti._LangPatchScope()
    except (ImportError, AttributeError, TypeError):
        return False
    try:
        ti._patch_lang_tensor(tl.core.tensor, scope)  # what the interpreter does per launch
        return operator.index(scalar) != 3
    except TypeError:
        return True
    finally:
        scope.restore()


def fix_interpreter_index():
    """Make the interpreter's ``tensor.__index__`` squeeze its 1-element array before
    ``int()``, as Triton 3.7+ does (see :func:`interpreter_index_broken`); returns a function
    that undoes it. The interpreter re-patches ``triton.language.tensor`` around every
    kernel launch through ``_patch_lang_tensor``, so that function is wrapped."""
    from triton.runtime import interpreter as ti

    original = ti._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    ti._patch_lang_tensor = patch_lang_tensor

    def undo():
        ti._patch_lang_tensor = original

    return undo
