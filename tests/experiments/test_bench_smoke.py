"""Smoke test of the benchmark command (issue 5): it runs and writes its files.

Benchmarks are not tests: nothing here looks at a time, only at the files' structure.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_quick_one_case(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "experiments.bench", "--device", "cpu", "--quick"]
    cmd += ["--case", "act_relu", "--case", "mlp_saved_leaky_relu", "--out", str(tmp_path)]
    cmd += ["--budget", "0.2", "--min-rounds", "3", "--max-rounds", "3"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    data = json.loads((tmp_path / "bench_cpu_quick.json").read_text())
    assert data["meta"]["device"] == "cpu"
    relu = data["cases"]["act_relu"]
    assert relu["impls"]["native"]["n"] == 3
    assert relu["impls"]["native"]["saved_bytes"] > 0
    if "torchbp" in relu["impls"]:
        assert set(relu["ratios"]["native"]) >= {"median", "min", "paired_median"}
    assert "mlp_saved_leaky_relu" in data["cases"]
    assert (tmp_path / "bench_cpu_quick.md").read_text().startswith("# torchbp benchmarks")
