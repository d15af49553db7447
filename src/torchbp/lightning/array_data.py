"""DataModules of in-memory arrays: :class:`ArrayDataModule` (the stratified split, the
standardisation, the loaders) and the datasets bundled with scikit-learn."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, TensorDataset

from torchbp.lightning.data_base import (
    ClassificationDataModule,
    DataConfigError,
    DataError,
    check_num_workers,
    first_nonfinite,
    rank_world,
)
from torchbp.lightning.privacy import PoissonBatchSampler
from torchbp.lightning.samplers import (
    ContinuableSequentialSampler,
    EpochSeededSampler,
    FetchOnFirstBatchDataLoader,
    collate_or_empty,
    evaluation_sampler,
)

__all__ = ["ArrayDataModule", "DigitsDataModule", "SklearnToyDataModule", "MAX_SPLIT_SEED"]


#: the largest ``seed`` of an :class:`ArrayDataModule`: its split hands scikit-learn
#: ``seed`` and ``seed + 1``, which must be below 2**32
MAX_SPLIT_SEED = 2**32 - 2
#: how many labels an error about the labels names before counting the rest
_LABELS_SHOWN = 10
#: how many characters of a label's repr such an error shows
_LABEL_CHARS_SHOWN = 40


def _shown_label(label: Any) -> str:
    """``label``'s repr as an error shows it: cut after :data:`_LABEL_CHARS_SHOWN`
    characters, its length said (a label column of free text holds whole sentences)."""
    text = repr(label)
    if len(text) <= _LABEL_CHARS_SHOWN:
        return text
    return f"{text[:_LABEL_CHARS_SHOWN]}... ({len(text)} characters)"


def _hint_if_labels_look_continuous(rows: int, classes: int) -> str:
    """A hint for labels of which most rows hold a value of their own, as a continuous
    target (a price, a score) does: every distinct value is read as a class."""
    if classes <= rows // 2:
        return ""
    return (
        f" ({classes} distinct labels in {rows} rows: every distinct value is a class; is "
        "the label column a class label, and not a continuous target?)"
    )


class ArrayDataModule(ClassificationDataModule):
    """Base class for datasets that fit in memory as a feature matrix and a label vector.

    Subclasses implement ``_load_arrays() -> (X float array (N, F), y int array (N,))``
    with labels already in ``0..C-1``. A subclass's ``__init__`` takes its own arguments and
    passes the rest on as ``**kwargs``; ``torchbp-train`` (jsonargparse) follows the
    ``**kwargs`` here, so its help and configs still list every argument.

    Args:
        batch_size: Mini-batch size for all splits.
        val_fraction: Fraction of samples in the validation split.
        test_fraction: Fraction of samples in the test split.
        seed: Seed of the stratified split and of the shuffling order, in
            ``[0, 2**32 - 2]``.
        standardize: Standardise features with the training split's mean and std.
        shuffle: Shuffle the training split each epoch.
        num_workers: DataLoader worker processes (0 is fastest for small data).
        poisson_sampling: Draw training batches by Poisson sampling (each sample joins a
            batch with probability ``batch_size / N``, batch sizes vary) as DP-SGD's privacy
            accountant assumes (:class:`~torchbp.lightning.privacy.PoissonBatchSampler`);
            ``shuffle`` is then ignored. In one process only: the draws are not sharded
            by rank, so the train loader refuses it under DDP.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        standardize: bool = True,
        shuffle: bool = True,
        num_workers: int = 0,
        poisson_sampling: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataConfigError(f"batch_size must be >= 1, got {batch_size}")
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < frac < 1.0:
                raise DataConfigError(f"{name} must be in (0, 1), got {frac}")
        if val_fraction + test_fraction >= 1.0:
            raise DataConfigError(
                f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}"
            )
        if not 0 <= seed <= MAX_SPLIT_SEED:
            raise DataConfigError(f"seed must be in [0, {MAX_SPLIT_SEED}], got {seed}")
        check_num_workers(num_workers)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.standardize = standardize
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.poisson_sampling = poisson_sampling
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._splits: dict[str, TensorDataset] | None = None
        #: the ``batch_size`` and the number of processes sharing each epoch's rows of the
        #: run whose checkpoint of this data was loaded last (``None``: none loaded, or one
        #: that does not record it)
        self.checkpoint_batch_size: int | None = None
        self.checkpoint_world_size: int | None = None

    # -- data -----------------------------------------------------------------------------
    def _load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The full ``(X, y)`` before splitting (loaded and validated once). ``X`` is float64:
        features are standardised before they are rounded to float32, so that large values
        (timestamps, amounts in cents) keep their differences."""
        if self._arrays is None:
            X, y = self._load_arrays()
            X = np.asarray(X, dtype=np.float64)
            y = self._class_indices(np.asarray(y).reshape(-1), len(X))
            self._check_split_sizes(y)
            self._arrays = (X, y)
        return self._arrays

    @staticmethod
    def _class_indices(y: np.ndarray, rows: int) -> np.ndarray:
        """``y`` as int64 class indices, one per row; labels that would be misread (not
        integers, negative) are a :class:`DataError`."""
        if len(y) != rows:
            raise DataError(f"{rows} feature rows but {len(y)} labels")
        if y.dtype == np.bool_:
            y = y.astype(np.int64)
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise DataError(f"labels must be integer class indices, got dtype {y.dtype}")
        integral = np.isfinite(y) & (y == np.round(y))
        if not integral.all():
            r = int(np.argmin(integral))
            raise DataError(f"labels must be integers, got {y[r]} (row {r + 1})")
        if len(y) and y.min() < 0:
            r = int(np.argmin(y))
            raise DataError(f"labels must be in 0..C-1, got {y[r]:g} (row {r + 1})")
        return y.astype(np.int64)

    @property
    def num_features(self) -> int:
        return int(self.arrays[0].shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.arrays[1].max()) + 1

    def _check_split_sizes(self, y: np.ndarray) -> None:
        n = len(y)
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2:
            raise DataError(
                f"the labels contain a single class ({self._labels_of(classes.tolist())}); "
                "classification needs at least 2 classes"
            )
        k = len(classes)
        # every split must be able to hold one sample of each class
        n_test = math.floor(self.test_fraction * n)
        n_val = math.floor(self.val_fraction * n)
        n_train = n - n_test - n_val
        need = max(
            math.ceil(k / self.test_fraction),
            math.ceil(k / self.val_fraction),
            math.ceil(k / (1.0 - self.test_fraction - self.val_fraction)),
        )
        if min(n_test, n_val, n_train) < k or n < need:
            raise DataError(
                f"too few rows: {n} rows with {k} classes; val_fraction={self.val_fraction} and "
                f"test_fraction={self.test_fraction} need at least {need} rows so that every "
                f"split can hold one sample per class{_hint_if_labels_look_continuous(n, k)}"
            )
        if counts.min() < 3:
            rare = self._labels_of(classes[counts < 3].tolist())
            raise DataError(
                f"class(es) {rare} have fewer than 3 samples; a stratified "
                "train/val/test split needs at least 3 per class"
            )

    def _labels_of(self, classes: list[int]) -> str:
        """The labels of class indices ``classes`` as an error names them, the first
        :data:`_LABELS_SHOWN` of them (see :func:`_shown_label`): their indices here; a
        subclass whose labels have names of their own (a CSV's) names them by those (see
        :meth:`_label_of`)."""
        shown = [_shown_label(self._label_of(k)) for k in classes[:_LABELS_SHOWN]]
        more = len(classes) - len(shown)
        listed = f"[{', '.join(shown)}]"
        return f"{listed} and {more} more" if more else listed

    def _label_of(self, index: int) -> Any:
        """The label of class ``index`` in messages: the index itself."""
        return index

    def _split(self) -> dict[str, TensorDataset]:
        from sklearn.model_selection import train_test_split

        X, y = self.arrays
        idx = np.arange(len(y))
        n_test = max(math.floor(self.test_fraction * len(y)), self.num_classes)
        n_val = max(math.floor(self.val_fraction * len(y)), self.num_classes)
        try:
            rest, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=self.seed)
            train, val = train_test_split(
                rest, test_size=n_val, stratify=y[rest], random_state=self.seed + 1
            )
        except ValueError as e:  # a rare class left with one row for the second split
            raise DataError(
                f"cannot split {len(y)} rows stratified into train/val/test with "
                f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction}: {e}"
            ) from e
        train, val, test = np.sort(train), np.sort(val), np.sort(test)
        self._check_every_class_trains(y, y[train])
        Xtr = X[train]
        if self.standardize:
            mean = Xtr.mean(axis=0)
            std = Xtr.std(axis=0)
            std[std == 0] = 1.0  # constant features (e.g. digits' corner pixels)
        else:
            mean = np.zeros(X.shape[1])
            std = np.ones(X.shape[1])
        self.mean = torch.from_numpy(mean).float()
        self.std = torch.from_numpy(std).float()
        self._scaling = (mean, std)  # float64, for rows scaled later (predict_path)
        features = self._as_float32((X - mean) / std)

        def make(ix: np.ndarray) -> TensorDataset:
            return TensorDataset(torch.from_numpy(features[ix]), torch.from_numpy(y[ix]))

        return {"train": make(train), "val": make(val), "test": make(test)}

    def _check_every_class_trains(self, y: np.ndarray, y_train: np.ndarray) -> None:
        """The stratified split rounds each class's share: with large val/test fractions a
        rare class can get no training row, and the model would never see it."""
        missing = np.setdiff1d(np.unique(y), y_train).tolist()
        if missing:
            raise DataError(
                f"class(es) {self._labels_of(missing)} have no row in the training split "
                f"(val_fraction={self.val_fraction}, test_fraction={self.test_fraction}); "
                "lower the fractions or add rows of the class"
            )

    def _as_float32(
        self, features: np.ndarray, raw: np.ndarray | None = None, where: str = ""
    ) -> np.ndarray:
        """``features`` (float64, standardised) rounded to float32; a value beyond float32's
        range is a :class:`DataError` naming it: its value in ``raw``, the unscaled rows
        (default: the data's ``X``, which is finite: it would become inf), after the prefix
        ``where`` (e.g. the file of new rows)."""
        raw = self.arrays[0] if raw is None else raw
        with np.errstate(over="ignore"):
            rounded = features.astype(np.float32)
        cell = first_nonfinite(rounded)
        if cell is not None:
            r, c = cell
            raise DataError(
                f"{where}value {raw[r, c]:g} in column {self._column_name(c)!r} at row "
                f"{r + 1} is beyond float32's range (±{np.finfo(np.float32).max:.3g}) after "
                f"standardisation (standardize={self.standardize}); rescale the column"
            )
        return rounded

    def _column_name(self, j: int) -> str:
        """The name of feature column ``j`` in messages: its index (named in subclasses)."""
        return str(j)

    # -- the split a checkpoint was trained on -------------------------------------------
    def _source(self) -> dict[str, Any]:
        """What names the data (a subclass's file or dataset name); ``{}`` for one dataset."""
        return {}

    def _split_settings(self) -> dict[str, Any]:
        """What decides which rows land in which split, and how features are scaled."""
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "standardize": self.standardize,
        }

    def state_dict(self) -> dict[str, Any]:
        """Kept in checkpoints: the data's source and split settings (see
        :meth:`load_state_dict`), the ``batch_size`` and the number of processes sharing
        the epoch's rows (a fit resumed within an epoch continues each process's share
        after the rows of the batches it trained)."""
        return {
            "source": self._source(),
            "split": self._split_settings(),
            "batch_size": self.batch_size,
            "world_size": rank_world()[1],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to serve a checkpoint's model the same data split otherwise.

        Raises:
            DataConfigError: The checkpoint's run read the same data (same source) with
                another ``seed``, ``val_fraction`` or ``test_fraction`` (its test and
                validation splits would hold rows the model trained on) or ``standardize``
                (its features would be scaled unlike the ones it trained on).
        """
        if state_dict.get("source") != self._source():
            return  # other data: evaluating a model on it is the user's choice
        self.checkpoint_batch_size = state_dict.get("batch_size")
        self.checkpoint_world_size = state_dict.get("world_size")
        saved = state_dict.get("split") or {}
        differ = [
            f"data.{key}={value} (the checkpoint's run: {saved[key]})"
            for key, value in self._split_settings().items()
            if key in saved and saved[key] != value
        ]
        if differ:
            raise DataConfigError(
                f"{', '.join(differ)}: this split of the data is not the one the checkpoint's "
                "model was trained on, so its validation and test rows would include training "
                "rows (or its features be scaled otherwise); use the run's data settings (its "
                "config.yaml)"
            )

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            self._splits = self._split()

    def check_data(self) -> None:
        """Load, split and standardise the data now (once): a problem that only the split
        shows is a :class:`DataError` before training."""
        self.setup()

    @property
    def splits(self) -> dict[str, TensorDataset]:
        self.setup()
        assert self._splits is not None
        return self._splits

    # -- loaders --------------------------------------------------------------------------
    def _loader_options(self) -> dict[str, Any]:
        """The options every loader of this DataModule takes (its four dataloaders and a
        subclass's own, e.g. the rows of ``predict_path``): its worker processes."""
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        """The loader of ``split``, its rows in order (see :func:`evaluation_sampler`) but
        for training; the train loader of a fit resumed within an epoch continues it (see
        :meth:`_batches_trained_before_resuming`), and its workers start fetching at its
        first batch, so that it does with workers too."""
        ds = self.splits[split]
        if not train:
            sampler = evaluation_sampler(ds, self.seed)
            return DataLoader(
                ds, batch_size=self.batch_size, sampler=sampler, **self._loader_options()
            )
        epoch, trained = self._batches_trained_before_resuming()
        if self.poisson_sampling:
            refuse_poisson_sampling_across_processes(rank_world()[1])
            rate = min(1.0, self.batch_size / len(ds))
            draws = PoissonBatchSampler(len(ds), rate, seed=self.seed)
            if trained:
                draws.load_state_dict({"epoch": epoch, "drawn": trained})
            return FetchOnFirstBatchDataLoader(
                ds,
                batch_sampler=draws,
                collate_fn=functools.partial(collate_or_empty, ds),
                **self._loader_options(),
            )
        if self._trains_first_batches_in_order():
            in_order = ContinuableSequentialSampler(ds)
            if trained:
                in_order.continue_epoch(epoch, min(trained * self.batch_size, len(ds)))
            return FetchOnFirstBatchDataLoader(
                ds, batch_size=self.batch_size, sampler=in_order, **self._loader_options()
            )
        sampler = EpochSeededSampler(ds, shuffle=self.shuffle, seed=self.seed, drop_last=True)
        if trained:
            self._warn_if_the_rows_per_process_changed(epoch, trained)
            sampler.continue_epoch(epoch, min(trained * self.batch_size, len(sampler)))
        return FetchOnFirstBatchDataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            **self._loader_options(),
        )

    def _warn_if_the_rows_per_process_changed(self, epoch: int, trained: int) -> None:
        """The train loader of a fit resumed within ``epoch`` after ``trained`` batches
        continues each process's share of its rows after as many batches of this
        ``batch_size``: with another batch size, or another number of processes sharing the
        rows, than the checkpoint's run had, they are rows it did not train (or did) in
        the epoch. Nothing to say after a checkpoint of the epoch's last step: no row of
        it is left to train."""
        if self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        saved, size = self.checkpoint_batch_size, self.batch_size
        if saved is not None and saved != size:
            rank_zero_warn(
                f"the fit resumed within epoch {epoch}, after {trained} batches "
                f"of {saved} rows (the checkpoint's data.batch_size), and continues it after "
                f"{trained} batches of {size}: rows of the epoch that the checkpoint's run had "
                f"{'not yet trained are skipped' if size > saved else 'trained are trained again'}"
                f"; resume with data.batch_size: {saved} to train the uninterrupted fit's "
                "batches, or change it at an epoch's end",
                category=UserWarning,
            )
        saved_world, world = self.checkpoint_world_size, rank_world()[1]
        if saved_world is not None and saved_world != world:
            rank_zero_warn(
                f"the fit resumed within epoch {epoch}, after {trained} batches "
                f"per process of a run whose processes ({saved_world}) shared the epoch's rows, "
                f"and continues it with {world}: each process's share of the rows is another, "
                "so rows of the epoch are skipped and others trained again; resume with "
                f"{saved_world} processes to train the uninterrupted fit's batches, or change "
                "their number at an epoch's end",
                category=UserWarning,
            )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


def refuse_poisson_sampling_across_processes(world_size: int) -> None:
    """Refuse ``poisson_sampling`` with ``world_size`` processes sharing the training
    (DDP): every process would draw the same batches (the draws are not sharded by rank),
    and Lightning fails to put a DistributedSampler into the Poisson batch sampler.

    Raises:
        DataConfigError: ``world_size`` is above 1.
    """
    if world_size > 1:
        raise DataConfigError(
            f"poisson_sampling: true draws every process's batches alike (they are not "
            f"sharded by rank), and this run has {world_size} processes (DDP); train with "
            "poisson_sampling: false, or in one process (--trainer.devices 1 "
            "--trainer.num_nodes 1)"
        )


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's bundled handwritten digits: 1797 8x8 images (64 features), 10 classes.

    Takes the arguments of :class:`ArrayDataModule`.

    Examples::

        >>> DigitsDataModule(batch_size=128).num_classes
        10
    """

    def _load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.data, d.target


class SklearnToyDataModule(ArrayDataModule):
    """A small dataset bundled with scikit-learn: iris (4 features, 3 classes), wine (13, 3) or
    breast_cancer (30, 2).

    Args:
        name: Which dataset.
        batch_size: Mini-batch size for all splits.
        **kwargs: The other arguments of :class:`ArrayDataModule`.

    Examples::

        >>> SklearnToyDataModule(name="wine", seed=1).num_features
        13
    """

    def __init__(
        self,
        name: Literal["iris", "wine", "breast_cancer"] = "iris",
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        if name not in ("iris", "wine", "breast_cancer"):
            raise DataConfigError(f"unknown toy dataset {name!r}; use iris, wine or breast_cancer")
        self.name = name

    def _source(self) -> dict[str, Any]:
        return {"name": self.name}

    def _load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        import sklearn.datasets as ds

        d = getattr(ds, f"load_{self.name}")()
        return d.data, d.target
