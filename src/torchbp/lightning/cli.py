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
``fit`` ends by testing the best checkpoint on the test split and printing the test metrics
(the best of ``--checkpoint.*``, as ``--ckpt_path best`` finds it, whatever other
ModelCheckpoint ``trainer.callbacks`` holds; after a fit that took no training step, such as
``--trainer.max_epochs 0``, the initial weights, with a note saying so);
``predict`` writes the class probabilities of the DataModule's predict split (the test split for
torchbp's DataModules, or the rows of a new file given as ``--data.predict_path`` to
``TabularFileDataModule``) to ``predictions.csv`` in its run folder: a column ``prediction``
(the most probable class; for a data file, by its label in the file) and ``prob_<class>`` per
class, from one process: ``predict`` under DDP (each process would predict a shard) is
refused before it starts, unless a ``BasePredictionWriter`` callback writes the shards.

Errors before training start with ``error:`` and their cause on one line, and exit with
status 2: a bad option or value, an invalid configuration (e.g. ``--trainer.accelerator cuda``
without a GPU) or a data problem (e.g. a missing data file).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment

from torchbp.lightning.ckpt_path import (
    best_checkpoint_to_evaluate,
    check_checkpoint_file,
    check_checkpoint_fits_model,
    check_checkpoint_fits_trainer,
    check_hpc_checkpoint,
    configured_checkpoint_dir,
    last_checkpoint,
)
from torchbp.lightning.config_files import (
    DEFAULT_CONFIG,
    describe_bundled_configs,
    is_config_option,
    with_config_files,
)
from torchbp.lightning.console import (
    ShortErrorParser,
    exit_with_error,
    quiet_lightning,
)
from torchbp.lightning.data_base import ClassificationDataModule
from torchbp.lightning.module import ERMClassifier
from torchbp.lightning.run_checkpoint import (
    RunCheckpoint,
    checkpoint_filename,
    evaluating_checkpoint_callback,
    follow_the_monitor,
    save_nothing,
)
from torchbp.lightning.run_checks import (
    CONFIG_ERRORS,
    check_batch_counts,
    check_config_file_is_new,
    check_gradient_clip_val,
    check_monitors,
    check_poisson_sampling,
    check_predictions_can_be_written,
    check_privacy,
    check_run_folders_can_be_written,
    check_trainer_intervals,
    check_training_length,
    describe_config_error,
)
from torchbp.lightning.run_folders import (
    RUN_FOLDER_ENV,
    is_slurm_requeue,
    new_run_version,
    run_of_slurm_job,
    slurm_job,
)
from torchbp.lightning.run_logger import RunCSVLogger, write_predictions

__all__ = ["TorchbpCLI", "RunCheckpoint", "RUN_FOLDER_ENV", "main", "cli_main"]

#: subcommands that load a checkpoint to evaluate it and never save one
_EVALUATING_SUBCOMMANDS = ("validate", "test", "predict")


#: what ``predict`` writes into its run folder
PREDICTIONS_FILE = "predictions.csv"


#: the data class of the default config (``digits``), by which its runs are named
_DEFAULT_DATA = "DigitsDataModule"


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


#: the largest seed numpy takes (Lightning's seed_everything raised a traceback beyond it)
_MAX_SEED = 2**32 - 1


def _check_seed(seed: Any) -> None:
    """``--seed_everything``: ``true`` (a random seed), ``false`` (none) or an int in
    ``[0, 2**32 - 1]``; an int beyond was a ValueError traceback from Lightning."""
    if seed is None or isinstance(seed, bool):
        return
    if not 0 <= seed <= _MAX_SEED:
        exit_with_error(
            f"invalid configuration: seed_everything must be true, false or an int in "
            f"[0, {_MAX_SEED}], got {seed}"
        )


#: ``PL_GLOBAL_SEED`` as the latest run of this process seeded it (see :func:`_note_run_seed`)
_latest_run_seed: str | None = None
#: whether a run of this process has started (see :func:`_note_run_seed`)
_ran_before = False
#: the variables of the launchers' seed and ranks as this process was started with them
_ENVIRONMENT_AT_START = {
    name: os.environ.get(name) for name in ("PL_GLOBAL_SEED", "LOCAL_RANK", "WORLD_SIZE")
}


def _note_run_seed(seed: Any) -> None:
    """Note that a run of this process started, and the seed it seeded (Lightning's
    ``seed_everything`` leaves it in ``PL_GLOBAL_SEED``; ``false`` seeds nothing): a later
    run's ``--seed_everything true`` draws its own rather than take it (see
    :func:`_random_seed_if_asked`)."""
    global _latest_run_seed, _ran_before
    _ran_before = True
    if seed is not False:
        _latest_run_seed = os.environ.get("PL_GLOBAL_SEED")


def _random_seed_if_asked(parsed: Namespace) -> None:
    """``--seed_everything true`` asks for a random seed (LightningCLI's help): Lightning's
    ``seed_everything`` seeds 0 then ("No seed found, seed set to 0"), every such run the
    default run. Drawn here, it is the seed the run uses and its config.yaml records; a
    process Lightning launched for DDP takes rank 0's (``PL_GLOBAL_SEED``, which Lightning
    reads for ``true`` itself), as one given ``PL_GLOBAL_SEED`` by its environment does;
    never the seed an earlier run of this process left there (a notebook's second fit took
    the first one's, also an int such as the configs' 0), unless the process was started
    with it (every such run takes it, as Lightning's do). Processes started apart (see
    :func:`_processes_started_apart`, :func:`_left_by_an_earlier_ddp_run`) have no rank 0
    to take it from before the run starts: refused, as each would draw its own."""
    if parsed.get("seed_everything") is not True:
        return
    after_ddp = _left_by_an_earlier_ddp_run()
    inherited = os.environ.get("PL_GLOBAL_SEED")
    given = inherited != _latest_run_seed or inherited == _ENVIRONMENT_AT_START["PL_GLOBAL_SEED"]
    if inherited is not None and given and not after_ddp:
        return  # Lightning's seed_everything takes it
    started_apart = _processes_started_apart(parsed.get("trainer") or {}) or after_ddp
    if started_apart:
        exit_with_error(
            f"invalid configuration: seed_everything: true draws a random seed in each "
            f"process, and this run's processes are started apart ({started_apart}): they "
            "would train with different seeds, and the run's config.yaml would record one "
            "of them; give every process the same int seed (--seed_everything N, drawn once "
            "for the whole job)"
        )
    parsed["seed_everything"] = secrets.randbelow(_MAX_SEED + 1)


def _processes_started_apart(trainer: Any) -> str | None:
    """What starts this run's processes apart, not as Lightning's workers of one process
    (which inherit its seed): ``trainer.num_nodes`` > 1 (a command per node), or the
    launcher's process count: ``WORLD_SIZE`` (torchrun) or ``SLURM_NTASKS`` (srun) > 1;
    ``None`` for a run of one process, or of one that launches its own workers, as in an
    interactive SLURM job (see :func:`_slurm_launches_the_processes`)."""
    num_nodes = trainer.get("num_nodes") or 1
    if num_nodes > 1:
        return f"trainer.num_nodes={num_nodes}"
    world_size = os.environ.get("WORLD_SIZE", "")
    if world_size.isdigit() and int(world_size) > 1:
        return f"WORLD_SIZE={world_size}"
    tasks = os.environ.get("SLURM_NTASKS", "")
    if tasks.isdigit() and int(tasks) > 1 and _slurm_launches_the_processes():
        return f"SLURM_NTASKS={tasks}"
    return None


def _left_by_an_earlier_ddp_run() -> str | None:
    """``LOCAL_RANK`` after an earlier run of this process, as Lightning's launcher of a DDP
    run leaves it (in the process it launched from, and in each worker it launched, which
    runs the same command): Lightning then takes this run's processes as started apart and
    launches none, and each process of the earlier run runs this one on its own, so that a
    seed drawn in each differed between the ranks. ``None`` before this process's first
    run (a worker's first run takes rank 0's seed, ``PL_GLOBAL_SEED``), and for a
    ``LOCAL_RANK`` this process was started with outside a launch of several processes
    (``WORLD_SIZE`` > 1 at start, as Lightning gives its workers)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if not _ran_before or local_rank is None:
        return None
    world_size = _ENVIRONMENT_AT_START["WORLD_SIZE"] or ""
    launched = world_size.isdigit() and int(world_size) > 1
    if _ENVIRONMENT_AT_START["LOCAL_RANK"] is not None and not launched:
        return None
    return (
        f"LOCAL_RANK={local_rank}, left by Lightning's launch of an earlier DDP run of this "
        "process, whose every process runs this run on its own"
    )


def _slurm_launches_the_processes() -> bool:
    """Whether Lightning takes SLURM's tasks for the run's processes: not in an interactive
    job (named ``bash`` or ``interactive``, Lightning's rule: see
    :meth:`SLURMEnvironment.detect`), whose allocation of several tasks (``salloc -n 4``)
    runs this one command, which launches its own workers."""
    return SLURMEnvironment.job_name() not in ("bash", "interactive")


def _check_run_name(name: Any) -> None:
    """``--run_name`` names one folder under ``run_dir``: a path (``../x``, ``a/b``, an
    absolute one) would put the run outside ``run_dir`` or under a name its config.yaml
    does not keep (it saves the last part only)."""
    if not name:  # the default name
        return
    if name in (".", "..") or "/" in name or "\\" in name:
        exit_with_error(
            f"invalid configuration: run_name must be one folder name (no '/', '\\', '.' "
            f"or '..'), got {name!r}; use --run_dir for the folder the runs go under"
        )


def _data_run_name(data: Any) -> str | None:
    """The run name of the default config run on other data (``--data ... --data.path
    my.csv`` without ``--config``): the data file's stem, else the DataModule's class name;
    ``None`` for the default config's own data."""
    class_path = str(getattr(data, "class_path", None) or "")
    if not class_path or class_path.endswith("." + _DEFAULT_DATA):
        return None
    path = (getattr(data, "init_args", None) or {}).get("path")
    return Path(str(path)).stem if path else class_path.rsplit(".", 1)[-1]


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
        parsed = self.config[subcommand] if subcommand else self.config
        _check_seed(parsed.get("seed_everything"))
        _random_seed_if_asked(parsed)
        _check_run_name(parsed.get("run_name"))
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last"):  # last is found in before_instantiate_classes
            check_checkpoint_file(ckpt_path)
        # LightningCLI would next replace the configured model by a checkpoint file's
        # hyperparameters, dropping the model options given with it (not those given with
        # --ckpt_path last or best, found later): held back until before_instantiate_classes,
        # every --ckpt_path runs the configured model, refused if it is another than the
        # checkpoint's (check_checkpoint_fits_model)
        self._held_ckpt_path = ckpt_path
        if ckpt_path is not None:
            self.config[subcommand]["ckpt_path"] = None

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="Run folder name under run_dir, one folder (default: stem of the last --config "
            "file; with no --config and other data, the data file's stem).",
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
                # the best checkpoint's file names the monitored value (see checkpoint_filename)
                "checkpoint.filename": checkpoint_filename("val/acc"),
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
        _note_run_seed(cfg.get("seed_everything"))  # seeded by LightningCLI right before
        if getattr(self, "_held_ckpt_path", None) is not None:
            cfg["ckpt_path"] = self._held_ckpt_path  # see parse_arguments
        _set_num_threads(cfg.get("torch_num_threads"))
        if cfg.get("checkpoint") is not None:
            follow_the_monitor(cfg["checkpoint"])
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
        dirpath = configured_checkpoint_dir(cfg.get("checkpoint"))
        if cfg.get("ckpt_path") == "last":
            cfg["ckpt_path"], resumed_version = last_checkpoint(root, self.subcommand, dirpath)
            if resumed_version is not None:  # fit resumes: keep logging there
                self._version, self._resumed = resumed_version, True
        elif cfg.get("ckpt_path") == "best":
            cfg["ckpt_path"] = str(best_checkpoint_to_evaluate(root, self.subcommand, dirpath))
        self._resume_requeued_slurm_job(root)
        check_checkpoint_file(cfg.get("ckpt_path"))
        if self._version is None:
            # a new run folder: for validate/test/predict even with --ckpt_path last, so that
            # they never overwrite the config.yaml and hparams.yaml of the run they evaluate
            self._version, self._made_folders = new_run_version(root)

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
        job = slurm_job()
        if self.subcommand != "fit" or cfg.get("ckpt_path") not in (None, "hpc"):
            return
        if job is None or not is_slurm_requeue():
            return
        hpc_folder = (cfg.get("trainer") or {}).get("default_root_dir")
        found = run_of_slurm_job(root, job, None if hpc_folder is None else Path(hpc_folder))
        if found is None:
            return
        self._version, hpc = found
        self._resumed = True  # the run folder's files are its own
        cfg["ckpt_path"] = str(hpc)  # checked as any checkpoint file, loaded with or without srun
        print(f"SLURM job {job}, requeued: resumes {hpc}", file=sys.stderr)

    def _release_run_folder(self) -> None:
        """Remove the run folder made for this run (and the parents made with it) while it
        is empty: the run stopped before writing into it, or wrote elsewhere."""
        for folder in getattr(self, "_made_folders", []):
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): it and its parents stay
                break
        self._made_folders = []

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
                if self.subcommand == "predict":
                    self.datamodule.check_predict_data()
            if self.subcommand == "fit" and isinstance(self.model, ERMClassifier):
                self.model.check_scheduler(self.trainer)
                own = self._subcommand_config(self.config_init).get("checkpoint")
                check_monitors(self.model, self.trainer, own)
            resumed = self._subcommand_config(self.config_init).get("ckpt_path") is not None
            check_privacy(self.subcommand, self.model, self.datamodule, self.trainer, resumed)
            check_trainer_intervals(self.subcommand, self.trainer)
            check_training_length(self.subcommand, self.trainer)
            check_gradient_clip_val(self.subcommand, self.trainer)
            check_batch_counts(self.subcommand, self.datamodule, self.trainer)
            check_poisson_sampling(self.subcommand, self.datamodule, self.trainer)
            ckpt_path = self._subcommand_config(self.config).get("ckpt_path")
            check_checkpoint_fits_model(ckpt_path, self.subcommand, self.model, self.datamodule)
            check_checkpoint_fits_trainer(ckpt_path, self.subcommand, self.trainer)
            check_hpc_checkpoint(ckpt_path, self.trainer.default_root_dir)
            if not self._resumed and self.save_config_callback is not None:
                name = self.save_config_kwargs.get("config_filename", "config.yaml")
                check_config_file_is_new(self.trainer, name)
            check_run_folders_can_be_written(self.trainer, self.subcommand)
            check_predictions_can_be_written(self.subcommand, self.trainer)
        except CONFIG_ERRORS as e:
            exit_with_error(describe_config_error(e))

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
        none when evaluating, when checkpointing is off or for a ``fast_dev_run``. A
        :class:`RunCheckpoint` of a fit resuming its run folder is told so (Lightning's
        warning that its folder is not empty is for a new run)."""
        if self.subcommand in _EVALUATING_SUBCOMMANDS:
            evaluating_checkpoint_callback(callback, ckpt_path)
        if isinstance(callback, RunCheckpoint):
            # its folder holds the checkpoints of the run this fit continues
            callback.resumes_its_run = self._resumed
        if callback.dirpath is None:
            # inside the run folder, with or without loggers (and when Lightning swaps them
            # out: fast_dev_run)
            callback.dirpath = os.path.realpath(run_folder / "checkpoints")
        if tcfg.get("enable_checkpointing") is False:
            save_nothing(callback)
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
        # the run's own checkpoint callback (--checkpoint.*), never another ModelCheckpoint of
        # trainer.callbacks: those come first in the trainer's list, and their best (on
        # another monitor) was tested
        own = self._subcommand_config(self.config_init).get("checkpoint")
        ckpt = (own.best_model_path or None) if isinstance(own, ModelCheckpoint) else None
        untrained = trainer.global_step == 0
        if untrained and trainer.is_global_zero:
            print(
                f"note: fit took no training step ({_why_no_training_step(trainer)}): its test "
                "evaluates the model's initial weights",
                file=sys.stderr,
            )
        results = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        if results:  # none with limit_test_batches: 0
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(results[0].items()))
            weights = "initial weights, untrained" if untrained else "final weights"
            print(f"test metrics ({ckpt or weights}): {shown}")
        if log_dir and os.path.isdir(log_dir):
            print(f"run folder: {os.path.abspath(log_dir)}")

    # -- predict writes what it predicted --------------------------------------------------
    def after_validate(self) -> None:
        self._release_run_folder()
        self._print_run_folder()

    def after_test(self) -> None:
        self._release_run_folder()
        self._print_run_folder()

    def _print_run_folder(self) -> None:
        """Name the run folder that validate or test logged into (a new one, beside the
        evaluated run's), as fit names its own; none is left by a run that logs nothing
        (``fast_dev_run``)."""
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if self.trainer.is_global_zero and log_dir and os.path.isdir(log_dir):
            print(f"run folder: {os.path.abspath(log_dir)}")

    def after_predict(self) -> None:
        try:
            self._write_predictions()
        finally:
            self._release_run_folder()

    def _write_predictions(self) -> None:
        """Write the predictions into the run folder (of a single-process run)."""
        trainer = self.trainer
        batches = trainer.predict_loop.predictions
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if trainer.is_global_zero and not batches and trainer.limit_predict_batches == 0:
            print(
                "note: predict ran no batch (trainer.limit_predict_batches=0): no "
                f"{PREDICTIONS_FILE} written",
                file=sys.stderr,
            )
        if not trainer.is_global_zero or not batches or not log_dir:
            return
        if trainer.world_size > 1:
            return  # a BasePredictionWriter writes the shards (check_predictions_can_be_written)
        if not all(isinstance(b, torch.Tensor) for b in batches):
            return  # several predict dataloaders, or a predict_step of another kind
        path = Path(log_dir) / PREDICTIONS_FILE
        write_predictions(path, torch.cat(batches), getattr(self.datamodule, "class_names", None))
        print(f"predictions: {path.resolve()}")


def _why_no_training_step(trainer: Trainer) -> str:
    """The trainer settings that left a fit without a training step (``max_epochs: 0``,
    ``max_steps: 0`` or ``limit_train_batches: 0``), as options."""
    settings = {
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
        "limit_train_batches": trainer.limit_train_batches,
    }
    zero = [f"trainer.{name}={value}" for name, value in settings.items() if value == 0]
    return ", ".join(zero) or "no batch was trained"


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
