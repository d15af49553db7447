"""torchbp.lightning.curves: a run's learning curves drawn from its metrics.csv."""

from __future__ import annotations

import csv
import struct

import pytest

from torchbp.lightning import curves
from torchbp.lightning.run_logger import RunCSVLogger

pytest.importorskip("matplotlib")

COLUMNS = [
    "epoch",
    "step",
    "test/acc",
    "test/loss",
    "train/acc",
    "train/loss",
    "val/acc",
    "val/loss",
]


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    return path


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _epochs(n):
    rows = []
    for e in range(n):
        rows.append(
            {"epoch": e, "step": 10 * e + 9, "val/acc": 0.5 + e / 10, "val/loss": 1 / (e + 1)}
        )
        rows.append(
            {"epoch": e, "step": 10 * e + 9, "train/acc": 0.4 + e / 10, "train/loss": 2 / (e + 1)}
        )
    return rows


def test_series_per_epoch_count_from_one_and_skip_empty_and_nan(tmp_path):
    rows = _epochs(3) + [{"epoch": 2, "step": 29, "test/acc": 0.75, "test/loss": "nan"}]
    series, x_name = curves.read_curves(_write(tmp_path / "metrics.csv", rows))
    assert x_name == "epoch"
    assert series["val/acc"] == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert series["train/loss"] == [(1, 2.0), (2, 1.0), (3, pytest.approx(2 / 3))]
    assert series["test/acc"] == [(3, 0.75)]
    assert "test/loss" not in series  # a NaN is not a point


def test_a_resumed_runs_rows_replace_those_it_trained_again(tmp_path):
    """A run resumed from a checkpoint older than its last rows (a kill after epoch 3 with
    last.ckpt from epoch 1) appends epochs 2 and 3 to metrics.csv again. Both copies were
    kept: the x-axis switched to steps as for mid-epoch validation, and each curve ran
    back to the earlier step and forth again. The resumed run's rows replace those it
    trained again."""
    first = _epochs(3)
    resumed = [
        {**row, "val/acc": row["val/acc"] + 0.05} for row in _epochs(4)[2:] if "val/acc" in row
    ]
    series, x_name = curves.read_curves(_write(tmp_path / "metrics.csv", first + resumed))
    assert x_name == "epoch"
    assert series["val/acc"] == [
        (1, 0.5),
        (2, pytest.approx(0.65)),
        (3, pytest.approx(0.75)),
        (4, pytest.approx(0.85)),
    ]
    assert series["train/acc"] == [(1, 0.4), (2, 0.5), (3, pytest.approx(0.6))]


def test_mid_epoch_validation_puts_steps_on_the_x_axis(tmp_path):
    rows = [
        {"epoch": 0, "step": 4, "val/acc": 0.5},
        {"epoch": 0, "step": 9, "val/acc": 0.6},  # val_check_interval: twice per epoch
        {"epoch": 0, "step": 9, "train/acc": 0.4},
    ]
    series, x_name = curves.read_curves(_write(tmp_path / "metrics.csv", rows))
    assert x_name == "step"
    assert series["val/acc"] == [(4, 0.5), (9, 0.6)]


def test_draws_one_panel_per_metric_present(tmp_path):
    both = curves.plot_curves(_write(tmp_path / "metrics.csv", _epochs(4)))
    assert both == tmp_path / curves.CURVES_FILE
    loss_only = [{k: v for k, v in r.items() if "acc" not in k} for r in _epochs(4)]
    one = curves.plot_curves(_write(tmp_path / "loss.csv", loss_only), tmp_path / "one.png")
    (w2, h2), (w1, h1) = _png_size(both), _png_size(one)
    assert h1 == h2 and w2 == 2 * w1


def test_nothing_to_draw_for_a_test_only_run(tmp_path):
    path = _write(tmp_path / "metrics.csv", [{"epoch": 0, "step": 0, "test/acc": 0.9}])
    assert curves.plot_curves(path) is None
    assert not (tmp_path / curves.CURVES_FILE).exists()


def test_nothing_to_draw_for_a_validate_run(tmp_path):
    """A ``validate`` run folder holds one validation row, at the epoch the checkpoint's
    loading logs (0 for the main job's best of epoch 15): its curves.png drew one point per
    panel, 'after the first epoch', a picture of no training that misdated the checkpoint
    (and cost each validate a plot). Curves are drawn for runs that trained."""
    row = {"epoch": 0, "step": 0, "val/acc": 0.98, "val/loss": 0.1}
    assert curves.plot_curves(_write(tmp_path / "metrics.csv", [row])) is None
    assert not (tmp_path / curves.CURVES_FILE).exists()


def test_nothing_to_draw_without_matplotlib(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    assert curves.plot_curves(_write(tmp_path / "metrics.csv", _epochs(2))) is None


def test_run_logger_draws_the_curves_when_it_finishes(tmp_path):
    logger = RunCSVLogger(tmp_path, "digits", version=0)
    for row in _epochs(3):
        step = row.pop("step")
        logger.log_metrics(row, step=step)
    logger.finalize("success")
    assert _png_size(tmp_path / "digits/version_0" / curves.CURVES_FILE)[0] > 0


def test_a_plotting_failure_warns_and_keeps_the_metrics(tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("torchbp.lightning.run_logger.plot_curves", broken)
    logger = RunCSVLogger(tmp_path, "digits", version=0)
    logger.log_metrics({"val/acc": 0.5, "epoch": 0}, step=9)
    with pytest.warns(UserWarning, match="curves.png not drawn: OSError: disk full"):
        logger.finalize("success")
    assert (tmp_path / "digits/version_0/metrics.csv").is_file()


def test_command_line_draws_each_run_and_reports_what_it_could_not(tmp_path, capsys):
    run = tmp_path / "version_0"
    run.mkdir()
    _write(run / "metrics.csv", _epochs(2))
    assert curves.main([str(run)]) == 0
    assert (run / curves.CURVES_FILE).is_file()
    assert curves.main([str(run), str(tmp_path / "missing")]) == 1
    assert "missing: no metrics.csv" in capsys.readouterr().out
