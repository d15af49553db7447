"""What a run writes into its folder: ``metrics.csv`` and ``hparams.yaml`` (RunCSVLogger, kept
across resumes; ``curves.png`` drawn from ``metrics.csv`` when it finishes) and, for
``predict``, ``predictions.csv`` (:func:`write_predictions`)."""

from __future__ import annotations

import csv
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from torchbp.lightning.curves import CURVES_FILE, plot_curves

__all__ = ["RunCSVLogger", "write_predictions"]


class RunCSVLogger(Logger):
    """Writes ``metrics.csv`` and ``hparams.yaml`` into a run folder ``<root>/<name>/version_<n>``.

    ``metrics.csv`` has the layout of Lightning's CSVLogger (one row per logging call; columns:
    the sorted metric names, among them ``epoch`` and ``step``), but a run resumed in the same
    folder appends to it, where Lightning's CSVLogger would delete it. The run folder is also
    the logger's ``save_dir``, so ``trainer.log_dir`` (where the CLI saves ``config.yaml``) is
    the run folder.

    Args:
        root: Folder holding the runs' folders (``runs``).
        name: Run name: the folder under ``root``.
        version: Version number: the run folder is ``<root>/<name>/version_<version>``.

    Examples::

        logger = RunCSVLogger("runs", "digits", version=0)
        trainer = Trainer(logger=logger)  # writes runs/digits/version_0/metrics.csv
    """

    METRICS_FILE = "metrics.csv"
    HPARAMS_FILE = "hparams.yaml"

    def __init__(self, root: str | Path, name: str, version: int) -> None:
        super().__init__()
        self._root = Path(root)
        self._name = name
        self._version = version
        self._pending: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int:
        return self._version

    @property
    def log_dir(self) -> str:
        """The run folder."""
        return str(self._root / self._name / f"version_{self._version}")

    @property
    def save_dir(self) -> str:
        """The run folder (Lightning's ``trainer.log_dir`` for a custom first logger)."""
        return self.log_dir

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / self.METRICS_FILE

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kw: Any) -> None:
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        save_hparams_to_yaml(Path(self.log_dir) / self.HPARAMS_FILE, params)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._pending.append({**metrics, "step": step})

    @rank_zero_only
    def save(self) -> None:
        """Append the rows logged since the last call to ``metrics.csv``; the whole file is
        rewritten (old rows included) only when a new column appears."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        path = self.metrics_file
        columns = set().union(*rows)
        header: list[str] = []
        old_rows: list[dict[str, str]] = []
        if path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                if not columns <= set(header):
                    old_rows = list(reader)
        if header and columns <= set(header):
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writerows(rows)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted(columns.union(header)))
            writer.writeheader()
            writer.writerows([*old_rows, *rows])

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Write the pending rows, then draw the run's learning curves (``curves.png``, see
        :mod:`torchbp.lightning.curves`) from the whole file: a picture that cannot be
        drawn is reported as a warning, never failing the run."""
        self.save()
        if self.metrics_file.is_file():
            try:
                plot_curves(self.metrics_file)
            except Exception as error:  # a plotting failure must not lose a finished run
                rank_zero_warn(f"{CURVES_FILE} not drawn: {type(error).__name__}: {error}")


def write_predictions(
    path: str | Path, probabilities: torch.Tensor, class_names: Sequence[Any] | None = None
) -> None:
    """Write class probabilities ``(N, C)`` as a CSV: one row per sample, in the order
    predicted; the column ``prediction`` (the most probable class) and ``prob_<class>`` for
    each class. Classes are named by ``class_names`` (e.g. a CSV's labels) when it has ``C``
    names, else by their index.

    Examples::

        write_predictions("runs/digits/version_1/predictions.csv", probs)
    """
    probs = probabilities.detach().float().cpu()
    names = list(range(probs.shape[1]))
    if class_names is not None and len(class_names) == probs.shape[1]:
        names = list(class_names)
    predicted = probs.argmax(dim=1).tolist() if probs.shape[0] else []
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prediction", *(f"prob_{name}" for name in names)])
        for k, row in zip(predicted, probs.tolist()):
            writer.writerow([names[k], *row])
