"""Smoke test of ``python -m experiments.bench_per_sample``: it runs and writes its files.

Benchmarks are not tests: nothing here looks at a time, only at the files' structure.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_per_sample_quick(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "experiments.bench_per_sample", "--quick", "--out", str(tmp_path)]
    cmd += ["--rounds", "2", "--slow-rounds", "1", "--case", "clip_noise", "--case", "grads"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads((tmp_path / "per_sample_quick.json").read_text())
    assert set(data["timing"]) == {"plain", "clip_noise", "grads"}
    assert data["timing"]["clip_noise"]["rounds"] == 2
    assert data["peak"]["plain"]["peak_extra_bytes"] >= 0
    text = (tmp_path / "per_sample_quick.md").read_text()
    assert text.startswith("# torchbp per-sample gradients benchmark")
    assert "| clip step peak memory ≤ 1.5x plain |" in text
