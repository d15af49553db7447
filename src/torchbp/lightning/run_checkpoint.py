""":class:`RunCheckpoint`, the checkpoint callback of ``torchbp-train`` (``--checkpoint.*``),
and the settings that follow its monitor or the subcommand."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

from torchbp.lightning.checkpoint_files import INTERRUPTED_SUFFIX, recorded_checkpoint_state
from torchbp.lightning.run_folders import SLURM_JOB_KEY, slurm_job

__all__ = [
    "UNFINISHED_VALIDATION_KEY",
    "RunCheckpoint",
    "evaluating_checkpoint_callback",
    "save_nothing",
    "checkpoint_filename",
    "follow_the_monitor",
    "improving_direction",
]


#: the logged metrics (the part after ``train/``, ``val/``, ``test/``) that improve upwards
_HIGHER_IS_BETTER = ("acc", "f1")
#: ERMClassifier's metrics that improve downwards
_LOWER_IS_BETTER = ("loss", "error")
#: what Lightning adds to the monitorable metrics: a checkpoint monitoring one keeps the latest
_PROGRESS = ("epoch", "step")
#: the key of a checkpoint saved during a fit's validation (Ctrl-C, SLURM's requeue signal):
#: ``{"epoch", "step", "checkpoint"}``, that validation's epoch and global step, and the name
#: of the checkpoint saved on the exception (``None`` if none was)
UNFINISHED_VALIDATION_KEY = "torchbp_unfinished_validation"
#: Lightning's warning, at a fit's setup, that its ModelCheckpoint's folder holds files
_FOLDER_NOT_EMPTY_WARNING = r"Checkpoint directory .* exists and is not empty"


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (``--checkpoint.*``), with these changes:

    - its checkpoint on an exception (Ctrl-C, SIGTERM, an error) is named
      ``<name>-interrupted.ckpt``: under the best checkpoints' own name (epoch and monitored
      value) it took the file of the best checkpoint of the same validation when the run
      stopped after a validation within the epoch, the best weights replaced by later ones;
    - ``last.ckpt`` follows every epoch (and validation within one, and the step at which
      ``max_steps`` stops the fit within one), see :meth:`_save_last_if_skipped`;
    - its state names the SLURM job that saved it (:meth:`state_dict`);
    - a checkpoint saved during a fit's validation records it, and a fit resumed from one
      warns that the validation will not be done as the uninterrupted fit did it (see
      :meth:`on_load_checkpoint`);
    - a fit resumed from another run's checkpoint keeps that run's best checkpoints as
      candidates where they exist and were validated on the same data (Lightning dropped
      them), and one resumed in its own folder drops those whose files are missing (see
      :meth:`load_state_dict`);
    - with ``resumes_its_run`` set (``torchbp-train fit --ckpt_path last``, a requeued SLURM
      job), Lightning's "Checkpoint directory ... exists and is not empty" is not given:
      the folder holds the run's own checkpoints, which the fit continues (see :meth:`setup`).
    """

    #: whether the fit resumes the run whose checkpoints fill this callback's folder
    resumes_its_run = False
    #: the state key taken to evaluate a checkpoint whose run configured this callback
    #: otherwise (see :func:`evaluating_checkpoint_callback`)
    _evaluated_state_key: str | None = None

    @property
    def state_key(self) -> str:
        """Lightning's key of this callback's state in a checkpoint, or, evaluating a
        checkpoint whose run configured it otherwise, the key of that run's state."""
        return self._evaluated_state_key or super().state_key

    _on_exception = False
    #: the global step of the latest checkpoint this callback saved (see :meth:`_own_saves`)
    _saved_at_step: int | None = None
    #: whether a checkpoint being saved is this callback's own (see :meth:`_own_saves`)
    _saving_own = False
    #: the global step of the latest ``last.ckpt`` saved by :meth:`_save_last_if_skipped`
    _last_saved_at_step: int | None = None
    #: whether the latest training batch was the last of its epoch
    _ended_epoch = False
    #: ``(epoch, global step)`` of the fit's validation under way, ``None`` outside one
    _validating: tuple[int, int] | None = None
    #: the file name of the checkpoint saved on the exception being handled
    _interrupted_name: str | None = None
    #: for a fit resumed from a checkpoint, the best checkpoints of its state that stay
    #: candidates (see :meth:`load_state_dict`); ``None`` for a checkpoint loaded to evaluate
    _kept_best: dict[str, Any] | None = None
    #: for a fit resumed from another folder's checkpoint, the best checkpoints of its run
    #: that lie inside this callback's folder and are no candidates (see :meth:`_best_to_keep`)
    _inside_dirpath: list[str] = []

    def __init__(self, *args: Any, enable_version_counter: bool = True, **kwargs: Any) -> None:
        """ModelCheckpoint's arguments; ``enable_version_counter`` is kept to name the
        ``last.ckpt`` saved here as Lightning names its own (see :meth:`_last_checkpoint_name`)."""
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)
        self.enable_version_counter = enable_version_counter

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Lightning's setup; for a fit that resumes its run (``resumes_its_run``) without
        Lightning's warning that the folder is not empty, which is meant for a new run
        whose checkpoints would mix with those a folder holds already."""
        with warnings.catch_warnings():
            if self.resumes_its_run:
                warnings.filterwarnings("ignore", message=_FOLDER_NOT_EMPTY_WARNING)
            super().setup(trainer, pl_module, stage)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: Any, checkpoint: dict) -> None:
        """Note the step of a save of this callback's own (Lightning calls this hook for
        every checkpoint: another ModelCheckpoint's, SLURM's hpc one); record a validation
        under way (see :meth:`on_validation_start`) in the checkpoint."""
        if self._saving_own:
            self._saved_at_step = trainer.global_step
        if self._validating is not None and (self._on_exception or not self._saving_own):
            epoch, step = self._validating
            checkpoint[UNFINISHED_VALIDATION_KEY] = {
                "epoch": epoch,
                "step": step,
                "checkpoint": self._interrupted_name,
            }

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        self._validating = None  # left set by an exception in a validation of an earlier fit

    def on_validation_start(self, trainer: Trainer, pl_module: Any) -> None:
        """A fit's validation is under way until this callback has considered its weights
        (see :meth:`on_validation_end`, :meth:`on_train_epoch_end`): a checkpoint saved
        meanwhile (on Ctrl-C, on SLURM's requeue signal, by a ModelCheckpoint of
        ``trainer.callbacks``, which Lightning runs first), other than this callback's own
        best and last checkpoints, holds a step whose validation the resumed fit does not do
        again, so that it never considers those weights."""
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validating = (trainer.current_epoch, trainer.global_step)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: Any, checkpoint: dict) -> None:
        """Warn when a fit resumes from a checkpoint saved during a validation: Lightning's
        saved loop counters make the resumed fit skip that validation (interrupted after its
        last batch) or finish it on the batches it had not reached, read from its loader's
        start (interrupted within them), so the step's ``val/*`` metrics are missing or come
        from part of the validation set, and its weights are no best-checkpoint candidate
        as the uninterrupted fit's were. Lightning offers no public way to run that
        validation again before training on. For a fit, find which of the best checkpoints
        its state records stay candidates (see :meth:`load_state_dict`)."""
        if trainer.state.fn != TrainerFn.FITTING:
            self._kept_best = None
            return
        self._kept_best = self._best_to_keep(trainer, checkpoint)
        unfinished = checkpoint.get(UNFINISHED_VALIDATION_KEY)
        if unfinished is not None:
            rank_zero_warn(_unfinished_validation_warning(unfinished, trainer.ckpt_path))

    def _best_to_keep(self, trainer: Trainer, checkpoint: dict) -> dict[str, Any]:
        """The best checkpoints (path: score) of this callback's state in ``checkpoint``
        that a fit resumed from it keeps: in the folder it saves into, all but the local
        files that are gone (a save cut short by Ctrl-C: Lightning counts a checkpoint
        among the best before writing it, and its final test failed to load the missing
        file); from another folder, the local files that exist, if that run validated on
        the configured data, except those inside the folder this fit saves into (see
        :func:`_deleted_when_beaten`), noted in ``_inside_dirpath``. Rank 0's view, so that
        every process takes the same best."""
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        best_k_models = (state or {}).get("best_k_models") or {}
        recorded = (state or {}).get("dirpath", self.dirpath)
        moved_here = False
        if recorded == self.dirpath:
            found = {path: path for path in best_k_models if not _missing_local_file(path)}
        elif _validated_on_the_same_data(trainer.datamodule, checkpoint):
            moved_here = _in_folder(trainer.ckpt_path, self.dirpath)
            found = _existing_files(list(best_k_models), self.dirpath if moved_here else None)
        else:
            found = {}
        # paths only: a score may be a tensor on rank 0's device
        found = trainer.strategy.broadcast(found)
        self._inside_dirpath = []
        if recorded != self.dirpath and not moved_here:  # another run's files
            self._inside_dirpath = sorted(
                path
                for path in found.values()
                if _deleted_when_beaten(path, self.dirpath, trainer.ckpt_path)
            )
        return {
            path: best_k_models[recorded_path]
            for recorded_path, path in found.items()
            if path not in self._inside_dirpath
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's restore, except for a fit resumed from a checkpoint of another folder
        (``fit --ckpt_path`` of another run's file: this fit saves into a new run folder).
        Lightning kept only ``best_model_path`` then ("The dirpath has changed"), which the
        first validation replaced however worse, so the fit's final test took this fit's
        best even where the checkpoint's run had a better one (``--ckpt_path last`` of a
        moved run folder, too). Its best checkpoints whose files still exist stay candidates
        here (never deleted: Lightning removes files of its own folder only) when the
        checkpoint's run validated on the same data; else this fit's best is among its own
        validations. A warning says which. Evaluating (validate, test, predict, saving
        nothing) it keeps its state: the test ending a fit whose best is that other run's
        checkpoint keeps the fit's."""
        recorded = state_dict.get("dirpath", self.dirpath)
        kept, self._kept_best = self._kept_best, None
        inside, self._inside_dirpath = self._inside_dirpath, []
        if recorded == self.dirpath:
            super().load_state_dict(state_dict)
            if kept is not None and set(kept) != set(self.best_k_models):
                gone = sorted(set(self.best_k_models) - set(kept))
                self._keep_best_k_models(kept)
                rank_zero_warn(_gone_best_warning(gone, self))
            return
        if kept is None:
            return  # evaluating, saving nothing: the test of a fit's best from another run
        # of the same monitor and mode: Lightning restores the state of a callback of both only
        self._keep_best_k_models(self._best_k_of(kept))
        rank_zero_warn(_carried_best_warning(recorded, self, kept, inside))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Lightning's save, then ``last.ckpt`` if ``max_steps`` stops the fit within the
        epoch: saved at epoch end, after Lightning has counted the cut epoch as finished, it
        resumed at the next epoch (the cut epoch's remaining batches never trained)."""
        with self._own_saves():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._ended_epoch = batch_idx + 1 >= trainer.num_training_batches
        if not self._ended_epoch and _max_steps_reached(trainer):
            self._save_last_if_skipped(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        """Lightning's save, then ``last.ckpt`` if the validation was within the epoch: the
        epoch's own last validation leaves it to :meth:`on_train_epoch_end`, where Lightning
        may still save (a best checkpoint and ``last.ckpt``) at this step. A validation
        within the epoch is finished once Lightning's save returns: its metrics are logged
        (Lightning runs the ModelCheckpoints' ``on_validation_end`` after computing and
        logging them, and after the other callbacks'), and its weights are considered here;
        Ctrl-C in that save, after Lightning has counted them among the best and before it
        wrote them, leaves it unfinished. The epoch's last validation stays under way until
        :meth:`on_train_epoch_end`, where Lightning considers its weights by default."""
        with self._own_saves():
            super().on_validation_end(trainer, pl_module)
        if not self._ended_epoch:
            self._validating = None
            self._save_last_if_skipped(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        """Lightning's save and ``last.ckpt``, except at the end of an epoch that
        ``max_steps`` cut: Lightning has counted it finished, so its checkpoint (a best one,
        and ``last.ckpt`` after it) would resume at the next epoch; the ``last.ckpt`` of
        :meth:`on_train_batch_end` holds this step's weights and the epoch's progress."""
        cut_by_max_steps = not self._ended_epoch and _max_steps_reached(trainer)
        if cut_by_max_steps and self._last_saved_at_step == trainer.global_step:
            return
        with self._own_saves():
            super().on_train_epoch_end(trainer, pl_module)
        self._validating = None  # the epoch's last validation is considered (see on_validation_end)
        self._save_last_if_skipped(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        """Lightning's ``last.ckpt`` at the end of training when it saved none of its own
        during the fit (``save_top_k`` 0, no epoch a multiple of ``every_n_epochs``), unless
        :meth:`_save_last_if_skipped` saved it at this step: it holds this state already."""
        if self._last_saved_at_step == trainer.global_step:
            return
        with self._own_saves():
            super().on_train_end(trainer, pl_module)

    def _keep_best_k_models(self, best_k_models: dict[str, Any]) -> None:
        """Take ``best_k_models`` (path: score) as this callback's, with the best and the
        k-th best among them as Lightning's ``_update_best_and_save`` sets them (none: as
        a new ModelCheckpoint's)."""
        self.best_k_models = dict(best_k_models)
        if not best_k_models:
            self.kth_best_model_path, self.best_model_path = "", ""
            self.kth_value = torch.tensor(float("inf") if self.mode == "min" else float("-inf"))
            self.best_model_score = None
            return
        worst, best = (max, min) if self.mode == "min" else (min, max)
        self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)
        self.kth_value = self.best_k_models[self.kth_best_model_path]
        self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)
        self.best_model_score = self.best_k_models[self.best_model_path]

    def _best_k_of(self, best_k_models: dict[str, Any]) -> dict[str, Any]:
        """The ``save_top_k`` best of ``best_k_models`` (all of them for ``save_top_k`` -1 or
        0): another run's best kept beyond this callback's ``save_top_k`` (that run saved
        more) left Lightning's count of them above k, so it never again removed one, and
        this fit kept every checkpoint that beat the worst carried one."""
        if self.save_top_k <= 0 or len(best_k_models) <= self.save_top_k:
            return best_k_models
        ranked = sorted(best_k_models, key=lambda path: float(best_k_models[path]))
        best_first = ranked[::-1] if self.mode == "max" else ranked
        return {path: best_k_models[path] for path in best_first[: self.save_top_k]}

    @contextmanager
    def _own_saves(self) -> Iterator[None]:
        """Mark the checkpoints saved within as this callback's own: :meth:`_save_last_if_skipped`
        skips a step at which this callback saved, never one at which another callback did
        (another ModelCheckpoint of ``trainer.callbacks``, saving first, left ``last.ckpt``
        at an older step)."""
        self._saving_own = True
        try:
            yield
        finally:
            self._saving_own = False

    def _save_last_if_skipped(self, trainer: Trainer) -> None:
        """``last.ckpt`` holds the latest weights, as ``--ckpt_path last`` (resume, evaluate)
        needs: Lightning 2.6 writes it only at a step where it also saved a best checkpoint,
        so after the best epoch it kept the best epoch's state (a resumed fit trained those
        epochs again; ``test --ckpt_path last`` evaluated the best weights). Saved here,
        through the public ``trainer.save_checkpoint`` (weights only with
        ``save_weights_only``, as Lightning's own), when fitting and this callback saved
        no checkpoint at this step (Lightning's own save, when it made one, comes first;
        another callback's save, as of another ModelCheckpoint, does not count). With
        ``save_last="link"`` it is saved as a file in place of the link (which points at an
        older checkpoint, not to be written through); Lightning links it again at its next
        save."""
        if not self.save_last or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return
        if self._saved_at_step == trainer.global_step or self.dirpath is None:
            return
        self.last_model_path = self._last_checkpoint_name(trainer)
        if trainer.is_global_zero and os.path.islink(self.last_model_path):
            os.remove(self.last_model_path)
        with self._own_saves():
            trainer.save_checkpoint(self.last_model_path, weights_only=self.save_weights_only)
        self._last_saved_at_step = trainer.global_step

    def _last_checkpoint_name(self, trainer: Trainer) -> str:
        """The path of ``last.ckpt`` as Lightning names it: numbered (``last-v1.ckpt``, ...)
        while a file of that name exists that is not this run's own last checkpoint (another
        run saved into the same ``dirpath``), unless the version counter is off."""
        metrics = dict(trainer.callback_metrics)
        path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        version = self.STARTING_VERSION
        while (
            self.enable_version_counter
            and path != self.last_model_path
            and self.file_exists(path, trainer)
        ):
            path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST, ver=version)
            version += 1
        return path

    def state_dict(self) -> dict[str, Any]:
        """Lightning's state, and the SLURM job that saved it (``None`` outside SLURM): a
        requeued job finds its run folder by it (see
        :func:`torchbp.lightning.run_folders.run_of_slurm_job`)."""
        return {**super().state_dict(), SLURM_JOB_KEY: slurm_job()}

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        self._on_exception = True
        try:
            with self._own_saves():
                super().on_exception(trainer, pl_module, exception)
        finally:
            self._on_exception = False
            self._interrupted_name = None

    def format_checkpoint_name(
        self,
        metrics: dict[str, torch.Tensor],
        filename: str | None = None,
        ver: int | None = None,
        prefix: str | None = None,
    ) -> str:
        if not self._on_exception or filename is not None:  # a best-k name, or last.ckpt
            return super().format_checkpoint_name(metrics, filename, ver, prefix)
        if self.monitor is not None and self.monitor not in metrics:
            # before the monitor is logged (Ctrl-C in the first epoch) Lightning wrote it
            # as 0 (epoch000-val_acc0.0000-interrupted.ckpt): named by epoch and step
            filename = checkpoint_filename(None)
        interrupted = self._interrupted_path(metrics, filename, ver, prefix)
        version = self.STARTING_VERSION
        while self.enable_version_counter and ver is None and os.path.exists(interrupted):
            # an earlier interrupt's file of the same epoch and value (or step): another run
            # into a shared dirpath, a replay from an older checkpoint. Checked locally, as
            # Lightning's exception save runs on the failing rank alone
            interrupted = self._interrupted_path(metrics, filename, version, prefix)
            version += 1
        self._interrupted_name = os.path.basename(interrupted)
        return interrupted

    def _interrupted_path(
        self, metrics: dict[str, torch.Tensor], filename: str | None, ver: int | None, prefix: Any
    ) -> str:
        """The exception checkpoint's path: Lightning's name (``-v<ver>`` numbered) with
        ``-interrupted`` before the extension."""
        name = super().format_checkpoint_name(metrics, filename, ver, prefix)
        stem, ext = os.path.splitext(name)
        return f"{stem}{INTERRUPTED_SUFFIX}{ext}"


def _unfinished_validation_warning(unfinished: dict[str, Any], ckpt_path: Any) -> str:
    """What a fit resumed from a checkpoint saved during a validation will not do, and how
    to evaluate the weights that validation was for: those of the ``-interrupted.ckpt``
    saved on the exception, which ``last.ckpt`` holds too but the resumed fit replaces; or,
    with none recorded (SLURM's requeue signal saves ``hpc_ckpt_<n>.ckpt`` only), those of
    the checkpoint resumed from, which the fit keeps."""
    name = unfinished.get("checkpoint")
    saved = os.path.join(os.path.dirname(str(ckpt_path)), name) if name else ckpt_path
    how = f"torchbp-train validate --ckpt_path {saved} evaluates them"
    return (
        f"the checkpoint this fit resumes from was saved during the validation of epoch "
        f"{unfinished['epoch']} (step {unfinished['step']}), which did not finish: the "
        "resumed fit skips it or finishes it on part of the validation set, so that "
        "validation's val/* metrics may be missing or partial, and those weights are not a "
        f"best-checkpoint candidate as the uninterrupted fit's were; {how}"
    )


def _validated_on_the_same_data(datamodule: Any, checkpoint: dict[str, Any]) -> bool:
    """Whether the checkpoint's run validated on ``datamodule``'s data: the checkpoint holds
    the state of a DataModule of its class naming the same source (torchbp's DataModules
    refuse the same source split otherwise); unknown for another DataModule."""
    if datamodule is None or not hasattr(datamodule, "state_dict"):
        return False
    saved = checkpoint.get(type(datamodule).__qualname__)
    configured = datamodule.state_dict()
    if not isinstance(saved, dict) or not isinstance(configured, dict):
        return False
    return "source" in saved and saved.get("source") == configured.get("source")


def _missing_local_file(path: str) -> bool:
    """Whether ``path`` names a local file that does not exist (a remote one, ``s3://...``,
    is not looked up)."""
    return "://" not in path and not os.path.isfile(path)


def _gone_best_warning(gone: list[str], callback: ModelCheckpoint) -> str:
    """What a fit resumed in its own folder takes for its best when best checkpoints that
    its checkpoint records are missing, why, and what would have kept them."""
    if callback.best_model_path:
        best = (
            f"the best so far is {callback.best_model_path} ({callback.monitor}="
            f"{float(callback.best_model_score):.4f}), which the fit's final test and "
            "--ckpt_path best take until a validation of this fit beats it"
        )
    else:
        best = "no best checkpoint is left: this fit's next validation saves the new best"
    return (
        f"the checkpoint this fit resumes from records best checkpoints whose files are "
        f"missing: {', '.join(gone)}. Lightning counts a checkpoint among the best before "
        "writing it, so an interrupt (Ctrl-C, SIGTERM) during that save leaves it unwritten. "
        f"This fit drops them from its best checkpoints; {best}. Nothing to do after an "
        "interrupt; a best checkpoint you moved or deleted must be back in place before a "
        "resume to stay a candidate"
    )


def _in_folder(path: Any, folder: Any) -> bool:
    """Whether the file ``path`` lies in ``folder`` (either may be ``None``)."""
    if path is None or folder is None:
        return False
    return os.path.realpath(os.path.dirname(str(path))) == os.path.realpath(str(folder))


def _existing_files(paths: list[str], moved_to: Any) -> dict[str, str]:
    """Of a checkpoint's best ``paths``, those whose local files still exist, each mapped to
    where: in ``moved_to`` under its name (the folder a run's checkpoints were moved to,
    ``None`` for another run's checkpoint: a file of that name there is another run's),
    else where recorded."""
    existing = {}
    for path in paths:
        moved = os.path.join(moved_to, os.path.basename(path)) if moved_to else path
        found = moved if os.path.isfile(moved) else path
        if os.path.isfile(found):
            existing[path] = found
    return existing


def _deleted_when_beaten(path: str, dirpath: Any, resume_path: Any) -> bool:
    """Whether Lightning's top-k cleanup would delete the local file ``path`` once it drops
    out of the best of a ModelCheckpoint saving into ``dirpath``: it deletes a dropped
    checkpoint anywhere inside that folder (subfolders too), except the one the fit resumed
    from, ``resume_path``."""
    if dirpath is None or "://" in str(path):
        return False
    file = Path(path).absolute()
    if resume_path is not None and file == Path(resume_path).absolute():
        return False
    return Path(dirpath).absolute() in file.parents


def _carried_best_warning(
    recorded: Any, callback: ModelCheckpoint, kept: dict[str, Any], inside: list[str]
) -> str:
    """What a fit resumed from another folder's checkpoint takes for its best so far:
    ``kept``, the best checkpoints of its run that stay candidates, and not ``inside``,
    those inside the folder this fit saves into, which Lightning would delete."""
    dirpath = callback.dirpath
    said = [f"this fit resumes from a checkpoint saved into {recorded} and saves into {dirpath}"]
    if inside:
        said.append(
            f"the best checkpoints its run recorded inside {dirpath} ({', '.join(inside)}) "
            "are no candidates: Lightning would delete them from there once a validation of "
            "this fit beats them (to keep them as candidates, save into a --checkpoint.dirpath "
            "that does not hold them)"
        )
    if kept:
        said.append(
            f"the best checkpoint its run recorded, {callback.best_model_path} "
            f"({callback.monitor}={float(callback.best_model_score):.4f}), stays this fit's "
            "best (and the one its test evaluates) until a validation of this fit beats it"
        )
    elif inside:
        said.append("this fit's best is chosen among its own validations")
    else:
        said.append(
            "the best checkpoints its run recorded are no candidates (gone, or validated on "
            "data not known to be the configured data: another source, or a DataModule that "
            "names none), so this fit's best is chosen among its own validations"
        )
    return "; ".join(said)


def _max_steps_reached(trainer: Trainer) -> bool:
    """Whether ``trainer.max_steps`` (``-1``: no limit) stops the fit at this step."""
    return 0 <= trainer.max_steps <= trainer.global_step


def evaluating_checkpoint_callback(callback: ModelCheckpoint, ckpt_path: str | None) -> None:
    """Make the checkpoint callback of validate, test or predict that of the run whose
    checkpoint it loads, saving nothing: Lightning restores the checkpoint's callback state
    into it, and one with another folder (the new run folder's) warned "The dirpath has
    changed" and dropped the state; without the callback it warned that the checkpoint's
    callbacks must be provided, also for a :class:`RunCheckpoint` of other options (the
    run's ``--checkpoint.monitor val/f1``, evaluated with the config's ``val/acc``), which
    takes that run's state key here."""
    save_nothing(callback)
    found = recorded_checkpoint_state(ckpt_path, callback)
    if found is None:
        return
    key, state = found
    if isinstance(callback, RunCheckpoint):
        callback._evaluated_state_key = key
    dirpath = state.get("dirpath")
    if callback.dirpath is None and isinstance(dirpath, str):
        callback.dirpath = dirpath


def save_nothing(callback: ModelCheckpoint) -> None:
    """Keep ``callback`` attached but have it save no checkpoint: no best, no ``last.ckpt``
    and none on an exception."""
    callback.save_top_k = 0
    callback.save_last = False
    callback.save_on_exception = False


def checkpoint_filename(monitor: str | None) -> str:
    """The default checkpoint file name: the epoch and the monitored value, e.g.
    ``epoch004-val_acc0.9666`` for ``val/acc``, ``epoch004-val_loss0.1201`` for ``val/loss``,
    with ``=`` after a name that ends in a digit (``epoch004-val_f1=0.9650`` for ``val/f1``,
    not ``val_f10.9650``); without a monitor, or monitoring ``epoch`` or ``step`` (the
    latest checkpoints are kept), the epoch and the global step: ``epoch004-step95`` (the
    metric names are not inserted: auto_insert_metric_name is off)."""
    if not monitor or monitor in _PROGRESS:
        return "epoch{epoch:03d}-step{step}"
    name = monitor.replace("/", "_")
    joint = "=" if name[-1].isdigit() else ""
    return f"epoch{{epoch:03d}}-{name}{joint}{{{monitor}:.4f}}"


def follow_the_monitor(checkpoint: Namespace) -> None:
    """Resolve the checkpoint options that follow ``checkpoint.monitor``: ``mode: auto``
    (see :func:`_checkpoint_mode`) and the default file name, which names the monitored
    value (a best-by-val/loss file named by its accuracy would mislead)."""
    monitor = checkpoint.get("monitor")
    if checkpoint.get("mode") == "auto":
        checkpoint["mode"] = _checkpoint_mode(monitor)
    if checkpoint.get("filename") == checkpoint_filename("val/acc"):
        checkpoint["filename"] = checkpoint_filename(monitor)


def _checkpoint_mode(monitor: str | None) -> str:
    """``checkpoint.mode: auto``: ``max`` for a metric that improves upwards (accuracy, F1)
    and for ``epoch`` and ``step`` (the latest checkpoints are kept), else Lightning's
    default, ``min`` (loss, 0-1 error)."""
    if monitor in _PROGRESS:
        return "max"
    return improving_direction(monitor) or "min"


def improving_direction(monitor: str | None) -> str | None:
    """``"max"`` for one of ERMClassifier's metrics that improves upwards (accuracy, F1),
    ``"min"`` for one that improves downwards (loss, 0-1 error), ``None`` for another name
    (``train/epsilon`` only grows: an EarlyStopping may stop at a budget either way).

    Examples::

        >>> improving_direction("val/f1"), improving_direction("val/loss")
        ('max', 'min')
    """
    name = (monitor or "").rsplit("/", 1)[-1]
    if name in _HIGHER_IS_BETTER:
        return "max"
    return "min" if name in _LOWER_IS_BETTER else None
