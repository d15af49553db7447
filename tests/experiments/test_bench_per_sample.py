"""``experiments/bench_per_sample.py``: what a run writes, and where."""

import json

import pytest
import torch

from experiments import bench_per_sample


def test_a_run_of_some_cases_keeps_the_full_results_file(tmp_path):
    full = tmp_path / "per_sample.json"
    full.write_text('{"committed": "figures"}')
    argv = ["--case", "norms", "--rounds", "1", "--slow-rounds", "1", "--no-peak"]
    assert bench_per_sample.main([*argv, "--out", str(tmp_path)]) == 0
    assert json.loads(full.read_text()) == {"committed": "figures"}
    assert not (tmp_path / "per_sample.md").exists()
    partial = json.loads((tmp_path / "per_sample_partial.json").read_text())
    assert set(partial["timing"]) == {"plain", "norms"}
    assert (tmp_path / "per_sample_partial.md").read_text().startswith("# torchbp per-sample")


def test_a_peak_measurement_that_fails_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    def peak_subprocess(name, quick):
        if name == "norms":
            return {"error": "exit 1: MemoryError in the subprocess"}
        return {"peak_extra_bytes": 2**20, "baseline_rss_bytes": 2**28}

    monkeypatch.setattr(bench_per_sample, "peak_subprocess", peak_subprocess)
    argv = ["--quick", "--case", "norms", "--rounds", "1", "--slow-rounds", "1"]
    assert bench_per_sample.main([*argv, "--out", str(tmp_path)]) == 1
    text = (tmp_path / "per_sample_quick.md").read_text()
    norms_row = next(line for line in text.splitlines() if line.startswith("| norms |"))
    assert "exit 1: MemoryError in the subprocess" in norms_row


@pytest.mark.parametrize("option", ["--rounds", "--slow-rounds", "--threads"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_count_below_one_is_refused_naming_the_option(tmp_path, capsys, option, value):
    # before: 0 rounds quietly meant the default, -1 died in statistics.median after the
    # cases were built and warmed up; --threads 0 quietly kept torch's thread count
    with pytest.raises(SystemExit) as exc:
        bench_per_sample.main(["--quick", "--no-peak", option, value, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["plain", "clip", "opacus_ghost", "opacus_hooks"])
def test_peak_is_measured_from_a_state_without_gradients(monkeypatch, name):
    # the peak counts what a step allocates, gradients included: no case may enter the
    # measured step still holding a gradient (Opacus keeps its clipped sum, summed_grad,
    # from one step to the next, which then left Opacus's peak one model's size short)
    built = []
    build = bench_per_sample.CASES[name][2]

    def capture(cfg):
        built.append(build(cfg))
        return built[-1]

    def held_at_baseline(key):
        if key == "VmRSS":
            held.extend(
                f"{attr} of a {tuple(p.shape)} parameter"
                for p in built[-1].params
                for attr, value in {"grad": p.grad, **vars(p)}.items()
                if isinstance(value, torch.Tensor)
            )
        return 0

    held: list[str] = []
    what, group, _ = bench_per_sample.CASES[name]
    monkeypatch.setitem(bench_per_sample.CASES, name, (what, group, capture))
    monkeypatch.setattr(bench_per_sample, "_status_kib", held_at_baseline)
    bench_per_sample.peak_in_this_process(name, bench_per_sample.Config.make(quick=True))
    assert held == []


@pytest.mark.parametrize("name", ["grads", "backpack_grad", "vmap_clip", "opacus_hooks"])
def test_materialising_cases_leave_their_per_sample_gradients_for_the_untimed_release(name):
    # time_group drops per-sample buffers after the timed step; a case that freed its
    # own inside the step (vmap_clip: 1.8 GB, ~80 ms of unmapping) was charged for it
    if name.startswith("backpack"):
        pytest.importorskip("backpack", reason="BackPACK is a benchmark-only peer")
    if name.startswith("opacus"):
        pytest.importorskip("opacus")
    cfg = bench_per_sample.Config.make(quick=True)
    case = bench_per_sample.CASES[name][2](cfg)
    case.step()
    left = [
        attr
        for p in case.params
        for attr in bench_per_sample.PER_SAMPLE_ATTRS
        if getattr(p, attr, None) is not None and getattr(p, attr).shape[0] == cfg.batch
    ]
    assert len(left) == len(case.params)
