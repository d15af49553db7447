"""``python -m experiments.bench`` (``experiments/bench/run.py``): failures and bad options."""

import json

import pytest
import torch
from experiments.bench import cases
from experiments.bench import run as bench_run


def _case_whose_torchbp_raises(opts: cases.Options) -> cases.Case:
    x = torch.randn(8, requires_grad=True)

    def torchbp_step():
        raise RuntimeError("kernel exploded")

    def native_step():
        x.relu().sum().backward()

    def reset():
        x.grad = None

    impls = {"torchbp": cases.Impl(torchbp_step), "native": cases.Impl(native_step)}
    return cases.Case("fake", "activation", "8 float32", impls, exclude=[], reset=reset)


def test_a_system_that_raises_fails_the_run_and_is_named_at_the_top(tmp_path, monkeypatch):
    monkeypatch.setitem(cases.BUILDERS, "fake", _case_whose_torchbp_raises)
    argv = ["--device", "cpu", "--case", "fake", "--out", str(tmp_path), "--no-peak"]
    argv += ["--budget", "0.01", "--min-rounds", "3", "--max-rounds", "3"]
    assert bench_run.main(argv) == 1
    data = json.loads((tmp_path / "bench_cpu_partial.json").read_text())
    assert data["errors"] == ["fake / torchbp: RuntimeError: kernel exploded"]
    text = (tmp_path / "bench_cpu_partial.md").read_text()
    head = text.split("## Summary")[0]
    assert "fake / torchbp: RuntimeError: kernel exploded" in head


@pytest.mark.parametrize("option", ["--min-rounds", "--max-rounds"])
def test_zero_rounds_are_refused_naming_the_option(capsys, option):
    # before: every case then failed alike in statistics.median (no median for empty data)
    with pytest.raises(SystemExit) as exc:
        bench_run.parse(["--device", "cpu", option, "0"])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def _relu_case(opts: cases.Options) -> cases.Case:
    x = torch.randn(8, requires_grad=True)

    def step():
        x.relu().sum().backward()

    def reset():
        x.grad = None

    impls = {"torchbp": cases.Impl(step), "native": cases.Impl(step)}
    return cases.Case("ok", "activation", "8 float32", impls, exclude=[], reset=reset)


def _interrupted(opts: cases.Options) -> cases.Case:
    raise KeyboardInterrupt


def test_an_interrupted_run_leaves_files_that_say_so_and_agree(tmp_path, monkeypatch):
    # the files are rewritten after every case, so that an interrupted run keeps what it
    # finished; they must not pass for a whole run, nor sit beside an older run's figure
    (tmp_path / "bench_cpu_partial.png").write_bytes(b"an older run's figure")
    monkeypatch.setitem(cases.BUILDERS, "ok", _relu_case)
    monkeypatch.setitem(cases.BUILDERS, "cut", _interrupted)
    argv = ["--device", "cpu", "--case", "ok", "--case", "cut", "--case", "ok_too"]
    argv += ["--out", str(tmp_path), "--no-peak", "--budget", "0.01"]
    argv += ["--min-rounds", "3", "--max-rounds", "3"]
    with pytest.raises(KeyboardInterrupt):
        bench_run.main(argv)
    data = json.loads((tmp_path / "bench_cpu_partial.json").read_text())
    assert list(data["cases"]) == ["ok"]
    assert data["not_run"] == ["cut", "ok_too"]
    head = (tmp_path / "bench_cpu_partial.md").read_text().split("## Summary")[0]
    assert "cut, ok_too" in head
    assert (tmp_path / "bench_cpu_partial.png").read_bytes().startswith(b"\x89PNG")
