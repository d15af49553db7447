"""ERMClassifier: an MLP trained by empirical risk minimisation with torchbp's hand-written
backward passes (or, for side-by-side comparison, with stock ``torch.nn``)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as _torch_F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torchmetrics import MeanMetric, MetricCollection

from torchbp.lightning.metrics import EVAL_METRICS, stage_metrics
from torchbp.lightning.mlp import (
    ACTIVATIONS,
    BACKENDS,
    Activation,
    Backend,
    build_mlp,
    check_choice,
    check_layer_sizes,
)
from torchbp.lightning.optimizers import (
    SCHEDULER_TRIAL_EPOCHS,  # noqa: F401 (named by check_scheduler's docstring, importable here)
    check_optimizer_arguments,
    check_scheduler_fits_trainer,
    factory_as_config,
    factory_from_config,
    owning_its_hyperparameters,
)
from torchbp.lightning.privacy import PoissonBatchSampler, Privacy, PrivacyAccountant
from torchbp.lightning.private_training import PrivateTraining
from torchbp.lightning.samplers import (
    ContinuableSequentialSampler,
    EpochSeededSampler,
    FetchOnFirstBatchDataLoader,
)
from torchbp.mode import TorchbpMode, enable
from torchbp.ops import OPS
from torchbp.per_sample import PerSampleGrads

__all__ = ["ERMClassifier", "ACTIVATIONS", "BACKENDS", "build_mlp"]

#: why compile=True (which compiles the network) is refused with fused_head
_COMPILE_FUSED_HEAD = (
    "compile compiles the network's forward, which a fused_head model's steps never call "
    "(they run the hidden layers, then the last Linear and the loss together), so it would "
    "change nothing; use compile or fused_head, not both (from Python, "
    "trainer.fit(torch.compile(model)) compiles a fused_head model's steps)"
)

#: the methods whose code a step's forward and loss run (a subclass may override them)
_OWN_CODE = ("forward", "features", "loss", "fused_loss")
#: the module classes that run torchbp's backward by themselves (exact types)
_TORCHBP_OR_CONTAINER = frozenset(
    [
        torch.nn.Sequential,
        *(ours for op in OPS.values() for ours, _ in op.module_pairs() if ours is not None),
    ]
)


def _is_stateful(loader: Any) -> bool:
    """Whether Lightning keeps ``loader``'s position in checkpoints and restores it itself
    (a loader with ``state_dict`` and ``load_state_dict``)."""
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )


def _epoch_source(loader: Any) -> Any:
    """What orders an epoch of one of torchbp's train loaders (its
    :class:`EpochSeededSampler` or :class:`PoissonBatchSampler`, or a dataset of batches
    with ``continue_epoch``, each with an ``epoch``), or ``None`` for another loader."""
    parts = ("sampler", "batch_sampler", "dataset")
    for part in (getattr(loader, name, None) for name in parts):
        if isinstance(part, (EpochSeededSampler, PoissonBatchSampler)):
            return part
        if hasattr(part, "continue_epoch"):  # e.g. an iterable dataset of batches
            return part
    return None


def _batches_trained_in_the_epoch(trainer: pl.Trainer) -> int:
    """The batches of the current epoch that a resumed fit's loop counts as trained, and
    continues after: those whose training step ran to its end. A checkpoint saved on an
    exception inside a step (Ctrl-C in its forward or backward) has that batch fetched
    (``ready``) but not trained (``processed``): Lightning's loop trains it again, so the
    loader must yield it again."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def _fetches_before_the_hooks(loader: Any) -> bool:
    """Whether ``loader``'s workers started fetching when Lightning made its iterator, before
    the fit's hooks could tell it which epoch, or where in it, to start (a DataLoader with
    workers, unless a :class:`FetchOnFirstBatchDataLoader`, as torchbp's DataModules make)."""
    return getattr(loader, "num_workers", 0) > 0 and not isinstance(
        loader, FetchOnFirstBatchDataLoader
    )


def _exact_resume_hint(source: Any) -> str:
    """How to resume exactly with a train loader whose epochs ``source`` orders (see
    :func:`_epoch_source`; one of torchbp's samplers fails only in a loader whose workers
    fetch before the hooks)."""
    if source is not None:
        return (
            "make the loader a torchbp.lightning.samplers.FetchOnFirstBatchDataLoader (as "
            "torchbp's DataModules do), whose workers start at its first batch, or give it "
            "num_workers=0"
        )
    return (
        "resume from a checkpoint saved at an epoch's end for an exact run, or give the "
        "loader state_dict and load_state_dict (Lightning then keeps its position)"
    )


class ERMClassifier(PrivateTraining, pl.LightningModule):
    """MLP classifier trained by empirical risk minimisation (mean cross-entropy).

    The network is ``Linear -> activation -> ... -> Linear`` built from ``torchbp.nn`` (hand-written
    backward passes) or, with ``backend="torch"``, from ``torch.nn`` with the same architecture
    and the same initialisation for the same seed, so the two can be compared side by side and
    their checkpoints are interchangeable. The loss is ``cross_entropy`` of the same backend.

    A fit resumed within an epoch (a checkpoint of ``every_n_train_steps``, of a validation
    within the epoch, of Ctrl-C) continues that epoch with torchbp's train loaders
    (:class:`~torchbp.lightning.samplers.EpochSeededSampler`, Poisson sampling, synthetic
    batches, with or without workers): it trains the batches the uninterrupted fit would.
    It warns about a loader it cannot continue.

    With ``backend="torchbp"``, a subclass whose ``forward`` (or ``features``, ``loss``,
    ``fused_loss``) calls ``F.linear``, ``F.gelu``, ``x.softmax()``, ..., or a network with
    modules other than torchbp's, runs the forward and loss of every step (and
    ``predict_step``) under :func:`torchbp.enable`, so it trains on torchbp's backward too;
    :attr:`routing` (the mode) counts what it routed. The stock network (``torchbp.nn``
    modules, ``torchbp.functional`` loss) has nothing to route and runs without the mode,
    which costs about a microsecond for every torch call it passes through.

    With ``fused_head=True`` the last Linear layer and the loss are computed together by
    ``linear_cross_entropy`` (:func:`torchbp.functional.linear_cross_entropy`, which never
    holds the ``(N, num_classes)`` logits in the autograd graph; with ``backend="torch"``,
    :func:`torch.nn.functional.linear_cross_entropy`, chunked when ``label_smoothing == 0``).
    The parameters, the ``state_dict`` and ``forward`` are unchanged (the last layer is still a
    Linear module, and checkpoints are interchangeable with unfused runs); only the loss of the
    train/val/test steps is computed from the hidden features and the last layer's ``weight``
    and ``bias``. The logits the accuracy/F1 metrics need are then computed without a graph.
    Loss and gradients equal the unfused ones up to floating-point rounding.

    Logged per epoch: ``train/loss`` (the empirical risk), ``train/acc``, and for ``val/`` and
    ``test/``: ``loss``, ``acc``, ``error`` (0-1 risk) and ``f1`` (macro).

    ``trainer.fit(torch.compile(model))`` (Lightning's way to compile a LightningModule)
    compiles each step's forward and loss; the metrics' bookkeeping and logging run eagerly
    (Dynamo cannot trace them), and the metrics equal the eager fit's. DP-SGD (``privacy``)
    refuses a compiled model: its per-sample clipping needs the eager forward.

    Args:
        input_size: Number of input features (linked from the DataModule by the CLI).
        num_classes: Number of classes (linked from the DataModule by the CLI).
        hidden_sizes: Widths of the hidden layers; ``[]`` gives multinomial logistic regression.
        activation: Hidden activation: any element-wise activation of the op registry
            (:mod:`torchbp.ops`), e.g. ``relu`` or ``gelu``.
        negative_slope: Slope for ``x < 0`` of leaky_relu (ignored by other activations).
        bias: Whether the Linear layers have a bias.
        backend: ``torchbp`` (hand-written backprop) or ``torch`` (stock autograd).
        class_weight: Optional per-class weights of the loss (length ``num_classes``).
        label_smoothing: Label smoothing of the cross-entropy, in ``[0, 1)``.
        fused_head: Compute the last Linear layer and the cross-entropy together with
            ``linear_cross_entropy`` of the backend (see above). ``backend="torch"`` needs a
            torch that has ``torch.nn.functional.linear_cross_entropy`` (2.13+); with an older
            torch the option is rejected with a ``ValueError``.
        optimizer: Optimizer factory, e.g. ``torch.optim.SGD`` with ``lr`` and ``momentum``,
            ``torch.optim.Adam`` or ``torch.optim.AdamW`` (default: Adam, lr=1e-3). A class,
            or a ``functools.partial`` of one with plain keyword arguments, is kept in
            checkpoints as its class path and arguments (as ``torchbp-train`` keeps it), so
            they load with ``torch.load``'s default ``weights_only=True``; another callable
            (a lambda) is pickled, and its checkpoints need ``weights_only=False``.
        lr_scheduler: Optional LR scheduler factory, e.g. ``torch.optim.lr_scheduler.StepLR``
            or ``CosineAnnealingLR``; stepped once per epoch (``ReduceLROnPlateau``: on
            ``val/loss``, after each epoch that validates). Kept in checkpoints as ``optimizer``.
        privacy: Train with DP-SGD (:class:`~torchbp.lightning.privacy.Privacy`: max grad
            norm, and a noise multiplier or a target ε at δ). Each step's gradient is
            ``(Σ_i clip(g_i) + N(0, σ²C²)) / L`` with the per-sample clipping of
            :func:`torchbp.per_sample_grads` in one backward pass and ``L`` the expected
            batch size; the data must be drawn by Poisson sampling
            (``data.poisson_sampling: true``). ε spent so far is logged as
            ``train/epsilon`` each epoch (Opacus' RDP accountant) and kept in checkpoints,
            as is the noise's generator (not with ``privacy.secure_rng``), seeded at a
            fresh fit's start from a hash of the run's seed (``torch.initial_seed()``, as
            ``seed_everything`` sets it), so the seed alone makes it reproducible, with a
            stream of its own: a resumed fit draws the noise an
            uninterrupted one would, never the first steps' again.
            Needs ``backend='torchbp'`` and ``fused_head=False``, one device and no gradient
            accumulation. An empty Poisson draw (probability ``(1 − q)^N``) still takes its
            step, with the noise alone: DP-SGD releases a noisy update at every step, and
            skipping one would tell that its draw was empty. A model without ``privacy`` refuses
            to fit on the weights of a DP-SGD checkpoint (no ε would hold for the result).
        compile: Compile the network with ``torch.compile`` (in place, so the state_dict and
            checkpoints are an eager model's; ``--model.compile true`` in torchbp-train). The
            metrics equal the eager run's; not with ``privacy`` or ``fused_head`` (whose
            steps never call the network's forward: compiling it would change nothing, so
            it is refused). From Python, ``trainer.fit(torch.compile(model))`` (Lightning's
            way, which compiles the steps, the fused loss included) works too, not with
            ``privacy``.
    """

    def __init__(
        self,
        input_size: int = 64,
        num_classes: int = 10,
        hidden_sizes: list[int] = [128],  # noqa: B006 (jsonargparse needs a literal default)
        activation: Activation = "relu",
        negative_slope: float = 0.01,
        bias: bool = True,
        backend: Backend = "torchbp",
        class_weight: list[float] | None = None,
        label_smoothing: float = 0.0,
        fused_head: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        privacy: Privacy | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        hidden_sizes = check_layer_sizes(input_size, num_classes, hidden_sizes)
        # plain ints in the hyperparameters (a numpy int does not load with weights_only)
        input_size, num_classes = int(input_size), int(num_classes)
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("backend", backend, BACKENDS)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if class_weight is not None and len(class_weight) != num_classes:
            raise ValueError(
                f"class_weight has {len(class_weight)} entries but there are {num_classes} classes"
            )
        if fused_head and backend == "torch" and not hasattr(_torch_F, "linear_cross_entropy"):
            raise ValueError(
                f"fused_head=True with backend='torch' needs "
                f"torch.nn.functional.linear_cross_entropy (torch >= 2.13), which torch "
                f"{torch.__version__} lacks; use backend='torchbp' or fused_head=False"
            )
        if isinstance(privacy, dict):  # from a checkpoint's hyperparameters
            privacy = Privacy(**privacy)
        if privacy is not None and compile:
            raise ValueError(
                "privacy (DP-SGD) clips per-sample gradients, which needs the eager network; "
                "got compile=True"
            )
        if compile and fused_head:
            raise ValueError(_COMPILE_FUSED_HEAD + "; got compile=True and fused_head=True")
        if privacy is not None and (backend != "torchbp" or fused_head):
            raise ValueError(
                "privacy (DP-SGD) clips per-sample gradients with torchbp.per_sample_grads, "
                f"which needs backend='torchbp' and fused_head=False; got backend={backend!r}, "
                f"fused_head={fused_head}"
            )
        optimizer = factory_from_config(optimizer, "optimizer")
        lr_scheduler = factory_from_config(lr_scheduler, "lr_scheduler")
        # privacy as a plain dict, the factories as class paths where they can be: checkpoints
        # stay loadable with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["privacy"])
        self.hparams["privacy"] = None if privacy is None else dataclasses.asdict(privacy)
        for key in ("optimizer", "lr_scheduler"):
            self.hparams[key] = factory_as_config(self.hparams[key])

        self.net = build_mlp(
            input_size, num_classes, hidden_sizes, activation, negative_slope, bias, backend
        )
        if compile:
            self.net.compile()  # in place: the state_dict keys stay the eager network's
        self.backend = backend
        #: backend torchbp: the mode the steps' forward and loss run under where they may
        #: call native ops (its ``counts`` say what it routed); ``None`` for backend torch
        self.routing: TorchbpMode | None = enable() if backend == "torchbp" else None
        cw = None if class_weight is None else torch.tensor(class_weight, dtype=torch.float32)
        self.register_buffer("class_weight", cw)
        self.label_smoothing = label_smoothing
        self.fused_head = bool(fused_head)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.privacy = privacy
        self.accountant: PrivacyAccountant | None = None
        self._restored_accountant: dict[str, Any] | None = None
        #: DP-SGD: the generator of the noise, kept in checkpoints so that a resumed fit
        #: continues its stream (see _continued_noise)
        self._noise_generator: torch.Generator | None = None
        self._restored_noise_state: torch.Tensor | None = None
        #: DP-SGD: a mid-epoch checkpoint's Poisson sampler state (how many of the epoch's
        #: batches were drawn), so that the resumed epoch continues its draws
        self._restored_sampler_state: dict[str, int] | None = None
        #: DP-SGD: (epoch, n): the first n Poisson draws of the sampler's epoch went to
        #: training steps (kept in checkpoints: those a resumed fit must not draw again)
        self._draws_taken: tuple[int, int] = (-1, 0)
        self._per_sample: PerSampleGrads | None = None
        self._check_optimizer()

        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_metrics = stage_metrics("train/", num_classes, full=False)
        self.val_metrics = stage_metrics("val/", num_classes, full=True)
        self.test_metrics = stage_metrics("test/", num_classes, full=True)

    def metric_names(self) -> list[str]:
        """The metrics this model logs each epoch (``train/epsilon`` only with ``privacy``):
        what a ModelCheckpoint or EarlyStopping of a fit may monitor, besides ``test/``'s.

        Examples::

            >>> ERMClassifier(input_size=4, num_classes=3).metric_names()[:3]
            ['train/loss', 'train/acc', 'val/loss']
        """
        names = ["train/loss", "train/acc"]
        names += [f"{stage}/{m}" for stage in ("val", "test") for m in EVAL_METRICS]
        return names + (["train/epsilon"] if self.privacy is not None else [])

    def _backend_calls(self) -> contextlib.AbstractContextManager[Any]:
        """The context a step's forward and loss run in: :attr:`routing` where they may
        call native ops, else nothing."""
        if self.routing is None or not self._may_call_native():
            return contextlib.nullcontext()
        return self.routing

    def _may_call_native(self) -> bool:
        """A subclass's own forward / features / loss, or a network holding modules other
        than torchbp's (checked per step: the network may be replaced after init)."""
        cls = type(self)
        if any(getattr(cls, name) is not getattr(ERMClassifier, name) for name in _OWN_CODE):
            return True
        return not all(type(m) in _TORCHBP_OR_CONTAINER for m in self.net.modules())

    @property
    def _F(self) -> Any:
        """The backend's functional module (``torchbp.functional`` or ``torch.nn.functional``)."""
        return BACKENDS[self.backend][1]

    # -- optimisation ---------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        """A new optimizer of the model's parameters, owning its hyperparameters: a tensor
        one (``lr=torch.tensor(0.1)``), which a scheduler steps in place, is copied, so
        neither the optimizers made to check the scheduler nor a fit change the factory's
        tensor (each fit, like one with a float lr, starts from the configured value)."""
        if self.optimizer_factory is None:
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return owning_its_hyperparameters(self.optimizer_factory(self.parameters()))

    def _check_optimizer(self) -> None:
        """Build the optimizer (and scheduler) once, and step the scheduler once, so bad
        arguments fail before training (see
        :func:`~torchbp.lightning.optimizers.check_optimizer_arguments`)."""
        check_optimizer_arguments(self._make_optimizer, self.scheduler_factory)

    def configure_optimizers(self) -> Any:
        opt = self._make_optimizer()
        if self.scheduler_factory is None:
            return opt
        with contextlib.suppress(RuntimeError):  # RuntimeError: no trainer attached
            self.check_scheduler(self.trainer)
        sched = self.scheduler_factory(opt)
        cfg: dict[str, Any] = {"scheduler": sched, "interval": "epoch"}
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # steps on val/loss, so only at the end of the epochs that validate
            cfg["monitor"] = "val/loss"
            cfg["frequency"] = self._epochs_between_validations()
        return {"optimizer": opt, "lr_scheduler": cfg}

    def check_scheduler(self, trainer: pl.Trainer) -> None:
        """Raise a ``ValueError`` now if ``trainer`` cannot run this model's LR scheduler
        (Lightning would stop the fit after training one or more epochs):

        - ReduceLROnPlateau steps on ``val/loss``, which a trainer with validation off
          (``limit_val_batches=0``) never computes;
        - a scheduler that fails before its ``trainer.max_epochs`` steps (one per epoch) are
          taken, such as ``OneCycleLR`` with fewer ``total_steps``: stepped through them on
          a copy (for a fit whose length is ``max_epochs``, at most
          :data:`SCHEDULER_TRIAL_EPOCHS`; one limited by ``max_steps`` or ``max_time`` may
          stop earlier, and is not judged).

        ``torchbp-train`` calls it before the run folder is made, and ``configure_optimizers``
        when a trainer is attached."""
        if self.scheduler_factory is not None:
            check_scheduler_fits_trainer(self.scheduler_factory(self._make_optimizer()), trainer)

    def _epochs_between_validations(self) -> int:
        """The trainer's ``check_val_every_n_epoch`` (1 without a trainer, or when validation
        is counted in steps across epochs)."""
        try:
            every = self.trainer.check_val_every_n_epoch
        except RuntimeError:  # not attached to a Trainer
            return 1
        return every or 1

    # -- forward / loss -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, input_size)``."""
        return self.net(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Mean cross-entropy of the backend (the empirical risk on a batch); DP-SGD asks
        for the sum."""
        return self._F.cross_entropy(
            logits,
            y,
            weight=self.class_weight,
            label_smoothing=self.label_smoothing,
            reduction=reduction,
        )

    @property
    def head(self) -> torch.nn.Module:
        """The last Linear layer (the classification head)."""
        return self.net[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden features ``(N, d)``: the input of the last Linear layer (``x`` itself for
        logistic regression)."""
        for layer in self.net[:-1]:
            x = layer(x)
        return x

    def fused_loss(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``loss(head(features), y)`` computed by the backend's ``linear_cross_entropy``,
        without the logits in the autograd graph."""
        head = self.head
        kwargs: dict[str, Any] = dict(
            linear_bias=head.bias, weight=self.class_weight, label_smoothing=self.label_smoothing
        )
        if self.backend == "torch":
            # torch's chunked path rejects label smoothing (it would warn and fall back to
            # the reference path, linear + cross_entropy, anyway): ask for it only when usable.
            if self.label_smoothing == 0.0:
                kwargs["options"] = torch.nn.LinearCrossEntropyOptions()
            return _torch_F.linear_cross_entropy(features, head.weight, y, **kwargs)
        return self._F.linear_cross_entropy(features, head.weight, y, **kwargs)

    def _step(self, batch, loss_metric: MeanMetric, metrics: MetricCollection) -> torch.Tensor:
        x, y = batch
        with self._backend_calls():
            if self.fused_head:
                h = self.features(x)
                loss = self.fused_loss(h, y)
                # the metrics need the logits: computed once, outside the autograd graph
                with torch.no_grad():
                    logits = self.head(h.detach())
            else:
                logits = self(x)
                loss = self.loss(logits, y)
        self._update_metrics(loss_metric, metrics, loss.detach(), logits.detach(), y)
        return loss

    @torch.compiler.disable
    def _update_metrics(
        self,
        loss_metric: MeanMetric,
        metrics: MetricCollection,
        loss: torch.Tensor,
        logits: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        """Add a batch's mean ``loss`` and its ``logits`` to the epoch's metrics: bookkeeping
        that runs eagerly under ``torch.compile`` (Dynamo cannot trace torchmetrics' update)."""
        loss_metric.update(loss.float(), weight=self._loss_denominator(y))
        metrics.update(logits.float(), y)

    @torch.compiler.disable
    def _log_epoch_metrics(
        self, stage: str, loss_metric: MeanMetric, metrics: MetricCollection
    ) -> None:
        """Log ``<stage>/loss`` and ``metrics`` once per epoch (eagerly under ``torch.compile``:
        Dynamo cannot trace ``LightningModule.log``)."""
        self.log(
            f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=stage != "test"
        )
        self.log_dict(metrics, on_step=False, on_epoch=True)

    def _loss_denominator(self, y: torch.Tensor) -> torch.Tensor | int:
        """What the batch's mean loss divides by: the sum of the targets' class weights (the
        batch size without weights), so the epoch's loss is the same weighted mean over all
        its rows, whatever the batch size."""
        if self.class_weight is None:
            return y.shape[0]
        return self.class_weight.float()[y].sum()

    def on_train_start(self) -> None:
        super().on_train_start()
        # a fit resumed within an epoch gets no on_train_epoch_start for that epoch, and
        # its loader would start the epoch over (training its first batches twice and its
        # last never): torchbp's loaders continue it after the batches trained
        trainer = self.trainer
        trained = _batches_trained_in_the_epoch(trainer)
        loader = trainer.train_dataloader
        source = _epoch_source(loader)
        if 0 < trained < trainer.num_training_batches:
            if source is not None and not _fetches_before_the_hooks(loader):
                self._continue_epoch(source, loader, trained)
            elif not _is_stateful(loader):
                rank_zero_warn(
                    f"the fit resumed within epoch {self.current_epoch}, after {trained} "
                    f"batches, and its train loader ({type(loader).__name__}) cannot "
                    "continue the epoch: it starts it over, so its first batches are trained "
                    "again and its last ones not; " + _exact_resume_hint(source),
                    category=UserWarning,
                )
        elif (
            source is not None
            and _fetches_before_the_hooks(loader)
            and source.epoch != self.current_epoch
        ):
            rank_zero_warn(
                f"the fit resumed at epoch {self.current_epoch}, and its train loader's "
                f"workers started fetching in epoch {source.epoch}'s order (Lightning sets "
                "the epoch once they have started): this epoch's batches are not those of "
                "the uninterrupted fit; " + _exact_resume_hint(source),
                category=UserWarning,
            )

    def _continue_epoch(self, source: Any, loader: Any, trained: int) -> None:
        """Have torchbp's train ``loader``, whose epochs ``source`` orders, yield the rest
        of the current epoch after the ``trained`` batches (of this rank) that a resumed
        fit trained before."""
        epoch = self.current_epoch
        if isinstance(source, (EpochSeededSampler, ContinuableSequentialSampler)):
            source.continue_epoch(epoch, trained * (loader.batch_size or 1))
        elif isinstance(source, PoissonBatchSampler):
            # a DP fit loaded the checkpoint's own sampler state (private_training.py)
            if self.privacy is None:
                source.load_state_dict({"epoch": epoch, "drawn": trained})
        else:
            source.continue_epoch(epoch, trained)

    def on_train_epoch_start(self) -> None:
        # an iterable dataset with set_epoch reshuffles from its epoch: Lightning sets the
        # epoch of a loader's samplers (a PoissonBatchSampler's, through its ``sampler``),
        # never of its dataset
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        if self.privacy is not None:
            loss = self._private_training_step(batch)
        else:
            loss = self._step(batch, self.train_loss, self.train_metrics)
        self._log_epoch_metrics("train", self.train_loss, self.train_metrics)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.val_loss, self.val_metrics)
        self._log_epoch_metrics("val", self.val_loss, self.val_metrics)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.test_loss, self.test_metrics)
        self._log_epoch_metrics("test", self.test_loss, self.test_metrics)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities ``(N, num_classes)``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        with self._backend_calls():
            return self._F.softmax(self(x).float(), dim=-1)
