"""A run's learning curves as a picture: ``curves.png`` beside its ``metrics.csv``.

:class:`~torchbp.lightning.run_logger.RunCSVLogger` draws it whenever it finishes
(``fit``, and the test of the best checkpoint after it), so every run folder with training
rows holds the loss and accuracy of each epoch, train against validation, with the test
result of the best checkpoint marked (a ``validate`` or ``test`` run's folder, one row and
no training, gets none). For a run folder written before, or elsewhere::

    python -m torchbp.lightning.curves runs/digits/version_0

Needs matplotlib (in the ``train`` extra); without it nothing is drawn.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CURVES_FILE", "read_curves", "plot_curves", "main"]

CURVES_FILE = "curves.png"
#: the panels, left to right: a metric name suffix and its axis label
_PANELS = (("loss", "loss (cross-entropy)"), ("acc", "accuracy"))
_SPLITS = ("train", "val")

Series = dict[str, list[tuple[float, float]]]


def read_curves(metrics_csv: str | Path) -> tuple[Series, str]:
    """The finite values of each ``<split>/<metric>`` column of ``metrics_csv`` as
    ``(x, value)`` points, and the x-axis name: ``"epoch"`` (1 = after the first epoch)
    when no column has two rows in one epoch, else ``"step"`` (mid-epoch validation).
    A row at or before a column's previous one (its step lower, or its epoch and step the
    same: a run resumed from an older checkpoint in the same folder training again) replaces
    that column's rows from its step on.

    Examples::

        series, x_name = read_curves("runs/digits/version_0/metrics.csv")
        series["val/acc"]  # [(1, 0.89), (2, 0.91), ...]
    """
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    by_epoch: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for row in rows:
        epoch, step = _int(row.get("epoch")), _int(row.get("step"))
        for name, text in row.items():
            value = _float(text)
            if name in ("epoch", "step") or "/" not in name or value is None:
                continue
            _add_point(by_epoch[name], (epoch, step, value))
    per_epoch = all(len({e for e, _, _ in pts}) == len(pts) for pts in by_epoch.values())
    x_name = "epoch" if per_epoch else "step"
    series = {
        name: [((e + 1) if per_epoch else s, v) for e, s, v in pts]
        for name, pts in by_epoch.items()
    }
    return series, x_name


def _add_point(points: list[tuple[int, int, float]], point: tuple[int, int, float]) -> None:
    """Append ``(epoch, step, value)`` to a column's points, after dropping those it
    replaces: from its step on, when it goes back (see :func:`read_curves`)."""
    epoch, step, _ = point
    last_epoch, last_step = points[-1][:2] if points else (None, None)
    if last_step is not None and (step < last_step or (epoch, step) == (last_epoch, last_step)):
        points[:] = [p for p in points if p[1] < step]
    points.append(point)


def plot_curves(metrics_csv: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw ``metrics_csv``'s loss and accuracy curves (train and validation; the test
    value as a marker after the last point) into ``out`` (default: ``curves.png`` in the
    same folder). Returns the picture's path, or ``None`` when there is nothing to draw
    (no training rows: a validate or test run, whose single row is no curve) or matplotlib
    is not installed.

    Args:
        metrics_csv: a ``metrics.csv`` in Lightning's CSVLogger layout (``epoch``,
            ``step`` and ``<split>/<metric>`` columns).
        out: where to write the PNG.

    Examples::

        plot_curves("runs/digits/version_0/metrics.csv")  # -> .../curves.png
    """
    metrics_csv = Path(metrics_csv)
    series, x_name = read_curves(metrics_csv)
    panels = [(m, label) for m, label in _PANELS if any(f"{s}/{m}" in series for s in _SPLITS)]
    if not panels or not any(name.startswith("train/") for name in series):
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    out = Path(out) if out is not None else metrics_csv.with_name(CURVES_FILE)
    fig = Figure(figsize=(5 * len(panels), 3.6), layout="constrained")
    for ax, (metric, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _draw_panel(ax, series, metric, label, x_name)
    run = metrics_csv.resolve().parent
    fig.suptitle(f"{run.parent.name} / {run.name}", fontsize=9)
    fig.savefig(out, dpi=110)
    return out


def _draw_panel(ax, series: Series, metric: str, label: str, x_name: str) -> None:
    from matplotlib.ticker import MaxNLocator

    last_x = 0.0
    for split in _SPLITS:
        points = series.get(f"{split}/{metric}", [])
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=split)
            last_x = max(last_x, max(xs))
    tests = series.get(f"test/{metric}")
    if tests:
        # the latest test, drawn after the last training point (its own row's epoch is
        # that of the checkpoint's loading, not of training)
        value = tests[-1][1]
        ax.plot([last_x], [value], marker="*", markersize=11, linestyle="none", color="black")
        ax.annotate(
            f"test {value:.4f}",
            (last_x, value),
            textcoords="offset points",
            xytext=(-6, 8),
            ha="right",
            fontsize=8,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(x_name)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _float(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _int(text: str | None) -> int:
    value = _float(text)
    return int(value) if value is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m torchbp.lightning.curves RUN_FOLDER_OR_METRICS_CSV...``: draw each run's
    ``curves.png``; exit status 1 when one had nothing to draw."""
    parser = argparse.ArgumentParser(
        prog="python -m torchbp.lightning.curves",
        description="Draw a run's learning curves (curves.png beside its metrics.csv).",
    )
    parser.add_argument("runs", nargs="+", help="run folders or metrics.csv files")
    args = parser.parse_args(argv)
    status = 0
    for run in map(Path, args.runs):
        csv_path = run / "metrics.csv" if run.is_dir() else run
        if not csv_path.is_file():
            print(f"{run}: no metrics.csv")
            status = 1
            continue
        written = plot_curves(csv_path)
        nothing = "nothing to draw (no training rows, or no matplotlib)"
        print(f"{run}: {written or nothing}")
        status |= written is None
    return status


if __name__ == "__main__":
    raise SystemExit(main())
