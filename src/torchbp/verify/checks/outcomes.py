"""How a check ends: it returns :class:`Passed`, or raises :class:`CheckFailure`,
:class:`CheckUnsupported` or :class:`CheckSkip`. The runner
(:mod:`torchbp.verify.checks.run`) turns these into a
:class:`~torchbp.verify.report.CheckResult` with the matching status.

- failed: a wrong number, a silent wrong behaviour, a crash in a path the function claims
  to support, or an error where native PyTorch works;
- unsupported: the function does not offer the capability the check exercises (no jvp, no
  vmap rule, ``once_differentiable``, a double backward, jvp or vmap rule that raises
  ``NotImplementedError``, a PyTorch limitation); not a bug, and ``report.ok`` stays true
  unless the check is in ``require``;
- skipped: the check does not apply (no reference, not float64, an earlier check failed).

A check raises :class:`UsageError` when fn cannot be checked at all as called (all its
outputs integer: nothing to differentiate); ``check_function`` raises it on, a
``ValueError`` as for inputs holding nothing to differentiate.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CheckFailure", "CheckSkip", "CheckUnsupported", "Passed", "UsageError"]


class Passed(NamedTuple):
    """A check passed.

    Args:
        note: a short note on what was compared.
        abs_err: largest absolute error measured, if the check measures one.
        rel_err: ``abs_err`` relative to the largest expected magnitude.
        caveat: what the check could not compare for this fn, and why (e.g. a random fn's
            outputs under a backend drawing other numbers); shown with the report, as a
            pass that leaves something unchecked must never read as a full one.
    """

    note: str
    abs_err: float | None = None
    rel_err: float | None = None
    caveat: str = ""


class CheckFailure(Exception):
    """Raised inside a check to fail it with a message (and optional error figures)."""

    def __init__(self, message: str, abs_err: float | None = None, rel_err: float | None = None):
        super().__init__(message)
        self.message = message
        self.abs_err = abs_err
        self.rel_err = rel_err


class CheckUnsupported(Exception):
    """Raised inside a check when fn does not offer the capability the check exercises.

    Args:
        missing: what is missing, e.g. ``"Function has no jvp: forward-mode AD unsupported"``.
        how_to_add: one line on how to add the capability, e.g. ``"define a jvp
            staticmethod and save what it needs with ctx.save_for_forward"``.
        abs_err: largest absolute error measured by whatever part of the check could run.
        rel_err: ``abs_err`` relative to the largest expected magnitude.

    Examples:
        >>> e = CheckUnsupported("Function has no jvp", "define a jvp staticmethod")
        >>> e.message
        'Function has no jvp; to add it: define a jvp staticmethod'
    """

    def __init__(
        self,
        missing: str,
        how_to_add: str,
        abs_err: float | None = None,
        rel_err: float | None = None,
    ):
        message = f"{missing}; to add it: {how_to_add}"
        super().__init__(message)
        self.missing = missing
        self.how_to_add = how_to_add
        self.message = message
        self.abs_err = abs_err
        self.rel_err = rel_err


class CheckSkip(Exception):
    """Raised inside a check to skip it with a reason."""


class UsageError(ValueError):
    """Raised inside a check when fn, called on the given inputs, leaves nothing to check
    (every output an integer or bool tensor); the runner lets it out of
    ``check_function`` as the ValueError of a usage error, not a verdict on fn."""
