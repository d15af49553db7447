"""What ``torchbp-train`` checks once data, model and trainer are made and before the run
starts (Lightning would find each only once the run has started, or never): the monitored
metrics, the run's folders and config file, and the DP-SGD settings; and the one line an
invalid configuration is reported as."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from torchbp.lightning.array_data import ArrayDataModule, refuse_poisson_sampling_across_processes
from torchbp.lightning.console import exit_with_error, headline
from torchbp.lightning.data_base import DataConfigError, DataError
from torchbp.lightning.module import ERMClassifier
from torchbp.lightning.run_checkpoint import improving_direction
from torchbp.lightning.run_folders import why_unwritable
from torchbp.lightning.samplers import EpochSeededSampler
from torchbp.lightning.synthetic_data import SyntheticDataModule

__all__ = [
    "CONFIG_ERRORS",
    "describe_config_error",
    "check_monitors",
    "log_folder",
    "check_run_folders_can_be_written",
    "check_config_file_is_new",
    "check_privacy",
    "check_predictions_can_be_written",
    "check_batch_counts",
    "check_trainer_intervals",
    "check_training_length",
    "check_gradient_clip_val",
]


#: errors of instantiating data, model and trainer that mean "fix the configuration"
CONFIG_ERRORS = (ValueError, TypeError, OSError, MisconfigurationException)


def describe_config_error(error: BaseException) -> str:
    """One line for an error raised while instantiating data, model and trainer: its message
    followed by those of its chained causes that add something, or, if the DataModule raised
    it, the DataModule's message."""
    chain = [error]
    while isinstance(cause := chain[-1].__cause__ or chain[-1].__context__, CONFIG_ERRORS):
        chain.append(cause)
    data = next((e for e in chain if isinstance(e, DataConfigError)), None)
    if isinstance(data, DataError):
        return f"data problem: {data}"
    if data is not None:
        return f"invalid data configuration: {data}"
    message = headline(str(error))
    for cause_message in map(str, chain[1:]):
        if cause_message and headline(cause_message) not in message:
            message = f"{message}: {headline(cause_message)}"
    return f"invalid configuration: {message}"


def _model_checkpoints(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    """The trainer's ModelCheckpoints: the CLI's (``checkpoint``) and trainer.callbacks'."""
    return [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]


def _check_monitor(option: str, monitor: str, logged: list[str]) -> None:
    """Raise a ``ValueError`` naming ``option`` if ``monitor`` is not one of ``logged``."""
    if monitor not in logged:
        raise ValueError(
            f"{option} {monitor!r} is not a metric the model logs during fit; "
            f"monitor one of {', '.join(logged)}"
        )


def check_monitors(model: pl.LightningModule, trainer: pl.Trainer, own: Any) -> None:
    """Every ModelCheckpoint's ``monitor`` (``checkpoint.monitor``, the CLI's ``own``
    callback, and those of trainer.callbacks) and every strict EarlyStopping's is a metric
    the fit logs (ERMClassifier's own, not a subclass's, which may log more): Lightning finds
    a misspelt one only after the first epoch, with a traceback. An EarlyStopping with
    ``strict=False`` may monitor a metric that is missing (Lightning trains on). Each one's
    mode is checked for a subclass too: it logs ERMClassifier's metrics, whose directions
    are known, beside its own."""
    if not isinstance(model, ERMClassifier):
        return
    exact = type(model) is ERMClassifier
    logged = [n for n in model.metric_names() if not n.startswith("test/")]
    for callback in _model_checkpoints(trainer):
        if callback.monitor is None or callback.save_top_k == 0:
            continue  # nothing monitored
        option = "checkpoint.monitor" if callback is own else "a ModelCheckpoint's monitor"
        if exact:  # Lightning adds epoch and step to what a checkpoint may monitor
            _check_monitor(option, callback.monitor, [*logged, "epoch", "step"])
        if callback is not own:  # checkpoint.mode is auto unless given (follow_the_monitor)
            _check_mode("a ModelCheckpoint", "keep its worst checkpoints as the best", callback)
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping):
            if callback.strict and exact:
                _check_monitor("an EarlyStopping's monitor", callback.monitor, logged)
            _check_mode("an EarlyStopping", "stop the fit while it improves", callback)


def _check_mode(kind: str, harm: str, callback: EarlyStopping | ModelCheckpoint) -> None:
    """The ``mode`` of an EarlyStopping or of a ModelCheckpoint of trainer.callbacks is the
    direction its monitored metric improves in: Lightning's default, ``min``, on ``val/acc``
    stopped the fit once accuracy had not fallen for ``patience`` epochs, that is while it
    rose, or kept the checkpoints of the lowest accuracy as the best (``max`` on a loss
    likewise). ``kind`` names the callback, ``harm`` what the wrong mode would do."""
    wanted = improving_direction(callback.monitor)
    if wanted is None or callback.mode == wanted:
        return
    way = "rises" if wanted == "max" else "falls"
    name = type(callback).__name__
    raise ValueError(
        f"{kind} monitors {callback.monitor!r} with mode {callback.mode!r} "
        f"(Lightning's default is 'min'), and {callback.monitor} improves as it {way}: it "
        f"would {harm}; give it mode: {wanted} (in a config file, "
        f"init_args: {{mode: {wanted}}}; on the command line, --trainer.callbacks.mode="
        f"{wanted} right after its --trainer.callbacks+={name}: it sets the last "
        "callback given)"
    )


def log_folder(trainer: pl.Trainer) -> str | None:
    """Where the run's logs and config go: Trainer.log_dir without its broadcast (no
    process group yet under DDP)."""
    loggers = trainer.loggers
    if not loggers:
        return trainer.default_root_dir
    if isinstance(loggers[0], (TensorBoardLogger, CSVLogger)):
        return loggers[0].log_dir
    return loggers[0].save_dir


def check_run_folders_can_be_written(trainer: pl.Trainer, subcommand: str | None) -> None:
    """The folders the run will write (logs and config; every ModelCheckpoint's when
    fitting) can be made: else Lightning fails with an OSError once the run has started."""
    folders = [log_folder(trainer)]
    if subcommand == "fit":
        folders += [callback.dirpath for callback in _model_checkpoints(trainer)]
    for folder in filter(None, folders):
        if "://" in str(folder):
            continue  # a remote filesystem: its own errors
        problem = why_unwritable(Path(folder))
        if problem:
            exit_with_error(
                f"invalid configuration: cannot write the run's files into "
                f"{os.path.abspath(folder)}: {problem} (choose another --run_dir, or run "
                "from a writable folder)"
            )


def check_predictions_can_be_written(subcommand: str | None, trainer: pl.Trainer) -> None:
    """``predict`` writes ``predictions.csv`` from one process: under DDP each process
    predicts a shard, and the run predicted every row and wrote none. Refused before it
    starts, unless a ``BasePredictionWriter`` callback writes the shards."""
    if subcommand != "predict" or trainer.world_size <= 1:
        return
    if any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
        return
    exit_with_error(
        f"invalid configuration: predict writes predictions.csv from one process, and this "
        f"run has {trainer.world_size} (each would predict a shard); add --trainer.devices 1 "
        "--trainer.num_nodes 1 --trainer.strategy auto (or a BasePredictionWriter callback)"
    )


def check_config_file_is_new(trainer: pl.Trainer, config_filename: str) -> None:
    """The resolved config is saved with overwrite on (a resumed run rewrites its own, and
    is not checked): anywhere else an existing file of that name is not this run's, and
    stays."""
    if trainer.fast_dev_run:
        return
    if trainer.global_rank != 0:  # a DDP worker, started once rank 0 is running
        return
    folder = log_folder(trainer)
    if folder is None:
        return
    path = Path(folder) / config_filename
    if path.exists():
        exit_with_error(
            f"{os.path.abspath(path)} exists and this run would write its config over it; "
            "give it a folder of its own (--trainer.default_root_dir, or the logger's "
            "save_dir)"
        )


def check_privacy(
    subcommand: str | None,
    model: pl.LightningModule,
    datamodule: Any,
    trainer: pl.Trainer,
    resumed: bool,
) -> None:
    """DP-SGD settings that training would refuse at its start (``fit`` of a private model
    on torchbp's DataModules, whose train loader is ready once ``check_data`` ran)."""
    if subcommand != "fit" or not isinstance(model, ERMClassifier):
        return
    if model.privacy is None or not isinstance(datamodule, (ArrayDataModule, SyntheticDataModule)):
        return
    model.check_privacy(
        trainer, datamodule.train_dataloader(), resumed=resumed, datamodule=datamodule
    )


def check_poisson_sampling(subcommand: str | None, datamodule: Any, trainer: pl.Trainer) -> None:
    """A ``fit`` of an :class:`ArrayDataModule` with ``poisson_sampling`` in several
    processes, which its train loader refuses once they have started (see
    :func:`refuse_poisson_sampling_across_processes`)."""
    if subcommand == "fit" and isinstance(datamodule, ArrayDataModule):
        if datamodule.poisson_sampling:
            refuse_poisson_sampling_across_processes(trainer.world_size)


#: the loaders each subcommand runs (``fit`` ends with a test of its best checkpoint)
_STAGES = {
    "fit": ("train", "val", "test"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}


def _limited_batches(length: int, limit: int | float) -> int:
    """Lightning's count of a loader's ``length`` batches under ``limit_<stage>_batches``:
    an int is a number of batches, a float a fraction of them (rounded down)."""
    if isinstance(limit, int):
        return min(length, limit)
    return int(length * limit)


def _fraction_of_one_batch(length: int) -> float:
    """The least fraction with 4 decimals that keeps one of ``length`` batches."""
    return math.ceil(10_000 / length) / 10_000


def _batches_of_each_process(datamodule: Any, stage: str, world_size: int) -> list[int] | None:
    """The number of batches of ``stage``'s loader in each of ``world_size`` processes, as
    torchbp's DataModules shard it under DDP: an :class:`ArrayDataModule`'s
    :class:`~torchbp.lightning.samplers.EpochSeededSampler` takes every ``world_size``-th
    row (training: the same count each, evaluation: uneven shards), a
    :class:`SyntheticDataModule` every ``world_size``-th batch (rounded down). ``None``
    where the count is not known before the processes start (the Poisson draws, refused
    under DDP; the rows of a ``predict_path``, which Lightning shards). One process: the
    loader's length."""
    if world_size == 1:
        return [len(getattr(datamodule, f"{stage}_dataloader")())]
    if isinstance(datamodule, SyntheticDataModule):
        split = {"train": "n_samples", "val": "n_val"}.get(stage, "n_test")
        total = math.ceil(getattr(datamodule, split) / datamodule.batch_size)
        return [total // world_size] * world_size
    train = stage == "train"
    if (train and datamodule.poisson_sampling) or getattr(datamodule, "predict_path", None):
        return None
    rows = datamodule.splits["test" if stage == "predict" else stage]
    shards = [
        len(EpochSeededSampler(rows, num_replicas=world_size, rank=rank, drop_last=train))
        for rank in range(world_size)
    ]
    return [math.ceil(shard / datamodule.batch_size) for shard in shards]


def _fewest_batches(counts: list[int]) -> tuple[int, int]:
    """``(rank, batches)`` of the process with the fewest batches among those with some
    (``(0, 0)`` if none has any): the first a fraction of batches leaves none."""
    return min(
        ((rank, n) for rank, n in enumerate(counts) if n > 0),
        key=lambda rank_n: rank_n[1],
        default=(0, 0),
    )


def _of_process(rank: int, world_size: int) -> str:
    """`` of process <rank> (of <world_size>)`` under DDP, nothing in one process."""
    return f" of process {rank} (of {world_size}, DDP)" if world_size > 1 else ""


#: the trainer's counts that Lightning takes as given and divides by once a fit has started
#: (a ZeroDivisionError traceback at 0): the option and the values it takes
_COUNTS_FROM_ONE = {
    "accumulate_grad_batches": "an int >= 1 (batches per optimizer step)",
    "check_val_every_n_epoch": "an int >= 1 (epochs between validations) or null",
    "val_check_interval": "an int >= 1 (batches between validations) or a fraction of the "
    "epoch in (0, 1]",
}


def check_trainer_intervals(subcommand: str | None, trainer: pl.Trainer) -> None:
    """Refuse a ``fit`` whose ``accumulate_grad_batches``, ``check_val_every_n_epoch`` or
    ``val_check_interval`` (an int: batches) is below 1, as a ``ValueError``: Lightning's
    Trainer accepts 0 and a negative int, and the fit fails with a ZeroDivisionError
    traceback after its run folder is written. A ``val_check_interval`` of 0.0 (a fraction
    of no batch) is refused too: Lightning takes it and validates after every batch."""
    if subcommand != "fit":
        return
    for name, wanted in _COUNTS_FROM_ONE.items():
        value = getattr(trainer, name, None)  # val_check_interval: see _batch_val_check_interval
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"trainer.{name} must be {wanted}, got {value}")
    if _batch_val_check_interval(trainer) == 0.0:
        raise ValueError(
            f"trainer.val_check_interval must be {_COUNTS_FROM_ONE['val_check_interval']}, "
            "got 0.0 (Lightning would validate after every batch: give 1 for that; "
            "--trainer.limit_val_batches 0 turns validation off)"
        )


def _batch_val_check_interval(trainer: pl.Trainer) -> int | float | None:
    """``trainer.val_check_interval`` in batches or as a fraction of the epoch; None for a
    time-based one (Lightning 2.6+: ``DD:HH:MM:SS``, a dict or a timedelta), which Lightning
    keeps elsewhere and leaves that attribute unset for."""
    return getattr(trainer, "val_check_interval", None)


def check_training_length(subcommand: str | None, trainer: pl.Trainer) -> None:
    """Refuse a ``fit`` whose ``min_epochs`` is above ``max_epochs`` (or ``min_steps``
    above ``max_steps``), as a ``ValueError``: Lightning takes both and stops at the
    maximum, so the minimum asked for never held. ``-1`` (or ``None``) is no maximum;
    ``fast_dev_run`` sets its own maximum (one epoch of n batches) on purpose."""
    if subcommand != "fit" or trainer.fast_dev_run:
        return
    for unit in ("epochs", "steps"):
        least, most = getattr(trainer, f"min_{unit}"), getattr(trainer, f"max_{unit}")
        if least is None or most is None or most == -1 or least <= most:
            continue
        raise ValueError(
            f"trainer.min_{unit}={least} is above trainer.max_{unit}={most}: the fit would "
            f"stop at {most} {unit}; lower min_{unit} or raise max_{unit}"
        )


def check_gradient_clip_val(subcommand: str | None, trainer: pl.Trainer) -> None:
    """Refuse a ``fit`` whose ``gradient_clip_val`` is negative or NaN, as a ``ValueError``:
    Lightning's Trainer accepts any float and clips only above 0, so a negative value
    trained unclipped without a word, and NaN made every clipped gradient NaN. ``None`` and
    0 are Lightning's "no clipping"."""
    value = trainer.gradient_clip_val
    if subcommand != "fit" or value is None:
        return
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"trainer.gradient_clip_val must be >= 0 (the largest gradient norm, or value "
            f"with gradient_clip_algorithm: value; 0 or null: no clipping), got {value}"
        )


def check_batch_counts(subcommand: str | None, datamodule: Any, trainer: pl.Trainer) -> None:
    """Batch counts that Lightning refuses with a traceback once the run has started and
    its run folder is written, raised now as a ``ValueError``: a fraction
    ``limit_<stage>_batches`` that leaves none of a loader's batches (in any process: under
    DDP each counts its own shard's), and a ``val_check_interval`` in batches above an
    epoch's training batches (with validation every ``check_val_every_n_epoch``). For
    torchbp's DataModules; a loader is made only where a count needs its length."""
    if not isinstance(datamodule, (ArrayDataModule, SyntheticDataModule)):
        return
    world = trainer.world_size
    for stage in _STAGES.get(subcommand or "", ()):
        limit = getattr(trainer, f"limit_{stage}_batches")
        if not (isinstance(limit, float) and 0.0 < limit < 1.0):
            continue  # every batch, a number of them, or none (validation off)
        counts = _batches_of_each_process(datamodule, stage, world)
        rank, length = _fewest_batches(counts or [])
        if _limited_batches(length, limit) == 0 and length > 0:
            raise ValueError(
                f"trainer.limit_{stage}_batches={limit} keeps none of the {length} {stage} "
                f"batches{_of_process(rank, world)} (a fraction of them, rounded down); give "
                f"at least {_fraction_of_one_batch(length)}, or a number of batches (an int)"
            )
    every = _batch_val_check_interval(trainer)
    if subcommand != "fit" or not isinstance(every, int) or isinstance(every, bool):
        return
    if trainer.check_val_every_n_epoch is None or not trainer.limit_val_batches:
        return
    if not trainer.limit_train_batches:
        return  # no training, no validation within it
    counts = _batches_of_each_process(datamodule, "train", world)
    if not counts:
        return
    rank, length = _fewest_batches(counts)
    batches = _limited_batches(length, trainer.limit_train_batches)
    if every > batches:
        raise ValueError(
            f"trainer.val_check_interval={every} (batches) is above the {batches} "
            f"training batches of an epoch{_of_process(rank, world)}; validate every "
            f"{batches} batches or fewer, give a fraction of the epoch (0.5), or set "
            "trainer.check_val_every_n_epoch: null to count batches across epochs"
        )
