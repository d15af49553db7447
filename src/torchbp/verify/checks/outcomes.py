"""How a check ends: it returns :class:`Passed`, or raises :class:`CheckFailure` or
:class:`CheckSkip`. The runner (:mod:`torchbp.verify.checks.run`) turns these into a
:class:`~torchbp.verify.report.CheckResult` with the matching status."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CheckFailure", "CheckSkip", "Passed"]


class Passed(NamedTuple):
    """A check passed.

    Args:
        note: a short note on what was compared.
        abs_err: largest absolute error measured, if the check measures one.
        rel_err: ``abs_err`` relative to the largest expected magnitude.
    """

    note: str
    abs_err: float | None = None
    rel_err: float | None = None


class CheckFailure(Exception):
    """Raised inside a check to fail it with a message (and optional error figures)."""

    def __init__(self, message: str, abs_err: float | None = None, rel_err: float | None = None):
        super().__init__(message)
        self.message = message
        self.abs_err = abs_err
        self.rel_err = rel_err


class CheckSkip(Exception):
    """Raised inside a check to skip it with a reason."""
