"""``torchbp-train``: LightningCLI for :class:`~torchbp.lightning.ERMClassifier`.

Examples::

    torchbp-train fit --config configs/digits.yaml
    torchbp-train fit --config configs/digits.yaml --ckpt_path last   # resume the latest run
    torchbp-train test --config configs/digits.yaml \\
        --ckpt_path runs/digits/version_0/checkpoints/last.ckpt
    torchbp-train fit --config configs/digits.yaml --print_config      # the full, resolved config

Runs go to ``<run_dir>/<run_name>/version_<n>/`` (``run_name`` defaults to the stem of the last
``--config`` file): ``metrics.csv`` (CSVLogger, always), TensorBoard events when tensorboard is
installed, the resolved ``config.yaml`` and ``checkpoints/`` (best on ``val/acc`` and ``last.ckpt``;
Ctrl-C, SIGTERM or an error during ``fit`` also saves a checkpoint and ``last.ckpt``).
``fit`` ends by testing the best checkpoint on the test split and printing the test metrics.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import ArgsType, LightningCLI
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from torchbp.lightning.data import ClassificationDataModule
from torchbp.lightning.module import ERMClassifier

__all__ = ["TorchbpCLI", "main", "cli_main"]

_VERSION_RE = re.compile(r"^version_(\d+)$")


class _AppendingWriter(ExperimentWriter):
    """CSV writer that keeps an existing ``metrics.csv`` (a resumed run appends to it)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class RunCSVLogger(CSVLogger):
    """CSVLogger whose ``metrics.csv`` survives resuming in the same run folder (Lightning's
    own CSVLogger deletes it)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _versions(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name)))


class TorchbpCLI(LightningCLI):
    """LightningCLI with torchbp's defaults: model/data linking, run folders, checkpoints,
    loggers, clear configuration errors and a test of the best checkpoint after ``fit``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"max_epochs": 20, "log_every_n_steps": 1})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(ERMClassifier, ClassificationDataModule, *args, **kwargs)

    # -- parser ---------------------------------------------------------------------------
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="Run folder name under run_dir (default: stem of the last --config file).",
        )
        parser.add_argument("--run_dir", type=str, default="runs", help="Root of run folders.")
        parser.add_argument(
            "--torch_num_threads",
            type=int | None,
            default=None,
            help="torch.set_num_threads before training (1 is fastest for small MLPs on CPU, "
            "and robust when other processes share the cores); default: torch's choice.",
        )
        parser.link_arguments("data.num_features", "model.input_size", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_on_exception": True,
            }
        )

    # -- run folder -----------------------------------------------------------------------
    def _cfg(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def _run_root(self) -> Path:
        cfg = self._cfg()
        name = cfg.get("run_name")
        if not name:
            configs = cfg.get("config") or []
            last = configs[-1] if configs else None
            name = Path(str(getattr(last, "relative", last) or "")).stem if last else "default"
        return Path(cfg.get("run_dir") or "runs") / name

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        if cfg.get("torch_num_threads"):
            torch.set_num_threads(int(cfg["torch_num_threads"]))
        root = self._run_root()
        self._version: int | None = None
        if cfg.get("ckpt_path") == "last":
            # resume the most recent run folder that has a last.ckpt, and keep logging there
            found = [
                v
                for v in _versions(root)
                if (root / f"version_{v}/checkpoints/last.ckpt").is_file()
            ]
            if found:
                self._version = found[-1]
                cfg["ckpt_path"] = str(root / f"version_{self._version}/checkpoints/last.ckpt")
            else:
                print(f"no last.ckpt under {root}; starting from scratch", file=sys.stderr)
                cfg["ckpt_path"] = None
        if self._version is None:
            vs = _versions(root)
            self._version = vs[-1] + 1 if vs else 0

    def instantiate_classes(self) -> None:
        """Instantiate data, model and trainer; invalid values become a CLI error (exit 2)
        before any training starts."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError) as e:
            msg = str(e)
            cause = e.__cause__ or e.__context__
            while cause is not None and isinstance(cause, (ValueError, TypeError, OSError)):
                if str(cause) and str(cause) not in msg:
                    msg = f"{msg}: {cause}"
                cause = cause.__cause__
            self.parser.error(f"invalid configuration: {msg}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        tcfg = self._get(self.config_init, "trainer", default={})
        root = self._run_root()
        version = self._version
        if tcfg.get("logger") in (None, True) and "logger" not in kwargs:
            loggers: list[Any] = [
                RunCSVLogger(save_dir=str(root.parent), name=root.name, version=version)
            ]
            try:
                import tensorboard  # noqa: F401
                from pytorch_lightning.loggers import TensorBoardLogger

                loggers.append(
                    TensorBoardLogger(
                        save_dir=str(root.parent),
                        name=root.name,
                        version=version,
                        default_hp_metric=False,
                    )
                )
            except ImportError:
                pass
            kwargs["logger"] = loggers
            ckpt_cb = self._get(self.config_init, "checkpoint", default=None)
            if isinstance(ckpt_cb, ModelCheckpoint) and ckpt_cb.dirpath is None:
                # inside the run folder even when Lightning swaps loggers out (fast_dev_run)
                ckpt_cb.dirpath = os.path.realpath(root / f"version_{version}" / "checkpoints")
        callbacks = list(tcfg.get("callbacks") or [])
        if tcfg.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            try:
                import rich  # noqa: F401
                from pytorch_lightning.callbacks import RichProgressBar

                callbacks.append(RichProgressBar())
            except ImportError:
                pass
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    # -- fit ends with a test of the best checkpoint --------------------------------------
    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.interrupted:
            return
        cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        ckpt = cb.best_model_path if cb is not None and cb.best_model_path else None
        results = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero and results:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(results[0].items()))
            print(f"test metrics ({ckpt or 'final weights'}): {shown}")
            if log_dir:
                print(f"run folder: {os.path.abspath(log_dir)}")


def cli_main(args: ArgsType = None, **kwargs: Any) -> TorchbpCLI:
    """Run the CLI (e.g. ``cli_main(["fit", "--config", "configs/digits.yaml"])``) and return it."""
    return TorchbpCLI(args=args, **kwargs)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``torchbp-train`` console script."""
    cli_main(args)


if __name__ == "__main__":
    main()
