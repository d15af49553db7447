"""The in-memory DataModules' EpochSeededSampler, next to the Poisson one of DP-SGD."""

from __future__ import annotations

import pytest

from torchbp.lightning.samplers import EpochSeededSampler


@pytest.mark.parametrize("seed", [2**62, 2**64 - 1, -(2**63)])
def test_epoch_seeded_sampler_takes_any_64_bit_seed(seed):
    """A seed whose (seed, epoch) mix passed 64 bits failed at the first iteration with
    torch's 'Overflow when unpacking long long'; it is wrapped to 64 bits as torch wraps a
    negative seed, so every order of a seed that worked is unchanged."""
    sampler = EpochSeededSampler(range(20), num_replicas=1, rank=0, seed=seed)
    order = list(sampler)
    assert sorted(order) == list(range(20)) and order == list(sampler)
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(20)) and list(sampler) != order


def test_epoch_seeded_sampler_orders_of_small_and_negative_seeds_are_unchanged():
    import torch

    for seed in (0, 7, -3):
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(seed * 100_003 + 2))
        sampler = EpochSeededSampler(range(10), num_replicas=1, rank=0, seed=seed)
        sampler.set_epoch(2)
        assert list(sampler) == expected.tolist()
