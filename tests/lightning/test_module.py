"""ERMClassifier: architecture, identical init across backends, loss, validation of arguments."""

from __future__ import annotations

import collections
import typing
from functools import partial
from pathlib import Path

import pytest
import torch

import torchbp.nn
from torchbp.lightning import ERMClassifier, build_mlp
from torchbp.lightning.mlp import BACKENDS, Activation, Backend
from torchbp.lightning.module import ACTIVATIONS


def _quiet_trainer(tmp_path, **kwargs):
    """A CPU ``pl.Trainer`` that writes nothing (no logger, no checkpoints) and prints no
    progress bar or model summary."""
    import pytorch_lightning as pl

    return pl.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_the_literal_types_name_every_activation_and_backend():
    # (ERMClassifier's annotations, read by jsonargparse and by type checkers)
    assert typing.get_args(Activation) == tuple(ACTIVATIONS)
    assert typing.get_args(Backend) == tuple(BACKENDS)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_same_init_and_outputs_both_backends(activation):
    models = {}
    for backend in ("torchbp", "torch"):
        torch.manual_seed(123)
        models[backend] = ERMClassifier(
            input_size=7, num_classes=4, hidden_sizes=[5, 6], activation=activation, backend=backend
        )
    a, b = models["torchbp"], models["torch"]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    # torchbp layers really are torchbp's (and torch's are torch's)
    import torchbp.nn

    assert type(a.net[0]) is torchbp.nn.Linear
    assert type(b.net[0]) is torch.nn.Linear
    x = torch.randn(9, 7)
    y = torch.randint(4, (9,))
    torch.testing.assert_close(a(x), b(x))
    la, lb = a.loss(a(x), y), b.loss(b(x), y)
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_architecture_and_options():
    m = ERMClassifier(
        input_size=3,
        num_classes=2,
        hidden_sizes=[8, 4],
        activation="leaky_relu",
        negative_slope=0.2,
        bias=False,
    )
    kinds = [type(l).__name__ for l in m.net]
    assert kinds == ["Linear", "LeakyReLU", "Linear", "LeakyReLU", "Linear"]
    assert m.net[1].negative_slope == 0.2
    assert all(l.bias is None for l in m.net if type(l).__name__ == "Linear")
    assert m(torch.randn(5, 3)).shape == (5, 2)
    # logistic regression
    lr = build_mlp(3, 2, [], backend="torch")
    assert len(lr) == 1


def test_loss_weight_and_label_smoothing_match_torch():
    torch.manual_seed(0)
    m = ERMClassifier(
        input_size=4,
        num_classes=3,
        hidden_sizes=[6],
        class_weight=[1.0, 2.0, 0.5],
        label_smoothing=0.1,
    )
    x, y = torch.randn(10, 4), torch.randint(3, (10,))
    logits = m(x)
    ref = torch.nn.functional.cross_entropy(
        logits, y, weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1
    )
    torch.testing.assert_close(m.loss(logits, y), ref)


def test_hparams_saved():
    m = ERMClassifier(input_size=4, num_classes=3, hidden_sizes=[6], activation="tanh")
    assert m.hparams.hidden_sizes == [6]
    assert m.hparams.activation == "tanh"
    assert m.hparams.backend == "torchbp"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"activation": "swish"}, "unknown activation"),
        ({"hidden_sizes": [8, -1]}, "hidden_sizes must be positive"),
        ({"hidden_sizes": [0]}, "hidden_sizes must be positive"),
        ({"backend": "jax"}, "unknown backend"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"class_weight": [1.0]}, "class_weight has 1 entries"),
        ({"optimizer": partial(torch.optim.SGD, lr=-0.1)}, "invalid optimizer arguments"),
        ({"optimizer": partial(torch.optim.SGD, lr=0.1, momentum=-1)}, "invalid optimizer"),
        ({"optimizer": partial(torch.optim.Adam, betas=(1.5, 0.9))}, "invalid optimizer"),
        ({"optimizer": partial(torch.optim.SGD, lr=0.1, bogus=1)}, "invalid optimizer"),
        # fail only when stepped: after the first epoch, with a bare ZeroDivisionError
        (
            {"lr_scheduler": partial(torch.optim.lr_scheduler.StepLR, step_size=0)},
            r"invalid lr_scheduler arguments: stepping StepLR .*ZeroDivisionError",
        ),
        (
            {"lr_scheduler": partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=0)},
            "invalid lr_scheduler arguments: stepping CosineAnnealingLR",
        ),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ERMClassifier(input_size=4, num_classes=3, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # torch's nn.Linear(True, ...) takes a bool as one feature: accepted silently
        ({"hidden_sizes": [True]}, r"hidden_sizes\[0\] must be an int, got True"),
        ({"hidden_sizes": [8, False]}, r"hidden_sizes\[1\] must be an int, got False"),
        ({"input_size": True}, "input_size must be an int, got True"),
        ({"num_classes": 3.0}, "num_classes must be an int, got 3.0"),
        # failed deep inside torch.empty, or as a bare "'int' object is not iterable"
        ({"hidden_sizes": [8.0]}, r"hidden_sizes\[0\] must be an int, got 8.0"),
        ({"hidden_sizes": 8}, "hidden_sizes must be a list of ints, got 8"),
        ({"hidden_sizes": "8"}, "hidden_sizes must be a list of ints, got '8'"),
    ],
)
@pytest.mark.parametrize("make", ["ERMClassifier", "build_mlp"])
def test_sizes_that_are_no_ints_are_type_errors_naming_them(kwargs, match, make):
    sizes = {"input_size": 4, "num_classes": 3, "hidden_sizes": [5], **kwargs}
    with pytest.raises(TypeError, match=match):
        if make == "ERMClassifier":
            ERMClassifier(**sizes)
        else:
            build_mlp(**sizes)


def test_sizes_may_be_numpy_ints_in_any_sequence():
    """A tuple or a numpy array of sizes, as before; the model's hparams hold plain ints."""
    np = pytest.importorskip("numpy")
    m = ERMClassifier(input_size=np.int64(4), num_classes=3, hidden_sizes=np.array([5, 6]))
    assert m.hparams.hidden_sizes == [5, 6] and type(m.hparams.hidden_sizes[0]) is int
    assert type(m.hparams.input_size) is int
    assert ERMClassifier(input_size=4, num_classes=3, hidden_sizes=(5,)).hparams.hidden_sizes == [5]


def test_configure_optimizers_and_scheduler():
    m = ERMClassifier(
        input_size=4,
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2),
    )
    cfg = m.configure_optimizers()
    assert isinstance(cfg["optimizer"], torch.optim.SGD)
    assert cfg["optimizer"].defaults["momentum"] == 0.9
    assert isinstance(cfg["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    default = ERMClassifier(input_size=4, num_classes=3).configure_optimizers()
    assert isinstance(default, torch.optim.Adam)


@pytest.mark.parametrize("every", [1, 2])
def test_plateau_scheduler_steps_when_validation_runs(tmp_path, every):
    """ReduceLROnPlateau steps on val/loss: with check_val_every_n_epoch=2, Lightning raised
    "val/loss which is not available" after the first epoch; now it steps after each
    validation (every 2 epochs)."""

    from torchbp.lightning import SklearnToyDataModule

    m = ERMClassifier(
        input_size=4,
        num_classes=3,
        hidden_sizes=[],
        lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0),
    )
    trainer = _quiet_trainer(tmp_path, max_epochs=4, check_val_every_n_epoch=every)
    trainer.fit(m, datamodule=SklearnToyDataModule(name="iris"))
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4 // every


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_epoch_loss_with_class_weights_is_the_weighted_mean_over_the_epoch(label_smoothing):
    """The weighted cross-entropy divides by the sum of the targets' weights; averaging the
    batches' losses by their sizes instead made val/loss depend on the batch size."""
    torch.manual_seed(0)
    m = ERMClassifier(
        input_size=4, num_classes=3, class_weight=[1.0, 5.0, 0.2], label_smoothing=label_smoothing
    )
    x, y = torch.randn(23, 4), torch.tensor([0] * 3 + [1] * 4 + [2] * 16)
    with torch.no_grad():
        for rows in torch.arange(23).split(7):
            m._step((x[rows], y[rows]), m.val_loss, m.val_metrics)
        whole = m.loss(m(x), y)
    torch.testing.assert_close(m.val_loss.compute(), whole)


def test_test_after_fit_prints_no_callback_override_notice(tmp_path, caplog):
    """Every trainer.test/validate/predict after a fit (torchbp-train fit's own test of the best
    checkpoint included) printed "The following callbacks returned in
    `LightningModule.configure_callbacks` will override existing callbacks passed to Trainer:
    _LeavePerSampleOnError", about a private callback the user never passed."""
    import logging

    from torchbp.lightning import SklearnToyDataModule

    m = ERMClassifier(input_size=4, num_classes=3, hidden_sizes=[])
    trainer = _quiet_trainer(tmp_path, max_epochs=1)
    data = SklearnToyDataModule(name="iris")
    with caplog.at_level(logging.INFO):
        trainer.fit(m, datamodule=data)
        trainer.test(m, datamodule=data, verbose=False)
        trainer.predict(m, datamodule=data)
    assert "configure_callbacks" not in caplog.text
    assert sum(type(c).__name__ == "_LeavePerSampleOnError" for c in trainer.callbacks) == 1


def test_plateau_scheduler_without_validation_is_refused_before_training(tmp_path):
    """ReduceLROnPlateau steps on val/loss; with validation off (limit_val_batches=0)
    Lightning stopped the fit at the end of the first epoch ("ReduceLROnPlateau conditioned
    on metric val/loss which is not available"), after training it."""

    from torchbp.lightning import SklearnToyDataModule

    m = ERMClassifier(
        input_size=4,
        num_classes=3,
        hidden_sizes=[],
        lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0),
    )
    before = [p.detach().clone() for p in m.parameters()]
    trainer = _quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau.*limit_val_batches=0"):
        trainer.fit(m, datamodule=SklearnToyDataModule(name="iris"))
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # no step taken


def test_scheduler_that_runs_out_before_max_epochs_is_refused_before_training(tmp_path):
    """OneCycleLR, stepped once per epoch, with fewer total_steps than max_epochs: Lightning
    stopped the fit with "Tried to step 3 times" after two epochs of training."""
    from torchbp.lightning import SklearnToyDataModule

    m = ERMClassifier(
        input_size=4,
        num_classes=3,
        hidden_sizes=[],
        lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=2),
    )
    before = [p.detach().clone() for p in m.parameters()]
    trainer = _quiet_trainer(tmp_path, max_epochs=3)
    with pytest.raises(ValueError, match=r"OneCycleLR.*epoch 3 of trainer.max_epochs=3"):
        m.check_scheduler(trainer)
    with pytest.raises(ValueError, match=r"OneCycleLR.*epoch 3 of trainer.max_epochs=3"):
        trainer.fit(m, datamodule=SklearnToyDataModule(name="iris"))
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # no step taken
    m.check_scheduler(_quiet_trainer(tmp_path, max_epochs=2))  # runs to its end: fine


@pytest.mark.parametrize(
    ("optimizer", "scheduler"),
    [
        (
            partial(torch.optim.SGD, lr=0.1, momentum=0.9),
            partial(torch.optim.lr_scheduler.StepLR, step_size=2),
        ),
        (torch.optim.Adam, None),
    ],
    ids=["partials", "class"],
)
def test_python_api_checkpoint_loads_with_weights_only(tmp_path, optimizer, scheduler):
    """A model built in Python with a class or a partial as its optimizer / scheduler saves
    them as class paths, so its checkpoint loads with torch.load's default weights_only=True
    (a pickled partial was refused: UnpicklingError) and rebuilds the same optimizer."""
    model = ERMClassifier(
        input_size=3, num_classes=2, hidden_sizes=[4], optimizer=optimizer, lr_scheduler=scheduler
    )
    trainer = _quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(2, (8,)))
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ERMClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    want, got = model.configure_optimizers(), loaded.configure_optimizers()
    if scheduler is None:  # the optimizer alone
        assert type(got) is torch.optim.Adam and got.defaults == want.defaults
    else:
        assert type(got["optimizer"]) is torch.optim.SGD
        assert got["optimizer"].defaults == want["optimizer"].defaults
        assert type(got["lr_scheduler"]["scheduler"]) is torch.optim.lr_scheduler.StepLR
        assert got["lr_scheduler"]["scheduler"].step_size == 2


def test_fit_of_a_compiled_model_matches_the_eager_fit(tmp_path):
    """Lightning's documented ``trainer.fit(torch.compile(model))`` compiles the steps; Dynamo
    failed inside them (torchmetrics' update and ``LightningModule.log`` cannot be traced):
    InternalTorchDynamoError. The metric bookkeeping now runs eagerly, and the compiled fit's
    metrics equal the eager fit's."""
    import pytorch_lightning as pl

    from torchbp.lightning import SklearnToyDataModule

    def fit(compiled: bool) -> dict[str, float]:
        pl.seed_everything(0)
        model = ERMClassifier(input_size=4, num_classes=3, hidden_sizes=[8])
        trainer = _quiet_trainer(tmp_path, max_epochs=1, deterministic=True)
        data = SklearnToyDataModule(name="iris", batch_size=32)
        trainer.fit(torch.compile(model) if compiled else model, datamodule=data)
        trainer.test(model, datamodule=data, verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    eager, compiled = fit(False), fit(True)
    assert "val/acc" in compiled or "test/acc" in compiled
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def test_compile_option_compiles_the_network_and_keeps_checkpoints_interchangeable(tmp_path):
    """torchbp-train has no way to call torch.compile on the model: ``compile=True``
    (``--model.compile true``) compiles the network in place, so the state_dict keys, and the
    checkpoints, are those of an eager model, and the metrics equal the eager fit's; DP-SGD,
    whose per-sample clipping needs the eager forward, refuses it."""
    import pytorch_lightning as pl

    from torchbp.lightning import SklearnToyDataModule
    from torchbp.lightning.privacy import Privacy

    def fit(compile: bool) -> tuple[dict[str, float], ERMClassifier]:
        pl.seed_everything(0)
        model = ERMClassifier(input_size=4, num_classes=3, hidden_sizes=[8], compile=compile)
        trainer = _quiet_trainer(tmp_path, max_epochs=1, deterministic=True)
        data = SklearnToyDataModule(name="iris", batch_size=32)
        trainer.fit(model, datamodule=data)
        trainer.test(model, datamodule=data, verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items()}, model

    (eager, plain), (compiled, model) = fit(False), fit(True)
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert model.state_dict().keys() == plain.state_dict().keys()
    with pytest.raises(ValueError, match=r"privacy.*compile"):
        ERMClassifier(
            input_size=4, num_classes=3, compile=True, privacy=Privacy(noise_multiplier=1)
        )


def test_compile_option_of_a_fused_head_model_is_refused_as_it_would_change_nothing():
    """A fused_head model's steps call its hidden layers and the fused loss, never the
    network's forward: compile=True, which compiles the network, compiled nothing they run.
    It is refused."""
    with pytest.raises(ValueError, match=r"compile or fused_head, not both.*compile=True"):
        ERMClassifier(input_size=4, num_classes=3, compile=True, fused_head=True)


def test_fit_of_a_compiled_fused_head_model_matches_the_eager_fit(tmp_path):
    """Lightning's ``trainer.fit(torch.compile(model))`` compiles the model's steps
    (training_step and the others, not only forward), so a fused_head model's fused loss is
    compiled too: it was refused as compiling nothing the steps run. It now fits, with the
    eager fit's metrics."""
    import pytorch_lightning as pl

    from torchbp.lightning import SklearnToyDataModule

    def fit(compiled: bool) -> dict[str, float]:
        pl.seed_everything(0)
        model = ERMClassifier(input_size=4, num_classes=3, hidden_sizes=[8], fused_head=True)
        trainer = _quiet_trainer(tmp_path, max_epochs=1, deterministic=True)
        data = SklearnToyDataModule(name="iris", batch_size=32)
        trainer.fit(torch.compile(model) if compiled else model, datamodule=data)
        trainer.test(model, datamodule=data, verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    eager, compiled = fit(False), fit(True)
    assert "test/acc" in compiled
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)


def test_a_tensor_learning_rate_is_neither_modified_nor_decayed_before_the_fit(tmp_path):
    """A tensor lr (PyTorch's form for capturable / compiled optimizers) is stepped in place
    by a scheduler (``fill_``): the optimizers made to check the scheduler (at init, through
    max_epochs on a copy) shared the factory's tensor, so the user's tensor was changed and
    the fit's optimizer started from the decayed lr (0.0016 for 0.1 halved over 5 epochs)."""
    lr = torch.tensor(0.1)
    m = ERMClassifier(
        input_size=4,
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=lr),
        lr_scheduler=partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.5),
    )
    m.check_scheduler(_quiet_trainer(tmp_path, max_epochs=5))
    first = m.configure_optimizers()["optimizer"]
    second = m.configure_optimizers()["optimizer"]  # a second fit starts where the first did
    assert lr.item() == pytest.approx(0.1)
    for opt in (first, second):
        assert opt.param_groups[0]["initial_lr"].item() == pytest.approx(0.1)
        assert opt.param_groups[0]["lr"].item() == pytest.approx(0.05)


def test_scheduler_arguments_that_fail_arithmetic_when_made_are_a_value_error():
    """CyclicLR(step_size_up=0) divides by zero when made: ERMClassifier (and torchbp-train,
    with a traceback) raised a bare ZeroDivisionError, where StepLR(step_size=0), failing
    alike when stepped, is 'invalid lr_scheduler arguments' naming the scheduler."""
    cyclic = partial(
        torch.optim.lr_scheduler.CyclicLR,
        base_lr=0.01,
        max_lr=0.1,
        step_size_up=0,
        cycle_momentum=False,
    )
    with pytest.raises(
        ValueError,
        match=r"invalid lr_scheduler arguments: making CyclicLR raised ZeroDivisionError",
    ):
        ERMClassifier(input_size=4, num_classes=3, lr_scheduler=cyclic)
    # a wrapper (torchbp-train's factories are jsonargparse's) is named by the class it made
    with pytest.raises(ValueError, match=r"making CyclicLR raised ZeroDivisionError"):
        ERMClassifier(input_size=4, num_classes=3, lr_scheduler=lambda opt: cyclic(opt))


class _SGDWithNamedSettings(torch.optim.SGD):
    """SGD with a namedtuple hyperparameter in its parameter groups (as a custom optimizer
    may keep)."""

    Settings = collections.namedtuple("Settings", ["warmup", "decay"])

    def __init__(self, params, lr=0.1):
        super().__init__(params, lr=lr)
        for group in self.param_groups:
            group["settings"] = self.Settings(warmup=1, decay=0.5)


def test_an_optimizer_with_a_namedtuple_hyperparameter_keeps_it():
    """Copying an optimizer's tensor hyperparameters rebuilt every tuple from its items,
    which a namedtuple refuses (TypeError: missing arguments) when the model was made."""
    m = ERMClassifier(input_size=4, num_classes=3, optimizer=_SGDWithNamedSettings)
    settings = m.configure_optimizers().param_groups[0]["settings"]
    assert settings == _SGDWithNamedSettings.Settings(warmup=1, decay=0.5)


def test_a_checkpoint_saved_before_module_py_was_split_still_loads():
    """``data/erm_before_split.ckpt`` was saved by a one-epoch ``Trainer.fit`` of
    ``ERMClassifier(input_size=4, num_classes=3, hidden_sizes=[5], activation="leaky_relu",
    negative_slope=0.2, class_weight=[1, 2, 0.5], label_smoothing=0.1, optimizer=SGD(lr=0.1,
    momentum=0.9), lr_scheduler=StepLR(step_size=1, gamma=0.5))`` while everything was in
    module.py: it loads as the same model (weights, options, optimizer and scheduler), with
    torch.load's default weights_only=True."""
    path = Path(__file__).parent / "data" / "erm_before_split.ckpt"
    saved = torch.load(path, weights_only=True)
    model = ERMClassifier.load_from_checkpoint(path, weights_only=True)
    assert dict(model.hparams) == saved["hyper_parameters"]
    own = model.state_dict()
    assert own.keys() == saved["state_dict"].keys()
    assert all(torch.equal(own[key], saved["state_dict"][key]) for key in own)
    assert isinstance(model.net[1], torchbp.nn.LeakyReLU) and model.net[1].negative_slope == 0.2
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer["optimizer"], torch.optim.SGD)
    assert optimizer["optimizer"].defaults["momentum"] == 0.9
    assert isinstance(optimizer["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


@pytest.mark.parametrize(
    "extra, routed",
    [
        (torchbp.nn.Softmin(dim=1), False),  # an op's extra module twins run torchbp by themselves
        (torchbp.nn.Softmax2d(), False),
        (torch.nn.Softmin(dim=1), True),  # a native module: its calls are routed
    ],
    ids=["torchbp Softmin", "torchbp Softmax2d", "native Softmin"],
)
def test_steps_route_native_calls_only_where_the_network_holds_native_modules(extra, routed):
    """A step enters the routing context (``torchbp.enable()``, per-call overhead) only when
    the network may call native ops: every torchbp module twin, the extra ones of an op
    (softmax's ``Softmin``, ``Softmax2d``) included, runs its own backward."""
    model = ERMClassifier(input_size=4, num_classes=3, hidden_sizes=[5])
    model.net.append(extra)
    assert (model._backend_calls() is model.routing) is routed
