"""Result objects returned by :func:`torchbp.verify.check_function`.

A :class:`Report` holds one :class:`CheckResult` per check, each with one of four statuses:
:data:`PASS`, :data:`FAIL` (a wrong number, a silent wrong behaviour, a crash in a supported
path), :data:`UNSUPPORTED` (the function does not offer the capability the check exercises,
e.g. no jvp; the message says how to add it) and :data:`SKIP` (the check does not apply).
``report.ok`` is True only if no check failed (unsupported and skipped checks do not count
against it), ``str(report)`` is a plain-text table and ``report.to_dict()`` is
JSON-serialisable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PASS", "FAIL", "SKIP", "UNSUPPORTED", "STATUSES", "CheckResult", "Report"]

#: The check ran and passed.
PASS = "pass"
#: The check ran and found a bug (or fn crashed where it claims support).
FAIL = "fail"
#: fn does not offer the capability the check exercises (not a bug, unless required).
UNSUPPORTED = "unsupported"
#: The check does not apply (no reference, not float64, an earlier check failed).
SKIP = "skipped"
#: Every status, in the order reports count them.
STATUSES = (PASS, FAIL, UNSUPPORTED, SKIP)


def _fmt_err(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if value == 0:
        return "0"
    return f"{value:.1e}"


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return float(value)


@dataclass
class CheckResult:
    """Outcome of one check.

    Args:
        name: the check's name, e.g. ``"gradcheck"``.
        status: ``"pass"``, ``"fail"``, ``"unsupported"`` or ``"skipped"``.
        message: why it failed, is unsupported (with how to add the capability) or was
            skipped, in plain words; a short note when it passed.
        max_abs_err: largest absolute difference seen by the check, if it measures one.
        max_rel_err: ``max_abs_err`` divided by the largest magnitude of the expected values.
        seconds: wall time the check took.
        caveat: what a passed check could not compare for this fn, and why; empty when
            it compared everything it names.

    Examples:
        >>> r = CheckResult("gradcheck", "pass", max_abs_err=1e-10)
        >>> r.passed
        True
    """

    name: str
    status: str
    message: str = ""
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    seconds: float = 0.0
    caveat: str = ""

    @property
    def passed(self) -> bool:
        """True if the check ran and passed."""
        return self.status == PASS

    @property
    def failed(self) -> bool:
        """True if the check ran and failed."""
        return self.status == FAIL

    @property
    def unsupported(self) -> bool:
        """True if fn does not offer the capability this check exercises."""
        return self.status == UNSUPPORTED

    @property
    def skipped(self) -> bool:
        """True if the check did not apply or could not run."""
        return self.status == SKIP

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of this result."""
        return {
            "name": self.name,
            "status": self.status,
            "message": self.message,
            "max_abs_err": _json_float(self.max_abs_err),
            "max_rel_err": _json_float(self.max_rel_err),
            "seconds": round(float(self.seconds), 6),
            "caveat": self.caveat,
        }


def _note(c: CheckResult) -> str:
    """The line under the table for ``c``: why it failed, is unsupported or was skipped,
    or what a passed check could not compare."""
    if c.passed:
        return f"{c.name} [pass, not all compared]: {c.caveat}"
    return f"{c.name} [{c.status}]: {c.message}"


@dataclass
class Report:
    """All check results for one callable on one set of inputs.

    Args:
        name: a label for what was checked (the callable's name by default).
        checks: the results, in the order they ran.
        meta: free-form JSON-serialisable facts (input shapes, dtype, device, torch version).

    Examples:
        >>> rep = Report("f", [CheckResult("gradcheck", "pass")])
        >>> rep.ok, rep["gradcheck"].status
        (True, 'pass')
    """

    name: str
    checks: list[CheckResult] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True only if no check failed (and at least one check ran)."""
        return any(c.passed for c in self.checks) and not any(c.failed for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        """The failed checks."""
        return [c for c in self.checks if c.failed]

    @property
    def unsupported(self) -> list[CheckResult]:
        """The checks of capabilities fn does not offer."""
        return [c for c in self.checks if c.unsupported]

    def counts(self) -> dict[str, int]:
        """How many checks ended with each status, e.g. ``{"pass": 9, "fail": 0, ...}``."""
        return {s: sum(c.status == s for c in self.checks) for s in STATUSES}

    @property
    def seconds(self) -> float:
        """Total time of all checks."""
        return sum(c.seconds for c in self.checks)

    def __getitem__(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; checks: {', '.join(self.names())}")

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.checks)

    def __iter__(self) -> Iterator[CheckResult]:
        return iter(self.checks)

    def __len__(self) -> int:
        return len(self.checks)

    def names(self) -> list[str]:
        """Names of the checks, in order."""
        return [c.name for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict: name, ok, meta, seconds and the checks."""
        return {
            "name": self.name,
            "ok": self.ok,
            "seconds": round(self.seconds, 6),
            "meta": self.meta,
            "checks": [c.to_dict() for c in self.checks],
        }

    def __str__(self) -> str:
        head = ("check", "status", "max abs err", "max rel err", "time")
        rows = [
            (
                c.name,
                c.status,
                _fmt_err(c.max_abs_err),
                _fmt_err(c.max_rel_err),
                f"{c.seconds * 1e3:.0f} ms" if c.seconds < 1 else f"{c.seconds:.2f} s",
            )
            for c in self.checks
        ]
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()

        verdict = "OK" if self.ok else "FAILED"
        counts = self.counts()
        noted = [f"{counts[s]} {s}" for s in (FAIL, UNSUPPORTED) if counts[s]]
        partial = sum(bool(c.caveat) for c in self.checks)
        if partial:
            noted.append(f"{partial} not all compared")
        summary = f"{self.name}: {verdict}"
        if noted:
            summary += f" ({', '.join(noted)})"
        out = [summary, line(head), line(tuple("-" * w for w in widths))]
        out += [line(r) for r in rows]
        notes = [_note(c) for c in self.checks if c.caveat or (c.message and not c.passed)]
        if notes:
            out.append("")
            out += notes
        return "\n".join(out)

    def __repr__(self) -> str:
        counts = self.counts()
        return (
            f"Report({self.name!r}, ok={self.ok}, passed={counts[PASS]}, "
            f"failed={counts[FAIL]}, unsupported={counts[UNSUPPORTED]}, skipped={counts[SKIP]})"
        )
