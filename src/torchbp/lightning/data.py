"""LightningDataModules for ERM classification that work offline.

Every DataModule exposes ``num_features`` and ``num_classes``; the ``torchbp-train`` CLI links
them to ``ERMClassifier(input_size=..., num_classes=...)`` so a config never repeats them.

- :class:`DigitsDataModule`: scikit-learn's bundled 8x8 handwritten digits (1797 x 64, 10 classes).
- :class:`SklearnToyDataModule`: iris, wine or breast_cancer (bundled with scikit-learn).
- :class:`SyntheticDataModule`: seeded Gaussian-mixture or teacher-network data, generated
  batch by batch (millions of samples cost no memory); the scale knob for benchmarks.
- :class:`TabularFileDataModule`: a user's CSV, NPZ or ``.pt`` file.

Array-backed modules split stratified train/val/test from ``seed`` and standardise features
with statistics fitted on the training split only. Shuffling uses a sampler seeded by
``(seed, epoch)``, so a run resumed from a checkpoint sees the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import csv
import decimal
import functools
import math
import os
import pickle
import zipfile
from collections.abc import Iterator, Sized
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    TensorDataset,
    default_collate,
)

from torchbp.lightning.privacy import PoissonBatchSampler

__all__ = [
    "ClassificationDataModule",
    "ArrayDataModule",
    "DigitsDataModule",
    "SklearnToyDataModule",
    "SyntheticDataModule",
    "TabularFileDataModule",
    "DataConfigError",
    "DataError",
    "EpochSeededSampler",
]


class DataConfigError(ValueError):
    """Raised for invalid DataModule arguments, e.g. ``val_fraction=1.5``."""


class DataError(DataConfigError):
    """Raised when the data itself is unusable: a missing file or label column, non-numeric or
    non-finite values, a single class, too few rows for the split.

    A subclass of :class:`DataConfigError`, so ``except DataConfigError`` catches both.
    """


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochSeededSampler(DistributedSampler):
    """Sampler whose order depends only on ``(seed, epoch)``, and which shards itself under DDP.

    - Shuffled order: a permutation seeded by ``(seed, epoch)``; Lightning calls ``set_epoch``
      before each training epoch, so epoch ``k`` sees the same batches whether or not the run
      was resumed from a checkpoint.
    - Under ``torch.distributed`` with ``W`` processes, rank ``r`` takes ``order[r::W]``. With a
      per-process batch ``B``, the ``W`` ranks' ``k``-th batches together are exactly the
      single-process run's ``k``-th batch of size ``W*B``, so DDP reproduces the single-process
      run. With ``drop_last`` (training) the last ``n % W`` samples of each epoch's order are
      dropped so every rank does the same number of steps; without it (evaluation) the shards
      are uneven instead of padded, so every sample is evaluated exactly once.

    Being a :class:`~torch.utils.data.DistributedSampler`, it is kept as is by Lightning, which
    otherwise replaces a DataLoader's sampler under DDP (``Trainer(use_distributed_sampler=True)``).
    ``num_replicas`` and ``rank`` default to the initialised process group's, else ``1`` and
    ``0``: Lightning asks for the dataloaders after setting up the process group.

    Args:
        dataset: The dataset (only its length is used).
        num_replicas: Number of processes sharing the data.
        rank: This process's rank.
        shuffle: Random order (else ``0..n-1``).
        seed: Seed of the order.
        drop_last: Drop ``n % num_replicas`` samples so every shard has the same length.

    Examples::

        >>> sampler = EpochSeededSampler(range(6), seed=1)
        >>> sampler.set_epoch(2)
        >>> sorted(sampler)
        [0, 1, 2, 3, 4, 5]
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        default_rank, default_world = _rank_world()
        super().__init__(
            dataset,
            num_replicas=default_world if num_replicas is None else num_replicas,
            rank=default_rank if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.drop_last:
            order = order[: n - n % self.num_replicas]
        return iter(order[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            return n // self.num_replicas
        return len(range(self.rank, n, self.num_replicas))


def _first_nonfinite(values: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first NaN or ±inf in ``values`` (in row-major order), or ``None``."""
    cells = np.argwhere(~np.isfinite(values))
    return tuple(int(i) for i in cells[0]) if len(cells) else None


def collate_or_empty(dataset: TensorDataset, samples: list) -> Any:
    """``default_collate``, except that an empty Poisson draw gives ``dataset``'s tensors
    with 0 rows instead of an error."""
    if not samples:
        return [t[:0] for t in dataset.tensors]
    return default_collate(samples)


#: the largest ``seed`` of an :class:`ArrayDataModule`: its split hands scikit-learn
#: ``seed`` and ``seed + 1``, which must be below 2**32
MAX_SPLIT_SEED = 2**32 - 2


def _check_num_workers(num_workers: int) -> None:
    if num_workers < 0:
        raise DataConfigError(f"num_workers must be >= 0, got {num_workers}")


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

    def check_data(self) -> None:
        """Raise :class:`DataError` if the data is unusable, before training starts
        (``torchbp-train`` calls it after instantiating the DataModule). Default: nothing to
        check beyond what ``__init__``, ``num_features`` and ``num_classes`` did."""


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
            ``shuffle`` is then ignored.
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
        _check_num_workers(num_workers)
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
                f"the labels contain a single class ({classes.tolist()}); "
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
                "split can hold one sample per class"
            )
        if counts.min() < 3:
            rare = classes[counts < 3].tolist()
            raise DataError(
                f"class(es) {rare} have fewer than 3 samples; a stratified "
                "train/val/test split needs at least 3 per class"
            )

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
                f"class(es) {missing} have no row in the training split (val_fraction="
                f"{self.val_fraction}, test_fraction={self.test_fraction}); lower the "
                "fractions or add rows of the class"
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
        cell = _first_nonfinite(rounded)
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
        :meth:`load_state_dict`)."""
        return {"source": self._source(), "split": self._split_settings()}

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
    def _loader(self, split: str, train: bool = False) -> DataLoader:
        ds = self.splits[split]
        if train and self.poisson_sampling:
            rate = min(1.0, self.batch_size / len(ds))
            return DataLoader(
                ds,
                batch_sampler=PoissonBatchSampler(len(ds), rate, seed=self.seed),
                collate_fn=functools.partial(collate_or_empty, ds),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
        sampler = EpochSeededSampler(
            ds, shuffle=train and self.shuffle, seed=self.seed, drop_last=train
        )
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


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


# -------------------------------------------------------------------------------------------
# Tabular files
# -------------------------------------------------------------------------------------------


#: CSV cells that stand for a missing value (compared in upper case)
_MISSING_MARKERS = frozenset({"", "NA", "N/A", "NULL", "NONE", "?", "-", "MISSING"})


def _header_hint(header: list[str]) -> str:
    """A hint for a CSV whose first row reads as data (every field a number): the file has no
    header row, and its first data row was taken for one."""
    try:
        [float(h) for h in header]
    except ValueError:
        return ""
    return (
        " (its first row holds numbers, so it looks like data: the file needs a header row "
        "naming the columns, the label column among them)"
    )


def _is_vector(array: np.ndarray) -> bool:
    """Whether ``array`` holds one value per row: at most one of its dimensions is over 1."""
    return sum(size > 1 for size in array.shape) <= 1


def _exact_integers(values: list[int]) -> np.ndarray:
    """``values`` as int64, or, when one is beyond int64's range, as Python ints (an object
    array, which sorts and compares them exactly)."""
    info = np.iinfo(np.int64)
    if all(info.min <= v <= info.max for v in values):
        return np.asarray(values, dtype=np.int64)
    exact = np.empty(len(values), dtype=object)
    exact[:] = values
    return exact


def _encode_labels(raw: np.ndarray) -> np.ndarray:
    """Map arbitrary labels (ints, floats holding ints, strings) to 0..C-1 in sorted order."""
    _, y = np.unique(raw, return_inverse=True)
    return y.reshape(-1)


class TabularFileDataModule(ArrayDataModule):
    """A user's table: CSV (with a header row), NPZ or ``.pt`` file.

    - CSV: one column is the label (any values; mapped to 0..C-1 in sorted order), every other
      column must be numeric (or listed in ``drop_columns``). Labels that all read as numbers
      are compared as numbers (``1``, ``1.0`` and ``01`` are one class; classes sort by
      value), any other label column as its text (without surrounding spaces).
    - NPZ (numeric arrays) / ``.pt`` (a dict of tensors, read with
      ``torch.load(weights_only=True)``): either a 2-D array under ``features_key`` plus the
      label array under ``label_column``, or one 1-D array per column.

    Errors name the problem precisely: missing file, missing label column, a missing value
    (an empty cell or a marker such as ``NA``) or a non-numeric one (column and row), NaN/inf
    (column and row), a single class, too few rows for the split.

    Args:
        path: Path of the ``.csv``, ``.npz`` or ``.pt`` file.
        label_column: Name of the label column (or array key).
        features_key: For NPZ/``.pt``: key of a 2-D feature array; if absent, every other 1-D
            array is a feature column.
        drop_columns: Columns to ignore (e.g. an id column).
        predict_path: A file of new rows to predict (same format and feature columns; its
            label column and those of ``drop_columns`` may be absent, and are ignored):
            ``predict`` then gives one row of class probabilities per row of this file, in
            its order, its features scaled with the training split's mean and std. Without
            it, ``predict`` predicts the test split.
        **kwargs: The arguments of :class:`ArrayDataModule` (``batch_size``, ``seed``, ...).

    Examples::

        dm = TabularFileDataModule("my.csv", label_column="y", drop_columns=["id"], batch_size=128)
        dm = TabularFileDataModule("my.csv", label_column="y", predict_path="new_rows.csv")
    """

    def __init__(
        self,
        path: str,
        label_column: str = "label",
        features_key: str = "X",
        drop_columns: list[str] | None = None,
        predict_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.path = str(path)
        self.predict_path = None if predict_path is None else str(predict_path)
        self.label_column = label_column
        self.features_key = features_key
        self.drop_columns = list(drop_columns or [])
        self.feature_names: list[str] = []
        self.class_names: list = []

    def _source(self) -> dict[str, Any]:
        return {
            "path": os.path.abspath(self.path),
            "label_column": self.label_column,
            "features_key": self.features_key,
            "drop_columns": self.drop_columns,
        }

    def state_dict(self) -> dict[str, Any]:
        """Kept in checkpoints: the source and split settings, and the class names (the
        labels the model's classes ``0..C-1`` stand for)."""
        self.arrays  # noqa: B018 (loads the file, which names the classes)
        return {**super().state_dict(), "class_names": list(self.class_names)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to serve a checkpoint's model data whose classes are other ones, or the same
        data split otherwise (see :meth:`ArrayDataModule.load_state_dict`).

        Raises:
            DataConfigError: The checkpoint's run had other class names (another label set, or
                one with a class more or less): the model's class ``k`` would be scored, and
                named in predictions, as this data's ``k``-th label.
        """
        trained_on = state_dict.get("class_names")
        self.arrays  # noqa: B018 (loads the file, which names the classes)
        if trained_on is not None and list(trained_on) != list(self.class_names):
            raise DataConfigError(
                f"the checkpoint's model was trained on the classes {list(trained_on)}, and "
                f"{self.path} has the classes {list(self.class_names)} (label column "
                f"{self.label_column!r}): its class k would be read as another label; use data "
                "with the same labels"
            )
        super().load_state_dict(state_dict)

    def _load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        p = Path(self.path)
        if not p.is_file():
            raise DataError(f"data file not found: {os.path.abspath(p)}")
        names, X, raw_y = self._read_table(p)
        if X.shape[0] == 0:
            raise DataError(f"{p} has no data rows")
        if X.shape[1] == 0:
            raise DataError(f"{p} has no feature columns besides {self.label_column!r}")
        cell = _first_nonfinite(X)
        if cell is not None:
            r, c = cell
            raise DataError(
                f"{p}: non-finite value {X[r, c]} in column {names[c]!r} at row {r + 1} "
                f"({int((~np.isfinite(X)).sum())} non-finite value(s) in total); clean or "
                "impute the data"
            )
        self.feature_names = names
        self.class_names = np.unique(raw_y).tolist()
        return X, _encode_labels(raw_y)

    def _column_name(self, j: int) -> str:
        return str(self.feature_names[j])

    # -- new rows to predict --------------------------------------------------------------
    def predict_dataloader(self) -> DataLoader:
        """The rows of ``predict_path`` (see the class docstring), else the test split."""
        if self.predict_path is None:
            return super().predict_dataloader()
        features = torch.from_numpy(self._predict_features())
        return DataLoader(TensorDataset(features), batch_size=self.batch_size, shuffle=False)

    def _predict_features(self) -> np.ndarray:
        """``predict_path``'s feature columns, in the training file's order, scaled as the
        training split was (float32)."""
        p = Path(self.predict_path)
        self.setup()  # the training split's mean and std (and feature names)
        if not p.is_file():
            raise DataError(f"predict_path: file not found: {os.path.abspath(p)}")
        names, X = self._read_table(p, new_rows=True)[:2]
        missing = [n for n in self.feature_names if n not in names]
        extra = [n for n in names if n not in self.feature_names]
        if missing or extra:
            raise DataError(
                f"predict_path {p}: its feature columns must be those of {self.path}; "
                f"missing: {missing or 'none'}, not in the training data: {extra or 'none'} "
                "(list columns to ignore in drop_columns)"
            )
        X = X[:, [names.index(n) for n in self.feature_names]]
        cell = _first_nonfinite(X)
        if cell is not None:
            r, c = cell
            raise DataError(
                f"predict_path {p}: non-finite value {X[r, c]} in column "
                f"{self.feature_names[c]!r} at row {r + 1}"
            )
        mean, std = self._scaling
        return self._as_float32((X - mean) / std, raw=X, where=f"predict_path {p}: ")

    def _read_table(
        self, p: Path, new_rows: bool = False
    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        """``(feature names, X, raw labels)`` of a ``.csv``, ``.npz`` or ``.pt`` file. A file of
        ``new_rows`` to predict (``predict_path``) needs no label column (its labels are
        ``None``: one it has is ignored) and may lack the columns ``drop_columns`` names."""
        suffix = p.suffix.lower()
        if suffix == ".csv":
            return self._read_csv(p, new_rows)
        if suffix in (".npz", ".pt", ".pth"):
            return self._read_arrays(p, new_rows)
        raise DataError(f"unsupported file type {suffix!r} ({p}); use .csv, .npz or .pt")

    def _missing_label(self, p: Path, columns: list[str], hint: str = "") -> DataError:
        return DataError(
            f"label column {self.label_column!r} not found in {p}; available columns: "
            f"{', '.join(map(str, columns))}{hint}"
        )

    def _read_csv(
        self, p: Path, new_rows: bool = False
    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        # utf-8-sig: UTF-8 without the byte order mark that Excel writes before the header
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise DataError(f"{p} is empty (expected a header row)") from None
            self._check_unique_names(p, header)
            if self.label_column not in header and not new_rows:
                raise self._missing_label(p, header, _header_hint(header))
            li = header.index(self.label_column) if self.label_column in header else None
            if not new_rows:
                self._check_drop_columns(p, [h for i, h in enumerate(header) if i != li])
            keep = [i for i, h in enumerate(header) if i != li and h not in set(self.drop_columns)]
            rows: list[list[float]] = []
            labels: list[str] = []
            label_rows: list[int] = []  # each label's row number in the file
            for r, row in enumerate(reader, start=1):
                if not row or all(not v.strip() for v in row):
                    continue  # blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{p}: row {r} (line {reader.line_num}) has {len(row)} fields, "
                        f"the header has {len(header)}"
                    )
                where = f"in column {{}} at row {r} (line {reader.line_num})"
                vals = []
                for i in keep:
                    v = row[i].strip()
                    try:
                        vals.append(float(v))
                    except ValueError:
                        raise self._not_a_number(p, v, where.format(repr(header[i]))) from None
                rows.append(vals)
                if not new_rows:
                    labels.append(row[li].strip())
                    label_rows.append(r)
        X = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(keep))
        names = [header[i] for i in keep]
        if new_rows:  # a label column there is ignored
            return names, X, None
        self._check_no_empty_label(p, [r for r, v in zip(label_rows, labels) if not v])
        return names, X, self._numeric_if_possible(p, labels, label_rows)

    @staticmethod
    def _not_a_number(p: Path, value: str, where: str) -> DataError:
        """The error for a feature cell ``value`` that is no number: a missing value (empty, or
        a usual marker such as ``NA``) or a non-numeric one."""
        if value.upper() in _MISSING_MARKERS:
            return DataError(
                f"{p}: missing value {value!r} {where}; fill in the value (impute it) or remove "
                "the row"
            )
        return DataError(
            f"{p}: non-numeric value {value!r} {where}; feature columns must be numbers "
            "(drop the column with drop_columns)"
        )

    def _numeric_if_possible(self, p: Path, labels: list[str], rows: list[int]) -> np.ndarray:
        """CSV labels as numbers when they all read as numbers (so "1", "1.0" and "01" are
        one class, and "10" sorts after "9"): the exact integers when every value is whole
        (IDs beyond float64's 2**53 stay apart), else floats; otherwise the text. Numbers
        with a NaN or inf among them are a :class:`DataError` (a missing label), and so
        are those beyond float64's range (no ID: 1e5000 would be a 5001-digit class)."""
        try:
            numbers = [decimal.Decimal(v) for v in labels]
        except decimal.InvalidOperation:
            return np.asarray(labels)
        for i, number in enumerate(numbers):
            where = f"{labels[i]} in column {self.label_column!r} at row {rows[i]}"
            if not number.is_finite():
                raise DataError(
                    f"{p}: non-finite label {where}; label every row or remove the unlabelled ones"
                )
            if math.isinf(float(number)):
                raise DataError(
                    f"{p}: label {where} is beyond float64's range (about 1.8e308); "
                    "use labels of a usual size"
                )
        if all(n == n.to_integral_value() for n in numbers):
            return _exact_integers([int(n) for n in numbers])
        return np.asarray([float(n) for n in numbers], dtype=np.float64)

    @staticmethod
    def _check_unique_names(p: Path, header: list[str]) -> None:
        """Each column is named once (a second label column would be read as a feature)."""
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise DataError(
                f"{p}: column name(s) {', '.join(map(repr, repeated))} appear more than once "
                "in the header; rename or remove the copies"
            )

    def _check_drop_columns(self, p: Path, columns: list[str]) -> None:
        """Every name in ``drop_columns`` is one of ``columns`` (a misspelt one would leave
        the column it meant among the features)."""
        if self.label_column in self.drop_columns:
            raise DataError(f"drop_columns names the label column {self.label_column!r}")
        unknown = [c for c in self.drop_columns if c not in columns]
        if unknown:
            raise DataError(
                f"drop_columns {', '.join(map(repr, unknown))} not found in {p}; available "
                f"columns: {', '.join(map(str, columns))}"
            )

    def _check_no_empty_label(self, p: Path, rows: list[int]) -> None:
        """An empty label cell (at data rows ``rows``) is a missing label, not a class of
        its own."""
        if rows:
            raise DataError(
                f"{p}: empty label in column {self.label_column!r} at row {rows[0]} "
                f"({len(rows)} in total); label every row or remove the unlabelled ones"
            )

    @staticmethod
    def _load_npz(p: Path) -> dict[str, np.ndarray]:
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"{p}: cannot load it as an .npz of numeric arrays (np.savez): {cause}"
            ) from e

    @staticmethod
    def _load_pt(p: Path) -> dict[str, np.ndarray]:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(
                f"{p}: cannot load it as a dict of tensors with torch.load(weights_only=True) "
                f"({type(e).__name__}); save torch tensors (not numpy arrays or other objects) "
                "with torch.save, or numpy arrays with np.savez as an .npz"
            ) from e
        if not isinstance(obj, dict):
            raise DataError(f"{p} must hold a dict of tensors, got {type(obj).__name__}")
        return {
            str(k): (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
            for k, v in obj.items()
        }

    def _label_vector(self, p: Path, labels: Any) -> np.ndarray:
        """The label array as one label per row (shape ``(N,)``, ``(N, 1)`` or ``(1, N)``);
        a matrix (one-hot labels) is a :class:`DataError`: flattened, it gave ``C`` labels
        per row."""
        labels = np.asarray(labels)
        if not _is_vector(labels):
            raise DataError(
                f"{p}: label array {self.label_column!r} has shape {labels.shape}; one label "
                "per row is needed (one-hot labels? save their argmax, the class indices)"
            )
        return labels.reshape(-1)

    def _feature_columns(
        self, p: Path, data: dict[str, np.ndarray], labels: np.ndarray | None
    ) -> list[np.ndarray]:
        """Without a ``features_key`` array, each array is one feature column: 1-D (or
        ``(N, 1)``), as long as the labels (else as the first column). An array of another
        shape or length is a :class:`DataError` naming it (``np.stack`` only said that
        "all input arrays must have the same shape")."""
        columns = []
        for name, array in data.items():
            array = np.asarray(array)
            if not _is_vector(array):
                raise DataError(
                    f"{p}: array {name!r} has shape {array.shape}; with no "
                    f"{self.features_key!r} array (features_key) every array besides the "
                    "label is one feature column (1-D): save a feature matrix under "
                    "features_key"
                )
            columns.append(array.reshape(-1))
        reference = (self.label_column, labels) if labels is not None else None
        if reference is None and columns:
            reference = (next(iter(data)), columns[0])
        for name, column in zip(data, columns):
            if reference is not None and len(column) != len(reference[1]):
                raise DataError(
                    f"{p}: array {name!r} has {len(column)} values, {reference[0]!r} has "
                    f"{len(reference[1])}; every column needs one value per row"
                )
        return columns

    def _read_arrays(
        self, p: Path, new_rows: bool = False
    ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
        data = self._load_npz(p) if p.suffix.lower() == ".npz" else self._load_pt(p)
        if self.label_column not in data and not new_rows:
            raise self._missing_label(p, list(data))
        raw_y = data.pop(self.label_column, None)
        if new_rows:  # a label array there is ignored
            raw_y = None
        raw_y = None if raw_y is None else self._label_vector(p, raw_y)
        if not new_rows:
            self._check_drop_columns(p, list(data))
        for c in self.drop_columns:
            data.pop(c, None)
        if self.features_key in data:
            X = np.asarray(data[self.features_key])
            if X.ndim != 2:
                raise DataError(
                    f"{p}: {self.features_key!r} must be 2-D (rows, features), got {X.shape}"
                )
            names = [f"{self.features_key}[{j}]" for j in range(X.shape[1])]
        else:
            names = list(data)
            cols = self._feature_columns(p, data, raw_y)
            X = (
                np.stack(cols, axis=1)
                if cols
                else np.zeros((0 if raw_y is None else len(raw_y), 0))
            )
        if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
            raise DataError(f"{p}: features must be real numbers, got dtype {X.dtype}")
        if raw_y is None:
            return names, X.astype(np.float64), None
        if X.shape[0] != raw_y.shape[0]:
            raise DataError(f"{p}: {X.shape[0]} feature rows but {raw_y.shape[0]} labels")
        cell = _first_nonfinite(raw_y) if raw_y.dtype.kind == "f" else None
        if cell is not None:
            (r,) = cell
            raise DataError(f"{p}: non-finite label in column {self.label_column!r} at row {r + 1}")
        return names, X.astype(np.float64), raw_y


# -------------------------------------------------------------------------------------------
# Synthetic data, generated batch by batch
# -------------------------------------------------------------------------------------------


class _SyntheticTask:
    """The fixed (seeded) generative model: class means or a random teacher MLP."""

    def __init__(self, kind: str, n_features: int, n_classes: int, seed: int, sep: float):
        g = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.n_features = n_features
        self.n_classes = n_classes
        if kind == "gaussian_mixture":
            means = torch.randn(n_classes, n_features, generator=g)
            self.means = sep * means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            hidden = max(2 * n_features, 16)
            self.w1 = torch.randn(n_features, hidden, generator=g) / math.sqrt(n_features)
            self.w2 = torch.randn(hidden, n_classes, generator=g) * sep / math.sqrt(hidden)

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "gaussian_mixture":
            y = torch.randint(self.n_classes, (n,), generator=g)
            x = self.means[y] + torch.randn(n, self.n_features, generator=g)
        else:
            x = torch.randn(n, self.n_features, generator=g)
            y = (torch.tanh(x @ self.w1) @ self.w2).argmax(dim=1)
        return x, y


class _SyntheticBatches(IterableDataset):
    """Yields whole batches; batch ``b`` of a split is a pure function of ``(seed, split, b)``.

    Under DDP each rank takes every ``world_size``-th batch (the count is rounded down so
    every rank does the same number of steps). Nothing beyond the current batch is stored.
    """

    def __init__(self, task, n_samples, batch_size, seed, shuffle):
        self.task = task
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_batches_total(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    def __len__(self) -> int:
        _, world = _rank_world()
        return self._num_batches_total() // world

    def __iter__(self):
        rank, world = _rank_world()
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        nb = self._num_batches_total()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(nb, generator=g).tolist()
        else:
            order = list(range(nb))
        order = order[: len(self) * world][rank::world][wid::nworkers]
        for b in order:
            size = min(self.batch_size, self.n_samples - b * self.batch_size)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            yield self.task.sample(size, g)


class SyntheticDataModule(ClassificationDataModule):
    """Seeded synthetic classification data, generated batch by batch (never materialised).

    ``gaussian_mixture``: a class ``y`` uniform in ``0..C-1``, ``x = mu_y + N(0, I)`` with
    ``|mu_y| = separation``. ``teacher``: ``x ~ N(0, I)``, ``y = argmax(tanh(x W1) W2)`` for a
    fixed random teacher MLP. Each batch is a pure function of ``(seed, split, batch index)``,
    so millions of samples cost a batch of memory and runs are reproducible.

    Args:
        n_samples: Training samples per epoch.
        n_features: Input dimension.
        n_classes: Number of classes.
        kind: ``gaussian_mixture`` or ``teacher``.
        separation: Distance of class means from the origin (mixture) or teacher logit scale.
        n_val: Validation samples.
        n_test: Test samples.
        batch_size: Mini-batch size for all splits.
        seed: Seed of the task and of every batch.
        shuffle: Visit the training batches in a new (seeded) order each epoch.
        num_workers: DataLoader worker processes generating batches.
    """

    def __init__(
        self,
        n_samples: int = 100_000,
        n_features: int = 32,
        n_classes: int = 10,
        kind: Literal["gaussian_mixture", "teacher"] = "gaussian_mixture",
        separation: float = 3.0,
        n_val: int = 5_000,
        n_test: int = 5_000,
        batch_size: int = 512,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        counts = {
            "n_samples": n_samples,
            "n_features": n_features,
            "n_val": n_val,
            "n_test": n_test,
            "batch_size": batch_size,
        }
        for name, v in counts.items():
            if v < 1:
                raise DataConfigError(f"{name} must be >= 1, got {v}")
        if n_classes < 2:
            raise DataConfigError(f"n_classes must be >= 2, got {n_classes}")
        if kind not in ("gaussian_mixture", "teacher"):
            raise DataConfigError(f"unknown kind {kind!r}; use gaussian_mixture or teacher")
        if not math.isfinite(separation):
            raise DataConfigError(f"separation must be finite, got {separation}")
        _check_num_workers(num_workers)
        self.n_samples, self.n_features, self.n_classes = n_samples, n_features, n_classes
        self.kind, self.separation = kind, separation
        self.n_val, self.n_test = n_val, n_test
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_workers = num_workers
        self.task = _SyntheticTask(kind, n_features, n_classes, seed, separation)

    # The task's sizes are known from the arguments (nothing to load).
    num_features = property(attrgetter("n_features"))
    num_classes = property(attrgetter("n_classes"))

    def _loader(self, n: int, split_seed: int, shuffle: bool) -> DataLoader:
        ds = _SyntheticBatches(self.task, n, self.batch_size, split_seed, shuffle)
        return DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            # not persistent: workers must see the epoch set by ``set_epoch``
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.n_samples, self.seed * 3 + 1, self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.n_val, self.seed * 3 + 2, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.n_test, self.seed * 3 + 3, False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
