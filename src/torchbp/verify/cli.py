"""``torchbp-verify``: check every torchbp op on every device and dtype, or your own.

Without a target, runs :func:`torchbp.verify.check_function` on each case of
:mod:`torchbp.verify.cases`, shows a progress bar while it runs and prints a table
(op x check) at the end. With a target (``module:Symbol`` or ``file.py:Symbol``: an
autograd.Function, a callable or a ``torch.library`` custom op) and ``--inputs``, checks
that one on the inputs the spec describes (:mod:`torchbp.verify.target`) and prints its
report.

Exit status: 0 if no check failed, 1 if a check failed, 2 on a usage error, 130 when
interrupted (Ctrl-C). ``--json`` is rewritten after every finished case run, marked
``"complete": false`` until the last, so a run killed at a time limit keeps its verdicts;
for a target that cannot be checked (a usage error: inputs outside its domain, a
malformed spec) it holds ``"ok": false`` and the ``"usage_error"``, with no checks.

Examples:
    $ torchbp-verify                         # every op, cpu (+ cuda if present)
    $ torchbp-verify --op cross_entropy --op linear --dtype float64 --fast
    $ torchbp-verify --device cuda --json verify-cuda.json
    $ torchbp-verify mypkg.ops:MyLinear --inputs "4,5;3,5;3" --reference torch.nn.functional:linear
    $ torchbp-verify mypkg.ops:MyScale --inputs "4,5;5" --grad-inputs 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchbp.verify.cases import LOW_PRECISION_CHECKS, Case, cases_for, op_names, unregistered_ops
from torchbp.verify.checks import CHECKS, check_function
from torchbp.verify.checks.spelling import command_line_spelling
from torchbp.verify.report import FAIL, PASS, SKIP, STATUSES, UNSUPPORTED, CheckResult, Report
from torchbp.verify.target import TargetError, load_symbol, parse_inputs

__all__ = ["main", "run"]

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICES = ("cpu", "cuda")
#: The exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line arguments (exit status 2)."""


class JsonWriteError(Exception):
    """The ``--json`` file could not be written (exit status 2)."""


@dataclass
class Job:
    case: Case
    device: str
    dtype: str


@dataclass
class Outcome:
    job: Job
    report: Report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchbp-verify",
        description=(
            "Verify every torchbp op against autograd and native PyTorch: gradcheck, "
            "gradgradcheck, forward-mode AD, vmap, batched/undefined grads, gradient shapes, "
            "grad_output safety, torch.compile and parity with torch.nn.functional."
        ),
        epilog=(
            "Your own Function: torchbp-verify module:Symbol --inputs SPEC, where SPEC lists "
            "the inputs separated by ';': 4,5 is a float tensor of shape (4, 5), () a 0-dim "
            "one, 4,5[0.1,2] one drawn uniformly from [0.1, 2] (a fn with a restricted "
            "domain: log, sqrt), int:4<10 an int64 tensor of shape (4,) with values in "
            "[0, 10), bool:4,5 a random mask of shape (4, 5), complex:4,5 a complex128 "
            "tensor, float32:4,5 a float32 one (cast to --dtype, float64 by default, for "
            "every check; the reference_dtype check runs the target on it in float32), "
            "=VALUE a Python literal (=1, =True, ='mean'); @FILE reads one input per line. "
            "Exit status: 0 nothing failed, 1 a check failed, 2 usage error, 130 "
            "interrupted."
        ),
    )
    p.add_argument(
        "target",
        nargs="?",
        metavar="module:Symbol",
        help=(
            "check your own autograd.Function, callable or torch.library custom op instead "
            "of torchbp's ops (module:Symbol or path/to/file.py:Symbol; needs --inputs)"
        ),
    )
    p.add_argument("--inputs", metavar="SPEC", help="example inputs of the target (see below)")
    p.add_argument(
        "--reference",
        metavar="module:Symbol",
        help="callable the target must match in outputs and gradients",
    )
    p.add_argument(
        "--require",
        action="append",
        metavar="CHECK",
        help="checks the target promises: unsupported counts as failed (comma-separated)",
    )
    p.add_argument(
        "--skip",
        action="append",
        metavar="CHECK",
        help="checks to leave out, of the target or of every op (comma-separated)",
    )
    p.add_argument(
        "--grad-inputs",
        metavar="I,J",
        help=(
            "positions (from 0, in --inputs order) of the target's inputs to differentiate; "
            "default: every floating tensor input"
        ),
    )
    p.add_argument("--seed", type=int, help="seed of the target's inputs (default 0)")
    for flag, metavar, text in TOLERANCE_FLAGS:
        p.add_argument(flag, type=float, metavar=metavar, help=text)
    p.add_argument(
        "--device",
        action="append",
        metavar="NAME",
        help="cpu or cuda (repeatable; default: cpu, plus cuda when a GPU is present)",
    )
    p.add_argument(
        "--op",
        action="append",
        metavar="NAME",
        help="op to check (repeatable or comma-separated; default: all). See --list.",
    )
    p.add_argument(
        "--dtype",
        action="append",
        metavar="NAME",
        help=(
            "float64 (all checks), float32, bfloat16, float16 (parity with native); "
            "repeatable; default: float64, float32, bfloat16 (+ float16 on cuda)"
        ),
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="gradcheck fast_mode (random projections; the default for a target whose "
        "inputs and parameters hold over 4096 differentiated elements)",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        help=(
            "also write the full results as JSON, rewritten after each case run "
            '("complete": false until the run ends); for a target, a usage error is '
            'written too ("ok": false, "usage_error")'
        ),
    )
    p.add_argument(
        "--compile-backend",
        default="aot_eager",
        metavar="NAME",
        help="torch.compile backend for the compile check (default: aot_eager)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile checks")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads for torch (default 1: the cases are tiny, threads only add overhead)",
    )
    p.add_argument("--list", action="store_true", help="list ops and their cases, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _print_error(err_console: Any, message: str) -> None:
    """Print ``torchbp-verify: error: <message>`` as plain text on one line: the message
    quotes the user's arguments and paths, which rich would read as markup (``[x]`` eaten
    as a style, ``[/x]`` raising) and wrap at the terminal's width."""
    err_console.print(
        f"torchbp-verify: error: {message}", markup=False, highlight=False, soft_wrap=True
    )


def _print_interrupted(err_console: Any, detail: str) -> None:
    """Print ``torchbp-verify: interrupted<detail>`` (Ctrl-C), as plain text."""
    err_console.print(
        f"torchbp-verify: interrupted{detail}", markup=False, highlight=False, soft_wrap=True
    )


def _split(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out += [s.strip() for s in v.split(",") if s.strip()]
    return out


#: check_function's numerical options as flags of a target's check: (flag, metavar,
#: help); each is passed on under its own name (``--nondet-tol`` as ``nondet_tol``).
TOLERANCE_FLAGS = (
    ("--eps", "EPS", "finite-difference step of the numerical checks (default 1e-6)"),
    ("--atol", "ATOL", "absolute tolerance against the numerical gradient (default 1e-5)"),
    ("--rtol", "RTOL", "relative tolerance against the numerical gradient (default 1e-3)"),
    (
        "--nondet-tol",
        "TOL",
        "how far two runs of backward on the same inputs may differ (default 0)",
    ),
    (
        "--parity-atol",
        "ATOL",
        "absolute tolerance against the reference (default: by dtype)",
    ),
    (
        "--parity-rtol",
        "RTOL",
        "relative tolerance against the reference (default: by dtype)",
    ),
)


def _attribute(flag: str) -> str:
    """The argparse attribute (and check_function option) of ``flag``: ``nondet_tol``."""
    return flag.removeprefix("--").replace("-", "_")


#: The options that only a target (module:Symbol --inputs SPEC) takes, by attribute.
TARGET_ONLY = {
    "reference": "--reference",
    "require": "--require",
    "grad_inputs": "--grad-inputs",
    "seed": "--seed",
    **{_attribute(flag): flag for flag, _, _ in TOLERANCE_FLAGS},
}


def _refuse_target_only(args: argparse.Namespace) -> None:
    """A usage error for an option that applies only to a target, given without one (it
    would be silently ignored)."""
    given = [flag for attr, flag in TARGET_ONLY.items() if getattr(args, attr) is not None]
    if given:
        raise UsageError(
            f"{given[0]} applies only to a target (module:Symbol --inputs SPEC), not to "
            "torchbp's ops"
        )


def _refuse_unknown(kind: str, given: Sequence[str], valid: Sequence[str]) -> None:
    """A usage error naming the ``given`` values that are not ``valid`` (``kind``: what
    they are, e.g. ``"op"``) and listing the valid ones."""
    bad = [v for v in given if v not in valid]
    if bad:
        raise UsageError(f"unknown {kind} {', '.join(bad)}; valid {kind}s: {', '.join(valid)}")


def _skipped(args: argparse.Namespace) -> set[str]:
    """The check names given to --skip, each a valid one."""
    skipped = _split(args.skip)
    _refuse_unknown("check", skipped, CHECKS)
    return set(skipped)


def _resolve(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    _refuse_target_only(args)
    _skipped(args)
    ops_valid = op_names()
    ops = _split(args.op) or ops_valid
    _refuse_unknown("op", ops, ops_valid)
    devices = _split(args.device)
    _refuse_unknown("device", devices, DEVICES)
    if "cuda" in devices and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for, but no CUDA GPU is available to this PyTorch "
            f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}); "
            "run on a machine with a GPU or use --device cpu"
        )
    if not devices:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    dtypes = _split(args.dtype)
    _refuse_unknown("dtype", dtypes, list(DTYPES))
    return ops, list(dict.fromkeys(devices)), list(dict.fromkeys(dtypes))


def _jobs(ops: list[str], devices: list[str], dtypes: list[str]) -> list[Job]:
    jobs = []
    for device in devices:
        chosen = dtypes or (
            ["float64", "float32", "bfloat16"] + (["float16"] if device == "cuda" else [])
        )
        for op in ops:
            for case in cases_for(op):
                for dtype in chosen:
                    jobs.append(Job(case, device, dtype))
    return jobs


def _options(
    job: Job, args: argparse.Namespace, compiled: set[tuple[str, str, str]]
) -> dict[str, Any]:
    # torchbp's ops are autograd.Functions, not torch.library custom ops, and each dtype
    # runs on inputs of that dtype (nothing cast: reference_dtype would only be skipped);
    # a float32 or bfloat16 job's reference check compares the op with native in that
    # dtype at its tolerance, a closer check of a low-precision backward than
    # reference_dtype's (against float64, 10 times looser)
    skipped = _skipped(args) | {"opcheck", "reference_dtype"}
    checks = [c for c in job.case.checks or CHECKS if c not in skipped]
    if job.dtype != "float64":
        checks = [c for c in checks if c in LOW_PRECISION_CHECKS]
    checks = checks or ["forward"]  # every check of this dtype skipped: forward still runs
    # compile: once per op, device and dtype family, on the op's main case (it is slow)
    key = (job.case.op, job.device)
    want_compile = (
        not args.no_compile
        and "compile" not in skipped
        and job.case.compile
        and job.dtype in ("float64", "float32")
        and (key + (job.dtype,)) not in compiled
    )
    if want_compile:
        compiled.add(key + (job.dtype,))
        checks.append("compile")
    else:
        checks = [c for c in checks if c != "compile"]
    return {
        "dtype": DTYPES[job.dtype],
        "device": job.device,
        "grad_inputs": job.case.grad_inputs,
        "checks": checks,
        # torchbp promises every capability it does not document as unsupported (those
        # run too, and must come out unsupported or pass, never fail)
        "require": [c for c in checks if c not in job.case.unsupported],
        "fast_mode": args.fast,
        "compile_backend": args.compile_backend,
        "name": f"{job.case.label} {job.device} {job.dtype}",
    }


def run(
    jobs: list[Job],
    args: argparse.Namespace,
    progress: Any | None = None,
    task: Any = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run every job; advance the (rich) progress bar if one is given.

    Args:
        jobs: what to check.
        args: parsed command-line options.
        progress: a ``rich.progress.Progress`` or None.
        task: its task id.
        on_outcome: called with each :class:`Outcome` as soon as its job is done (what
            finished stays known to the caller when a later job is interrupted).

    Returns:
        One :class:`Outcome` per job.
    """
    outcomes: list[Outcome] = []
    compiled: set[tuple[str, str, str]] = set()
    for job in jobs:
        if progress is not None:
            progress.update(task, description=f"{job.case.label} ({job.device}, {job.dtype})")
        opts = _options(job, args, compiled)
        if "compile" in opts["checks"]:
            torch.compiler.reset()
        try:
            with command_line_spelling():
                report = check_function(
                    job.case.fn(), *job.case.inputs(), reference=job.case.reference(), **opts
                )
        except (TypeError, ValueError) as exc:  # a broken case is a failure, not a crash
            report = Report(opts["name"], [CheckResult("forward", FAIL, f"bad case: {exc}")])
        report.meta.update({"op": job.case.op, "case": job.case.name, "note": job.case.note})
        for result in report:
            reason = job.case.unsupported.get(result.name)
            if reason and result.status == UNSUPPORTED:
                result.message = f"{reason}: {result.message}"
        outcomes.append(Outcome(job, report))
        if on_outcome is not None:
            on_outcome(outcomes[-1])
        if progress is not None:
            progress.advance(task)
    return outcomes


def _cell(results: list) -> tuple[str, str]:
    """Text and style of one table cell aggregating several CheckResults."""
    ran = [r for r in results if r.status != SKIP]
    if not results:
        return "", ""
    if not ran:
        return "skip", "dim"
    failed = [r for r in ran if r.status == FAIL]
    unsupported = [r for r in ran if r.status == UNSUPPORTED]
    errs = [r.max_abs_err for r in ran if r.max_abs_err is not None and r.status == PASS]
    if failed:
        return f"FAIL {len(failed)}/{len(ran)}", "bold red"
    if len(unsupported) == len(ran):
        return "unsupported", "yellow"
    err = f" {max(errs):.0e}" if errs else ""
    if unsupported:
        return f"pass{err} ({len(unsupported)} unsup.)", "yellow"
    return f"pass{err}", "green"


def _table_rows(outcomes: list[Outcome]) -> tuple[list[str], list[tuple[str, list, float]]]:
    by_op: dict[tuple[str, str], dict[str, list]] = {}
    times: dict[tuple[str, str], float] = {}
    for oc in outcomes:
        key = (oc.job.case.op, oc.job.device)
        cells = by_op.setdefault(key, {})
        times[key] = times.get(key, 0.0) + oc.report.seconds
        for r in oc.report:
            cells.setdefault(r.name, []).append(r)
    checks = [c for c in CHECKS if any(c in cells for cells in by_op.values())]
    rows = []
    for (op, device), cells in by_op.items():
        rows.append(
            (f"{op} ({device})", [_cell(cells.get(c, [])) for c in checks], times[(op, device)])
        )
    return checks, rows


def _print_table(
    console: Any, outcomes: list[Outcome], wall: float, planned: int | None = None
) -> None:
    from rich.markup import escape
    from rich.table import Table

    checks, rows = _table_rows(outcomes)
    table = Table(title="torchbp-verify", show_lines=False, header_style="bold")
    table.add_column("op (device)", no_wrap=True)
    for c in checks:
        table.add_column(c.replace("_", " "), no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    for name, cells, secs in rows:
        table.add_row(
            name,
            *[f"[{style}]{text}[/]" if style else text for text, style in cells],
            f"{secs:.1f}s",
        )
    console.print(table)
    console.print(
        "cells: pass + largest max-abs-error over the op's cases and dtypes, or FAIL "
        "failed/ran; unsupported = a capability the op does not offer by design "
        "(documented); skip = not applicable"
    )
    failures = [(oc, r) for oc in outcomes for r in oc.report if r.status == FAIL]
    for oc, r in failures[:40]:
        console.print(
            f"[bold red]FAIL[/] {escape(f'{oc.report.name} {r.name}: {r.message}')}",
            highlight=False,
            markup=True,
            soft_wrap=True,
        )
    if len(failures) > 40:
        console.print(f"... and {len(failures) - 40} more failures (see --json)")
    gaps = {
        (oc.job.case.op, r.name): r.message.split("; to add it:")[0]
        for oc in outcomes
        for r in oc.report
        if r.status == UNSUPPORTED
    }
    for (op, name), message in gaps.items():
        console.print(
            f"[yellow]UNSUPPORTED[/] {escape(f'{op} {name}: {message}')}",
            highlight=False,
            soft_wrap=True,
        )
    missing = unregistered_ops()
    if missing:
        console.print(f"[yellow]no verification cases for: {', '.join(missing)}[/]")
    console.print(_summary(outcomes, wall, planned), highlight=False)


def _counts(outcomes: list[Outcome]) -> dict[str, int]:
    results = [r for oc in outcomes for r in oc.report]
    return {s: sum(r.status == s for r in results) for s in STATUSES}


def _verdict(failed: int, finished: int, planned: int | None) -> str:
    """``ALL PASSED`` or ``N CHECK(S) FAILED``; for a run that stopped early (``planned``
    case runs, of which ``finished`` finished) ``INCOMPLETE (...)`` saying so."""
    failures = f"{failed} CHECK(S) FAILED"
    if planned is None:
        return failures if failed else "ALL PASSED"
    so_far = failures if failed else "no check failed so far"
    return f"INCOMPLETE ({finished} of {planned} case runs finished, {so_far})"


def _summary(outcomes: list[Outcome], wall: float, planned: int | None = None) -> str:
    """One line: the verdict and the counts; ``planned``: the number of case runs of a run
    that has not finished them all (None once it has)."""
    n = _counts(outcomes)
    ops = len({oc.job.case.op for oc in outcomes})
    verdict = _verdict(n[FAIL], len(outcomes), planned)
    devices = ",".join(dict.fromkeys(oc.job.device for oc in outcomes))
    return (
        f"{verdict}: {ops} ops, {len(outcomes)} case runs on {devices}, {n[PASS]} checks passed, "
        f"{n[FAIL]} failed, {n[UNSUPPORTED]} unsupported, {n[SKIP]} skipped in {wall:.1f}s "
        f"(torch {torch.__version__})"
    )


def _write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder renamed over
    it: a reader, or a run killed mid-write, finds the old file or the new one, never a
    truncated one."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(temporary, path)
    except BaseException:  # an OSError or Ctrl-C: leave no temporary file behind
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def _result_entry(outcome: Outcome) -> dict[str, Any]:
    """One case run's item of the JSON file's ``results``."""
    return {
        "op": outcome.job.case.op,
        "case": outcome.job.case.name,
        "device": outcome.job.device,
        "dtype": outcome.job.dtype,
        **outcome.report.to_dict(),
    }


class JsonResults:
    """The ``--json`` file of a run of torchbp's ops, written whole after each finished
    case run (:func:`_write_atomically`): valid JSON at any time, ``"complete": false``
    until the run has finished every case run. Each result is serialized once, so that
    rewriting the file costs its size, not the run's checks again.

    Args:
        path: the file.
        argv: the command line, recorded in the file.
        planned: the number of case runs of the whole run.
    """

    def __init__(self, path: str, argv: list[str], planned: int) -> None:
        self.path, self.argv, self.planned = path, argv, planned
        self._entries: list[str] = []  # one per outcome written, as the file indents it

    def write(self, outcomes: list[Outcome], wall: float, complete: bool) -> None:
        """Write the file for ``outcomes`` (those of earlier calls first, then new ones).

        Raises:
            JsonWriteError: the file cannot be written.
        """
        for outcome in outcomes[len(self._entries) :]:
            # at the file's nesting (an item of "results"): two more spaces per line;
            # json.dumps escapes newlines in strings, so each newline starts a line
            text = json.dumps(_result_entry(outcome), indent=1)
            self._entries.append(text.replace("\n", "\n  "))
        try:
            _write_atomically(self.path, self._text(self._header(outcomes, wall, complete)))
        except OSError as exc:
            raise JsonWriteError(f"cannot write {self.path}: {exc}") from exc

    def _header(self, outcomes: list[Outcome], wall: float, complete: bool) -> dict[str, Any]:
        n = _counts(outcomes)
        return {
            "ok": complete and n[FAIL] == 0,
            "complete": complete,
            "planned_case_runs": self.planned,
            "summary": _summary(outcomes, wall, None if complete else self.planned),
            "counts": n,
            "wall_seconds": round(wall, 3),
            "argv": self.argv,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device_names": {
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
            },
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _text(self, header: dict[str, Any]) -> str:
        """What ``json.dump(..., indent=1)`` writes for ``header`` followed by the key
        ``results``, a list of the serialized entries."""
        head = json.dumps(header, indent=1).removesuffix("\n}")
        items = ",\n  ".join(self._entries)
        results = f"[\n  {items}\n ]" if self._entries else "[]"
        return f'{head},\n "results": {results}\n}}'


def _list(console: Any) -> None:
    from rich.markup import escape

    for op in op_names():
        # case names hold brackets (2d[negative_slope=0.2]) that rich would take for markup
        names = escape(", ".join(c.name for c in cases_for(op)))
        console.print(f"[bold]{op}[/]: {names}", highlight=False)
    missing = unregistered_ops()
    if missing:
        console.print(f"no cases yet: {', '.join(missing)}")


def _target_options(args: argparse.Namespace) -> dict[str, Any]:
    """check_function's options from the command line (target mode)."""
    dtypes = _split(args.dtype)
    devices = _split(args.device)
    if len(dtypes) > 1 or len(devices) > 1:
        raise UsageError("give one --dtype and one --device when checking a target")
    _refuse_unknown("dtype", dtypes, list(DTYPES))
    _refuse_unknown("device", devices, DEVICES)
    skip = _split(args.skip) + (["compile"] if args.no_compile else [])
    return {
        "dtype": DTYPES[dtypes[0]] if dtypes else torch.float64,
        "device": devices[0] if devices else None,
        "require": _split(args.require),
        "skip": skip,
        # without --fast, check_function's default (fast for a large nn.Module)
        **({"fast_mode": True} if args.fast else {}),
        **{
            _attribute(flag): getattr(args, _attribute(flag))
            for flag, _, _ in TOLERANCE_FLAGS
            if getattr(args, _attribute(flag)) is not None
        },
        "compile_backend": args.compile_backend,
    }


def _grad_inputs(spec: str | None, inputs: Sequence[Any]) -> tuple[int, ...] | None:
    """The positions ``--grad-inputs`` names (None without it), each that of a floating
    or complex tensor among ``inputs`` and given once; a usage error naming the flag otherwise."""
    if spec is None:
        return None
    flag = f"--grad-inputs {spec!r}"
    parts = [s.strip() for s in spec.split(",")]
    if not all(parts):
        raise UsageError(f"{flag}: give input positions separated by commas, e.g. 0,2")
    try:
        given = [int(s) for s in parts]
    except ValueError:
        raise UsageError(f"{flag}: an input position is an integer, e.g. 0,2") from None
    positions: list[int] = []
    for i in given:
        if not -len(inputs) <= i < len(inputs):
            raise UsageError(
                f"{flag}: there is no input {i}; --inputs gives {len(inputs)} input(s), "
                f"positions 0 to {len(inputs) - 1}"
            )
        i %= len(inputs)
        if i in positions:
            raise UsageError(f"{flag}: input {i} is named twice; give each position once")
        x = inputs[i]
        if not (isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())):
            kind = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else "a Python value"
            raise UsageError(
                f"{flag}: input {i} is {kind}, which cannot require gradients; name only "
                "floating or complex tensor inputs"
            )
        positions.append(i)
    return tuple(positions)


def _refuse_module_class(role: str, spec: str, value: Any) -> None:
    """A usage error for an ``nn.Module`` class named as the target or reference: the
    command line cannot construct it (check_function's advice, pass an instance such as
    ``MyLayer()``, has no command-line spelling)."""
    if not (isinstance(value, type) and issubclass(value, torch.nn.Module)):
        return
    path = spec.rsplit(":", 1)[0]
    where, named = (path, f"{path}:layer") if path.endswith(".py") else ("a file", "file.py:layer")
    raise UsageError(
        f"{role} {spec} is the nn.Module class {value.__name__}, which the command line "
        f"cannot construct: make an instance in {where} (layer = {value.__name__}(...)"
        f".double()) and name it ({named}), or name a function instead"
    )


def _require_module_dtype(role: str, target: Any, dtype_given: bool) -> None:
    """A usage error naming ``--dtype`` for an ``nn.Module`` target or reference whose
    floating parameters are not float64, when no ``--dtype`` was given: the inputs are
    float64 then, and check_function's advice (``dtype=None``) has no command-line form."""
    module = target if isinstance(target, torch.nn.Module) else getattr(target, "__self__", None)
    if dtype_given or not isinstance(module, torch.nn.Module):
        return
    found = {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}
    other = sorted(str(d).removeprefix("torch.") for d in found - {torch.float64})
    if other:
        raise UsageError(
            f"{role} is an nn.Module with {', '.join(other)} parameters, but the inputs are "
            f"float64 without --dtype: give --dtype {other[0]} (the numerical checks need "
            "float64 and are then skipped), or convert the module with .double() in your file"
        )


def _check_target(args: argparse.Namespace, console: Any, err_console: Any) -> int:
    """``torchbp-verify module:Symbol --inputs SPEC``: check the user's own Function."""
    try:
        if args.target is None or args.inputs is None:
            raise UsageError("checking your own Function needs both module:Symbol and --inputs")
        if args.op:
            raise UsageError("--op selects torchbp's ops; leave it out when checking a target")
        options = _target_options(args)
        fn = load_symbol(args.target)
        reference = load_symbol(args.reference) if args.reference else None
        for role, spec, value in (
            ("the target", args.target, fn),
            ("the reference", args.reference, reference),
        ):
            _refuse_module_class(role, spec or "", value)
            _require_module_dtype(role, value, bool(args.dtype))
        inputs = parse_inputs(args.inputs, 0 if args.seed is None else args.seed)
        grad_inputs = _grad_inputs(args.grad_inputs, inputs)
        torch.set_num_threads(args.threads)
        with command_line_spelling():  # messages advise --skip, not skip=[...]
            report = check_function(
                fn, *inputs, reference=reference, grad_inputs=grad_inputs, **options
            )
    except (UsageError, TargetError, TypeError, ValueError) as exc:
        _print_error(err_console, str(exc))
        _write_usage_error(args, str(exc))
        return 2
    console.print(str(report), highlight=False, markup=False, soft_wrap=True)
    if args.json:
        try:
            _write_atomically(args.json, json.dumps(report.to_dict(), indent=1))
        except OSError as exc:
            _print_error(err_console, f"cannot write {args.json}: {exc}")
            return 2
    return 0 if report.ok else 1


def _write_usage_error(args: argparse.Namespace, message: str) -> None:
    """Write ``--json``, if given, for a target that could not be checked (a usage error,
    exit status 2: inputs outside fn's domain, a malformed spec): ``"ok": false`` with
    the message as ``"usage_error"`` and no checks, so that a file left by an earlier run
    is not read as this one's verdict. The error is already printed; a file that cannot
    be written adds nothing to it."""
    if not args.json:
        return
    entry = {"name": args.target, "ok": False, "usage_error": message, "checks": []}
    with contextlib.suppress(OSError):
        _write_atomically(args.json, json.dumps(entry, indent=1))


def _unwritable_json(path: str | None) -> str | None:
    """Why ``--json PATH`` cannot be written (its folder missing, not a folder, not writable,
    or PATH a folder), or None."""
    if not path:
        return None
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        return "it is a folder"
    if not folder.is_dir():
        return f"no folder {folder}" if not folder.exists() else f"{folder} is not a folder"
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``torchbp-verify``.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        0 if every check passed, 1 if a check failed, 2 on a usage error, 130 when
        interrupted (Ctrl-C; ``--json`` then holds the case runs that finished, marked
        ``"complete": false``).

    Examples:
        >>> main(["--op", "relu", "--dtype", "float64", "--no-progress"])  # doctest: +SKIP
        0
    """
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=320)  # 17 columns: a pipe or file gets the whole table
    err_console = Console(stderr=True)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own message
        return int(exc.code or 0) if exc.code in (0, None) else 2
    if args.list:
        _list(console)
        return 0
    if args.threads < 1:
        _print_error(err_console, "--threads must be at least 1")
        return 2
    unwritable = _unwritable_json(args.json)
    if unwritable:  # before the checks run, not after (their results would be lost)
        _print_error(err_console, f"cannot write {args.json}: {unwritable}")
        return 2
    if args.target is not None or args.inputs is not None:
        try:
            return _check_target(args, console, err_console)
        except KeyboardInterrupt:
            _print_interrupted(err_console, "")
            return INTERRUPTED
    try:
        ops, devices, dtypes = _resolve(args)
    except UsageError as exc:
        _print_error(err_console, str(exc))
        return 2
    torch.set_num_threads(args.threads)
    jobs = _jobs(ops, devices, dtypes)
    if not jobs:
        _print_error(err_console, "nothing to check")
        return 2
    try:
        return _run_ops(jobs, args, argv, console, err_console)
    except JsonWriteError as exc:
        _print_error(err_console, str(exc))
        return 2


def _run_ops(
    jobs: list[Job], args: argparse.Namespace, argv: list[str], console: Any, err_console: Any
) -> int:
    """Run ``jobs``, writing ``--json`` after each (:class:`JsonResults`), then print the
    table and write the file complete. Ctrl-C stops the run: the table of what finished is
    printed, the file written incomplete, and the exit status is 130."""
    results = JsonResults(args.json, argv, len(jobs)) if args.json else None
    finished: list[Outcome] = []
    start = time.perf_counter()

    def record(outcome: Outcome) -> None:
        finished.append(outcome)
        if results is not None:
            results.write(finished, time.perf_counter() - start, complete=False)

    if results is not None:  # replaces a previous run's file before the first case
        results.write(finished, 0.0, complete=False)
    try:
        _run_with_progress(jobs, args, err_console, record)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    wall = time.perf_counter() - start
    planned = len(jobs) if interrupted else None
    if finished:
        _print_table(console, finished, wall, planned)
    if results is not None:
        results.write(finished, wall, complete=not interrupted)
        incomplete = ' (incomplete: "complete": false)' if interrupted else ""
        console.print(f"wrote {args.json}{incomplete}", markup=False, highlight=False)
    if interrupted:
        _print_interrupted(err_console, f" after {len(finished)} of {len(jobs)} case runs")
        return INTERRUPTED
    return 1 if _counts(finished)[FAIL] else 0


def _run_with_progress(
    jobs: list[Job],
    args: argparse.Namespace,
    err_console: Any,
    record: Callable[[Outcome], None],
) -> None:
    """:func:`run`, with a progress bar on ``err_console`` unless ``--no-progress`` or
    not a terminal."""
    if args.no_progress or not err_console.is_terminal:
        run(jobs, args, on_outcome=record)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=len(jobs))
        run(jobs, args, progress, task, on_outcome=record)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
