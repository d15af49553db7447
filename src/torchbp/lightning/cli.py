"""``torchbp-train``: LightningCLI for :class:`~torchbp.lightning.ERMClassifier`.

Examples::

    torchbp-train fit                                  # the main job: the bundled digits config
    torchbp-train fit --config iris                    # another bundled config, by name
    torchbp-train fit --config my.yaml                 # a config file
    torchbp-train fit --ckpt_path last                 # resume the latest run
    torchbp-train test --ckpt_path runs/digits/version_0/checkpoints/last.ckpt
    torchbp-train fit --config wine --print_config     # the full, resolved config

Configs: ``--config NAME`` names a config bundled with the package (``digits``,
``digits_native``, ``digits_dp``, ``iris``, ``wine``, ``breast_cancer``, ``synthetic_large``,
``ddp_cpu``; the files are in ``torchbp/lightning/configs/``) unless a file ``NAME`` exists; a
command line with no ``--config`` runs ``digits``. Options after ``--config`` override it.

Runs go to ``<run_dir>/<run_name>/version_<n>/`` (the next ``n``, made as the run starts: runs
started together never share a folder; ``run_name`` defaults to the stem of the last
``--config`` file, or with no ``--config`` and other data than the default's, to the data file's
stem (``--data.path my.csv``: ``my``); the run's saved ``config.yaml`` records it, so
``--config`` of that file runs under the same name): ``metrics.csv`` and, when tensorboard is
installed, TensorBoard events (neither with ``--trainer.logger false``), the resolved
``config.yaml`` and ``checkpoints/`` (none with ``--trainer.enable_checkpointing false``; best
on ``val/acc`` and ``last.ckpt``; another ``--checkpoint.monitor`` brings its own
``--checkpoint.mode``, default ``auto``: ``max`` for accuracy and F1, ``min`` for the rest, as
Lightning's default; Ctrl-C, SIGTERM or an error during ``fit`` also saves a checkpoint,
named ``...-interrupted.ckpt`` so that it never replaces a best one, and ``last.ckpt``).
``fit --ckpt_path last`` resumes the latest run with a ``last.ckpt`` in its own folder;
``validate``, ``test`` and ``predict`` load it from there (an error if there is none) but log
into a new run folder, so they never overwrite the files of the run they evaluate; with
``--ckpt_path best`` they load the best checkpoint of the latest run (``fit`` refuses ``best``).
With a configured ``--checkpoint.dirpath`` (every run saves there) ``last`` is its newest
``last*.ckpt``, as Lightning finds it, and ``best`` the best checkpoint that one records.
Every ``--ckpt_path`` (``last``, ``best`` or a file's path alike) runs the configured model
(not, as LightningCLI does for a file's path, the checkpoint's hyperparameters in place of the
configured ones, which dropped options given with it): a checkpoint of another model (layer
sizes, activation, label smoothing, class weights) or optimizer class is refused before
anything is written (use the run's ``config.yaml``); how the model runs (``backend``,
``compile``, ``fused_head``) may differ from the checkpoint's.
``--ckpt_path registry[:<model>[:<version>]]`` (Lightning's model registry) needs the
``litmodels`` package; without it the run refuses that syntax before it starts.
On SLURM, a ``fit`` that Lightning's auto-requeue saved (``hpc_ckpt_<n>.ckpt`` in the run
folder) and requeued continues in its own run folder from that checkpoint (the job is known by
its ``SLURM_JOB_ID``, recorded in the checkpoint; ``SLURM_RESTART_COUNT`` > 0 says it was
requeued), also with ``--trainer.default_root_dir``, where Lightning then saves it.
Under DDP, the workers Lightning launches take rank 0's run folder (``TORCHBP_RUN_FOLDER``).
``fit`` ends by testing the best checkpoint on the test split and printing the test metrics;
``predict`` writes the class probabilities of the DataModule's predict split (the test split for
torchbp's DataModules, or the rows of a new file given as ``--data.predict_path`` to
``TabularFileDataModule``) to ``predictions.csv`` in its run folder: a column ``prediction``
(the most probable class; for a data file, by its label in the file) and ``prob_<class>`` per
class.

Errors before training start with ``error:`` and their cause on one line, and exit with
status 2: a bad option or value, an invalid configuration (e.g. ``--trainer.accelerator cuda``
without a GPU) or a data problem (e.g. a missing data file).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from torchbp.lightning.config_files import (
    DEFAULT_CONFIG,
    describe_bundled_configs,
    is_config_option,
    with_config_files,
)
from torchbp.lightning.console import (
    ShortErrorParser,
    exit_with_error,
    headline,
    quiet_lightning,
)
from torchbp.lightning.data import (
    ArrayDataModule,
    ClassificationDataModule,
    DataConfigError,
    DataError,
    SyntheticDataModule,
)
from torchbp.lightning.module import ERMClassifier
from torchbp.lightning.run_logger import RunCSVLogger, write_predictions

__all__ = ["TorchbpCLI", "RunCheckpoint", "RUN_FOLDER_ENV", "main", "cli_main"]

_VERSION_RE = re.compile(r"^version_(\d+)$")
#: ``ckpt_path`` values that Lightning resolves itself (``last`` is resolved here)
_LIGHTNING_CKPT_NAMES = ("best", "hpc")
#: Lightning's model-registry ``ckpt_path``: ``registry`` or ``registry:<model>[:<version>]``
_REGISTRY_RE = re.compile(r"^registry(:.*)?$", re.IGNORECASE)
#: the logged metrics (the part after ``train/``, ``val/``, ``test/``) that improve upwards
_HIGHER_IS_BETTER = ("acc", "f1")
#: subcommands that load a checkpoint to evaluate it and never save one
_EVALUATING_SUBCOMMANDS = ("validate", "test", "predict")
#: ends the name of the checkpoint saved on an exception (see RunCheckpoint)
INTERRUPTED_SUFFIX = "-interrupted"
#: what ``predict`` writes into its run folder
PREDICTIONS_FILE = "predictions.csv"
#: the environment variable by which rank 0 hands its run folder to the processes it launches
RUN_FOLDER_ENV = "TORCHBP_RUN_FOLDER"
#: what RunCheckpoint's state names the SLURM job that saved it by
SLURM_JOB_KEY = "slurm_job"
#: the data class of the default config (``digits``), by which its runs are named
_DEFAULT_DATA = "DigitsDataModule"
#: errors of instantiating data, model and trainer that mean "fix the configuration"
_CONFIG_ERRORS = (ValueError, TypeError, OSError, MisconfigurationException)
#: ERMClassifier's options that choose how the model runs, not which model it is: they may
#: differ from a checkpoint's (the optimizer's class is checked against its saved state, and
#: a fit's privacy by TorchbpCLI._check_resume_privacy)
_HOW_THE_MODEL_RUNS = ("backend", "compile", "fused_head", "optimizer", "lr_scheduler", "privacy")


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (``--checkpoint.*``) with three changes:

    - its checkpoint on an exception (Ctrl-C, SIGTERM, an error) is named
      ``<name>-interrupted.ckpt``: under the best checkpoints' own name (epoch and monitored
      value) it took the file of the best checkpoint of the same validation when the run
      stopped after a validation within the epoch, the best weights replaced by later ones;
    - ``last.ckpt`` follows every epoch (and validation within one), see
      :meth:`_save_last_if_skipped`;
    - its state names the SLURM job that saved it (:meth:`state_dict`).
    """

    _on_exception = False
    #: the global step of the latest checkpoint this trainer saved (any file)
    _saved_at_step: int | None = None
    #: the global step of the latest ``last.ckpt`` saved by :meth:`_save_last_if_skipped`
    _last_saved_at_step: int | None = None
    #: whether the latest training batch was the last of its epoch
    _ended_epoch = False

    def __init__(self, *args: Any, enable_version_counter: bool = True, **kwargs: Any) -> None:
        """ModelCheckpoint's arguments; ``enable_version_counter`` is kept to name the
        ``last.ckpt`` saved here as Lightning names its own (see :meth:`_last_checkpoint_name`)."""
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)
        self.enable_version_counter = enable_version_counter

    def on_save_checkpoint(self, trainer: Trainer, pl_module: Any, checkpoint: dict) -> None:
        self._saved_at_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._ended_epoch = batch_idx + 1 >= trainer.num_training_batches

    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        """Lightning's save, then ``last.ckpt`` if the validation was within the epoch: the
        epoch's own last validation leaves it to :meth:`on_train_epoch_end`, where Lightning
        may still save (a best checkpoint and ``last.ckpt``) at this step."""
        super().on_validation_end(trainer, pl_module)
        if not self._ended_epoch:
            self._save_last_if_skipped(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_if_skipped(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        """Lightning's ``last.ckpt`` at the end of training when it saved none of its own
        during the fit (``save_top_k`` 0, no epoch a multiple of ``every_n_epochs``), unless
        :meth:`_save_last_if_skipped` saved it at this step: it holds this state already."""
        if self._last_saved_at_step == trainer.global_step:
            return
        super().on_train_end(trainer, pl_module)

    def _save_last_if_skipped(self, trainer: Trainer) -> None:
        """``last.ckpt`` holds the latest weights, as ``--ckpt_path last`` (resume, evaluate)
        needs: Lightning 2.6 writes it only at a step where it also saved a best checkpoint,
        so after the best epoch it kept the best epoch's state (a resumed fit trained those
        epochs again; ``test --ckpt_path last`` evaluated the best weights). Saved here,
        through the public ``trainer.save_checkpoint`` (weights only with
        ``save_weights_only``, as Lightning's own), when fitting and no checkpoint was
        saved at this step (Lightning's own save, when it made one, comes first). With
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
        requeued job finds its run folder by it (see :func:`_run_of_slurm_job`)."""
        return {**super().state_dict(), SLURM_JOB_KEY: _slurm_job()}

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        self._on_exception = True
        try:
            super().on_exception(trainer, pl_module, exception)
        finally:
            self._on_exception = False

    def format_checkpoint_name(
        self,
        metrics: dict[str, torch.Tensor],
        filename: str | None = None,
        ver: int | None = None,
        prefix: str | None = None,
    ) -> str:
        name = super().format_checkpoint_name(metrics, filename, ver, prefix)
        if not self._on_exception or filename is not None:  # a best-k name, or last.ckpt
            return name
        stem, ext = os.path.splitext(name)
        return f"{stem}{INTERRUPTED_SUFFIX}{ext}"


def _versions(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name)))


def _is_distributed_worker() -> bool:
    """Whether this process is a worker of a multi-process run, not its rank 0 (Lightning's
    launcher, torchrun and SLURM name the ranks in the environment)."""
    ranks = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
    return any(os.environ.get(name, "0") != "0" for name in ranks)


def _version_of_rank_zero(root: Path) -> int | None:
    """The version of the run folder under ``root`` that rank 0 made before it launched this
    worker (Lightning's launcher re-runs the command line with rank 0's environment), or
    ``None`` if it named none there (a worker started by torchrun or srun, or of another run)."""
    handed = os.environ.get(RUN_FOLDER_ENV)
    if not handed or os.path.dirname(handed) != os.path.abspath(root):
        return None
    match = _VERSION_RE.match(os.path.basename(handed))
    return int(match.group(1)) if match else None


def _slurm_job() -> str | None:
    """This process's SLURM job as Lightning requeues it (``<array job>_<task>`` in a job
    array, else the job id), or ``None`` outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def _is_slurm_requeue() -> bool:
    """Whether this process runs a SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0:
    SLURM runs the job's script again, with the same job id)."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return _slurm_job() is not None and restarts.isdigit() and int(restarts) > 0


def _newest_hpc_checkpoint(folder: Path) -> Path | None:
    """The ``hpc_ckpt_<n>.ckpt`` of ``folder`` with the largest ``n`` (Lightning's choice)."""
    numbered = []
    for path in folder.glob("hpc_ckpt_*.ckpt"):
        number = path.stem.removeprefix("hpc_ckpt_")
        if number.isdigit():
            numbered.append((int(number), path))
    return max(numbered)[1] if numbered else None


def _job_state(hpc: Path | None, job: str) -> dict[str, Any] | None:
    """The checkpoint-callback state in the hpc checkpoint ``hpc`` that records the SLURM job
    ``job`` (RunCheckpoint's), or ``None`` (no checkpoint, or another job's)."""
    checkpoint = None if hpc is None else _read_checkpoint(hpc)
    callbacks = (checkpoint or {}).get("callbacks")
    if not isinstance(callbacks, dict):
        return None
    return next(
        (c for c in callbacks.values() if isinstance(c, dict) and c.get(SLURM_JOB_KEY) == job),
        None,
    )


def _run_of_slurm_job(root: Path, job: str, hpc_folder: Path | None) -> tuple[int, Path] | None:
    """The run folder under ``root`` of the SLURM job ``job`` and the hpc checkpoint it saved
    last, as the folder's version and the checkpoint; ``None`` if there is none (another
    job's run is never taken). Lightning saves hpc checkpoints into trainer.default_root_dir:
    the run folder itself unless ``hpc_folder`` (``--trainer.default_root_dir``) is given,
    whose checkpoint names its run folder by the checkpoint folder it recorded."""
    if hpc_folder is not None:
        hpc = _newest_hpc_checkpoint(hpc_folder)
        dirpath = (_job_state(hpc, job) or {}).get("dirpath")
        if hpc is None or not isinstance(dirpath, str):
            return None
        run_folder = Path(dirpath).parent  # <run folder>/checkpoints
        match = _VERSION_RE.match(run_folder.name)
        if match and os.path.realpath(run_folder.parent) == os.path.realpath(root):
            return int(match.group(1)), hpc
        return None
    for version in reversed(_versions(root)):
        hpc = _newest_hpc_checkpoint(root / f"version_{version}")
        if hpc is not None and _job_state(hpc, job) is not None:
            return version, hpc
    return None


def _make_new_folder(folder: Path) -> list[Path] | None:
    """Make ``folder`` and its missing parents: the folders made, deepest first, or
    ``None`` if ``folder`` exists (another run made it)."""
    missing = []
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        return None
    return [folder, *missing]


def _check_monitor(option: str, monitor: str, logged: list[str]) -> None:
    """Raise a ``ValueError`` naming ``option`` if ``monitor`` is not one of ``logged``."""
    if monitor not in logged:
        raise ValueError(
            f"{option} {monitor!r} is not a metric the model logs during fit; "
            f"monitor one of {', '.join(logged)}"
        )


def _newest_last_checkpoint(folder: Path) -> Path | None:
    """The newest ``last*.ckpt`` of ``folder`` (Lightning's choice for ``ckpt_path="last"``:
    a second run into one checkpoint folder saves ``last-v1.ckpt``), or ``None``."""
    candidates = [p for p in folder.glob("last*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _best_checkpoint(folder: Path, last: str = "last.ckpt") -> Path | None:
    """The best checkpoint in a run's ``checkpoints`` folder: the one its ``last`` checkpoint
    records as ModelCheckpoint's ``best_model_path`` (looked up in ``folder``, so a moved run
    folder still works; ``None`` if it records none, as after an interrupt before the first
    validation, whose exception checkpoint is no best), else, without a readable ``last``,
    the folder's only checkpoint besides ``last*.ckpt``."""
    state = _read_checkpoint(folder / last) if (folder / last).is_file() else None
    if state is not None:
        for callback in (state.get("callbacks") or {}).values():
            recorded = callback.get("best_model_path") if isinstance(callback, dict) else None
            if recorded and (folder / Path(recorded).name).is_file():
                return folder / Path(recorded).name
        return None
    others = [
        p
        for p in folder.glob("*.ckpt")
        if not p.name.startswith("last") and not p.stem.endswith(INTERRUPTED_SUFFIX)
    ]
    return others[0] if len(others) == 1 else None


def _is_registry_name(ckpt_path: str | None) -> bool:
    """Whether ``--ckpt_path`` has the syntax of Lightning's model registry: ``registry`` or
    ``registry:<model>[:<version>]`` (any case, as Lightning reads it)."""
    return ckpt_path is not None and _REGISTRY_RE.match(str(ckpt_path)) is not None


def _from_registry(ckpt_path: str | None) -> bool:
    """Whether Lightning downloads ``--ckpt_path`` from its model registry: a registry name
    with the ``litmodels`` package installed (without it, Lightning reads it as a file's)."""
    return _is_registry_name(ckpt_path) and importlib.util.find_spec("litmodels") is not None


def _local_checkpoint(ckpt_path: str | None) -> Path | None:
    """``--ckpt_path`` as a local file's path; ``None`` for no checkpoint, a name Lightning
    resolves itself (``best``, ``hpc``, ``registry[:...]``) or a remote one (``s3://...``)."""
    if ckpt_path is None or str(ckpt_path) in _LIGHTNING_CKPT_NAMES or "://" in str(ckpt_path):
        return None
    return None if _from_registry(ckpt_path) else Path(ckpt_path)


def _check_registry_checkpoint(ckpt_path: str | None) -> None:
    """A model-registry ``--ckpt_path`` needs the ``litmodels`` package, with which Lightning
    downloads it; without it (and no file of that name) the error names the package, not a
    missing file."""
    if not _is_registry_name(ckpt_path) or _from_registry(ckpt_path):
        return
    if not Path(str(ckpt_path)).is_file():
        exit_with_error(
            f"--ckpt_path {ckpt_path}: Lightning's model registry "
            "(registry[:<model>[:<version>]]) needs the litmodels package, which is not "
            "installed (pip install litmodels); or give a checkpoint file's path, last or best"
        )


def _why_unreadable(path: Path) -> str | None:
    """Why the file at ``path`` is no checkpoint that ``torch.save`` wrote in full (one cut
    short by a crash or a full disk, or another kind of file), or ``None``. Lightning saves
    zip archives; one that needs ``weights_only=False`` is left to Lightning."""
    if not zipfile.is_zipfile(path):
        return "not a zip archive, as torch.save writes"
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        return None  # readable, but not weights-only
    except (RuntimeError, OSError, EOFError) as e:
        return headline(str(e))
    return None


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (memory-mapped), or ``None`` if it cannot be read here
    (Lightning then reports it)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, pickle.UnpicklingError):
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def _weights_mismatch(checkpoint: dict[str, Any], model: torch.nn.Module) -> list[str]:
    """What keeps ``model`` from loading the checkpoint's weights (Lightning loads them
    strictly unless the model's ``strict_loading`` is false): a tensor of another shape, a
    missing or an unexpected one."""
    weights = checkpoint.get("state_dict")
    if not isinstance(weights, dict):
        return []
    own = model.state_dict()
    problems = [
        f"{key}: {tuple(weights[key].shape)} in the checkpoint, {tuple(value.shape)} in the model"
        for key, value in own.items()
        if isinstance(weights.get(key), torch.Tensor) and weights[key].shape != value.shape
    ]
    if getattr(model, "strict_loading", True):
        problems += [f"{key}: not in the checkpoint" for key in own if key not in weights]
        problems += [f"{key}: not in the model" for key in weights if key not in own]
    return problems


def _hyperparameters_mismatch(checkpoint: dict[str, Any], model: ERMClassifier) -> list[str]:
    """Which of ``model``'s options make it another model than the checkpoint's (one that
    loads the weights all the same: another activation, label smoothing or class weights),
    as ``model.<option>: <saved> in the checkpoint, <configured> configured``."""
    saved = checkpoint.get("hyper_parameters")
    if not isinstance(saved, dict):
        return []
    configured = dict(model.hparams)
    problems = []
    for key, value in configured.items():
        if key in _HOW_THE_MODEL_RUNS or key not in saved:
            continue
        if key == "negative_slope" and configured.get("activation") != "leaky_relu":
            continue  # the slope of leaky_relu only
        if not _same_setting(saved[key], value):
            problems.append(f"model.{key}: {saved[key]!r} in the checkpoint, {value!r} configured")
    return problems


def _same_setting(saved: Any, configured: Any) -> bool:
    """Whether a checkpoint's hyperparameter and the configured one are the same setting:
    numbers, alone or in a list, tuple or tensor (a checkpoint saved from Python holds them
    as they were given), that are equal in float32, the precision the model computes in
    (its class weights are a float32 buffer); anything else equal."""
    saved_numbers, configured_numbers = _as_float32(saved), _as_float32(configured)
    if saved_numbers is None or configured_numbers is None:
        return saved_numbers is configured_numbers and saved == configured
    return saved_numbers.shape == configured_numbers.shape and bool(
        (saved_numbers == configured_numbers).all()
    )


def _as_float32(value: Any) -> torch.Tensor | None:
    """``value`` as a float32 tensor if it is a number or numbers (``None`` for anything else:
    a name, ``None``, a dict)."""
    if not isinstance(value, (int, float, list, tuple, torch.Tensor)):
        return None
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        return None


def _check_resumable(checkpoint: dict[str, Any], path: str) -> None:
    """A fit resumes from a checkpoint holding the optimizer and loop state, not from one
    saved with ``save_weights_only`` (Lightning refuses it with a KeyError only once the run
    has started, after it saved an exception checkpoint and a ``last-v1.ckpt`` beside it)."""
    if "optimizer_states" not in checkpoint:
        exit_with_error(
            f"--ckpt_path: {path} holds the weights only (saved with "
            "checkpoint.save_weights_only): a fit cannot resume from it, it has no optimizer "
            "or loop state; test, validate or predict with it, or give a full checkpoint"
        )


def _optimizer_mismatch(checkpoint: dict[str, Any], optimizer: torch.optim.Optimizer) -> list[str]:
    """What keeps ``optimizer`` from continuing the checkpoint's optimizer state (that of
    another optimizer class): the settings its parameter groups need that the saved groups
    lack (SGD's ``momentum`` in Adam's state), or another number of groups."""
    saved = checkpoint.get("optimizer_states") or []
    if len(saved) != 1 or not isinstance(saved[0], dict):
        return []
    saved_groups = saved[0].get("param_groups") or []
    groups = optimizer.state_dict()["param_groups"]
    if len(saved_groups) != len(groups):
        return [f"{len(saved_groups)} parameter group(s) saved, {len(groups)} configured"]
    needed = {key for group in groups for key in group}
    missing = sorted(needed - {key for group in saved_groups for key in group})
    return [f"no {', '.join(missing)} in the saved state"] if missing else []


def _configured_optimizer(model: Any) -> torch.optim.Optimizer | None:
    """The one optimizer ``model.configure_optimizers()`` makes (``None`` for anything else)."""
    configured = model.configure_optimizers()
    if isinstance(configured, dict):
        configured = configured.get("optimizer")
    return configured if isinstance(configured, torch.optim.Optimizer) else None


def _why_unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot be made and written into (its nearest existing ancestor is a file,
    or not writable), or ``None``."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _recorded_checkpoint_dir(ckpt_path: str | None, callback: ModelCheckpoint) -> str | None:
    """The folder that ``callback``'s state in the checkpoint at ``ckpt_path`` records (the
    checkpoint's run saved it there), or ``None`` if it records none or cannot be read."""
    path = _local_checkpoint(ckpt_path)
    checkpoint = None if path is None else _read_checkpoint(path)
    states = (checkpoint or {}).get("callbacks") or {}
    state = states.get(callback.state_key) if isinstance(states, dict) else None
    dirpath = state.get("dirpath") if isinstance(state, dict) else None
    return dirpath if isinstance(dirpath, str) else None


def _evaluating_checkpoint_callback(callback: ModelCheckpoint, ckpt_path: str | None) -> None:
    """Make the checkpoint callback of validate, test or predict that of the run whose
    checkpoint it loads, saving nothing: Lightning restores the checkpoint's callback state
    into it, and one with another folder (the new run folder's) warned "The dirpath has
    changed" and dropped the state; without the callback it warned that the checkpoint's
    callbacks must be provided."""
    _save_nothing(callback)
    if callback.dirpath is None:
        callback.dirpath = _recorded_checkpoint_dir(ckpt_path, callback)


def _save_nothing(callback: ModelCheckpoint) -> None:
    """Keep ``callback`` attached but have it save no checkpoint: no best, no ``last.ckpt``
    and none on an exception."""
    callback.save_top_k = 0
    callback.save_last = False
    callback.save_on_exception = False


def _keep_command_line_ckpt_path(config: Namespace, argv: list[str]) -> None:
    """A ``--ckpt_path`` given on the command line holds whatever its order among the
    ``--config`` files: a run's saved ``config.yaml`` has ``ckpt_path: null``, which, given
    after ``--ckpt_path last``, replaced it (jsonargparse applies arguments in order) and
    the run evaluated an untrained model. A config file's own non-null ``ckpt_path`` still
    wins when it comes later, as jsonargparse orders it."""
    subcommand = config.get("subcommand")
    if not subcommand or config[subcommand].get("ckpt_path") is not None:
        return
    given = None
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            given = argv[i + 1]
        elif arg.startswith("--ckpt_path="):
            given = arg.split("=", 1)[1]
    if given is not None and given not in ("null", "None", ""):
        config[subcommand]["ckpt_path"] = given


def _checkpoint_filename(monitor: str | None) -> str:
    """The default checkpoint file name: the epoch and the monitored value, e.g.
    ``epoch004-val_acc0.9666`` for ``val/acc``, ``epoch004-val_loss0.1201`` for ``val/loss``;
    without a monitor (the latest checkpoint is kept) the epoch and the global step:
    ``epoch004-step95`` (the metric names are not inserted: auto_insert_metric_name is off)."""
    if not monitor:
        return "epoch{epoch:03d}-step{step}"
    return f"epoch{{epoch:03d}}-{monitor.replace('/', '_')}{{{monitor}:.4f}}"


def _as_callback_list(callbacks: Any) -> list[Any]:
    """``trainer.callbacks`` as a new list: Lightning's Trainer takes one callback, a list
    of them or ``None``."""
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def _run_loggers(root: Path, version: int | None) -> list[Any]:
    """The loggers of the run folder ``root/version_<version>``: metrics.csv (kept across
    resumes) and, when tensorboard is installed, TensorBoard's events."""
    loggers: list[Any] = [RunCSVLogger(root.parent, root.name, version)]
    try:
        import tensorboard  # noqa: F401

        loggers.append(
            TensorBoardLogger(
                save_dir=str(root.parent), name=root.name, version=version, default_hp_metric=False
            )
        )
    except ImportError:
        pass
    return loggers


def _add_rich_progress_bar(callbacks: list[Any]) -> None:
    """Add Lightning's rich progress bar to ``callbacks`` when rich is installed and they
    hold no progress bar."""
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return
    try:
        import rich  # noqa: F401
        from pytorch_lightning.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    except ImportError:
        pass


def _set_num_threads(threads: int | None) -> None:
    """``--torch_num_threads``: ``torch.set_num_threads`` (nothing for ``None``)."""
    if threads is None:
        return
    if threads < 1:
        exit_with_error(f"invalid configuration: torch_num_threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def _follow_the_monitor(checkpoint: Namespace) -> None:
    """Resolve the checkpoint options that follow ``checkpoint.monitor``: ``mode: auto``
    (see :func:`_checkpoint_mode`) and the default file name, which names the monitored
    value (a best-by-val/loss file named by its accuracy would mislead)."""
    monitor = checkpoint.get("monitor")
    if checkpoint.get("mode") == "auto":
        checkpoint["mode"] = _checkpoint_mode(monitor)
    if checkpoint.get("filename") == _checkpoint_filename("val/acc"):
        checkpoint["filename"] = _checkpoint_filename(monitor)


def _data_run_name(data: Any) -> str | None:
    """The run name of the default config run on other data (``--data ... --data.path
    my.csv`` without ``--config``): the data file's stem, else the DataModule's class name;
    ``None`` for the default config's own data."""
    class_path = str(getattr(data, "class_path", None) or "")
    if not class_path or class_path.endswith("." + _DEFAULT_DATA):
        return None
    path = (getattr(data, "init_args", None) or {}).get("path")
    return Path(str(path)).stem if path else class_path.rsplit(".", 1)[-1]


def _checkpoint_mode(monitor: str | None) -> str:
    """``checkpoint.mode: auto``: ``max`` for a metric that improves upwards (accuracy, F1),
    else Lightning's default, ``min`` (loss, 0-1 error)."""
    name = (monitor or "").rsplit("/", 1)[-1]
    return "max" if name in _HIGHER_IS_BETTER else "min"


def _describe(error: BaseException) -> str:
    """One line for an error raised while instantiating data, model and trainer: its message
    followed by those of its chained causes that add something, or, if the DataModule raised
    it, the DataModule's message."""
    chain = [error]
    while isinstance(cause := chain[-1].__cause__ or chain[-1].__context__, _CONFIG_ERRORS):
        chain.append(cause)
    data = next((e for e in chain if isinstance(e, DataConfigError)), None)
    if isinstance(data, DataError):
        return f"data problem: {data}"
    if data is not None:
        return f"invalid data configuration: {data}"
    message = headline(str(error))
    for cause in map(str, chain[1:]):
        if cause and headline(cause) not in message:
            message = f"{message}: {headline(cause)}"
    return f"invalid configuration: {message}"


class TorchbpCLI(LightningCLI):
    """LightningCLI with torchbp's defaults: bundled configs, model/data linking, run folders,
    checkpoints, loggers, short error messages and a test of the best checkpoint after
    ``fit``.

    Args:
        *args: Passed to :class:`~pytorch_lightning.cli.LightningCLI` after the model class
            (:class:`ERMClassifier`) and the DataModule base class.
        **kwargs: LightningCLI's keyword arguments; torchbp's defaults fill those not given.

    Examples::

        cli = TorchbpCLI(args=["fit", "--config", "iris", "--trainer.max_epochs=5"])
        cli.trainer.callback_metrics["test/acc"]
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"max_epochs": 20, "log_every_n_steps": 1})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_class", ShortErrorParser)
        config_help = describe_bundled_configs()
        kwargs.setdefault(
            "parser_kwargs",
            {
                "description": f"Train torchbp's ERMClassifier. {config_help}",
                **{cmd: {"epilog": config_help} for cmd in self.subcommands()},
            },
        )
        super().__init__(ERMClassifier, ClassificationDataModule, *args, **kwargs)

    # -- parser ---------------------------------------------------------------------------
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` (default: the command line) with bundled config names resolved and
        the default config added when no ``--config`` is given; store it in ``self.config``."""
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
        else:
            argv = sys.argv[1:] if args is None else args
            #: no --config given: the default config runs, maybe with other data (see _run_root)
            self._default_config = not any(is_config_option(a) for a in argv)
            self.config = parser.parse_args(with_config_files(argv))
            _keep_command_line_ckpt_path(self.config, argv)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last"):  # last is found in before_instantiate_classes
            self._check_checkpoint_file(ckpt_path)
        # LightningCLI would next replace the configured model by a checkpoint file's
        # hyperparameters, dropping the model options given with it (not those given with
        # --ckpt_path last or best, found later): held back until before_instantiate_classes,
        # every --ckpt_path runs the configured model, refused if it is another than the
        # checkpoint's (_check_checkpoint_fits_model)
        self._held_ckpt_path = ckpt_path
        if ckpt_path is not None:
            self.config[subcommand]["ckpt_path"] = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="Run folder name under run_dir (default: stem of the last --config file; with no "
            "--config and other data, the data file's stem).",
        )
        parser.add_argument("--run_dir", type=str, default="runs", help="Root of run folders.")
        parser.add_argument(
            "--torch_num_threads",
            type=int | None,
            default=None,
            help="torch.set_num_threads before training (1 is fastest for small MLPs on CPU, "
            "and robust when other processes share the cores); default: torch's choice.",
        )
        parser.link_arguments("data.num_features", "model.input_size", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                # resolved from the monitor (before_instantiate_classes): changing only the
                # monitor to val/loss must not keep the max meant for val/acc
                "checkpoint.mode": "auto",
                "checkpoint.save_last": True,
                # the best checkpoint's file names the monitored value (see _checkpoint_filename)
                "checkpoint.filename": _checkpoint_filename("val/acc"),
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_on_exception": True,
            }
        )

    # -- run folder -----------------------------------------------------------------------
    def _subcommand_config(self, config: Namespace) -> Namespace:
        """The part of ``config`` (``self.config`` or ``self.config_init``) of the subcommand."""
        return config[self.subcommand] if self.subcommand else config

    def _run_root(self) -> Path:
        cfg = self._subcommand_config(self.config)
        name = cfg.get("run_name")
        if not name:
            configs = cfg.get("config") or []
            name = Path(str(configs[-1])).stem if configs and configs[-1] else DEFAULT_CONFIG
            if getattr(self, "_default_config", False):
                name = _data_run_name(cfg.get("data")) or name
        return Path(cfg.get("run_dir") or "runs") / name

    def before_instantiate_classes(self) -> None:
        """Resolve what the parsed config leaves open (the checkpoint's mode and file name,
        ``--ckpt_path last``/``best``, the run folder) and refuse what cannot run."""
        cfg = self._subcommand_config(self.config)
        if getattr(self, "_held_ckpt_path", None) is not None:
            cfg["ckpt_path"] = self._held_ckpt_path  # see parse_arguments
        _set_num_threads(cfg.get("torch_num_threads"))
        if cfg.get("checkpoint") is not None:
            _follow_the_monitor(cfg["checkpoint"])
        if self.subcommand in _EVALUATING_SUBCOMMANDS and cfg.get("ckpt_path") is None:
            print(
                f"note: no --ckpt_path: {self.subcommand} evaluates a freshly initialised, "
                "untrained model (use --ckpt_path last, best or a checkpoint file)",
                file=sys.stderr,
            )
        root = self._run_root()
        # the saved config.yaml names its run: run again, it is not named after that file
        cfg["run_name"] = root.name
        self._version: int | None = None
        self._resumed = False  # fit --ckpt_path last: the run folder's files are its own
        if cfg.get("ckpt_path") == "last":
            cfg["ckpt_path"] = self._last_checkpoint(root)
        elif cfg.get("ckpt_path") == "best":
            cfg["ckpt_path"] = str(self._best_checkpoint_to_evaluate(root))
        self._resume_requeued_slurm_job(root)
        self._check_checkpoint_file(cfg.get("ckpt_path"))
        if self._version is None:
            # a new run folder: for validate/test/predict even with --ckpt_path last, so that
            # they never overwrite the config.yaml and hparams.yaml of the run they evaluate
            self._version = self._new_version(root)

    def _resume_requeued_slurm_job(self, root: Path) -> None:
        """A SLURM job requeued by Lightning's auto-requeue (which saved ``hpc_ckpt_<n>.ckpt``
        into trainer.default_root_dir, the job's run folder, and requeued it: SLURM runs the
        same command line again) continues in that run folder from that checkpoint; a new
        run folder held no hpc checkpoint, and the job started again from scratch. With
        ``--trainer.default_root_dir`` (where Lightning found the checkpoint) it logged into
        a new run folder and checkpointed into another folder than the one the checkpoint's
        callback state recorded, which dropped the best score. Only for ``fit`` without a
        ``--ckpt_path`` other than ``hpc``."""
        cfg = self._subcommand_config(self.config)
        job = _slurm_job()
        if self.subcommand != "fit" or cfg.get("ckpt_path") not in (None, "hpc"):
            return
        if job is None or not _is_slurm_requeue():
            return
        hpc_folder = (cfg.get("trainer") or {}).get("default_root_dir")
        found = _run_of_slurm_job(root, job, None if hpc_folder is None else Path(hpc_folder))
        if found is None:
            return
        self._version, hpc = found
        self._resumed = True  # the run folder's files are its own
        cfg["ckpt_path"] = str(hpc)  # checked as any checkpoint file, loaded with or without srun
        print(f"SLURM job {job}, requeued: resumes {hpc}", file=sys.stderr)

    def _new_version(self, root: Path) -> int:
        """The version of a new run folder under ``root``: the next after the existing ones,
        made here (by rank 0 of a DDP run) so that a run started at the same moment takes
        the one after; listing the folders alone gave both runs the same one. A folder that
        cannot be made is left to :meth:`_check_run_folders_can_be_written` to name.

        A DDP worker that Lightning launched takes rank 0's version from the environment
        (``TORCHBP_RUN_FOLDER``, set here by rank 0); one started by torchrun or srun, beside
        rank 0, computes its own, and relies on Lightning broadcasting rank 0's log and
        checkpoint folders."""
        versions = _versions(root)
        version = versions[-1] + 1 if versions else 0
        if _is_distributed_worker():
            # rank 0 made the run folder: its version, which it hands to the workers it
            # launches (they see its folder, and the next would be another run's)
            handed = _version_of_rank_zero(root)
            return version if handed is None else handed
        while True:
            try:
                made = _make_new_folder(root / f"version_{version}")
            except OSError:
                return version
            if made is not None:
                self._made_folders = made
                os.environ[RUN_FOLDER_ENV] = os.path.abspath(root / f"version_{version}")
                return version
            version += 1

    def _release_run_folder(self) -> None:
        """Remove the run folder made for this run (and the parents made with it) while it
        is empty: the run stopped before writing into it, or wrote elsewhere."""
        for folder in getattr(self, "_made_folders", []):
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): it and its parents stay
                break
        self._made_folders = []

    def _last_checkpoint(self, root: Path) -> str | None:
        """``--ckpt_path last``: the newest ``last*.ckpt`` of the most recent run under
        ``root`` that has one (``fit`` resumes that run, in its folder); with a configured
        ``checkpoint.dirpath``, which every run saves into, the newest ``last*.ckpt`` there,
        as Lightning's ``ckpt_path="last"`` finds it (a run folder of its own); with none,
        ``fit`` starts from scratch (``None``) and the evaluating subcommands exit with an
        error."""
        dirpath = self._configured_checkpoint_dir()
        if dirpath is not None:
            return self._last_checkpoint_in(dirpath)
        for version in reversed(_versions(root)):
            # the newest last*.ckpt, as Lightning finds "last": a run resumed after its
            # folder moved saves last-v1.ckpt (the moved checkpoint records another folder)
            newest = _newest_last_checkpoint(root / f"version_{version}/checkpoints")
            if newest is None:
                continue
            if self.subcommand == "fit":
                self._version = version  # resumed: keep logging there
                self._resumed = True
            return str(newest)
        if self.subcommand != "fit":
            # evaluating an untrained model would pass for the run's metrics
            exit_with_error(
                f"--ckpt_path last: no last.ckpt under {root}; nothing to {self.subcommand} "
                "(check --run_dir and --run_name, or give the checkpoint's path)"
            )
        print(f"no last.ckpt under {root}; starting from scratch", file=sys.stderr)
        return None

    def _configured_checkpoint_dir(self) -> Path | None:
        """The configured ``checkpoint.dirpath`` as ModelCheckpoint saves into it (``~``
        expanded, made absolute), or ``None`` when none is configured."""
        dirpath = (self._subcommand_config(self.config).get("checkpoint") or {}).get("dirpath")
        if not dirpath:
            return None
        return Path(os.path.realpath(os.path.expanduser(dirpath)))

    def _last_checkpoint_in(self, folder: Path) -> str | None:
        """``--ckpt_path last`` with ``checkpoint.dirpath`` ``folder``: its newest
        ``last*.ckpt`` (Lightning numbers a second run's ``last-v1.ckpt``); none is handled
        as under the run folders."""
        newest = _newest_last_checkpoint(folder)
        if newest is not None:
            return str(newest)
        if self.subcommand != "fit":
            exit_with_error(
                f"--ckpt_path last: no last.ckpt in {folder} (checkpoint.dirpath); nothing to "
                f"{self.subcommand} (give the checkpoint's path)"
            )
        print(
            f"no last.ckpt in {folder} (checkpoint.dirpath); starting from scratch", file=sys.stderr
        )
        return None

    def _best_checkpoint_to_evaluate(self, root: Path) -> Path:
        """``--ckpt_path best``: the best checkpoint of the latest run under ``root``, or with a
        configured ``checkpoint.dirpath`` the one its newest ``last*.ckpt`` records (Lightning's
        ``best`` means a fit's in the same process, which validate/test/predict never have)."""
        if self.subcommand == "fit":
            exit_with_error(
                "--ckpt_path best: fit resumes from last or a checkpoint file; best is for "
                "validate, test and predict"
            )
        dirpath = self._configured_checkpoint_dir()
        if dirpath is not None:  # every run saves there: its newest last*.ckpt records the best
            runs = [dirpath]
        else:
            runs = [root / f"version_{v}/checkpoints" for v in reversed(_versions(root))]
        latest = next((folder for folder in runs if any(folder.glob("*.ckpt"))), None)
        newest_last = None if latest is None else _newest_last_checkpoint(latest)
        best = None
        if latest is not None:
            best = _best_checkpoint(latest, newest_last.name if newest_last else "last.ckpt")
        if best is None and dirpath is not None:
            exit_with_error(
                f"--ckpt_path best: no best checkpoint in {dirpath} (checkpoint.dirpath); "
                f"nothing to {self.subcommand} (give the checkpoint's path)"
            )
        if best is None:
            where = root if latest is None else latest
            exit_with_error(
                f"--ckpt_path best: no best checkpoint under {where}; nothing to "
                f"{self.subcommand} (check --run_dir and --run_name, or give the checkpoint's "
                "path)"
            )
        return best

    @staticmethod
    def _check_checkpoint_file(ckpt_path: str | None) -> None:
        """A local ``--ckpt_path`` must be a checkpoint file that can be read: else Lightning
        fails with a traceback (LightningCLI reads its hyperparameters as it parses, a fit
        loads it once the run has started)."""
        _check_registry_checkpoint(ckpt_path)
        path = _local_checkpoint(ckpt_path)
        if path is None:
            return
        if not path.is_file():
            exit_with_error(f"--ckpt_path: checkpoint file not found: {ckpt_path}")
        problem = _why_unreadable(path)
        if problem:
            exit_with_error(
                f"--ckpt_path: {ckpt_path} is not a readable checkpoint: {problem} (a save cut "
                "short by a crash or a full disk? give another checkpoint of the run, e.g. its "
                "best)"
            )

    def instantiate_classes(self) -> None:
        """Instantiate data, model and trainer; a data problem or an invalid value is a
        one-line error (exit status 2) before any training starts, which leaves no run
        folder behind."""
        try:
            self._instantiate_and_check()
        except BaseException:
            self._release_run_folder()
            raise

    def _instantiate_and_check(self) -> None:
        try:
            super().instantiate_classes()
            if isinstance(self.datamodule, ClassificationDataModule):
                self.datamodule.check_data()
            if self.subcommand == "fit" and isinstance(self.model, ERMClassifier):
                self.model.check_scheduler(self.trainer)
                self._check_monitors()
            self._check_privacy()
            self._check_checkpoint_fits_model()
            self._check_hpc_checkpoint()
            self._check_config_file_is_new()
            self._check_run_folders_can_be_written()
        except _CONFIG_ERRORS as e:
            exit_with_error(_describe(e))

    def _model_checkpoints(self) -> list[ModelCheckpoint]:
        """The trainer's ModelCheckpoints: the CLI's (``checkpoint``) and trainer.callbacks'."""
        return [c for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint)]

    def _check_monitors(self) -> None:
        """Every ModelCheckpoint's ``monitor`` (``checkpoint.monitor``, and those of
        trainer.callbacks) and every strict EarlyStopping's is a metric the fit logs
        (ERMClassifier's own, not a subclass's, which may log more): Lightning finds a misspelt
        one only after the first epoch, with a traceback. An EarlyStopping with
        ``strict=False`` may monitor a metric that is missing (Lightning trains on)."""
        if type(self.model) is not ERMClassifier:
            return
        logged = [n for n in self.model.metric_names() if not n.startswith("test/")]
        own = self._subcommand_config(self.config_init).get("checkpoint")
        for callback in self._model_checkpoints():
            if callback.monitor is None or callback.save_top_k == 0:
                continue  # nothing monitored
            option = "checkpoint.monitor" if callback is own else "a ModelCheckpoint's monitor"
            # Lightning adds epoch and step to what a checkpoint may monitor
            _check_monitor(option, callback.monitor, [*logged, "epoch", "step"])
        for callback in self.trainer.callbacks:
            if isinstance(callback, EarlyStopping) and callback.strict:
                _check_monitor("an EarlyStopping's monitor", callback.monitor, logged)

    def _check_checkpoint_fits_model(self) -> None:
        """A ``--ckpt_path`` that the configured model cannot load (another architecture), is
        another model than (another activation, label smoothing or class weights: it loads,
        and the run evaluated or trained on a model nobody trained), or a fit cannot continue
        (the state of another optimizer class) is an error now: Lightning finds out only
        once the run has started, when it has written the new config.yaml over a resumed
        run's, or never. The same for ``last``, ``best`` and a file's path: the configured
        model runs (LightningCLI's own replacing of it by a checkpoint file's
        hyperparameters dropped options silently), and how it runs (backend, compile,
        fused_head) may differ from the checkpoint's."""
        path = self._subcommand_config(self.config).get("ckpt_path")
        local = _local_checkpoint(path)
        checkpoint = None if local is None else _read_checkpoint(local)
        if checkpoint is None:
            return
        # the data first: data of other classes is why a model's sizes differ
        data_state = checkpoint.get(type(self.datamodule).__qualname__)
        if isinstance(data_state, dict):
            try:  # what Lightning does once the run has started
                self.datamodule.load_state_dict(data_state)
            except DataConfigError as e:
                exit_with_error(f"--ckpt_path: {path}: {e}")
        if self.subcommand == "fit":
            _check_resumable(checkpoint, path)
        if self.subcommand == "fit" and isinstance(self.model, ERMClassifier):
            self._check_resume_privacy(checkpoint, path, self._same_data(data_state))
        hint = "(its run's config.yaml has the options it was trained with)"
        problems = _weights_mismatch(checkpoint, self.model)
        if problems:
            shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
            exit_with_error(
                f"--ckpt_path: {path} does not fit the configured model: {shown} {hint}"
            )
        if isinstance(self.model, ERMClassifier):
            problems = _hyperparameters_mismatch(checkpoint, self.model)
            if problems:
                exit_with_error(
                    f"--ckpt_path: {path} does not fit the configured model: "
                    f"{'; '.join(problems)} {hint}"
                )
        optimizer = _configured_optimizer(self.model) if self.subcommand == "fit" else None
        problems = [] if optimizer is None else _optimizer_mismatch(checkpoint, optimizer)
        if problems:
            exit_with_error(
                f"--ckpt_path: {path}: its optimizer state does not fit "
                f"{type(optimizer).__name__} ({'; '.join(problems)}); resume with the optimizer "
                "the run was trained with (its config.yaml has it)"
            )

    def _check_hpc_checkpoint(self) -> None:
        """``--ckpt_path hpc``: Lightning loads the newest ``hpc_ckpt_<n>.ckpt`` of
        trainer.default_root_dir (where it saves one on a SLURM requeue), and without one
        fails once the run has started."""
        if self._subcommand_config(self.config).get("ckpt_path") != "hpc":
            return
        folder = Path(self.trainer.default_root_dir)
        if not any(folder.glob("hpc_ckpt_*.ckpt")):
            exit_with_error(
                f"--ckpt_path hpc: no hpc_ckpt_<n>.ckpt in {os.path.abspath(folder)} (Lightning "
                "saves one into trainer.default_root_dir on a SLURM requeue); name that folder "
                "with --trainer.default_root_dir, or give the checkpoint's path"
            )

    def _same_data(self, data_state: Any) -> bool:
        """Whether a checkpoint's DataModule state (``None``: another DataModule class) says
        it was trained on the configured data: the same source, or no source recorded."""
        if not isinstance(data_state, dict):
            return False
        return data_state.get("source") == self.datamodule.state_dict().get("source")

    def _check_resume_privacy(self, checkpoint: dict[str, Any], path: str, same_data: bool) -> None:
        """A fit from a checkpoint keeps its DP-SGD setting: a private checkpoint fitted on
        without privacy ends as a model no ε holds for, and one trained on this data without
        privacy has no ε whatever the noise from here (both went on silently)."""
        private = (checkpoint.get("hyper_parameters") or {}).get("privacy") is not None
        private = private or "privacy_accountant" in checkpoint
        if private and self.model.privacy is None:
            exit_with_error(
                f"--ckpt_path: {path} was trained with DP-SGD, and this configuration has no "
                "privacy: training on would end with a model no epsilon holds for; resume "
                "with the run's privacy settings (its config.yaml has them)"
            )
        trained = (checkpoint.get("global_step") or 0) > 0
        if not private and trained and same_data and self.model.privacy is not None:
            exit_with_error(
                f"--ckpt_path: {path} was trained without DP-SGD on this data: no epsilon "
                "holds for its weights, whatever the noise from here; train with privacy from "
                "the start (a new run, without --ckpt_path)"
            )

    def _log_folder(self) -> str | None:
        """Where the run's logs and config go: Trainer.log_dir without its broadcast (no
        process group yet under DDP)."""
        loggers = self.trainer.loggers
        if not loggers:
            return self.trainer.default_root_dir
        if isinstance(loggers[0], (TensorBoardLogger, CSVLogger)):
            return loggers[0].log_dir
        return loggers[0].save_dir

    def _check_run_folders_can_be_written(self) -> None:
        """The folders the run will write (logs and config; every ModelCheckpoint's when
        fitting) can be made: else Lightning fails with an OSError once the run has started."""
        folders = [self._log_folder()]
        if self.subcommand == "fit":
            folders += [callback.dirpath for callback in self._model_checkpoints()]
        for folder in filter(None, folders):
            if "://" in str(folder):
                continue  # a remote filesystem: its own errors
            problem = _why_unwritable(Path(folder))
            if problem:
                exit_with_error(
                    f"invalid configuration: cannot write the run's files into "
                    f"{os.path.abspath(folder)}: {problem} (choose another --run_dir, or run "
                    "from a writable folder)"
                )

    def _check_config_file_is_new(self) -> None:
        """The resolved config is saved with overwrite on (a resumed run rewrites its own):
        anywhere else an existing file of that name is not this run's, and stays."""
        if self._resumed or self.save_config_callback is None or self.trainer.fast_dev_run:
            return
        if self.trainer.global_rank != 0:  # a DDP worker, started once rank 0 is running
            return
        folder = self._log_folder()
        if folder is None:
            return
        name = self.save_config_kwargs.get("config_filename", "config.yaml")
        path = Path(folder) / name
        if path.exists():
            exit_with_error(
                f"{os.path.abspath(path)} exists and this run would write its config over it; "
                "give it a folder of its own (--trainer.default_root_dir, or the logger's "
                "save_dir)"
            )

    def _check_privacy(self) -> None:
        """DP-SGD settings that training would refuse at its start (``fit`` of a private model
        on torchbp's DataModules, whose train loader is ready once ``check_data`` ran)."""
        model, data = self.model, self.datamodule
        if self.subcommand != "fit" or not isinstance(model, ERMClassifier):
            return
        if model.privacy is None or not isinstance(data, (ArrayDataModule, SyntheticDataModule)):
            return
        resumed = self._subcommand_config(self.config_init).get("ckpt_path") is not None
        model.check_privacy(self.trainer, data.train_dataloader(), resumed=resumed)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer of the run folder ``<run_dir>/<run_name>/version_<n>``: its loggers,
        its checkpoint callback and a rich progress bar, unless the config sets them."""
        cfg = self._subcommand_config(self.config_init)
        tcfg = cfg.get("trainer") or {}
        root = self._run_root()
        run_folder = root / f"version_{self._version}"
        if tcfg.get("default_root_dir") is None and "default_root_dir" not in kwargs:
            # Lightning's log_dir without a logger (--trainer.logger=false): config.yaml goes
            # into the run folder, never over a ./config.yaml
            kwargs["default_root_dir"] = str(run_folder)
        callbacks = _as_callback_list(tcfg.get("callbacks"))
        # the CLI's checkpoint callback and any of trainer.callbacks
        for callback in [cfg.get("checkpoint"), *callbacks]:
            if isinstance(callback, ModelCheckpoint):
                self._set_up_checkpoint_callback(callback, tcfg, cfg.get("ckpt_path"), run_folder)
        if tcfg.get("enable_checkpointing") is False and isinstance(
            cfg.get("checkpoint"), ModelCheckpoint
        ):
            # the CLI always passes its checkpoint callback, which Lightning refuses beside
            # enable_checkpointing=False: it stays, and saves nothing
            kwargs["enable_checkpointing"] = True
        if tcfg.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = _run_loggers(root, self._version)
        if tcfg.get("enable_progress_bar", True) is not False:
            _add_rich_progress_bar(callbacks)
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _set_up_checkpoint_callback(
        self, callback: ModelCheckpoint, tcfg: Any, ckpt_path: str | None, run_folder: Path
    ) -> None:
        """Save the checkpoints into ``run_folder/checkpoints`` (unless the config names a
        folder: Lightning's own choice, the first logger's ``save_dir/name/version``, would
        nest a second run folder in the run folder, RunCSVLogger's ``save_dir``), and save
        none when evaluating, when checkpointing is off or for a ``fast_dev_run``."""
        if self.subcommand in _EVALUATING_SUBCOMMANDS:
            _evaluating_checkpoint_callback(callback, ckpt_path)
        if callback.dirpath is None:
            # inside the run folder, with or without loggers (and when Lightning swaps them
            # out: fast_dev_run)
            callback.dirpath = os.path.realpath(run_folder / "checkpoints")
        if tcfg.get("enable_checkpointing") is False:
            _save_nothing(callback)
        if tcfg.get("fast_dev_run"):
            # Lightning turns checkpointing off for fast_dev_run, except save_last at the end
            # of training: that one-step last.ckpt would be what --ckpt_path last finds
            callback.save_last = False

    # -- fit ends with a test of the best checkpoint --------------------------------------
    def after_fit(self) -> None:
        self._release_run_folder()
        trainer = self.trainer
        if trainer.interrupted:
            return
        cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        ckpt = cb.best_model_path if cb is not None and cb.best_model_path else None
        results = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero and results:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(results[0].items()))
            print(f"test metrics ({ckpt or 'final weights'}): {shown}")
            if log_dir:
                print(f"run folder: {os.path.abspath(log_dir)}")

    # -- predict writes what it predicted --------------------------------------------------
    def after_validate(self) -> None:
        self._release_run_folder()

    def after_test(self) -> None:
        self._release_run_folder()

    def after_predict(self) -> None:
        try:
            self._write_predictions()
        finally:
            self._release_run_folder()

    def _write_predictions(self) -> None:
        """Write the predictions into the run folder (by rank 0 of a single-process run)."""
        trainer = self.trainer
        batches = trainer.predict_loop.predictions
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not batches or not log_dir:
            return
        if trainer.world_size > 1:
            print(
                "predictions.csv is written by single-process runs only (under DDP each "
                "process predicts a shard); run predict on one device",
                file=sys.stderr,
            )
            return
        if not all(isinstance(b, torch.Tensor) for b in batches):
            return  # several predict dataloaders, or a predict_step of another kind
        path = Path(log_dir) / PREDICTIONS_FILE
        write_predictions(path, torch.cat(batches), getattr(self.datamodule, "class_names", None))
        print(f"predictions: {path.resolve()}")


def cli_main(args: ArgsType = None, **kwargs: Any) -> TorchbpCLI:
    """Run the CLI without Lightning's unactionable warnings, and return it.

    Args:
        args: Command line arguments (default: ``sys.argv[1:]``), or a config as a dict.
        **kwargs: Keyword arguments of :class:`TorchbpCLI`.

    Examples::

        cli = cli_main(["fit", "--config", "digits", "--trainer.max_epochs=2"])
    """
    with quiet_lightning():
        return TorchbpCLI(args=args, **kwargs)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``torchbp-train`` console script."""
    try:
        cli_main(args)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down a DDP process group before the interpreter exits.

    Lightning leaves the group open; gloo's worker threads then meet interpreter shutdown
    and, now and then, abort the process ("terminate called without an active exception")
    after a run that succeeded.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
