"""DP-SGD pieces: Poisson batch sampling, the privacy settings and the accountant."""

from __future__ import annotations

import math

import pytest
import torch

from torchbp.lightning.data import DigitsDataModule
from torchbp.lightning.privacy import PoissonBatchSampler, Privacy, PrivacyAccountant


def test_poisson_sampler_draws_each_sample_with_the_sample_rate():
    s = PoissonBatchSampler(2000, sample_rate=0.05, seed=3)
    assert len(s) == 20
    sizes = [len(b) for b in s]
    assert len(sizes) == 20
    # 20 batches of Binomial(2000, 0.05): mean 100, sd ~9.7 per batch, ~2.2 for the mean
    assert abs(sum(sizes) / len(sizes) - 100) < 10
    assert len(set(sizes)) > 1  # sizes vary: Poisson, not fixed-size, batches
    for batch in s:
        assert batch == sorted(set(batch)) and all(0 <= i < 2000 for i in batch)


def test_poisson_sampler_is_seeded_by_seed_and_epoch():
    a, b = PoissonBatchSampler(500, 0.1, seed=1), PoissonBatchSampler(500, 0.1, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(PoissonBatchSampler(500, 0.1, seed=2)) != list(a)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0, sample_rate=0.1), "num_samples"),
        (dict(num_samples=10, sample_rate=0.0), "sample_rate"),
        (dict(num_samples=10, sample_rate=1.5), "sample_rate"),
    ],
)
def test_poisson_sampler_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoissonBatchSampler(**kwargs)


def test_datamodule_poisson_sampling_loader():
    dm = DigitsDataModule(batch_size=64, poisson_sampling=True)
    dm.setup()
    n = len(dm.splits["train"])
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    assert loader.batch_sampler.sample_rate == pytest.approx(64 / n)
    x, y = next(iter(loader))
    assert x.shape[0] == y.shape[0] and x.shape[1] == dm.num_features
    # validation and test stay deterministic, fixed-size batches
    assert not isinstance(dm.val_dataloader().batch_sampler, PoissonBatchSampler)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_grad_norm=0.0, noise_multiplier=1.0), "max_grad_norm"),
        (dict(), "exactly one of noise_multiplier and target_epsilon"),
        (dict(noise_multiplier=1.0, target_epsilon=3.0), "exactly one"),
        (dict(noise_multiplier=0.0), "noise_multiplier must be > 0"),
        (dict(target_epsilon=-1.0), "target_epsilon"),
        (dict(noise_multiplier=1.0, delta=0.0), "delta"),
    ],
)
def test_privacy_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Privacy(**kwargs)


def test_accountant_epsilon_grows_with_steps_and_shrinks_with_noise():
    pytest.importorskip("opacus")
    low = PrivacyAccountant(Privacy(noise_multiplier=0.8), sample_rate=0.05, epochs=1)
    high = PrivacyAccountant(Privacy(noise_multiplier=2.0), sample_rate=0.05, epochs=1)
    assert low.epsilon() == 0.0 and low.steps == 0
    eps = []
    for _ in range(3):
        for _ in range(20):
            low.step()
            high.step()
        eps.append(low.epsilon())
    assert low.steps == 60
    assert eps[0] < eps[1] < eps[2] and math.isfinite(eps[2])
    assert high.epsilon() < low.epsilon()


def test_accountant_finds_the_noise_for_a_target_epsilon():
    pytest.importorskip("opacus")
    q, epochs = 0.05, 4
    acc = PrivacyAccountant(Privacy(target_epsilon=2.0, delta=1e-5), q, epochs)
    assert acc.noise_multiplier > 0
    for _ in range(round(epochs / q)):
        acc.step()
    # the accountant's search stops within its tolerance of the target, never far above it
    assert acc.epsilon() == pytest.approx(2.0, rel=0.05)
    assert torch.isfinite(torch.tensor(acc.epsilon()))
