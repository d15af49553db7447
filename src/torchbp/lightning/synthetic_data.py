""":class:`SyntheticDataModule`: seeded synthetic classification data, generated batch by
batch (millions of samples cost a batch of memory)."""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Literal

import torch
from torch.utils.data import DataLoader, IterableDataset

from torchbp.lightning.data_base import (
    ClassificationDataModule,
    DataConfigError,
    check_num_workers,
    rank_world,
)
from torchbp.lightning.samplers import FetchOnFirstBatchDataLoader

__all__ = ["SyntheticDataModule"]


#: the largest ``seed`` of a :class:`SyntheticDataModule` (Lightning's ``seed_everything``
#: range): each batch's generator is seeded with about ``3 * 10**6 * seed``, which must
#: stay below 2**64
MAX_SEED = 2**32 - 1


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
    every rank does the same number of steps). The rank and world size are those of the
    process that makes the dataset (Lightning asks for the loaders once the process group is
    up): a DataLoader worker that starts as a fresh process (spawn, forkserver) has no process
    group, and took every batch. Nothing beyond the current batch is stored.
    """

    def __init__(self, task, n_samples, batch_size, seed, shuffle):
        self.task = task
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0  # the first of this rank's batches of the epoch to yield
        self.rank, self.world_size = rank_world()

    def set_epoch(self, epoch: int) -> None:
        """Yield epoch ``epoch``'s batches, from its first."""
        self.epoch, self.start = epoch, 0

    def continue_epoch(self, epoch: int, start: int) -> None:
        """Yield epoch ``epoch``'s batches from its ``start``-th (of this rank's) on: a fit
        resumed within the epoch, where ``start`` batches were trained."""
        self.epoch, self.start = epoch, start

    def _num_batches_total(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    def __len__(self) -> int:
        return self._num_batches_total() // self.world_size

    def __iter__(self):
        rank, world = self.rank, self.world_size
        info = torch.utils.data.get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        nb = self._num_batches_total()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(nb, generator=g).tolist()
        else:
            order = list(range(nb))
        order = order[: len(self) * world][rank::world][self.start :][wid::nworkers]
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
        seed: Seed of the task and of every batch, in ``[0, 2**32 - 1]``.
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
        if not 0 <= seed <= MAX_SEED:
            raise DataConfigError(f"seed must be in [0, {MAX_SEED}], got {seed}")
        check_num_workers(num_workers)
        self.n_samples, self.n_features, self.n_classes = n_samples, n_features, n_classes
        self.kind, self.separation = kind, separation
        self.n_val, self.n_test = n_val, n_test
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_workers = num_workers
        self.task = _SyntheticTask(kind, n_features, n_classes, seed, separation)

    # The task's sizes are known from the arguments (nothing to load).
    num_features = property(attrgetter("n_features"))
    num_classes = property(attrgetter("n_classes"))

    def _loader(
        self, n: int, split_seed: int, shuffle: bool, loader_class: type[DataLoader] = DataLoader
    ) -> DataLoader:
        ds = _SyntheticBatches(self.task, n, self.batch_size, split_seed, shuffle)
        return loader_class(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            # not persistent: workers must see the epoch set by ``set_epoch``
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        """The training batches; the workers start at the first batch, once the epoch (and
        where a resumed fit continues it) is set."""
        return self._loader(
            self.n_samples, self.seed * 3 + 1, self.shuffle, FetchOnFirstBatchDataLoader
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.n_val, self.seed * 3 + 2, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.n_test, self.seed * 3 + 3, False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
