"""Run folders ``<run_dir>/<run_name>/version_<n>``: their versions, making a new one, the one
rank 0 hands its DDP workers, and the one a requeued SLURM job continues in."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from torchbp.lightning.checkpoint_files import read_checkpoint

__all__ = [
    "RUN_FOLDER_ENV",
    "SLURM_JOB_KEY",
    "run_versions",
    "is_distributed_worker",
    "version_of_rank_zero",
    "slurm_job",
    "is_slurm_requeue",
    "run_of_slurm_job",
    "make_new_folder",
    "new_run_version",
    "why_unwritable",
]


_VERSION_RE = re.compile(r"^version_(\d+)$")


#: the environment variable by which rank 0 hands its run folder to the processes it launches
RUN_FOLDER_ENV = "TORCHBP_RUN_FOLDER"


#: what RunCheckpoint's state names the SLURM job that saved it by
SLURM_JOB_KEY = "slurm_job"


def run_versions(root: Path) -> list[int]:
    """The versions ``n`` of the run folders ``root/version_<n>``, in increasing order: only
    folders count, as for Lightning's loggers (a file named ``version_<n>`` is no run)."""
    if not root.is_dir():
        return []
    return sorted(
        int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name)) and p.is_dir()
    )


def is_distributed_worker() -> bool:
    """Whether this process is a worker of a multi-process run, not its rank 0 (Lightning's
    launcher, torchrun and SLURM name the ranks in the environment)."""
    ranks = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
    return any(os.environ.get(name, "0") != "0" for name in ranks)


def version_of_rank_zero(root: Path) -> int | None:
    """The version of the run folder under ``root`` that rank 0 made before it launched this
    worker (Lightning's launcher re-runs the command line with rank 0's environment), or
    ``None`` if it named none there (a worker started by torchrun or srun, or of another run)."""
    handed = os.environ.get(RUN_FOLDER_ENV)
    if not handed or os.path.dirname(handed) != os.path.abspath(root):
        return None
    match = _VERSION_RE.match(os.path.basename(handed))
    return int(match.group(1)) if match else None


def slurm_job() -> str | None:
    """This process's SLURM job as Lightning requeues it (``<array job>_<task>`` in a job
    array, else the job id), or ``None`` outside SLURM."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def is_slurm_requeue() -> bool:
    """Whether this process runs a SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0:
    SLURM runs the job's script again, with the same job id)."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return slurm_job() is not None and restarts.isdigit() and int(restarts) > 0


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
    checkpoint = None if hpc is None else read_checkpoint(hpc)
    callbacks = (checkpoint or {}).get("callbacks")
    if not isinstance(callbacks, dict):
        return None
    return next(
        (c for c in callbacks.values() if isinstance(c, dict) and c.get(SLURM_JOB_KEY) == job),
        None,
    )


def run_of_slurm_job(root: Path, job: str, hpc_folder: Path | None) -> tuple[int, Path] | None:
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
    for version in reversed(run_versions(root)):
        hpc = _newest_hpc_checkpoint(root / f"version_{version}")
        if hpc is not None and _job_state(hpc, job) is not None:
            return version, hpc
    return None


def make_new_folder(folder: Path) -> list[Path] | None:
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


def new_run_version(root: Path) -> tuple[int, list[Path]]:
    """The version of a new run folder under ``root``, and the folders made for it (deepest
    first; none in a DDP worker): the next after the existing ones, made here (by rank 0 of
    a DDP run) so that a run started at the same moment takes the one after; listing the
    folders alone gave both runs the same one. A folder that cannot be made is left to
    ``run_checks.check_run_folders_can_be_written`` to name.

    A DDP worker that Lightning launched takes rank 0's version from the environment
    (``TORCHBP_RUN_FOLDER``, set here by rank 0); one started by torchrun or srun, beside
    rank 0, computes its own, and relies on Lightning broadcasting rank 0's log and
    checkpoint folders."""
    versions = run_versions(root)
    version = versions[-1] + 1 if versions else 0
    if is_distributed_worker():
        # rank 0 made the run folder: its version, which it hands to the workers it
        # launches (they see its folder, and the next would be another run's)
        handed = version_of_rank_zero(root)
        return (version if handed is None else handed), []
    while True:
        try:
            made = make_new_folder(root / f"version_{version}")
        except OSError:
            return version, []
        if made is not None:
            os.environ[RUN_FOLDER_ENV] = os.path.abspath(root / f"version_{version}")
            return version, made
        version += 1


def why_unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot be made and written into (its nearest existing ancestor is a file,
    or not writable), or ``None``."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    # what access() cannot tell (for root: a read-only or pseudo filesystem such as /proc)
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing))
    except OSError as e:
        return f"cannot make a folder in {existing} ({e.strerror})"
    return None
