"""Checkpoint files as ``torchbp-train`` finds and checks them: reading one, why one cannot be
read, the last and best of a run, ``--ckpt_path`` names (local file, Lightning's own,
model registry), and what keeps the configured model or optimizer from a checkpoint."""

from __future__ import annotations

import importlib.util
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from torchbp.lightning.console import exit_with_error, headline

if TYPE_CHECKING:
    from torchbp.lightning.module import ERMClassifier

__all__ = [
    "INTERRUPTED_SUFFIX",
    "newest_last_checkpoint",
    "best_checkpoint",
    "local_checkpoint",
    "check_registry_checkpoint",
    "why_unreadable",
    "read_checkpoint",
    "weights_mismatch",
    "hyperparameters_mismatch",
    "check_resumable",
    "optimizer_mismatch",
    "configured_optimizer",
    "recorded_checkpoint_state",
]


#: ``ckpt_path`` values that Lightning resolves itself (``last`` is resolved here)
_LIGHTNING_CKPT_NAMES = ("best", "hpc")


#: Lightning's model-registry ``ckpt_path``: ``registry`` or ``registry:<model>[:<version>]``
_REGISTRY_RE = re.compile(r"^registry(:.*)?$", re.IGNORECASE)


#: ends the name of the checkpoint saved on an exception (see RunCheckpoint)
INTERRUPTED_SUFFIX = "-interrupted"


#: ERMClassifier's options that choose how the model runs, not which model it is: they may
#: differ from a checkpoint's (the optimizer's class is checked against its saved state, and
#: a fit's privacy by ckpt_path.check_checkpoint_fits_model)
_HOW_THE_MODEL_RUNS = ("backend", "compile", "fused_head", "optimizer", "lr_scheduler", "privacy")


def newest_last_checkpoint(folder: Path) -> Path | None:
    """The newest ``last*.ckpt`` of ``folder`` (Lightning's choice for ``ckpt_path="last"``:
    a second run into one checkpoint folder saves ``last-v1.ckpt``), or ``None``."""
    candidates = [p for p in folder.glob("last*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def best_checkpoint(folder: Path, last: str = "last.ckpt") -> Path | None:
    """The best checkpoint in a run's ``checkpoints`` folder: the one its ``last`` checkpoint
    records as ModelCheckpoint's ``best_model_path`` (looked up in ``folder``, so a moved run
    folder still works; where recorded when outside the folder the run saved into: a fit
    resumed from another run's checkpoint keeps that run's better best; ``None`` if it
    records none, as after an interrupt before the first validation, whose exception
    checkpoint is no best), else, without a readable ``last``, the folder's only
    checkpoint besides ``last*.ckpt``."""
    state = read_checkpoint(folder / last) if (folder / last).is_file() else None
    if state is not None:
        for callback in _best_recording_states(state.get("callbacks")):
            recorded = callback.get("best_model_path")
            if recorded and _carried_from_another_folder(callback) and Path(recorded).is_file():
                return Path(recorded)
            if recorded and (folder / Path(recorded).name).is_file():
                return folder / Path(recorded).name
        return None
    others = [
        p
        for p in folder.glob("*.ckpt")
        if not p.name.startswith("last") and not p.stem.endswith(INTERRUPTED_SUFFIX)
    ]
    return others[0] if len(others) == 1 else None


def _carried_from_another_folder(state: dict[str, Any]) -> bool:
    """Whether a checkpoint-callback state's best lies outside the folder it saves into: the
    best of another run that a fit resumed from that run's checkpoint kept (see
    :meth:`RunCheckpoint.load_state_dict`), never a copied or moved run's own best."""
    best, dirpath = state.get("best_model_path"), state.get("dirpath")
    return bool(best and dirpath) and Path(best).parent != Path(dirpath)


def _best_recording_states(states: Any) -> list[dict[str, Any]]:
    """The checkpoint-callback states of a checkpoint's ``callbacks`` whose best is the run's:
    RunCheckpoint's (``--checkpoint.*``) when it has one, else every ModelCheckpoint's (a
    checkpoint saved without ``torchbp-train``). A ModelCheckpoint of trainer.callbacks
    comes first in the trainer's list, and its best (on another monitor) was taken."""
    if not isinstance(states, dict):
        return []
    dicts = {key: value for key, value in states.items() if isinstance(value, dict)}
    # the state keys are the callbacks' class names and settings: RunCheckpoint{...}
    own = [value for key, value in dicts.items() if _is_run_checkpoint(key)]
    return own or list(dicts.values())


def _is_run_checkpoint(state_key: Any) -> bool:
    """Whether a checkpoint's callback state under ``state_key`` is RunCheckpoint's."""
    return str(state_key).startswith("RunCheckpoint{")


def _is_registry_name(ckpt_path: str | None) -> bool:
    """Whether ``--ckpt_path`` has the syntax of Lightning's model registry: ``registry`` or
    ``registry:<model>[:<version>]`` (any case, as Lightning reads it)."""
    return ckpt_path is not None and _REGISTRY_RE.match(str(ckpt_path)) is not None


def _from_registry(ckpt_path: str | None) -> bool:
    """Whether Lightning downloads ``--ckpt_path`` from its model registry: a registry name
    with the ``litmodels`` package installed (without it, Lightning reads it as a file's)."""
    return _is_registry_name(ckpt_path) and importlib.util.find_spec("litmodels") is not None


def local_checkpoint(ckpt_path: str | None) -> Path | None:
    """``--ckpt_path`` as a local file's path; ``None`` for no checkpoint, a name Lightning
    resolves itself (``best``, ``hpc``, ``registry[:...]``) or a remote one (``s3://...``)."""
    if ckpt_path is None or str(ckpt_path) in _LIGHTNING_CKPT_NAMES or "://" in str(ckpt_path):
        return None
    return None if _from_registry(ckpt_path) else Path(ckpt_path)


def check_registry_checkpoint(ckpt_path: str | None) -> None:
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


def why_unreadable(path: Path) -> str | None:
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


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (memory-mapped), or ``None`` if it cannot be read here
    (Lightning then reports it)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, pickle.UnpicklingError):
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def weights_mismatch(checkpoint: dict[str, Any], model: torch.nn.Module) -> list[str]:
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


def hyperparameters_mismatch(checkpoint: dict[str, Any], model: ERMClassifier) -> list[str]:
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


def check_resumable(checkpoint: dict[str, Any], path: str) -> None:
    """A fit resumes from a checkpoint holding the optimizer and loop state, not from one
    saved with ``save_weights_only`` (Lightning refuses it with a KeyError only once the run
    has started, after it saved an exception checkpoint and a ``last-v1.ckpt`` beside it)."""
    if "optimizer_states" not in checkpoint:
        exit_with_error(
            f"--ckpt_path: {path} holds the weights only (saved with "
            "checkpoint.save_weights_only): a fit cannot resume from it, it has no optimizer "
            "or loop state; test, validate or predict with it, or give a full checkpoint"
        )


def optimizer_mismatch(checkpoint: dict[str, Any], optimizer: torch.optim.Optimizer) -> list[str]:
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


def configured_optimizer(model: Any) -> torch.optim.Optimizer | None:
    """The one optimizer ``model.configure_optimizers()`` makes (``None`` for anything else)."""
    configured = model.configure_optimizers()
    if isinstance(configured, dict):
        configured = configured.get("optimizer")
    return configured if isinstance(configured, torch.optim.Optimizer) else None


def recorded_checkpoint_state(
    ckpt_path: str | None, callback: ModelCheckpoint
) -> tuple[str, dict[str, Any]] | None:
    """``(state key, state)`` of ``callback`` in the checkpoint at ``ckpt_path``: under its
    own state key, else the only state of a callback of its class (the checkpoint's run
    configured it otherwise: another monitor, mode or interval); ``None`` if there is none
    or the checkpoint cannot be read."""
    path = local_checkpoint(ckpt_path)
    checkpoint = None if path is None else read_checkpoint(path)
    states = (checkpoint or {}).get("callbacks") or {}
    if not isinstance(states, dict):
        return None
    keys = [callback.state_key]
    if callback.state_key not in states:
        keys = [k for k in states if str(k).startswith(f"{type(callback).__qualname__}{{")]
    if len(keys) != 1 or not isinstance(states.get(keys[0]), dict):
        return None
    return keys[0], states[keys[0]]
