""":class:`SyntheticDataModule`: seeded synthetic classification data, generated batch by
batch (millions of samples cost a batch of memory)."""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Literal

import torch
from torch.utils.data import DataLoader, Dataset

from torchbp.lightning.data_base import (
    ClassificationDataModule,
    DataConfigError,
    check_num_workers,
    rank_world,
)
from torchbp.lightning.samplers import (
    ContinuableSequentialSampler,
    EpochSeededSampler,
    FetchOnFirstBatchDataLoader,
    evaluation_sampler,
)

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


class _SyntheticBatches(Dataset):
    """Item ``b`` is the split's whole batch ``b``, a pure function of ``(seed, b)``: nothing
    beyond the batch asked for is stored. An
    :class:`~torchbp.lightning.samplers.EpochSeededSampler` of the batch indices orders
    them (``set_epoch``, which Lightning calls for any LightningModule, reshuffles them) and
    shards them under DDP."""

    def __init__(self, task: _SyntheticTask, n_samples: int, batch_size: int, seed: int) -> None:
        self.task = task
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed

    def __len__(self) -> int:
        return math.ceil(self.n_samples / self.batch_size)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range for {len(self)} batches")
        size = min(self.batch_size, self.n_samples - b * self.batch_size)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        return self.task.sample(size, g)


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

    def _loader(self, n: int, split_seed: int, train: bool = False) -> DataLoader:
        """The loader of ``n`` samples in whole batches, in order (see
        :func:`evaluation_sampler`) but for training; under DDP each process takes every
        ``world_size``-th batch, their count rounded down so that every process does the
        same number of steps (the rank is the process's when the loader is made: Lightning
        asks for it once the process group is up, and its workers need none)."""
        batches = _SyntheticBatches(self.task, n, self.batch_size, split_seed)
        if train and self._trains_first_batches_in_order():
            sampler = ContinuableSequentialSampler(batches)
        elif train:
            rank, world_size = rank_world()
            sampler = EpochSeededSampler(
                batches,
                num_replicas=world_size,
                rank=rank,
                shuffle=self.shuffle,
                seed=split_seed,
                drop_last=True,
            )
        else:
            sampler = evaluation_sampler(batches, split_seed, drop_last=True)
        loader_class = FetchOnFirstBatchDataLoader if train else DataLoader
        return loader_class(
            batches,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """The training batches; a fit resumed within an epoch continues it (see
        :meth:`_batches_trained_before_resuming`), and the workers start at the first batch,
        once the epoch (and where a resumed fit continues it) is set."""
        loader = self._loader(self.n_samples, self.seed * 3 + 1, train=True)
        epoch, trained = self._batches_trained_before_resuming()
        if trained:
            loader.sampler.continue_epoch(epoch, min(trained, len(loader.sampler)))
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.n_val, self.seed * 3 + 2)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.n_test, self.seed * 3 + 3)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
