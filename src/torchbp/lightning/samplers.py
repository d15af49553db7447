"""How torchbp's DataModules order and batch their rows: an order seeded by
``(seed, epoch)`` that shards itself under DDP, the collate of a Poisson draw, and a
train DataLoader whose workers start fetching at its first batch."""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
    default_collate,
)

from torchbp.lightning.data_base import rank_world

__all__ = [
    "EpochSeededSampler",
    "ContinuableSequentialSampler",
    "FetchOnFirstBatchDataLoader",
    "collate_or_empty",
    "evaluation_sampler",
]


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
    - A fit resumed within an epoch continues it: after :meth:`continue_epoch` the epoch
      yields only the samples its uninterrupted iteration had still to yield (Lightning's
      ``set_epoch`` of that same epoch keeps this; the next epoch's starts from its first).

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
        default_rank, default_world = rank_world()
        super().__init__(
            dataset,
            num_replicas=default_world if num_replicas is None else num_replicas,
            rank=default_rank if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0  # the first of this rank's samples of the epoch to yield

    def set_epoch(self, epoch: int) -> None:
        """Yield epoch ``epoch``'s samples from its first, unless ``epoch`` is the one
        :meth:`continue_epoch` continues (Lightning sets the resumed epoch after it)."""
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def continue_epoch(self, epoch: int, start: int) -> None:
        """Yield epoch ``epoch``'s samples of this rank from its ``start``-th on: a fit
        resumed within the epoch after ``start`` of this rank's samples (the batches
        trained times the batch size) were trained.

        Args:
            epoch: The epoch to continue.
            start: How many of this rank's samples of the epoch to skip, in ``[0, len(self)]``.

        Examples::

            >>> sampler = EpochSeededSampler(range(6), shuffle=False)
            >>> sampler.continue_epoch(3, start=4)
            >>> list(sampler)
            [4, 5]
        """
        if not 0 <= start <= len(self):
            raise ValueError(
                f"EpochSeededSampler.continue_epoch: start must be in [0, {len(self)}] "
                f"(this rank's samples of an epoch), got {start}"
            )
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            # one seed per (seed, epoch), wrapped to the 64 bits torch's generator takes
            # (torch wraps a negative seed the same way, so no order changes)
            g = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**64)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.drop_last:
            order = order[: n - n % self.num_replicas]
        return iter(order[self.rank :: self.num_replicas][self.start :].tolist())

    def __len__(self) -> int:
        """This rank's samples of a whole epoch (also while one is continued)."""
        n = len(self.dataset)
        if self.drop_last:
            return n // self.num_replicas
        return len(range(self.rank, n, self.num_replicas))


class ContinuableSequentialSampler(SequentialSampler):
    """torch's :class:`~torch.utils.data.SequentialSampler` (the rows ``0..n-1`` every
    epoch) that a fit resumed within an epoch continues, as :class:`EpochSeededSampler`
    does: the train sampler of a fit with ``trainer.overfit_batches`` in one process, for
    which Lightning replaces any sampler but a SequentialSampler (with one that starts
    every epoch over: a resumed fit trained the epoch's first batches again, its last
    ones never).

    Args:
        data_source: The dataset (only its length is used).

    Examples::

        >>> sampler = ContinuableSequentialSampler(range(6))
        >>> sampler.continue_epoch(2, start=4)
        >>> sampler.set_epoch(2)  # Lightning sets the resumed epoch: continued
        >>> list(sampler)
        [4, 5]
        >>> sampler.set_epoch(3)
        >>> list(sampler)
        [0, 1, 2, 3, 4, 5]
    """

    def __init__(self, data_source: Sized) -> None:
        super().__init__(data_source)
        self.epoch = 0
        self.start = 0  # the first row of the epoch to yield

    def set_epoch(self, epoch: int) -> None:
        """Yield epoch ``epoch``'s rows from the first, unless ``epoch`` is the one
        :meth:`continue_epoch` continues."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def continue_epoch(self, epoch: int, start: int) -> None:
        """Yield epoch ``epoch``'s rows from the ``start``-th on (the batches trained
        times the batch size), ``start`` in ``[0, len(self)]``."""
        if not 0 <= start <= len(self):
            raise ValueError(
                f"ContinuableSequentialSampler.continue_epoch: start must be in "
                f"[0, {len(self)}] (the rows of an epoch), got {start}"
            )
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, len(self.data_source)))


def evaluation_sampler(dataset: Sized, seed: int = 0, drop_last: bool = False) -> Sampler:
    """The sampler of an evaluation loader (validation, test, predict: the rows in order):
    torch's :class:`~torch.utils.data.SequentialSampler` in one process, an
    :class:`EpochSeededSampler` of this process's shard under DDP.

    Lightning takes any sampler but a SequentialSampler for a shuffling one: with
    ``trainer.overfit_batches`` an EpochSeededSampler in one process made it warn "You
    requested to overfit but enabled val dataloader shuffling" of a loader that never
    shuffles.

    Args:
        dataset: The dataset (only its length is used).
        seed: Seed of the shard's sampler (its order does not depend on it).
        drop_last: Drop ``n % world_size`` samples under DDP, so every shard has the same
            length.

    Examples::

        >>> list(evaluation_sampler(range(4)))
        [0, 1, 2, 3]
    """
    rank, world_size = rank_world()
    if world_size == 1:
        return SequentialSampler(dataset)
    return EpochSeededSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=False, seed=seed, drop_last=drop_last
    )


def collate_or_empty(dataset: TensorDataset, samples: list) -> Any:
    """``default_collate``, except that an empty Poisson draw gives ``dataset``'s tensors
    with 0 rows instead of an error."""
    if not samples:
        return [t[:0] for t in dataset.tensors]
    return default_collate(samples)


class FetchOnFirstBatchDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` whose iteration, workers included, starts at
    its first batch rather than at ``iter()``.

    A DataLoader with workers draws its sampler's order and has its workers fetch the first
    batches as soon as ``iter()`` is called. Lightning makes a resumed fit's train
    iterator before the hooks that say which epoch it is (``set_epoch``) and where in it the
    fit continues (``on_train_start``): the workers fetched the wrong batches. This loader
    makes its DataLoader iterator when the first batch is asked for, after those hooks, so
    a fit resumed with workers trains the batches of one without them. It takes the
    arguments of :class:`~torch.utils.data.DataLoader`.

    Examples::

        >>> loader = FetchOnFirstBatchDataLoader(range(5), batch_size=2)
        >>> batches = iter(loader)  # nothing drawn or fetched yet
        >>> [b.tolist() for b in batches]
        [[0, 1], [2, 3], [4]]
    """

    def __iter__(self) -> Iterator[Any]:
        return self._batches_from_the_first_request()

    def _batches_from_the_first_request(self) -> Iterator[Any]:
        # a generator's body runs at its first next(): the DataLoader iterator is made then
        yield from super().__iter__()
