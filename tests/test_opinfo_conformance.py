"""PyTorch's own OpInfo / ModuleInfo samples of torchbp's ops, equal to native (the checks
are in ``tests/opinfo_conformance.py``).

They run in a subprocess: importing ``torch.testing._internal`` calls
``torch.backends.disable_global_flags()``, after which setting a cudnn flag raises, and
Lightning's ``Trainer(deterministic=True)`` in a later test of the same process would fail.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("opinfo_conformance.py")


def test_every_opinfo_and_moduleinfo_sample_matches_native():
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    print(summary)  # e.g. "passed {...}: 3837 checks, 0 failed, 20 excluded"
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    found = re.search(r": (\d+) checks, (\d+) failed, (\d+) excluded$", summary)
    assert found, summary
    checks, failed, _ = map(int, found.groups())
    assert failed == 0
    assert checks > 3000, summary  # every op and module of ours contributed samples
