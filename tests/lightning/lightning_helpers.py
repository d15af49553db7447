"""Helpers for the Lightning tests (imported by name; kept out of conftest.py)."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytorch_lightning as pl

from torchbp.lightning.config_files import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]
CONFIGS = CONFIG_DIR  # the bundled configs (the repository's configs/ links here)

# quiet, fast runs; tests never depend on a progress bar or the model summary
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def run_cli(*args: str):
    """Run ``torchbp-train`` in-process and return the CLI object (with ``sys.argv`` as a
    bare ``torchbp-train`` would see it: pytest's own arguments are not the CLI's)."""
    from torchbp.lightning.cli import cli_main

    argv = sys.argv
    sys.argv = ["torchbp-train"]
    try:
        return cli_main([*args, *QUIET])
    finally:
        sys.argv = argv


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def epoch_series(rows: list[dict[str, float]], key: str) -> list[float]:
    """Values of ``key`` in epoch order (one per epoch)."""
    out = {}
    for r in rows:
        if key in r:
            out[int(r["epoch"])] = r[key]
    return [out[e] for e in sorted(out)]


def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m torchbp.lightning.cli`` subprocesses."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO / "src")])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


def cli_command(*args: str) -> list[str]:
    """The command line of ``torchbp-train ARGS`` in a subprocess (this interpreter)."""
    return [PYTHON, "-m", "torchbp.lightning.cli", *args]


class InterruptAt(pl.Callback):
    """A Lightning callback (``--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAt``)
    that presses Ctrl-C, raising KeyboardInterrupt, once training reaches ``step``."""

    def __init__(self, step: int = 10) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class InterruptInStep(pl.Callback):
    """A Lightning callback
    (``--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptInStep``) that presses
    Ctrl-C inside the training step after ``step`` steps (before its backward), where a real
    Ctrl-C mostly lands: the batch was fetched, and is not trained."""

    def __init__(self, step: int = 10) -> None:
        self.step = step

    def on_before_backward(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class InterruptInValidation(pl.Callback):
    """A Lightning callback
    (``--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptInValidation``) that
    presses Ctrl-C at the end of epoch ``epoch``'s validation, after its last batch and
    before its metrics are computed."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_validation_epoch_end(self, trainer, *args) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            raise KeyboardInterrupt


class InterruptAfterValidation(pl.Callback):
    """A Lightning callback
    (``--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAfterValidation``)
    that presses Ctrl-C at the end of epoch ``epoch``'s validation, after its metrics are
    logged and before the checkpoint callbacks save (Lightning runs their
    ``on_validation_end`` after the other callbacks')."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_validation_end(self, trainer, *args) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            raise KeyboardInterrupt


class InterruptAtEpochEnd(pl.Callback):
    """A Lightning callback
    (``--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAtEpochEnd``) that
    presses Ctrl-C at the end of training epoch ``epoch``, after its validation and before
    the checkpoint callbacks save (Lightning runs their ``on_train_epoch_end`` last)."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, *args) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


class InterruptInSave(pl.Callback):
    """A Lightning callback
    (``--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptInSave``) that
    presses Ctrl-C once, in the first checkpoint save after epoch ``epoch``'s validation
    (as the run's checkpoint callback writes that validation's best checkpoint)."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch
        self.validated = self.pressed = False

    def on_validation_epoch_end(self, trainer, *args) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            self.validated = True

    def on_save_checkpoint(self, trainer, *args) -> None:
        if self.validated and not self.pressed:
            self.pressed = True
            raise KeyboardInterrupt


class RequeueInValidation(pl.Callback):
    """A Lightning callback
    (``--trainer.callbacks+=tests.lightning.lightning_helpers.RequeueInValidation``) that
    saves ``hpc_ckpt_1.ckpt`` into ``trainer.default_root_dir`` within epoch ``epoch``'s
    validation, as Lightning's handler of SLURM's requeue signal does (through
    ``trainer.save_checkpoint``), and then presses Ctrl-C, as the job's end."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch

    def on_validation_batch_end(self, trainer, *args) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            trainer.save_checkpoint(os.path.join(trainer.default_root_dir, "hpc_ckpt_1.ckpt"))
            raise KeyboardInterrupt


class RecordBatches(pl.Callback):
    """A Lightning callback
    (``--trainer.callbacks+=tests.lightning.lightning_helpers.RecordBatches``) that records
    each training batch as ``(epoch, batch_idx, first input row)``."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, list[float]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.batches.append((trainer.current_epoch, batch_idx, batch[0][0].tolist()))
