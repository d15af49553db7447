"""What every torchbp DataModule shares: the base class, the errors, and small helpers."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = [
    "ClassificationDataModule",
    "DataConfigError",
    "DataError",
    "check_num_workers",
    "first_nonfinite",
    "rank_world",
]


class DataConfigError(ValueError):
    """Raised for invalid DataModule arguments, e.g. ``val_fraction=1.5``."""


class DataError(DataConfigError):
    """Raised when the data itself is unusable: a missing file or label column, non-numeric or
    non-finite values, a single class, too few rows for the split.

    A subclass of :class:`DataConfigError`, so ``except DataConfigError`` catches both.
    """


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def first_nonfinite(values: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first NaN or ±inf in ``values`` (in row-major order), or ``None``."""
    cells = np.argwhere(~np.isfinite(values))
    return tuple(int(i) for i in cells[0]) if len(cells) else None


def check_num_workers(num_workers: int) -> None:
    if num_workers < 0:
        raise DataConfigError(f"num_workers must be >= 0, got {num_workers}")


def _within_the_checkpoints_epoch(trainer: pl.Trainer) -> bool:
    """Whether the fit of a restarting ``trainer`` is still in the epoch its checkpoint was
    saved in, begun and not finished, whose batches its batch counter counts. Not once that
    epoch is done: a checkpoint of an epoch's last step ends its epoch at the resume, and a
    train loader reloaded for the next one (``reload_dataloaders_every_n_epochs``) while the
    fit still restarts starts that epoch from its first batch."""
    epochs = trainer.fit_loop.epoch_progress.current
    return epochs.started > epochs.processed


class ClassificationDataModule(pl.LightningDataModule):
    """Base class of torchbp's DataModules: a classification task with a known input size.

    Subclasses provide ``num_features`` and ``num_classes`` (available right after
    ``__init__``, before ``setup``) and the train/val/test/predict dataloaders.
    """

    @property
    def num_features(self) -> int:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def _batches_trained_before_resuming(self) -> tuple[int, int]:
        """``(epoch, batches)``: the epoch a fit resumed within (from a checkpoint saved in
        it) and how many of its batches it trained before, while that fit asks for its
        train loader (Lightning asks once the checkpoint's loops are restored, before the
        epoch continues); ``(epoch, 0)`` otherwise. The train loaders of torchbp's
        DataModules continue the epoch after them, whatever the LightningModule."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        if not (trainer.fit_loop.restarting and _within_the_checkpoints_epoch(trainer)):
            return trainer.current_epoch, 0
        # the batches whose step ran to its end (a checkpoint saved on an exception inside
        # a step has that batch fetched, not trained: the loop trains it again)
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _trains_first_batches_in_order(self) -> bool:
        """Whether the trainer overfits (``trainer.overfit_batches``) in one process: it
        then trains the first batches in the rows' order, and replaced the sampler of a
        train loader that was no ``SequentialSampler``, warning that it turned the loader's
        shuffling off (also of one that never shuffled), with one that starts every epoch
        over (a fit resumed within one trained its first batches again): the train loader
        then has a :class:`~torchbp.lightning.samplers.ContinuableSequentialSampler`."""
        overfit = getattr(self.trainer, "overfit_batches", 0)
        return bool(overfit) and rank_world()[1] == 1

    def check_data(self) -> None:
        """Raise :class:`DataError` if the data is unusable, before training starts
        (``torchbp-train`` calls it after instantiating the DataModule). Default: nothing to
        check beyond what ``__init__``, ``num_features`` and ``num_classes`` did."""

    def check_predict_data(self) -> None:
        """Raise :class:`DataError` if the rows to predict are unusable, before ``predict``
        starts (``torchbp-train predict`` calls it after :meth:`check_data`). Default:
        nothing beyond :meth:`check_data` (the test split is predicted)."""
