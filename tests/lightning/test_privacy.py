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


def test_poisson_sampler_resumed_mid_epoch_continues_its_draws():
    # a mid-epoch checkpoint's sampler state: the resumed epoch continues the draws, never
    # repeats the first batches (the accountant takes each step's batch as a fresh draw)
    whole = PoissonBatchSampler(300, 0.1, seed=4)
    whole.set_epoch(2)
    expected = list(whole)
    first = PoissonBatchSampler(300, 0.1, seed=4)
    first.set_epoch(2)
    taken = [b for _, b in zip(range(4), first)]
    state = first.state_dict()
    assert state == {"epoch": 2, "drawn": 4}
    resumed = PoissonBatchSampler(300, 0.1, seed=4)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert taken + list(resumed) == expected
    assert list(resumed) == expected  # the next iteration of that epoch: afresh
    later = PoissonBatchSampler(300, 0.1, seed=4)
    later.load_state_dict(state)
    later.set_epoch(3)  # a state of another epoch skips nothing
    whole.set_epoch(3)
    assert list(later) == list(whole)


@pytest.mark.parametrize("seed", [2**62, 2**64 - 1, -(2**63)])
def test_poisson_sampler_takes_any_64_bit_seed(seed):
    """A seed from secrets.randbits(64) draws batches, different from its neighbour's,
    instead of overflowing torch's seed at the first batch."""
    a, b = PoissonBatchSampler(50, 0.2, seed=seed), PoissonBatchSampler(50, 0.2, seed=seed)
    b.set_epoch(1)
    assert len(list(a)) == 5 and list(a) != list(b)


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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=10.5, sample_rate=0.1), "num_samples must be an int, got 10.5"),
        (dict(num_samples=True, sample_rate=0.1), "num_samples must be an int, got True"),
        (dict(num_samples=10, sample_rate="0.1"), "sample_rate must be a number, got '0.1'"),
        (dict(num_samples=10, sample_rate=True), "sample_rate must be a number, got True"),
        (dict(num_samples=10, sample_rate=0.1, seed=1.5), "seed must be an int, got 1.5"),
    ],
)
def test_poisson_sampler_rejects_wrong_types(kwargs, match):
    """Named when the sampler is made, not by torch.rand at the first batch."""
    with pytest.raises(TypeError, match=match):
        PoissonBatchSampler(**kwargs)


def test_datamodule_poisson_sampling_loader():
    dm = DigitsDataModule(batch_size=64, poisson_sampling=True, standardize=False)
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


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(max_grad_norm=math.inf, noise_multiplier=1.0), ValueError, "max_grad_norm .*finite"),
        (dict(noise_multiplier=math.inf), ValueError, "noise_multiplier .*finite"),
        (dict(target_epsilon=math.inf), ValueError, "target_epsilon .*finite"),
        (dict(max_grad_norm=True, noise_multiplier=1.0), TypeError, "max_grad_norm .*number"),
        (dict(noise_multiplier=True), TypeError, "noise_multiplier .*number, got True"),
        (dict(noise_multiplier="1.1"), TypeError, "noise_multiplier .*number, got '1.1'"),
        (dict(target_epsilon=[3.0]), TypeError, "target_epsilon .*number"),
        (dict(noise_multiplier=1.0, delta="1e-5"), TypeError, "delta .*number"),
    ],
)
def test_privacy_settings_refuse_what_the_training_step_would(kwargs, error, match):
    """Caught when the settings are made, not at the first DP step (per_sample_grads and
    add_noise refuse an infinite or boolean max_norm / noise multiplier), nor by a bare
    comparison error."""
    with pytest.raises(error, match=match):
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


@pytest.mark.parametrize("sample_rate, epochs", [(0.6, 1), (0.064, 20)])
def test_target_epsilon_holds_for_the_batches_the_sampler_draws(sample_rate, epochs):
    """The noise is calibrated for the steps the run takes, epochs x len(sampler): with
    1/q = 1.67 or 15.6 the sampler draws 2 or 16 batches an epoch, not int(epochs / q)."""
    pytest.importorskip("opacus")
    acc = PrivacyAccountant(Privacy(target_epsilon=2.0, delta=1e-5), sample_rate, epochs)
    for _ in range(epochs * len(PoissonBatchSampler(1000, sample_rate))):
        acc.step()
    assert acc.epsilon() <= 2.0


def test_unreachable_target_epsilon_is_named():
    """Opacus' own error ('The privacy budget is too low.') names neither the setting nor
    what to change."""
    pytest.importorskip("opacus")
    with pytest.raises(ValueError, match=r"privacy.target_epsilon=0.001 cannot be reached"):
        PrivacyAccountant(Privacy(target_epsilon=1e-3, delta=1e-5), sample_rate=0.05, epochs=20)


# -- ERMClassifier(privacy=...) ------------------------------------------------------------


def _dp_fit(tmp_path, privacy, num_workers=0, **trainer_kwargs):
    import pytorch_lightning as pl

    from torchbp.lightning import ERMClassifier

    pl.seed_everything(0)
    dm = DigitsDataModule(
        batch_size=64, poisson_sampling=True, standardize=False, num_workers=num_workers
    )
    model = ERMClassifier(
        input_size=64,
        num_classes=10,
        hidden_sizes=[16],
        privacy=privacy,
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    return dm, model, trainer


def test_dp_step_is_the_clipped_sum_plus_noise_over_the_expected_batch(tmp_path):
    """One DP-SGD step with SGD(lr=1) moves each parameter by exactly
    -(Σ_i clip_C(g_i) + noise) / L; with σ tiny the noise is negligible, and the clipped sum
    is formed independently here with torch.func in float64."""
    pytest.importorskip("opacus")
    C = 0.05  # small enough that most samples are clipped
    dm, model, trainer = _dp_fit(
        tmp_path,
        Privacy(max_grad_norm=C, noise_multiplier=1e-9),
        max_steps=1,
        limit_val_batches=0,
    )
    before = {k: v.detach().clone().double() for k, v in model.net.named_parameters()}
    trainer.fit(model, datamodule=dm)
    after = {k: v.detach().double() for k, v in model.net.named_parameters()}

    sampler = dm.train_dataloader().batch_sampler
    first = next(iter(sampler))
    x, y = (t[first] for t in dm.splits["train"].tensors)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)
    ).double()
    params = {k: before[k] for k in before}

    def sample_loss(p, xi, yi):
        logits = torch.func.functional_call(net, p, (xi[None].double(),))
        return torch.nn.functional.cross_entropy(logits, yi[None], reduction="sum")

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    assert (norms > C).sum() > len(first) // 2
    factors = (C / norms).clamp(max=1.0)
    expected_batch = sampler.sample_rate * sampler.num_samples
    for k in before:
        clipped = (factors.view(-1, *[1] * (grads[k].dim() - 1)) * grads[k]).sum(0)
        step = before[k] - after[k]
        torch.testing.assert_close(step, clipped / expected_batch, rtol=1e-5, atol=1e-7)
    assert model.accountant.steps == 1 and model.accountant.epsilon() > 0


def test_dp_fit_logs_epsilon_and_reaches_the_target(tmp_path):
    pytest.importorskip("opacus")
    dm, model, trainer = _dp_fit(
        tmp_path, Privacy(max_grad_norm=1.0, target_epsilon=4.0), max_epochs=2
    )
    trainer.fit(model, datamodule=dm)
    eps = trainer.callback_metrics["train/epsilon"].item()
    assert 0 < eps <= 4.0 * 1.01
    steps_per_epoch = len(dm.train_dataloader().batch_sampler)
    assert model.accountant.steps == 2 * steps_per_epoch


def test_dp_fit_draws_fresh_poisson_batches_each_epoch(tmp_path):
    """DP-SGD's accounting assumes an independent Poisson draw at every step: an epoch
    must not replay the batches of the one before."""
    import pytorch_lightning as pl

    pytest.importorskip("opacus")
    labels: dict[int, list[list[int]]] = {}

    class RecordBatches(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            labels.setdefault(trainer.current_epoch, []).append(batch[1].tolist())

    dm, model, trainer = _dp_fit(
        tmp_path,
        Privacy(noise_multiplier=1.0),
        max_epochs=2,
        limit_val_batches=0,
        callbacks=[RecordBatches()],
    )
    trainer.fit(model, datamodule=dm)
    assert len(labels[0]) == len(labels[1]) > 0
    assert labels[0] != labels[1]


def _batch_recorder():
    """A callback whose ``labels`` are each training batch's labels, by epoch."""
    import pytorch_lightning as pl

    class RecordBatches(pl.Callback):
        def __init__(self):
            self.labels: dict[int, list[list[int]]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.labels.setdefault(trainer.current_epoch, []).append(batch[1].tolist())

    return RecordBatches()


def _batches_of_a_resumed_dp_fit(tmp_path, max_epochs, save_at_step, num_workers=0):
    """``(whole, resumed)``: each training batch's labels by epoch, of a DP fit that saved a
    checkpoint after global step ``save_at_step`` (a callable of the trainer), and of a fit
    resumed from that checkpoint (both loading with ``num_workers`` workers)."""
    import pytorch_lightning as pl

    pytest.importorskip("opacus")
    privacy = Privacy(noise_multiplier=1.0)
    ckpt = tmp_path / "resume.ckpt"

    class SaveAtStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == save_at_step(trainer):
                trainer.save_checkpoint(ckpt)

    runs = []
    for callbacks, ckpt_path in (([SaveAtStep()], None), ([], ckpt)):
        recorder = _batch_recorder()
        dm, model, trainer = _dp_fit(
            tmp_path,
            privacy,
            num_workers,
            max_epochs=max_epochs,
            limit_val_batches=0,
            callbacks=[recorder, *callbacks],
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        runs.append(recorder.labels)
    return runs


def test_dp_fit_resumed_from_an_epochs_last_batch_draws_the_next_epochs_batches(tmp_path):
    """A checkpoint saved at the end of an epoch's last batch (ModelCheckpoint's
    every_n_train_steps, or a save in on_train_batch_end) resumes with Lightning's fit loop
    restarting: it skips on_train_epoch_start, where the model set the sampler's epoch, so
    the resumed epoch 1 replayed epoch 0's Poisson draws batch for batch. Reused draws are
    outside the accountant's bound (every step a fresh draw). Lightning itself now sets the
    epoch (through loader.batch_sampler.sampler), and the resumed epoch draws the batches of
    the uninterrupted run's epoch 1."""
    whole, resumed = _batches_of_a_resumed_dp_fit(
        tmp_path, 2, lambda trainer: trainer.num_training_batches
    )
    assert list(resumed) == [1]
    assert resumed[1] == whole[1] != whole[0]


def test_dp_fit_resumed_mid_epoch_continues_the_epochs_poisson_draws(tmp_path):
    """A checkpoint saved after an epoch's 3rd batch (a SLURM requeue, every_n_train_steps)
    resumes that epoch: its batches were drawn from the epoch's seed again from the first,
    so the resumed steps trained on batches 1, 2, 3 once more, which the accountant counts
    as fresh draws. The sampler's state in the checkpoint continues the draws: every
    resumed batch is one the uninterrupted run drew later in that epoch, none repeated."""
    whole, resumed = _batches_of_a_resumed_dp_fit(tmp_path, 1, lambda trainer: 3)
    first, rest = whole[0][:3], whole[0][3:]
    assert resumed[0], "the resumed epoch trained no batch"
    assert not any(batch in first for batch in resumed[0])
    # the continued draws (a DataLoader fetching ahead at the save drops one more, never
    # repeats one)
    assert resumed[0] == rest[len(rest) - len(resumed[0]) :]


def test_dp_fit_with_workers_resumed_mid_epoch_trains_the_uninterrupted_fits_draws(tmp_path):
    """With workers the Poisson sampler draws batches ahead of the steps, and its state in
    a checkpoint counts them: the resumed epoch skipped the batches drawn ahead, never
    trained nor released, and trained other batches than the uninterrupted fit. The skip
    is now cut to the batches the fit had fetched: the resumed fit draws the rest of the
    uninterrupted fit's epoch."""
    whole, resumed = _batches_of_a_resumed_dp_fit(tmp_path, 1, lambda trainer: 3, num_workers=2)
    assert resumed[0] == whole[0][3:]


def test_dp_fit_stopped_after_a_steps_noise_never_draws_that_batch_again(tmp_path):
    """A checkpoint saved on an exception inside step 4, after its noise was added and
    counted by the accountant (an error in on_after_backward, a Ctrl-C there): Lightning's
    loop trains batch 4 again, but its Poisson draw is spent, so the resumed fit skips it
    (a non-private fit trains it again, as the uninterrupted one did) and draws the rest
    of the epoch: a redrawn batch would be outside the accountant's bound."""
    import pytorch_lightning as pl

    pytest.importorskip("opacus")
    ckpt = tmp_path / "stopped.ckpt"

    class StopAfterTheNoise(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 3:
                raise RuntimeError("stopped after the noise")

        def on_exception(self, trainer, pl_module, exception):
            trainer.save_checkpoint(ckpt)

    runs = []
    for callbacks, ckpt_path in (([], None), ([StopAfterTheNoise()], None), ([], ckpt)):
        recorder = _batch_recorder()
        dm, model, trainer = _dp_fit(
            tmp_path,
            Privacy(noise_multiplier=1.0),
            max_epochs=1,
            limit_val_batches=0,
            callbacks=[recorder, *callbacks],
        )
        try:
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        except RuntimeError as stopped:
            assert "stopped after the noise" in str(stopped)
        runs.append((recorder.labels[0], model.accountant.steps))
    (whole, _), (stopped, counted), (resumed, _) = runs
    assert stopped == whole[:4] and counted == 4
    assert resumed == whole[4:]


def test_dp_fit_resumed_twice_after_a_stopped_step_never_draws_a_batch_again(tmp_path):
    """Stopped inside step 4 after its noise (its draw skipped on resume), resumed, saved
    after step 5 and resumed again: the skip of the second resume was Lightning's batch
    counter, which restarted at the 3 batches trained, one behind the draws, so the
    second resumed fit drew and trained the first resume's last batch once more (a
    reused draw, outside the accountant's bound). The steps now count their draws, kept
    in checkpoints: the three fits train the uninterrupted fit's draws, each once."""
    import pytorch_lightning as pl

    pytest.importorskip("opacus")
    first, second = tmp_path / "first.ckpt", tmp_path / "second.ckpt"

    class StopAfterTheNoise(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 3:
                raise RuntimeError("stopped")

        def on_exception(self, trainer, pl_module, exception):
            trainer.save_checkpoint(first)

    class SaveAndStop(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                trainer.save_checkpoint(second)
                raise RuntimeError("stopped")

    runs = []
    for callback, ckpt_path in (
        (None, None),
        (StopAfterTheNoise(), None),
        (SaveAndStop(), first),
        (None, second),
    ):
        recorder = _batch_recorder()
        dm, model, trainer = _dp_fit(
            tmp_path,
            Privacy(noise_multiplier=1.0),
            max_epochs=1,
            limit_val_batches=0,
            callbacks=[recorder, *filter(None, [callback])],
        )
        try:
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        except RuntimeError as stopped:
            assert "stopped" in str(stopped)
        runs.append(recorder.labels[0])
    whole, *parts = runs
    assert [len(part) for part in parts[:2]] == [4, 2]
    assert [batch for part in parts for batch in part] == whole


def test_dp_fit_that_fails_mid_step_leaves_no_context_open(tmp_path):
    """After a DP fit stopped between the forward and on_after_backward, other torchbp
    training in the process must work (it failed with 'not a torchbp.nn.Linear of the
    model given to per_sample_grads')."""
    import pytorch_lightning as pl

    import torchbp
    from torchbp.autograd.linear import per_sample_recording

    pytest.importorskip("opacus")

    class FailBeforeBackward(pl.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            raise RuntimeError("stopped mid-step")

    dm, model, trainer = _dp_fit(
        tmp_path, Privacy(noise_multiplier=1.0), max_steps=1, callbacks=[FailBeforeBackward()]
    )
    with pytest.raises(RuntimeError, match="stopped mid-step"):
        trainer.fit(model, datamodule=dm)
    other = torchbp.nn.Linear(3, 2)
    try:
        other(torch.randn(4, 3)).sum().backward()
    finally:
        per_sample_recording.recorder = None  # whatever the outcome, for the next tests
    assert other.weight.grad is not None


def test_dp_accountant_survives_a_checkpoint(tmp_path):
    pytest.importorskip("opacus")
    dm, model, trainer = _dp_fit(
        tmp_path, Privacy(max_grad_norm=1.0, noise_multiplier=1.0), max_epochs=1
    )
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    steps = model.accountant.steps
    dm2, model2, trainer2 = _dp_fit(
        tmp_path, Privacy(max_grad_norm=1.0, noise_multiplier=1.0), max_epochs=2
    )
    trainer2.fit(model2, datamodule=dm2, ckpt_path=ckpt)
    assert model2.accountant.steps == 2 * steps
    # the hyperparameters keep the settings as plain data: a weights-only load works
    from torchbp.lightning import ERMClassifier

    restored = ERMClassifier.load_from_checkpoint(ckpt, weights_only=True)
    assert restored.privacy == Privacy(max_grad_norm=1.0, noise_multiplier=1.0)


@pytest.mark.parametrize("delta", [1 / 8, 1 / 10])
def test_delta_at_or_above_one_over_n_is_refused(delta):
    """δ ≥ 1/N is met by a mechanism that publishes one sample outright: no guarantee."""
    with pytest.raises(ValueError, match=r"privacy.delta=0.1.*\(N=10 training samples"):
        Privacy(noise_multiplier=1.0, delta=delta).check_delta(10)
    Privacy(noise_multiplier=1.0, delta=1 / 11).check_delta(10)


def test_dp_fit_refuses_delta_not_below_one_over_n(tmp_path):
    pytest.importorskip("opacus")
    dm, model, trainer = _dp_fit(tmp_path, Privacy(noise_multiplier=1.0, delta=0.01), max_steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"privacy.delta=0.01 .*N=\d+ training samples"):
        trainer.fit(model, datamodule=dm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dp_fit_refuses_features_standardised_on_the_training_rows(tmp_path):
    """The training rows' mean and std scale every row: one row moves all of them, a change
    no clipping bounds, so ε would not cover the data the model trains on. The digits_dp
    config trained on standardised digits and reported ε = 3 for it; now refused."""
    dm, model, trainer = _dp_fit(tmp_path, Privacy(noise_multiplier=1.0), max_steps=1)
    dm.standardize = True
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"data.standardize .* set data.standardize: false"):
        trainer.fit(model, datamodule=dm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _fit_then_resume(tmp_path, privacy, epochs, more_epochs, then=None):
    """A fit of ``epochs`` epochs, checkpointed, and the parts of a resumed fit up to
    ``more_epochs`` (with the settings ``then``, by default the same)."""
    dm, model, trainer = _dp_fit(tmp_path, privacy, max_epochs=epochs, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "first.ckpt"
    trainer.save_checkpoint(ckpt)
    dm2, model2, trainer2 = _dp_fit(
        tmp_path, then or privacy, max_epochs=more_epochs, limit_val_batches=0
    )
    return model, (dm2, model2, trainer2, ckpt)


def test_resumed_target_epsilon_run_counts_the_epsilon_already_spent(tmp_path):
    """A run resumed with more epochs calibrates the noise of the steps left so that the
    whole run, the checkpoint's steps included, meets target_epsilon (before, the noise was
    calibrated for a fresh run of max_epochs, and ε ended far above the target)."""
    pytest.importorskip("opacus")
    privacy = Privacy(max_grad_norm=1.0, target_epsilon=2.0)
    first, (dm, model, trainer, ckpt) = _fit_then_resume(tmp_path, privacy, 1, 2)
    assert first.accountant.epsilon() == pytest.approx(2.0, rel=0.02)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    acc = model.accountant
    assert acc.steps == 2 * first.accountant.steps
    assert 0 < acc.epsilon() <= 2.0
    # the history keeps each part's own noise: the checkpoint's, then the larger one
    (sigma1, _, n1), (sigma2, _, n2) = acc.state_dict()["history"]
    assert (sigma1, n1) == (first.accountant.noise_multiplier, first.accountant.steps)
    assert sigma2 == acc.noise_multiplier > sigma1 and n2 == n1


def test_resumed_run_whose_budget_is_spent_is_refused(tmp_path):
    """Nothing is left of target_epsilon after the checkpoint: no noise makes more steps
    meet it, and the fit says so before any step."""
    pytest.importorskip("opacus")
    _, (dm, model, trainer, ckpt) = _fit_then_resume(
        tmp_path, Privacy(target_epsilon=2.0), 1, 2, then=Privacy(target_epsilon=1.0)
    )
    with pytest.raises(ValueError, match=r"privacy.target_epsilon=1.0 .*already spent"):
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    assert model.accountant is None  # not a fresh run's, with the checkpoint's steps lost


def test_checkpoint_of_a_loaded_model_keeps_the_epsilon_spent(tmp_path):
    """A DP model loaded from a checkpoint and saved again before any training (after a
    validation, say) keeps the steps of its accountant: they were dropped, and a run
    resumed from the new checkpoint counted ε from 0."""
    import pytorch_lightning as pl

    from torchbp.lightning import ERMClassifier

    pytest.importorskip("opacus")
    first, (dm, _, _, ckpt) = _fit_then_resume(tmp_path, Privacy(noise_multiplier=1.0), 1, 2)
    loaded = ERMClassifier.load_from_checkpoint(ckpt, weights_only=True)
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    trainer.validate(loaded, datamodule=dm, verbose=False)
    again = tmp_path / "again.ckpt"
    trainer.save_checkpoint(again)
    saved = torch.load(again, weights_only=True)["privacy_accountant"]
    assert saved == first.accountant.state_dict()


def test_second_fit_of_a_model_counts_the_epsilon_of_the_first(tmp_path):
    """Fitting the same model again (a new Trainer, no checkpoint) trains weights that
    already spent ε: the accountant counts on, and the second fit's noise keeps the total
    within target_epsilon (before, each fit started from ε = 0 and logged only its own)."""
    import pytorch_lightning as pl

    pytest.importorskip("opacus")

    def fit_again(model, dm):  # a new Trainer, as a user would make
        pl.Trainer(
            default_root_dir=tmp_path,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            limit_val_batches=0,
        ).fit(model, datamodule=dm)

    dm, model, trainer = _dp_fit(tmp_path, Privacy(noise_multiplier=1.0), max_epochs=1)
    trainer.fit(model, datamodule=dm)
    first_steps, first_epsilon = model.accountant.steps, model.accountant.epsilon()
    fit_again(model, dm)
    assert model.accountant.steps == 2 * first_steps
    assert model.accountant.epsilon() > first_epsilon

    dm, model, trainer = _dp_fit(tmp_path, Privacy(target_epsilon=2.0), max_epochs=1)
    trainer.fit(model, datamodule=dm)
    fit_again(model, dm)
    assert model.accountant.steps == 2 * first_steps
    assert model.accountant.epsilon() <= 2.0


def test_dp_needs_poisson_sampling(tmp_path):
    pytest.importorskip("opacus")
    dm, model, trainer = _dp_fit(tmp_path, Privacy(noise_multiplier=1.0), max_steps=1)
    dm.poisson_sampling = False
    with pytest.raises(ValueError, match="poisson_sampling"):
        trainer.fit(model, datamodule=dm)


@pytest.mark.parametrize(
    "kwargs", [dict(backend="torch"), dict(fused_head=True)], ids=["torch", "fused"]
)
def test_dp_refuses_what_per_sample_clipping_cannot_serve(kwargs):
    from torchbp.lightning import ERMClassifier

    with pytest.raises(ValueError, match="privacy"):
        ERMClassifier(privacy=Privacy(noise_multiplier=1.0), **kwargs)


def test_dp_empty_poisson_draw_takes_a_noise_only_step():
    """DP-SGD releases a noisy update at every step: an empty draw's update is the noise
    alone, N(0, σ²C²) / L, not a skipped step (which would tell that the draw was empty)."""
    pytest.importorskip("opacus")
    from torchbp.lightning import ERMClassifier

    torch.manual_seed(0)
    privacy = Privacy(max_grad_norm=2.0, noise_multiplier=1.5)
    model = ERMClassifier(input_size=64, num_classes=10, hidden_sizes=[256], privacy=privacy)
    model.accountant = PrivacyAccountant(model.privacy, sample_rate=0.05, epochs=1)
    model._expected_batch = 10.0
    empty = (torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))
    loss = model._private_training_step(empty)
    model.backward(loss)
    assert model.accountant.steps == 1
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads.numel() == sum(p.numel() for p in model.parameters())
    std = 1.5 * 2.0 / 10.0
    assert abs(grads.std().item() / std - 1) < 0.02
    assert abs(grads.mean().item()) < 0.02 * std


def test_dp_train_loss_is_the_weighted_mean_like_without_privacy():
    """With class weights train/loss is Σ w_yi ℓ_i / Σ w_yi (the loss being minimised), in
    a DP step too; it was Σ w_yi ℓ_i / B there."""
    from torchbp.lightning import ERMClassifier

    torch.manual_seed(0)
    weights = [0.2, 1.0, 3.0]
    model = ERMClassifier(
        input_size=4,
        num_classes=3,
        hidden_sizes=[8],
        class_weight=weights,
        privacy=Privacy(noise_multiplier=1.0),
    )
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 2, 2])
    loss_sum = model._private_training_step((x, y))
    loss_sum.backward()
    model._close_per_sample()
    with torch.no_grad():
        expected = model.loss(model(x), y)
    torch.testing.assert_close(model.train_loss.compute(), expected)


@pytest.mark.parametrize(
    "limits", [{"limit_train_batches": 0.25}, {"max_steps": 6}, {"limit_train_batches": 3}]
)
def test_target_epsilon_is_met_for_the_steps_the_trainer_takes(tmp_path, limits):
    """With limit_train_batches or max_steps the trainer takes fewer steps than max_epochs x
    the sampler's batches: the noise was calibrated for all of those anyway, so the run ended
    far below its target_epsilon (1.4 for a target of 3 with limit_train_batches=0.25 on
    digits_dp), with needless noise. It is now calibrated for the steps taken."""
    pytest.importorskip("opacus")
    dm, model, trainer = _dp_fit(
        tmp_path, Privacy(max_grad_norm=1.0, target_epsilon=2.0), max_epochs=2, **limits
    )
    trainer.fit(model, datamodule=dm)
    assert (
        model.accountant.steps == trainer.global_step < 2 * len(dm.train_dataloader().batch_sampler)
    )
    assert model.accountant.epsilon() == pytest.approx(2.0, rel=0.02)
    assert model.accountant.epsilon() <= 2.0


def test_dp_fit_of_a_compiled_model_is_refused_before_any_step(tmp_path):
    """Lightning's fit of torch.compile(model) compiles the forward, which per_sample_grads
    cannot see into: the first backward failed deep inside with per_sample_grads' error about
    an op other than the recorded Linear call. It is refused, naming torch.compile, before
    any step."""
    pytest.importorskip("opacus")
    dm, model, trainer = _dp_fit(tmp_path, Privacy(noise_multiplier=1.0), max_steps=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"privacy \(DP-SGD\).*torch\.compile"):
        trainer.fit(torch.compile(model), datamodule=dm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_resumed_dp_fit_draws_fresh_noise_and_ends_as_the_uninterrupted_fit(tmp_path):
    """A DP fit resumed from a checkpoint (after seed_everything, as torchbp-train runs it)
    drew its noise from the global RNG, re-seeded to where the first run had started: every
    resumed step repeated the noise of the first run's step of the same index. Noise reused
    across steps is outside the accountant's bound (the difference of two such updates has
    no noise left). The noise stream now continues from the checkpoint, and the resumed fit
    ends with the weights of an uninterrupted one."""
    pytest.importorskip("opacus")
    privacy = Privacy(max_grad_norm=1.0, noise_multiplier=1.0)
    dm, full, trainer = _dp_fit(tmp_path, privacy, max_epochs=2, limit_val_batches=0)
    trainer.fit(full, datamodule=dm)
    dm, first, trainer = _dp_fit(tmp_path, privacy, max_epochs=1, limit_val_batches=0)
    trainer.fit(first, datamodule=dm)
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    dm, resumed, trainer = _dp_fit(tmp_path, privacy, max_epochs=2, limit_val_batches=0)
    trainer.fit(resumed, datamodule=dm, ckpt_path=ckpt)
    assert resumed.accountant.steps == full.accountant.steps
    for name, p in full.named_parameters():
        torch.testing.assert_close(dict(resumed.named_parameters())[name], p, rtol=0, atol=0)


def test_fit_of_a_trained_model_from_a_checkpoint_continues_the_checkpoints_noise(tmp_path):
    """A model fitted on past a checkpoint and then fitted again from that checkpoint
    (trainer.fit(model, ckpt_path=...)) restores the checkpoint's steps, weights and noise
    stream alike: it ends as a fresh model resumed from the checkpoint does, not with the
    noise its own later steps had advanced to."""
    pytest.importorskip("opacus")
    privacy = Privacy(max_grad_norm=1.0, noise_multiplier=1.0)
    dm, model, trainer = _dp_fit(tmp_path, privacy, max_epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    dm, fresh, trainer = _dp_fit(tmp_path, privacy, max_epochs=2, limit_val_batches=0)
    trainer.fit(fresh, datamodule=dm, ckpt_path=ckpt)
    _, _, trainer = _dp_fit(tmp_path, privacy, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)  # on past the checkpoint: epoch 2
    _, _, trainer = _dp_fit(tmp_path, privacy, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)  # from the checkpoint again
    assert model.accountant.steps == fresh.accountant.steps
    for name, p in fresh.named_parameters():
        torch.testing.assert_close(dict(model.named_parameters())[name], p, rtol=0, atol=0)


class _StateOnAccelerator:
    """The saved noise state as ``load_from_checkpoint(..., map_location="cuda")`` gives it:
    a tensor on the GPU, which ``Generator.set_state`` refuses ("RNG state must be a
    torch.ByteTensor", a TypeError) on any device; ``.cpu()`` gives the saved state back."""

    def __init__(self, state: torch.Tensor) -> None:
        self._state = state

    def cpu(self) -> torch.Tensor:
        return self._state


def test_a_noise_state_loaded_onto_an_accelerator_continues_the_checkpoints_noise(tmp_path):
    """A checkpoint loaded with map_location="cuda" (load_from_checkpoint's way to put a
    model on the GPU) has its noise state on the GPU too: the fit then failed at its start
    with set_state's TypeError. The state is brought to the CPU as it is loaded, and the fit
    continues the checkpoint's noise as from a CPU load."""
    pytest.importorskip("opacus")
    privacy = Privacy(max_grad_norm=1.0, noise_multiplier=1.0)
    dm, model, trainer = _dp_fit(tmp_path, privacy, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=False)
    ends = []
    for state in (checkpoint["privacy_noise_generator"], None):
        dm, restored, trainer = _dp_fit(tmp_path, privacy, max_steps=3, limit_val_batches=0)
        loaded = dict(checkpoint)
        if state is None:  # as map_location="cuda" leaves it
            loaded["privacy_noise_generator"] = _StateOnAccelerator(
                checkpoint["privacy_noise_generator"]
            )
        restored.load_state_dict(checkpoint["state_dict"])
        restored.on_load_checkpoint(loaded)
        trainer.fit(restored, datamodule=dm)
        ends.append(restored.net[0].weight.detach().clone())
    torch.testing.assert_close(ends[1], ends[0], rtol=0, atol=0)


def test_a_fit_without_privacy_from_a_dp_checkpoint_is_refused_before_any_step(tmp_path):
    """trainer.fit(ERMClassifier(privacy=None), ckpt_path=<a DP-SGD checkpoint>) (torchbp-train
    refuses it) trained on without noise, and its checkpoints kept the DP steps' accountant:
    a DP fit resumed from one counted ε over the DP steps only, for weights that had trained
    without noise in between. It is refused before any step, the weights untouched."""
    pytest.importorskip("opacus")
    from torchbp.lightning import ERMClassifier

    dm, model, trainer = _dp_fit(tmp_path, Privacy(noise_multiplier=1.0), max_steps=2)
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "dp.ckpt"
    trainer.save_checkpoint(ckpt)
    dm, _, trainer = _dp_fit(tmp_path, Privacy(noise_multiplier=1.0), max_steps=4)
    plain = ERMClassifier(
        input_size=64,
        num_classes=10,
        hidden_sizes=[16],
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
    )
    with pytest.raises(ValueError, match=r"trained with DP-SGD.*privacy=None"):
        trainer.fit(plain, datamodule=dm, ckpt_path=ckpt)
    assert trainer.global_step == 2  # restored, not a step further
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(plain.named_parameters())[name], p, rtol=0, atol=0)


def test_a_fresh_fits_noise_is_not_the_stream_the_rest_of_the_run_draws_from(tmp_path):
    """The noise generator of a fresh fit was a copy of the default generator: its draws were
    the very numbers that everything else of the run then drew from the default one (dropout
    of a subclass's network, a dataset's random augmentation, the DataLoader's seeds), so the
    noise was a function of them, not the independent draw the Gaussian mechanism assumes.
    It is now seeded from a draw of the default generator: its own stream, still
    reproducible from seed_everything."""
    pytest.importorskip("opacus")
    from torchbp.lightning import ERMClassifier

    class Probe(ERMClassifier):
        def on_train_start(self):
            super().on_train_start()
            self.noise_draw = torch.randn(64, generator=self._noise_generator)
            self.other_draw = torch.randn(64)  # what the rest of the run draws next

    privacy = Privacy(noise_multiplier=1.0)
    draws = []
    for _ in range(2):
        dm, model, trainer = _dp_fit(tmp_path, privacy, max_steps=1, limit_val_batches=0)
        probe = Probe(**model.hparams)
        trainer.fit(probe, datamodule=dm)
        # none of the next draws of the default generator is a noise draw
        assert not set(probe.noise_draw.tolist()) & set(probe.other_draw.tolist())
        draws.append(probe.noise_draw)
    torch.testing.assert_close(draws[1], draws[0], rtol=0, atol=0)  # seed_everything's


def test_a_fresh_fits_noise_depends_on_the_seed_not_on_what_the_run_drew_before(tmp_path):
    """The noise generator was seeded from a draw of the default generator at the fit's
    start: a number drawn before by unrelated code (as a subclass's extra layer or a
    DataLoader made earlier would) changed every noise draw of a run of the same seed. It
    is now a fixed function of the seed."""
    pytest.importorskip("opacus")
    import pytorch_lightning as pl

    from torchbp.lightning import ERMClassifier

    class Probe(ERMClassifier):
        def on_train_start(self):
            super().on_train_start()
            self.noise_draw = torch.randn(64, generator=self._noise_generator)

    def noise_of_a_fit(seed: int, drawn_before: int) -> torch.Tensor:
        dm, model, trainer = _dp_fit(tmp_path, Privacy(noise_multiplier=1.0), max_steps=1)
        pl.seed_everything(seed)
        probe = Probe(**model.hparams)
        torch.rand(drawn_before)  # unrelated code
        trainer.fit(probe, datamodule=dm)
        return probe.noise_draw

    first = noise_of_a_fit(0, 0)
    torch.testing.assert_close(noise_of_a_fit(0, 1), first, rtol=0, atol=0)
    assert not torch.equal(noise_of_a_fit(1, 0), first)  # another seed, other noise


def test_a_checkpoint_saved_after_loading_one_keeps_its_steps_and_its_noise_together(tmp_path):
    """A fitted model that loads an earlier checkpoint (trainer.validate(model,
    ckpt_path=...)) and is saved again kept the loaded checkpoint's accountant (its steps) but
    the noise state of its own later steps: the pair belonged to no single point of the run,
    and a fit resumed from it did not continue the loaded checkpoint's noise as a fit of the
    model itself does. Both now come from the loaded checkpoint."""
    pytest.importorskip("opacus")
    privacy = Privacy(max_grad_norm=1.0, noise_multiplier=1.0)
    dm, model, trainer = _dp_fit(tmp_path, privacy, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    early = tmp_path / "early.ckpt"
    trainer.save_checkpoint(early)
    _, _, trainer = _dp_fit(tmp_path, privacy, max_steps=4, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)  # on past it
    _, _, trainer = _dp_fit(tmp_path, privacy, limit_val_batches=1)
    trainer.validate(model, datamodule=dm, ckpt_path=early)
    again = tmp_path / "again.ckpt"
    trainer.save_checkpoint(again)
    saved, loaded = torch.load(again, weights_only=False), torch.load(early, weights_only=False)
    assert saved["privacy_accountant"] == loaded["privacy_accountant"]
    assert torch.equal(saved["privacy_noise_generator"], loaded["privacy_noise_generator"])


def test_a_checkpoint_without_noise_state_loaded_into_a_fitted_model_saves_none(tmp_path):
    """A checkpoint saved before the noise state was kept (its accountant, no noise state)
    loaded into a fitted model and saved again got the loaded steps beside the noise state of
    the model's own later fit, a pair of no point of either run, which a fit resumed from it
    then continued. The noise state follows the accountant here too: none is saved (and a
    fit resumed from it draws from a fresh stream, as from the loaded checkpoint)."""
    pytest.importorskip("opacus")
    privacy = Privacy(max_grad_norm=1.0, noise_multiplier=1.0)
    dm, model, trainer = _dp_fit(tmp_path, privacy, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    early = tmp_path / "early.ckpt"
    trainer.save_checkpoint(early)
    old = torch.load(early, weights_only=False)
    del old["privacy_noise_generator"]  # as saved before the noise state was kept
    torch.save(old, early)
    _, _, trainer = _dp_fit(tmp_path, privacy, max_steps=4, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)  # on past it
    _, _, trainer = _dp_fit(tmp_path, privacy, limit_val_batches=1)
    trainer.validate(model, datamodule=dm, ckpt_path=early)
    again = tmp_path / "again.ckpt"
    trainer.save_checkpoint(again)
    saved = torch.load(again, weights_only=False)
    assert saved["privacy_accountant"] == old["privacy_accountant"]
    assert "privacy_noise_generator" not in saved
