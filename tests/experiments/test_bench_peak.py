"""``experiments/bench/peak.py`` and the harness's CPU peak-memory figures."""

import json
import subprocess

import torch
from experiments.bench import cases, harness, peak

MIB = 2**20


def _case_with_one_time_workspace(compiled: bool) -> cases.Case:
    """A 1 MiB op whose first call in a process also fills a 64 MiB workspace it keeps
    (as a lazily made thread pool, kernel cache or compiled graph does)."""
    x = torch.randn(MIB // 4, requires_grad=True)
    kept: list[torch.Tensor] = []

    def run():
        if not kept:
            kept.append(torch.ones(64 * MIB // 4))
        (x * 2.0).sum().backward()

    def reset():
        x.grad = None

    impl = cases.Impl(run, compiled=compiled)
    return cases.Case("fake", "loss", "", {"f": impl}, exclude=[], reset=reset, peak_rss=True)


def _peak_extra(monkeypatch, capsys, compiled: bool) -> int:
    monkeypatch.setattr(cases, "build", lambda name, opts: _case_with_one_time_workspace(compiled))
    assert peak.main(["--case", "fake", "--impl", "f", "--quick"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_extra_bytes"]


def test_peak_of_an_eager_impl_leaves_out_its_first_call_as_a_compiled_ones_does(
    monkeypatch, capsys
):
    # one call's peak, not the process's one-time costs: measured alike for every system
    assert _peak_extra(monkeypatch, capsys, compiled=True) < 16 * MIB
    assert _peak_extra(monkeypatch, capsys, compiled=False) < 16 * MIB


def test_peak_subprocess_fixes_the_mmap_threshold(monkeypatch):
    # after the warm-up call, glibc's adaptive threshold would keep the memory that call
    # freed in the heap, and the measured call would reuse it unseen
    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(kwargs["env"])
        return subprocess.CompletedProcess(cmd, 0, '{"peak_extra_bytes": 1}\n', "")

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    out = harness.rss_peak_subprocess("cross_entropy", "native", quick=True, compile_mode="none")
    assert out == {"peak_extra_bytes": 1}
    assert seen["MALLOC_MMAP_THRESHOLD_"] == "65536"
