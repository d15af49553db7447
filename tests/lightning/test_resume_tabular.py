"""A fit of torchbp's in-memory DataModules resumed within an epoch continues that epoch's
batches: it trains exactly what the uninterrupted fit trains from there on."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from tests.lightning.lightning_helpers import RecordBatches, run_cli
from torch.utils.data import DataLoader, TensorDataset

from torchbp.lightning.console import quiet_lightning
from torchbp.lightning.data import SklearnToyDataModule, SyntheticDataModule
from torchbp.lightning.samplers import EpochSeededSampler


def _about_resuming(message: str) -> bool:
    """Whether a warning is Lightning's or torchbp's about a loader that restarts the epoch."""
    return "dataloader is not resumable" in message or "cannot continue the epoch" in message


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_continued_epoch_yields_what_the_uninterrupted_epoch_still_had_to(world, shuffle):
    """Each rank skips the samples of the batches it trained (``order[rank::W]``, the
    epoch's last ``n % W`` samples dropped), in the epoch's own order."""
    data, batch, trained = range(23), 2, 3
    for rank in range(world):
        whole = EpochSeededSampler(data, world, rank, shuffle, seed=5, drop_last=True)
        whole.set_epoch(4)
        resumed = EpochSeededSampler(data, world, rank, shuffle, seed=5, drop_last=True)
        resumed.continue_epoch(4, trained * batch)
        resumed.set_epoch(4)  # Lightning sets the resumed epoch after on_train_start
        assert list(resumed) == list(whole)[trained * batch :]
        assert len(resumed) == len(whole)  # the epoch's, as Lightning counts its batches


def test_the_next_epoch_of_a_continued_one_starts_from_its_first_sample():
    sampler, whole = EpochSeededSampler(range(10), seed=1), EpochSeededSampler(range(10), seed=1)
    sampler.continue_epoch(2, 6)
    sampler.set_epoch(3)
    whole.set_epoch(3)
    assert list(sampler) == list(whole)


@pytest.mark.parametrize("start", [-1, 11])
def test_continue_epoch_refuses_a_start_outside_the_epoch(start):
    with pytest.raises(ValueError, match=r"start must be in \[0, 10\]"):
        EpochSeededSampler(range(10)).continue_epoch(0, start)


#: iris: 7 training batches (of 16 rows) an epoch
COMMON = [
    "--config=iris",
    "--model.hidden_sizes=[4]",
    "--trainer.max_epochs=3",
    "--trainer.callbacks+=tests.lightning.lightning_helpers.RecordBatches",
]
STOPS = {
    # last.ckpt of the validation within epoch 1 at which max_steps stops the fit
    "max_steps": ["--trainer.max_steps=9", "--trainer.val_check_interval=1"],
    # no validation within the epoch: last.ckpt of the step at which max_steps stops the fit
    "max_steps_mid_epoch": ["--trainer.max_steps=9"],
    # ... and keeping the latest checkpoints, which Lightning saves at the cut epoch's end
    "max_steps_keeping_latest": ["--trainer.max_steps=9", "--checkpoint.monitor=step"],
    "every_n_train_steps": ["--trainer.max_steps=9", "--checkpoint.every_n_train_steps=3"],
    # Ctrl-C after step 9: last.ckpt of the interrupt
    "interrupt": [
        "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAt",
        "--trainer.callbacks.step=9",
    ],
    # Ctrl-C inside step 10, before its backward: the checkpoint of the interrupt has 9
    # steps, and batch 10 fetched but not trained
    "interrupt_in_a_step": [
        "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptInStep",
        "--trainer.callbacks.step=9",
    ],
}


def _batches(cli) -> list:
    (record,) = [c for c in cli.trainer.callbacks if isinstance(c, RecordBatches)]
    return record.batches


@pytest.mark.parametrize("poisson", [False, True], ids=["shuffled", "poisson"])
@pytest.mark.parametrize("stop", list(STOPS))
def test_fit_resumed_within_an_epoch_trains_what_the_uninterrupted_fit_does(
    tmp_path, stop, poisson
):
    """Resumed from a checkpoint of epoch 1's second step (step 9), a fit started the
    epoch's order over: it trained epoch 1's first batches twice and its last never, and
    Lightning warned that the dataloader is not resumable. It now trains the batches and
    ends with the weights of the uninterrupted fit, without that warning."""
    common = [*COMMON, f"--run_dir={tmp_path}", f"--data.init_args.poisson_sampling={poisson}"]
    try:
        run_cli("fit", *common, "--run_name=resumed", *STOPS[stop])
    except SystemExit as interrupted:  # the run Ctrl-C stopped
        assert stop.startswith("interrupt") and interrupted.code != 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run_cli("fit", *common, "--run_name=resumed", "--ckpt_path=last")
    whole = run_cli("fit", *common, "--run_name=whole")
    steps = len(_batches(whole)) - len(_batches(resumed))
    epoch, batch_idx, _ = _batches(resumed)[0]
    assert steps == 9 and epoch == 1 and batch_idx > 0
    assert _batches(resumed) == _batches(whole)[steps:]
    resumed_weights, whole_weights = resumed.model.state_dict(), whole.model.state_dict()
    for name, value in whole_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0, msg=name)
    assert not [str(w.message) for w in caught if _about_resuming(str(w.message))]


@pytest.mark.parametrize(
    ("size", "what"), [(8, "trained are trained again"), (32, "not yet trained are skipped")]
)
def test_a_fit_resumed_within_an_epoch_with_another_batch_size_warns(tmp_path, size, what):
    """Resumed within epoch 1 after 2 batches of 16 rows with data.batch_size 8 or 32, the
    fit continued the epoch after 2 batches of the new size, silently skipping rows the
    checkpoint's run had not trained in it (or training rows again). A warning says so."""
    common = [*COMMON, f"--run_dir={tmp_path}"]
    run_cli("fit", *common, *STOPS["max_steps_mid_epoch"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli("fit", *common, "--ckpt_path=last", f"--data.init_args.batch_size={size}")
    messages = [str(w.message) for w in caught if "fit resumed" in str(w.message)]
    assert len(messages) == 1, messages
    assert "after 2 batches of 16 rows (the checkpoint's data.batch_size)" in messages[0]
    assert f"after 2 batches of {size}: " in messages[0] and what in messages[0]


def _fit_iris_loader(tmp_path, loader, ckpt_path=None, first_steps=4):
    """Fit on ``loader`` (3 epochs, a checkpoint every 3 steps; without ``ckpt_path``,
    ``first_steps`` steps) and return the trainer."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from torchbp.lightning.module import ERMClassifier

    pl.seed_everything(0)
    model = ERMClassifier(input_size=4, num_classes=3, hidden_sizes=[4])
    every_3 = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=3,
        max_steps=-1 if ckpt_path else first_steps,
        callbacks=[every_3],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def test_a_loader_that_cannot_continue_the_epoch_is_named_in_a_warning(tmp_path):
    """quiet_lightning hides Lightning's "your dataloader is not resumable", which it
    gives for torchbp's loaders too; ERMClassifier warns about a loader of your own."""
    g = torch.Generator().manual_seed(0)
    rows = TensorDataset(torch.randn(40, 4, generator=g), torch.randint(3, (40,), generator=g))
    loader = DataLoader(rows, batch_size=8, shuffle=True)
    _fit_iris_loader(tmp_path, loader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning():
            _fit_iris_loader(tmp_path, loader, ckpt_path=tmp_path / "step=3.ckpt")
    messages = [str(w.message) for w in caught if _about_resuming(str(w.message))]
    assert len(messages) == 1
    assert "resumed within epoch 0, after 3 batches" in messages[0]
    assert "(DataLoader) cannot continue the epoch" in messages[0]


def test_secure_rng_resume_of_a_seeded_checkpoint_is_a_cli_error_before_anything_is_written(
    tmp_path, capsys
):
    """A seeded DP run's checkpoint (it keeps the noise generator) continued with
    secure_rng was refused by the fit, once it had rewritten the run's config.yaml."""
    from tests.lightning.lightning_helpers import CONFIGS

    common = [
        "--config",
        str(CONFIGS / "digits_dp.yaml"),
        f"--run_dir={tmp_path}",
        "--model.hidden_sizes=[8]",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
    ]
    run_cli("fit", *common, "--trainer.max_epochs=1")
    (config,) = tmp_path.rglob("config.yaml")
    before = config.read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(
            "fit",
            *common,
            "--trainer.max_epochs=2",
            "--model.privacy.secure_rng=true",
            "--ckpt_path=last",
        )
    assert exit_.value.code == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert error.startswith("error: --ckpt_path: ") and "seeded DP-SGD run's" in error
    assert config.read_text() == before
    assert list(tmp_path.rglob("config.yaml")) == [config]


#: how the first run of a resume with workers stops: within epoch 1 (Ctrl-C after its
#: second batch), or at epoch 0's end (epoch 1 then starts in the resumed run)
WORKER_STOPS = {
    "within_an_epoch": STOPS["interrupt"],
    "at_an_epochs_start": ["--trainer.max_steps=7", "--checkpoint.every_n_train_steps=7"],
}


@pytest.mark.parametrize(
    ("stop", "poisson"),
    [("within_an_epoch", False), ("at_an_epochs_start", True)],
    ids=["within_an_epoch-shuffled", "at_an_epochs_start-poisson"],
)
def test_a_fit_resumed_with_workers_trains_what_the_uninterrupted_fit_does(tmp_path, stop, poisson):
    """Workers fetched the epoch's first batches when Lightning made the loader's
    iterator, before it set the sampler's epoch or the model could continue the epoch:
    a resume, even at an epoch's start, trained other batches than the uninterrupted fit,
    and warned so. torchbp's train loaders now start their workers at the first batch:
    the resumed fit trains the uninterrupted fit's batches, to its weights, unwarned."""
    common = [
        *COMMON,
        f"--run_dir={tmp_path}",
        "--trainer.max_epochs=2",
        "--data.init_args.num_workers=2",
        f"--data.init_args.poisson_sampling={poisson}",
    ]
    try:
        run_cli("fit", *common, "--run_name=resumed", *WORKER_STOPS[stop])
    except SystemExit:  # the run Ctrl-C stopped
        assert stop == "within_an_epoch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run_cli("fit", *common, "--run_name=resumed", "--ckpt_path=last")
    whole = run_cli("fit", *common, "--run_name=whole")
    steps = len(_batches(whole)) - len(_batches(resumed))
    assert steps in (7, 9) and _batches(resumed)[0][0] == 1
    assert _batches(resumed) == _batches(whole)[steps:]
    resumed_weights, whole_weights = resumed.model.state_dict(), whole.model.state_dict()
    for name, value in whole_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0, msg=name)
    about_the_batches = ("fit resumed", "dataloader is not resumable")
    assert not [w for w in caught if any(part in str(w.message) for part in about_the_batches)]


@pytest.mark.parametrize(
    ("first_steps", "resumed", "warning"),
    [
        (4, "step=3.ckpt", "resumed within epoch 0, after 3 batches"),
        (6, "step=6.ckpt", "workers started fetching in epoch 0's order"),
    ],
    ids=["within_an_epoch", "at_an_epochs_start"],
)
def test_a_resume_with_workers_of_a_loader_of_your_own_warns_where_they_fetch_early(
    tmp_path, first_steps, resumed, warning
):
    """A DataLoader of your own with workers and torchbp's sampler fetches before the fit
    can continue the epoch or set it: the warning says so, and names the loader that does
    not (48 rows: 6 batches an epoch, step=6.ckpt saved at epoch 0's end)."""
    g = torch.Generator().manual_seed(0)
    rows = TensorDataset(torch.randn(48, 4, generator=g), torch.randint(3, (48,), generator=g))
    loader = DataLoader(rows, batch_size=8, sampler=EpochSeededSampler(rows), num_workers=1)
    _fit_iris_loader(tmp_path, loader, first_steps=first_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning():
            _fit_iris_loader(tmp_path, loader, ckpt_path=tmp_path / resumed)
    messages = [str(w.message) for w in caught if "fit resumed" in str(w.message)]
    assert len(messages) == 1 and warning in messages[0], messages
    assert "make the loader a torchbp.lightning.samplers.FetchOnFirstBatchDataLoader" in messages[0]


def test_a_fit_resumed_within_an_epoch_on_another_number_of_processes_warns(tmp_path):
    """A checkpoint saved within an epoch by a run of 2 DDP processes, resumed on 1: each
    process's share of the epoch's rows is another, so continuing after the batches trained
    skips rows and trains others again. A warning says so (the checkpoint's world size is
    set by hand: the test runs one process)."""
    common = [*COMMON, f"--run_dir={tmp_path}"]
    run_cli("fit", *common, *STOPS["max_steps_mid_epoch"])
    (last,) = tmp_path.rglob("last.ckpt")
    checkpoint = torch.load(last, weights_only=False)
    (data_state,) = [v for v in checkpoint.values() if isinstance(v, dict) and "world_size" in v]
    assert data_state["world_size"] == 1
    data_state["world_size"] = 2
    torch.save(checkpoint, last)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli("fit", *common, "--ckpt_path=last")
    messages = [str(w.message) for w in caught if "fit resumed" in str(w.message)]
    assert len(messages) == 1, messages
    assert "whose processes (2) shared the epoch's rows, and continues it with 1" in messages[0]


class _PlainModel(pl.LightningModule):
    """A LightningModule of one's own (not ERMClassifier) that records its batches."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)
        self.batches: list[tuple[int, list[float]]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batches.append((self.current_epoch, x[0].tolist()))
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_plain_model(tmp_path, data, ckpt_path=None, every=3, **trainer_options) -> _PlainModel:
    """Fit a :class:`_PlainModel` 3 epochs on ``data`` (a checkpoint every ``every`` steps)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    pl.seed_everything(0)
    model = _PlainModel()
    checkpoints = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=every, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_options,
    )
    with quiet_lightning():
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


#: DataModules of 7 training batches an epoch (Poisson sampling: 6)
_SEVEN_BATCHES = {
    "shuffled": lambda: SklearnToyDataModule(name="iris", batch_size=16),
    "poisson": lambda: SklearnToyDataModule(name="iris", batch_size=16, poisson_sampling=True),
    "synthetic": lambda: SyntheticDataModule(
        n_samples=112, n_features=4, n_classes=3, n_val=16, n_test=16, batch_size=16
    ),
}


@pytest.mark.parametrize("data", list(_SEVEN_BATCHES))
def test_any_lightning_module_resumed_within_an_epoch_continues_its_batches(tmp_path, data):
    """Only ERMClassifier continued a resumed epoch of torchbp's DataModules: a LightningModule
    of one's own, resumed after step 9 (epoch 1's second batch of 7), started epoch 1 over,
    training its first batches twice and its last ones never."""
    whole = _fit_plain_model(tmp_path, _SEVEN_BATCHES[data]())
    resumed = _fit_plain_model(
        tmp_path / "resumed", _SEVEN_BATCHES[data](), ckpt_path=tmp_path / "step=9.ckpt"
    )
    assert resumed.batches == whole.batches[9:]


@pytest.mark.parametrize("data", list(_SEVEN_BATCHES))
def test_a_fit_resumed_after_an_epochs_last_step_reloading_its_loader_trains_the_next_epoch(
    tmp_path, data
):
    """A checkpoint of epoch 0's last step, resumed with reload_dataloaders_every_n_epochs:
    Lightning reloads epoch 1's loader while the fit still counts as restarting, and the
    DataModule continued epoch 1 after as many batches as epoch 0 had: all of them, so
    epoch 1 was skipped whole."""
    last_step = len(_SEVEN_BATCHES[data]().train_dataloader())
    options = {"every": last_step, "reload_dataloaders_every_n_epochs": 1}
    whole = _fit_plain_model(tmp_path, _SEVEN_BATCHES[data](), **options)
    resumed = _fit_plain_model(
        tmp_path / "resumed",
        _SEVEN_BATCHES[data](),
        ckpt_path=tmp_path / f"step={last_step}.ckpt",
        **options,
    )
    assert resumed.batches == whole.batches[last_step:]


def _warnings_of_a_resume_with_batch_size_32(tmp_path, step: int) -> list[str]:
    """The warnings about resuming of a fit resumed with data.batch_size 32 from the
    checkpoint of ``step`` of a fit of :class:`_PlainModel` with 16 (7 batches an epoch)."""
    _fit_plain_model(tmp_path, _SEVEN_BATCHES["shuffled"](), every=step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit_plain_model(
            tmp_path / "resumed",
            SklearnToyDataModule(name="iris", batch_size=32),
            ckpt_path=tmp_path / f"step={step}.ckpt",
            every=step,
        )
    return [str(w.message) for w in caught if "fit resumed" in str(w.message)]


def test_any_lightning_module_resumed_within_an_epoch_with_another_batch_size_warns(tmp_path):
    """The DataModule continues the epoch of a module of one's own after the batches trained
    times the new batch size: resumed with data.batch_size 32 after 9 steps of 16 rows, it
    silently skipped rows of epoch 1 that the checkpoint's run had not trained (only
    ERMClassifier warned)."""
    messages = _warnings_of_a_resume_with_batch_size_32(tmp_path, step=9)
    assert len(messages) == 1, messages
    assert "after 2 batches of 16 rows (the checkpoint's data.batch_size)" in messages[0]
    assert "not yet trained are skipped" in messages[0]


def test_a_resume_after_an_epochs_last_step_with_another_batch_size_does_not_warn(tmp_path):
    """After a checkpoint of epoch 0's last step no row of it is left to train: the next
    epochs start from their first rows whatever the batch size, and no warning is due."""
    assert _warnings_of_a_resume_with_batch_size_32(tmp_path, step=7) == []
