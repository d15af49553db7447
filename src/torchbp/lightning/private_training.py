"""DP-SGD training of :class:`~torchbp.lightning.ERMClassifier` (its ``privacy`` option):
the checks before a private fit, each step's per-sample clipping and noise, the privacy
accountant and the noise generator kept in checkpoints, and the refusal to fit without
privacy on a DP-SGD checkpoint's weights."""

from __future__ import annotations

import hashlib
import secrets
import sys
from typing import Any

import pytorch_lightning as pl
import torch

from torchbp.lightning.privacy import PoissonBatchSampler, Privacy, PrivacyAccountant
from torchbp.per_sample import PerSampleGrads, per_sample_grads

__all__ = ["PrivateTraining"]


def _noise_seed() -> int:
    """The seed of a fresh fit's noise generator: a fixed function of the run's seed (the
    default generator's initial seed, which ``seed_everything`` and ``torch.manual_seed``
    set), hashed so that the generator has a stream of its own (a copy of the default
    generator would repeat what the run draws from it). A draw of the default generator
    depended on how many numbers the run had drawn before the fit started: a change of
    unrelated code (a DataLoader made earlier, a subclass's extra layer) changed the noise."""
    digest = hashlib.sha256(f"torchbp DP-SGD noise {torch.initial_seed()}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**62


#: the trainer precisions a DP-SGD fit takes (see _refuse_reduced_precision)
_PRIVATE_PRECISIONS = ("32-true", "64-true")


def _refuse_reduced_precision(precision: str) -> None:
    """DP-SGD's noise covers a clipped sum that one sample moves by at most ``C``. Autocast
    (``16-mixed``, ``bf16-mixed``) hands the layers cast copies of their weights, which
    per-sample clipping cannot record (and 16-mixed's GradScaler would scale the loss before
    the clip); in bfloat16 or float16 parameters (``bf16-true``, ``16-true``) the rounding
    of the clipped sum lets one sample move it by more than ``C`` (1.096·C measured in
    bfloat16 on a batch of 256), beyond what the noise is calibrated for. Refused before
    the fit starts."""
    if precision not in _PRIVATE_PRECISIONS:
        raise ValueError(
            f"privacy (DP-SGD) needs trainer.precision 32-true or 64-true, got {precision!r}: "
            "mixed precision's autocast hides the layers' weights from per-sample clipping, "
            "and a half-precision clipped sum rounds one sample's share beyond max_grad_norm"
        )


#: the logged metrics computed from the private training batches without noise
#: (``train/epsilon`` is not: it depends on the steps taken only)
_PRIVATE_BATCH_METRICS = ("train/loss", "train/acc")


def _refuse_monitors_of_private_batches(trainer: pl.Trainer) -> None:
    """A ModelCheckpoint picking the best checkpoint, or an EarlyStopping choosing the last
    step, by ``train/loss`` or ``train/acc`` picks the released model by metrics of the
    private batches without noise: a choice that depends on the training data beyond what
    ε covers. Refused (validation metrics and ``train/epsilon`` are fine to monitor)."""
    for callback in trainer.callbacks:
        monitor = getattr(callback, "monitor", None)
        if monitor in _PRIVATE_BATCH_METRICS:
            raise ValueError(
                f"privacy (DP-SGD): {type(callback).__name__} monitors {monitor!r}, computed "
                "from the private training batches without noise, so the model it picks "
                "or the step it stops at depends on the training data beyond what epsilon "
                "covers; monitor a val/ metric (or train/epsilon) instead"
            )


def _refuse_non_finite_samples(ps: PerSampleGrads) -> None:
    """Raise before the noise if a sample's gradient is inf or NaN (non-finite features, or
    a diverged model): its clip factor is NaN and the clipped sum is NaN, so the step would
    release a NaN update, which tells that the batch held such a sample (no noise hides it).
    Nothing is released: the optimizer step does not run."""
    if not bool(ps.norms.isfinite().all()):
        raise RuntimeError(
            "privacy (DP-SGD): a sample's gradient is inf or NaN (non-finite features, or a "
            "diverged model), so the clipped gradient sum is not finite; the step is not "
            "taken (releasing it would tell that the batch held such a sample)"
        )


class _LeavePerSampleOnError(pl.Callback):
    """Leaves a DP step's ``per_sample_grads`` context when the fit stops between the
    forward and the end of the backward (a failing backward, Ctrl-C): left open, it would
    catch every later torchbp backward of the thread. Before the optimizer step, refuses a
    step of a private model whose noise was not added: a subclass's ``backward`` that does
    not call ``super().backward``, or its ``training_step`` that does not call
    ``super().training_step`` (where the per-sample clipping starts); the optimizer would
    release a gradient that is not DP-SGD's. Counts each step's Poisson draw as taken
    (see ``PrivateTraining._draws_to_skip``)."""

    def __init__(self) -> None:
        self._noisy_steps_before = 0  # the accountant's steps at the batch's start

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(pl_module, PrivateTraining):
            pl_module._close_per_sample(type(exception), exception, exception.__traceback__)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(pl_module, PrivateTraining) and pl_module.accountant is not None:
            self._noisy_steps_before = pl_module.accountant.steps
            pl_module._count_draw_taken(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not isinstance(pl_module, PrivateTraining) or pl_module.privacy is None:
            return
        opened = pl_module._close_per_sample() is not None
        assert pl_module.accountant is not None
        if opened or pl_module.accountant.steps != self._noisy_steps_before + 1:
            raise RuntimeError(
                "privacy (DP-SGD): the step's noise was not added before the optimizer "
                "step, so a gradient that is not DP-SGD's would be released; a subclass "
                "that overrides training_step or backward must call "
                "super().training_step(batch, batch_idx) and super().backward(loss)"
            )


class PrivateTraining:
    """The DP-SGD hooks and steps of :class:`~torchbp.lightning.ERMClassifier`, which
    inherits them: a LightningModule whose ``__init__`` sets ``privacy`` (a
    :class:`~torchbp.lightning.privacy.Privacy` or ``None``), ``accountant``,
    ``_restored_accountant``, ``_noise_generator``, ``_restored_noise_state``,
    ``_restored_sampler_state`` and ``_per_sample`` (all ``None``) and ``_draws_taken``
    (``(-1, 0)``), and whose ``net``,
    ``loss``, ``_loss_denominator``, ``_update_metrics``, ``train_loss`` and
    ``train_metrics`` a private training step uses."""

    privacy: Privacy | None
    accountant: PrivacyAccountant | None
    _restored_accountant: dict[str, Any] | None
    _noise_generator: torch.Generator | None
    _restored_noise_state: torch.Tensor | None
    _restored_sampler_state: dict[str, int] | None
    _draws_taken: tuple[int, int]
    _per_sample: PerSampleGrads | None

    def check_privacy(
        self,
        trainer: pl.Trainer,
        train_loader: Any,
        resumed: bool = False,
        datamodule: Any = None,
    ) -> None:
        """Raise now the ``ValueError`` that DP-SGD training would raise at its start: several
        devices or gradient accumulation, a precision other than ``32-true`` or ``64-true``,
        a train loader that is not Poisson-sampled (or, with ``secure_rng``, is reloaded
        during the fit), a ``delta`` not below ``1/N``, a ``datamodule`` that standardises
        with the training rows' statistics, a callback monitoring ``train/loss`` or
        ``train/acc`` (metrics of the private batches), and (for a run not ``resumed`` from a
        checkpoint, whose earlier steps are not known yet) an unreachable
        ``target_epsilon``. Nothing without ``privacy``. ``torchbp-train fit`` calls it
        before the run folder is made.

        Args:
            trainer: The trainer that will fit the model.
            train_loader: The DataLoader it will train on.
            resumed: The fit resumes from a checkpoint.
            datamodule: The DataModule the loader comes from, if any.
        """
        if self.privacy is None:
            return
        sampler = self._private_sampler(trainer, train_loader, datamodule)
        if self.privacy.target_epsilon is not None and not resumed and self.accountant is None:
            self._new_accountant(trainer, sampler)

    def _private_sampler(
        self, trainer: pl.Trainer, train_loader: Any, datamodule: Any
    ) -> PoissonBatchSampler:
        """The train loader's Poisson sampler, once the trainer and the data (``train_loader``,
        from ``datamodule`` if any) suit DP-SGD."""
        assert self.privacy is not None
        if "forward" in vars(self):
            # Lightning's fit of torch.compile(model) compiles the instance's forward, which
            # per_sample_grads cannot see into (its backward would stop at the first layer)
            raise ValueError(
                "privacy (DP-SGD) clips per-sample gradients, which needs the eager model: "
                "fit the model itself, not torch.compile(model) (or a model whose forward "
                "was replaced on the instance)"
            )
        if trainer.world_size > 1 or trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "privacy (DP-SGD) supports one device without gradient accumulation; got "
                f"world_size={trainer.world_size}, "
                f"accumulate_grad_batches={trainer.accumulate_grad_batches}"
            )
        _refuse_reduced_precision(trainer.precision)
        sampler = getattr(train_loader, "batch_sampler", None)
        if not isinstance(sampler, PoissonBatchSampler):
            raise ValueError(
                "privacy (DP-SGD): the privacy accountant assumes Poisson sampling; set "
                "data.poisson_sampling: true (a DataModule whose train loader uses "
                "torchbp.lightning.privacy.PoissonBatchSampler)"
            )
        self.privacy.check_delta(sampler.num_samples)
        if self.privacy.secure_rng:
            self._use_secure_batches(trainer, sampler)
        self._refuse_data_dependent_scaling(datamodule)
        _refuse_monitors_of_private_batches(trainer)
        epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if self.privacy.target_epsilon is not None and epochs < 1:
            raise ValueError(
                "privacy.target_epsilon needs trainer.max_epochs >= 1 (the run's length sets "
                f"the noise), got max_epochs={trainer.max_epochs}"
            )
        return sampler

    @staticmethod
    def _use_secure_batches(trainer: pl.Trainer, sampler: PoissonBatchSampler) -> None:
        """Poisson draws from the system's entropy (``privacy.secure_rng``): batches known
        to whoever knows the data seed void the amplification by sampling that ε counts
        on. Refused with loaders reloaded during the fit, whose new samplers would draw
        from the seed again."""
        if trainer.reload_dataloaders_every_n_epochs:
            raise ValueError(
                "privacy.secure_rng draws the Poisson batches from the system's entropy, "
                "which a train loader reloaded during the fit would not; got "
                "reload_dataloaders_every_n_epochs="
                f"{trainer.reload_dataloaders_every_n_epochs}"
            )
        sampler.use_secure_rng()

    @staticmethod
    def _refuse_data_dependent_scaling(datamodule: Any) -> None:
        """Standardising features with the training rows' mean and std lets one row move
        every scaled row, unbounded by the clipping norm: the ε of DP-SGD would not cover the
        data the model trains on. Refused for a DataModule with ``standardize`` on (the
        bundled ones); data scaled by known, public bounds is the way out."""
        if getattr(datamodule, "standardize", False):
            raise ValueError(
                "privacy (DP-SGD): data.standardize scales the features by the training "
                "rows' mean and std, which the privacy guarantee (epsilon) does not cover "
                "(one row moves every scaled row); set data.standardize: false and scale "
                "by known bounds instead (the bundled digits_dp config does)"
            )

    @staticmethod
    def _steps_left(trainer: pl.Trainer, sampler: PoissonBatchSampler) -> int:
        """The DP steps the trainer will still take: ``max_epochs`` (at least 1) epochs of the
        sampler's batches as ``limit_train_batches`` cuts them (Lightning's rule), at most
        ``max_steps``, less the steps already taken (a resumed run's)."""
        per_epoch = len(sampler)
        limit = trainer.limit_train_batches
        if isinstance(limit, float):
            per_epoch = int(per_epoch * limit)
        elif limit is not None:
            per_epoch = min(per_epoch, int(limit))
        epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        total = max(epochs, 1) * per_epoch
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            total = min(total, trainer.max_steps)
        return max(total - trainer.global_step, 0)

    def on_train_start(self) -> None:
        # the train DataLoader exists from here on (not yet in on_fit_start)
        if self.privacy is None:
            self._refuse_private_checkpoint()
            return
        self._refuse_secure_rng_after_seeded_noise()
        trainer = self.trainer
        sampler = self._private_sampler(trainer, trainer.train_dataloader, trainer.datamodule)
        accountant = self._new_accountant(trainer, sampler)
        # ε keeps counting: over a checkpoint's steps, or over an earlier fit's of these
        # weights (a second trainer.fit of the same model)
        spent = self._spent_privacy()
        if spent is not None:
            accountant.load_state_dict(spent)
        noise = self._continued_noise(accountant.steps)
        # set once complete: a resume refused above leaves no accountant of a fresh run
        self.accountant, self._restored_accountant = accountant, None
        self._noise_generator, self._restored_noise_state = noise, None
        self._expected_batch = sampler.sample_rate * sampler.num_samples
        self._draws_taken = (-1, 0)  # none of this fit's yet (a second fit of the model)
        # a run resumed in mid-epoch continues that epoch's Poisson draws: drawing its first
        # batches again would repeat them, where the accountant counts every step's batch
        # as a fresh draw
        if self._restored_sampler_state is not None:
            sampler.load_state_dict(self._draws_to_skip(self._restored_sampler_state))
            self._restored_sampler_state = None

    def _draws_to_skip(self, saved: dict[str, int]) -> dict[str, int]:
        """The checkpoint's Poisson sampler state ``saved``, its draws cut to those that
        went to training steps: a DataLoader with workers draws batches ahead of the steps,
        and those no step took (none released in an update) are the ones the uninterrupted
        fit trains next. A batch whose step an exception stopped is not drawn again (unlike
        a fit without privacy, whose loop trains it again): its noise may have been added
        and counted, so its draw is spent. Counted by the steps themselves, not by
        Lightning's batch counter, which restarts at the batches trained: after a resume
        that skipped a stopped step's draw, it is one draw behind."""
        taken = saved.get("taken")
        if taken is None:  # a checkpoint that predates the count: the batches fetched
            taken = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        skip = min(saved["drawn"], taken)
        self._draws_taken = (saved["epoch"], skip)
        return {"epoch": saved["epoch"], "drawn": skip}

    def _count_draw_taken(self, trainer: pl.Trainer) -> None:
        """Count the batch of the step ``trainer`` starts among the draws of the Poisson
        sampler's epoch that went to training steps (see :meth:`_draws_to_skip`)."""
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if not isinstance(sampler, PoissonBatchSampler):
            return
        epoch, taken = self._draws_taken
        self._draws_taken = (sampler.epoch, taken + 1 if epoch == sampler.epoch else 1)

    def _refuse_secure_rng_after_seeded_noise(self) -> None:
        """A ``secure_rng`` fit on a checkpoint that keeps a noise generator's state (a run
        without ``secure_rng``): its earlier steps' noise and batches stay computable from
        that run's seed, so ε would not hold against whoever holds it, contrary to what
        ``secure_rng`` promises for the whole run. Refused."""
        if self._secure_rng and self._restored_noise_state is not None:
            raise ValueError(
                "privacy.secure_rng: the checkpoint's steps drew their noise and batches "
                "from the run's seed (it keeps the noise generator's state), so the resumed "
                "run's randomness would not all be secret; resume with secure_rng: false, "
                "or train a secure_rng run from the start"
            )

    def _refuse_private_checkpoint(self) -> None:
        """A fit without privacy of weights loaded from a DP-SGD checkpoint would end as a
        model no ε holds for, while its checkpoints kept the DP steps' accountant (a DP fit
        resumed from one would count ε over those steps only): refused, as torchbp-train
        refuses it."""
        if self._restored_accountant is not None:
            raise ValueError(
                "the weights were loaded from a checkpoint trained with DP-SGD, and this model "
                "has privacy=None: training on without privacy would end with a model no "
                "epsilon holds for; fit with the checkpoint's privacy settings (its "
                "hyper_parameters have them)"
            )

    def _new_accountant(
        self, trainer: pl.Trainer, sampler: PoissonBatchSampler
    ) -> PrivacyAccountant:
        """An accountant for the steps ``trainer`` will take on ``sampler``'s batches (it
        computes the noise for ``target_epsilon``, or refuses an unreachable one)."""
        assert self.privacy is not None
        return PrivacyAccountant(
            self.privacy, sampler.sample_rate, steps=self._steps_left(trainer, sampler)
        )

    def _continued_noise(self, steps_taken: int) -> torch.Generator:
        """The generator of this fit's DP noise, on the parameters' device: the one of the
        steps taken before (a checkpoint's state, or the last fit's generator), so a resumed
        fit draws the noise an uninterrupted one would; for a fresh run, a generator seeded
        from the run's seed (see :func:`_noise_seed`: ``seed_everything`` makes the noise
        reproducible, whatever the run draws before the fit). A copy of the default
        generator would draw the very numbers that the rest of the run then draws from it
        (a dataset's augmentation, a subclass's dropout): noise that is a function of them,
        not the independent draw DP-SGD assumes.

        Noise drawn from the default generator itself repeated on a resume: the run seeds it
        again, and the resumed steps drew the very noise of the first steps, which the
        accountant (independent noise at every step) does not cover. Steps taken before
        without a state to continue (a checkpoint saved before the state was kept) get a
        generator seeded from the system's entropy, never a repeated stream (so does a
        state of another device's generator: a run resumed on a GPU from a CPU run's).

        With ``privacy.secure_rng`` every fit's generator is seeded from the system's
        entropy: noise that the run's seed does not give, and no checkpoint keeps."""
        device = self.device
        if self._secure_rng:
            return torch.Generator(device=device).manual_seed(secrets.randbits(64))
        last, state = self._noise_generator, self._restored_noise_state
        if state is None and last is not None and last.device == device:
            return last
        generator = torch.Generator(device=device)
        if state is None and last is None and steps_taken == 0:
            return generator.manual_seed(_noise_seed())
        try:
            if state is None:
                raise RuntimeError("no state to continue")
            generator.set_state(state)
        except RuntimeError:  # none, or a state of another device's generator
            generator.seed()
        return generator

    def _spent_privacy(self) -> dict[str, Any] | None:
        """The accountant state of these weights' steps: a checkpoint's, loaded with the
        weights but not yet continued by a fit (a later fit counts ε on from it), else the
        last fit's; ``None`` if there is neither."""
        if self._restored_accountant is not None:
            return self._restored_accountant
        return None if self.accountant is None else self.accountant.state_dict()

    @property
    def _secure_rng(self) -> bool:
        """The noise and the Poisson batches are drawn from the system's entropy."""
        return self.privacy is not None and self.privacy.secure_rng

    def _noise_state(self) -> torch.Tensor | None:
        """The noise generator's state that goes with :meth:`_spent_privacy`'s steps: a loaded
        checkpoint's, not yet continued by a fit (``None`` for one saved before the state was
        kept), else the last fit's generator's; ``None`` with ``privacy.secure_rng``, whose
        noise no checkpoint may give away."""
        if self._secure_rng:
            return None
        if self._restored_accountant is not None or self._noise_generator is None:
            return self._restored_noise_state
        return self._noise_generator.get_state()

    def _private_training_step(self, batch) -> torch.Tensor:
        x, y = batch
        assert self.privacy is not None
        self._per_sample = per_sample_grads(
            self.net, mode="clip", max_norm=self.privacy.max_grad_norm
        ).__enter__()
        try:
            logits = self(x)
            # DP-SGD clips each sample's gradient of its own loss, so the loss is summed;
            # the 1/L of the mean is applied after clipping and noise (backward).
            loss_sum = self.loss(logits, y, reduction="sum")
        except BaseException:
            self._close_per_sample(*sys.exc_info())
            raise
        # An empty Poisson draw goes through the same step: its clipped sum is 0, and the
        # update is the noise alone (skipping it would tell that the draw was empty).
        if x.shape[0]:
            # the batch's mean loss, weighted as without privacy (see _loss_denominator)
            mean = loss_sum.detach() / self._loss_denominator(y)
            self._update_metrics(self.train_loss, self.train_metrics, mean, logits.detach(), y)
        return loss_sum

    def _close_per_sample(self, *exc_info: Any) -> PerSampleGrads | None:
        """Leave the step's per_sample_grads context (with the error, if one was raised)."""
        ps, self._per_sample = self._per_sample, None
        if ps is not None:
            ps.__exit__(*(exc_info or (None, None, None)))
        return ps

    def configure_callbacks(self) -> list[pl.Callback]:
        # once per trainer: returned again (a test after the fit), Lightning would announce
        # that it replaces the one the fit attached
        try:
            attached = self.trainer.callbacks
        except RuntimeError:  # not attached to a Trainer
            attached = []
        if any(isinstance(c, _LeavePerSampleOnError) for c in attached):
            return []
        return [_LeavePerSampleOnError()]

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """The backward of a step, and for a DP step its noise: ``p.grad`` is the noisy
        gradient before any hook sees it (``on_after_backward`` of callbacks and of the
        module, ``on_before_optimizer_step``, ``gradient_clip_val``, the optimizer), so an
        override of those hooks cannot release the clipped sum without noise."""
        super().backward(loss, *args, **kwargs)  # type: ignore[misc]
        ps = self._close_per_sample()
        if ps is not None:
            self._noisy_step(ps)

    def _noisy_step(self, ps: PerSampleGrads) -> None:
        """Turn the step's clipped gradient sum into DP-SGD's noisy mean, and count it."""
        assert self.accountant is not None
        _refuse_non_finite_samples(ps)
        # g̃ = (Σ_i clip_C(g_i) + N(0, σ²C²)) / L
        ps.add_noise(self.accountant.noise_multiplier, generator=self._noise_generator)
        with torch.no_grad():
            for p in ps.parameters:
                p.grad.div_(self._expected_batch)
        self.accountant.step()

    def on_train_epoch_end(self) -> None:
        if self.accountant is not None:
            self.log("train/epsilon", self.accountant.epsilon(), prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = self._spent_privacy()
        if state is not None:
            checkpoint["privacy_accountant"] = state
        noise = self._noise_state()
        if noise is not None:
            checkpoint["privacy_noise_generator"] = noise
        # (the trainer saving a checkpoint is attached)
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        if self.privacy is not None and isinstance(sampler, PoissonBatchSampler):
            epoch, taken = self._draws_taken
            state = sampler.state_dict()
            state["taken"] = taken if epoch == sampler.epoch else 0
            checkpoint["privacy_poisson_sampler"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_accountant = checkpoint.get("privacy_accountant")
        noise = checkpoint.get("privacy_noise_generator")
        # Generator.set_state takes a CPU tensor only: a checkpoint loaded with
        # map_location="cuda" has it on the GPU
        self._restored_noise_state = None if noise is None else noise.cpu()
        self._restored_sampler_state = checkpoint.get("privacy_poisson_sampler")
