"""``--ckpt_path`` as ``torchbp-train`` resolves and checks it: ``last`` and ``best`` found
among the run folders (or in a configured ``checkpoint.dirpath``), a file that must be a
readable checkpoint, ``hpc``'s SLURM checkpoint, and a checkpoint that must fit the configured
model, data, optimizer and privacy. Each refusal is a one-line error (exit status 2) before
the run writes anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from torchbp.lightning.checkpoint_files import (
    best_checkpoint,
    check_registry_checkpoint,
    check_resumable,
    configured_optimizer,
    hyperparameters_mismatch,
    local_checkpoint,
    newest_last_checkpoint,
    optimizer_mismatch,
    read_checkpoint,
    weights_mismatch,
    why_unreadable,
)
from torchbp.lightning.console import exit_with_error
from torchbp.lightning.data_base import DataConfigError
from torchbp.lightning.module import ERMClassifier
from torchbp.lightning.run_folders import run_versions

__all__ = [
    "configured_checkpoint_dir",
    "last_checkpoint",
    "best_checkpoint_to_evaluate",
    "check_checkpoint_file",
    "check_hpc_checkpoint",
    "check_checkpoint_fits_model",
    "check_checkpoint_fits_trainer",
]


def configured_checkpoint_dir(checkpoint_config: Any) -> Path | None:
    """The configured ``checkpoint.dirpath`` (of the ``checkpoint`` config section) as
    ModelCheckpoint saves into it (``~`` expanded, made absolute), or ``None`` when none is
    configured."""
    dirpath = (checkpoint_config or {}).get("dirpath")
    if not dirpath:
        return None
    return Path(os.path.realpath(os.path.expanduser(dirpath)))


def last_checkpoint(
    root: Path, subcommand: str | None, dirpath: Path | None
) -> tuple[str | None, int | None]:
    """``--ckpt_path last``: the newest ``last*.ckpt`` of the most recent run under ``root``
    that has one, and for ``fit``, which resumes that run in its folder, the run's version
    (else ``None``); with a configured ``checkpoint.dirpath`` ``dirpath``, which every run
    saves into, the newest ``last*.ckpt`` there, as Lightning's ``ckpt_path="last"`` finds it
    (a run folder of its own); with none, ``fit`` starts from scratch (``None``) and the
    evaluating subcommands exit with an error."""
    if dirpath is not None:
        return _last_checkpoint_in(dirpath, subcommand), None
    for version in reversed(run_versions(root)):
        # the newest last*.ckpt, as Lightning finds "last": a run resumed after its
        # folder moved saves last-v1.ckpt (the moved checkpoint records another folder)
        newest = newest_last_checkpoint(root / f"version_{version}/checkpoints")
        if newest is None:
            continue
        # fit resumes: it keeps logging in that run folder
        return str(newest), version if subcommand == "fit" else None
    if subcommand != "fit":
        # evaluating an untrained model would pass for the run's metrics
        exit_with_error(
            f"--ckpt_path last: no last.ckpt under {root}; nothing to {subcommand} "
            "(check --run_dir and --run_name, or give the checkpoint's path)"
        )
    print(f"no last.ckpt under {root}; starting from scratch", file=sys.stderr)
    return None, None


def _last_checkpoint_in(folder: Path, subcommand: str | None) -> str | None:
    """``--ckpt_path last`` with ``checkpoint.dirpath`` ``folder``: its newest
    ``last*.ckpt`` (Lightning numbers a second run's ``last-v1.ckpt``); none is handled
    as under the run folders."""
    newest = newest_last_checkpoint(folder)
    if newest is not None:
        return str(newest)
    if subcommand != "fit":
        exit_with_error(
            f"--ckpt_path last: no last.ckpt in {folder} (checkpoint.dirpath); nothing to "
            f"{subcommand} (give the checkpoint's path)"
        )
    print(f"no last.ckpt in {folder} (checkpoint.dirpath); starting from scratch", file=sys.stderr)
    return None


def best_checkpoint_to_evaluate(root: Path, subcommand: str | None, dirpath: Path | None) -> Path:
    """``--ckpt_path best``: the best checkpoint of the latest run under ``root``, or with a
    configured ``checkpoint.dirpath`` ``dirpath`` the one its newest ``last*.ckpt`` records
    (Lightning's ``best`` means a fit's in the same process, which validate/test/predict
    never have)."""
    if subcommand == "fit":
        exit_with_error(
            "--ckpt_path best: fit resumes from last or a checkpoint file; best is for "
            "validate, test and predict"
        )
    if dirpath is not None:  # every run saves there: its newest last*.ckpt records the best
        runs = [dirpath]
    else:
        runs = [root / f"version_{v}/checkpoints" for v in reversed(run_versions(root))]
    latest = next((folder for folder in runs if any(folder.glob("*.ckpt"))), None)
    newest_last = None if latest is None else newest_last_checkpoint(latest)
    best = None
    if latest is not None:
        best = best_checkpoint(latest, newest_last.name if newest_last else "last.ckpt")
    if best is None and dirpath is not None:
        exit_with_error(
            f"--ckpt_path best: no best checkpoint in {dirpath} (checkpoint.dirpath); "
            f"nothing to {subcommand} (give the checkpoint's path)"
        )
    if best is None:
        where = root if latest is None else latest
        exit_with_error(
            f"--ckpt_path best: no best checkpoint under {where}; nothing to "
            f"{subcommand} (check --run_dir and --run_name, or give the checkpoint's "
            "path)"
        )
    return best


def check_checkpoint_file(ckpt_path: str | None) -> None:
    """A local ``--ckpt_path`` must be a checkpoint file that can be read: else Lightning
    fails with a traceback (LightningCLI reads its hyperparameters as it parses, a fit
    loads it once the run has started)."""
    check_registry_checkpoint(ckpt_path)
    path = local_checkpoint(ckpt_path)
    if path is None:
        return
    if not path.is_file():
        exit_with_error(f"--ckpt_path: checkpoint file not found: {ckpt_path}")
    problem = why_unreadable(path)
    if problem:
        exit_with_error(
            f"--ckpt_path: {ckpt_path} is not a readable checkpoint: {problem} (a save cut "
            "short by a crash or a full disk? give another checkpoint of the run, e.g. its "
            "best)"
        )


def check_hpc_checkpoint(ckpt_path: str | None, default_root_dir: str) -> None:
    """``--ckpt_path hpc``: Lightning loads the newest ``hpc_ckpt_<n>.ckpt`` of
    trainer.default_root_dir (where it saves one on a SLURM requeue), and without one
    fails once the run has started."""
    if ckpt_path != "hpc":
        return
    folder = Path(default_root_dir)
    if not any(folder.glob("hpc_ckpt_*.ckpt")):
        exit_with_error(
            f"--ckpt_path hpc: no hpc_ckpt_<n>.ckpt in {os.path.abspath(folder)} (Lightning "
            "saves one into trainer.default_root_dir on a SLURM requeue); name that folder "
            "with --trainer.default_root_dir, or give the checkpoint's path"
        )


def check_checkpoint_fits_model(
    path: str | None, subcommand: str | None, model: pl.LightningModule, datamodule: Any
) -> None:
    """A ``--ckpt_path`` that the configured model cannot load (another architecture), is
    another model than (another activation, label smoothing or class weights: it loads,
    and the run evaluated or trained on a model nobody trained), or a fit cannot continue
    (the state of another optimizer class) is an error now: Lightning finds out only
    once the run has started, when it has written the new config.yaml over a resumed
    run's, or never. The same for ``last``, ``best`` and a file's path: the configured
    model runs (LightningCLI's own replacing of it by a checkpoint file's
    hyperparameters dropped options silently), and how it runs (backend, compile,
    fused_head) may differ from the checkpoint's."""
    local = local_checkpoint(path)
    checkpoint = None if local is None else read_checkpoint(local)
    if checkpoint is None:
        return
    # the data first: data of other classes is why a model's sizes differ
    data_state = checkpoint.get(type(datamodule).__qualname__)
    if isinstance(data_state, dict):
        try:  # what Lightning does once the run has started
            datamodule.load_state_dict(data_state)
        except DataConfigError as e:
            exit_with_error(f"--ckpt_path: {path}: {e}")
    if subcommand == "fit":
        check_resumable(checkpoint, path)
    if subcommand == "fit" and isinstance(model, ERMClassifier):
        _check_resume_privacy(checkpoint, path, model, _same_data(data_state, datamodule))
    hint = _trained_with_hint(local)
    problems = weights_mismatch(checkpoint, model)
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        exit_with_error(f"--ckpt_path: {path} does not fit the configured model: {shown} {hint}")
    if isinstance(model, ERMClassifier):
        problems = hyperparameters_mismatch(checkpoint, model)
        if problems:
            exit_with_error(
                f"--ckpt_path: {path} does not fit the configured model: "
                f"{'; '.join(problems)} {hint}"
            )
    optimizer = configured_optimizer(model) if subcommand == "fit" else None
    problems = [] if optimizer is None else optimizer_mismatch(checkpoint, optimizer)
    if problems:
        exit_with_error(
            f"--ckpt_path: {path}: its optimizer state does not fit "
            f"{type(optimizer).__name__} ({'; '.join(problems)}); resume with the optimizer "
            "the run was trained with (its config.yaml has it)"
        )


def _trained_with_hint(checkpoint_file: Path) -> str:
    """Where the options a checkpoint was trained with are: its run's ``config.yaml``, named
    for a checkpoint of a run folder's ``checkpoints/`` (in another folder, such as a
    ``--checkpoint.dirpath``, a config.yaml above it need not be its run's)."""
    folder = checkpoint_file.resolve().parent
    config = folder.parent / "config.yaml"
    if folder.name == "checkpoints" and config.is_file():
        return f"(--config {config} runs the model it was trained with)"
    return "(its run's config.yaml has the options it was trained with)"


def check_checkpoint_fits_trainer(path: str | None, subcommand: str | None, trainer: Any) -> None:
    """A fit cannot resume from a checkpoint saved at a later epoch than
    ``trainer.max_epochs``: Lightning refuses it with a traceback once the run has started,
    when it has written the new config.yaml over the resumed run's."""
    local = local_checkpoint(path) if subcommand == "fit" else None
    checkpoint = None if local is None else read_checkpoint(local)
    epoch = (checkpoint or {}).get("epoch")
    max_epochs = trainer.max_epochs
    if not isinstance(epoch, int) or max_epochs in (None, -1) or epoch <= max_epochs:
        return
    exit_with_error(
        f"--ckpt_path: {path} was saved at epoch {epoch}, past trainer.max_epochs="
        f"{max_epochs}: there is nothing to resume; give --trainer.max_epochs above {epoch} "
        "to train on, or start a new run without --ckpt_path"
    )


def _same_data(data_state: Any, datamodule: Any) -> bool:
    """Whether a checkpoint's DataModule state (``None``: another DataModule class) says
    it was trained on the configured data: the same source, or no source recorded."""
    if not isinstance(data_state, dict):
        return False
    return data_state.get("source") == datamodule.state_dict().get("source")


def _check_resume_privacy(
    checkpoint: dict[str, Any], path: str, model: ERMClassifier, same_data: bool
) -> None:
    """A fit from a checkpoint keeps its DP-SGD setting: a private checkpoint fitted on
    without privacy ends as a model no ε holds for, and one trained on this data without
    privacy has no ε whatever the noise from here (both went on silently); a seeded DP run's
    checkpoint cannot be continued with ``secure_rng`` (the fit refuses it once the run
    folder exists)."""
    private = (checkpoint.get("hyper_parameters") or {}).get("privacy") is not None
    private = private or "privacy_accountant" in checkpoint
    if private and model.privacy is None:
        exit_with_error(
            f"--ckpt_path: {path} was trained with DP-SGD, and this configuration has no "
            "privacy: training on would end with a model no epsilon holds for; resume "
            "with the run's privacy settings (its config.yaml has them)"
        )
    if "privacy_noise_generator" in checkpoint and model.privacy is not None:
        _refuse_secure_rng_after_seeded_noise(path, model.privacy)
    trained = (checkpoint.get("global_step") or 0) > 0
    if not private and trained and same_data and model.privacy is not None:
        exit_with_error(
            f"--ckpt_path: {path} was trained without DP-SGD on this data: no epsilon "
            "holds for its weights, whatever the noise from here; train with privacy from "
            "the start (a new run, without --ckpt_path)"
        )


def _refuse_secure_rng_after_seeded_noise(path: str, privacy: Any) -> None:
    """A checkpoint that keeps its noise generator's state is a seeded run's: its steps'
    noise and batches are computable from that run's seed, so a ``secure_rng`` resume would
    end with a run whose randomness is not all secret."""
    if privacy.secure_rng:
        exit_with_error(
            f"--ckpt_path: {path} is a seeded DP-SGD run's (it keeps the noise generator's "
            "state): its steps' noise and batches are computable from the run's seed, so "
            "with model.privacy.secure_rng: true the resumed run's randomness would not all "
            "be secret; resume with secure_rng: false, or train a secure_rng run from the "
            "start (a new run, without --ckpt_path)"
        )
