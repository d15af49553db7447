"""Privacy(secure_rng=True): DP-SGD noise and Poisson batches that the run's seed does not
give, and that no checkpoint keeps."""

from __future__ import annotations

import pytest
import torch

from torchbp.lightning.data import DigitsDataModule
from torchbp.lightning.privacy import PoissonBatchSampler, Privacy

pytest.importorskip("opacus")

SECURE = Privacy(noise_multiplier=1.0, secure_rng=True)


def test_secure_rng_must_be_a_bool():
    with pytest.raises(TypeError, match="privacy.secure_rng must be a bool"):
        Privacy(noise_multiplier=1.0, secure_rng=1)


def test_secure_sampler_draws_are_not_the_seeds():
    seeded = PoissonBatchSampler(200, sample_rate=0.1, seed=0)
    assert list(seeded) == list(seeded)
    secure = PoissonBatchSampler(200, sample_rate=0.1, seed=0)
    secure.use_secure_rng()
    assert list(secure) != list(seeded)
    assert list(secure) != list(secure)
    assert len(list(secure)) == len(secure)


def _fit(tmp_path, privacy, ckpt_path=None, save_to=None, **trainer_kwargs):
    """``(model, labels)``: a DP model fitted on digits from seed 0, and the labels of its
    training batches (``save_to``: a checkpoint after the fit)."""
    import pytorch_lightning as pl

    from torchbp.lightning import ERMClassifier

    labels = []

    class RecordBatches(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            labels.append(batch[1].tolist())

    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, poisson_sampling=True, standardize=False)
    model = ERMClassifier(input_size=64, num_classes=10, hidden_sizes=[8], privacy=privacy)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[RecordBatches()],
        **{"max_epochs": 1, "limit_train_batches": 2, **trainer_kwargs},
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model, labels


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_seeded_fits_repeat_and_secure_fits_do_not(tmp_path):
    """With the default generators two fits of one seed draw the same batches and noise
    (whoever knows the seed can compute both); with secure_rng they differ."""
    plain = Privacy(noise_multiplier=1.0)
    (a, batches_a), (b, batches_b) = _fit(tmp_path, plain), _fit(tmp_path, plain)
    assert batches_a == batches_b and torch.equal(_weights(a), _weights(b))
    (c, batches_c), (d, batches_d) = _fit(tmp_path, SECURE), _fit(tmp_path, SECURE)
    assert batches_c != batches_a and batches_c != batches_d
    assert not torch.equal(_weights(c), _weights(a))
    assert not torch.equal(_weights(c), _weights(d))
    assert c.accountant.steps == d.accountant.steps == 2


def test_secure_checkpoint_keeps_no_noise_state_and_a_resume_draws_afresh(tmp_path):
    """A secure fit's checkpoint keeps the accountant and the hyperparameters (loadable
    weights-only) but no generator state; the resumed fit counts the steps before and
    seeds a new noise generator, not the first fit's."""
    from torchbp.lightning import ERMClassifier

    ckpt = tmp_path / "secure.ckpt"
    first, _ = _fit(tmp_path, SECURE, save_to=ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert "privacy_noise_generator" not in saved and "privacy_accountant" in saved
    restored = ERMClassifier.load_from_checkpoint(ckpt, weights_only=True)
    assert restored.privacy == SECURE
    resumed, _ = _fit(tmp_path, SECURE, ckpt_path=ckpt, max_epochs=2)
    assert resumed.accountant.steps == 4
    assert resumed._noise_generator.initial_seed() != first._noise_generator.initial_seed()


def test_secure_rng_refuses_loaders_reloaded_during_the_fit(tmp_path):
    """A reloaded train loader's new sampler would draw from the data seed again."""
    with pytest.raises(ValueError, match="secure_rng.*reload_dataloaders_every_n_epochs=1"):
        _fit(tmp_path, SECURE, reload_dataloaders_every_n_epochs=1)


def test_secure_rng_from_the_yaml_config(tmp_path):
    """model.privacy.secure_rng: true from torchbp-train: kept in config.yaml and in the
    checkpoint's hyperparameters, with no generator state in the checkpoint."""
    import yaml
    from tests.lightning.lightning_helpers import CONFIGS, run_cli

    run_cli(
        "fit",
        "--config",
        str(CONFIGS / "digits_dp.yaml"),
        f"--run_dir={tmp_path}",
        "--model.privacy.secure_rng=true",
        "--model.hidden_sizes=[8]",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
    )
    (config,) = tmp_path.rglob("config.yaml")
    assert yaml.safe_load(config.read_text())["model"]["privacy"]["secure_rng"] is True
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    for ckpt in checkpoints:
        saved = torch.load(ckpt, weights_only=True)
        assert saved["hyper_parameters"]["privacy"]["secure_rng"] is True
        assert "privacy_noise_generator" not in saved


def test_secure_rng_refuses_to_continue_a_seeded_runs_checkpoint(tmp_path):
    """A seeded run's steps drew noise and batches computable from its seed: continuing
    it with secure_rng would end with a run whose randomness is not all secret."""
    ckpt = tmp_path / "seeded.ckpt"
    _fit(tmp_path, Privacy(noise_multiplier=1.0), save_to=ckpt)
    with pytest.raises(ValueError, match="secure_rng: the checkpoint's steps drew"):
        _fit(tmp_path, SECURE, ckpt_path=ckpt, max_epochs=2)
