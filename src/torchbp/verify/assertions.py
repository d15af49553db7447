""":func:`assert_function`: :func:`~torchbp.verify.check_function` for a test suite."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchbp.verify.checks import check_function
from torchbp.verify.report import Report

__all__ = ["assert_function"]


def assert_function(
    fn: Callable[..., Any] | type[torch.autograd.Function],
    *inputs: Any,
    reference: Callable[..., Any] | None = None,
    require: Sequence[str] = (),
    **options: Any,
) -> Report:
    """Check ``fn`` like :func:`~torchbp.verify.check_function` and raise if a check failed.

    Meant for a user's own test suite (pytest, unittest): the assertion message is the
    whole report, so the failing check and its plain-word reason show in the test output.
    Unsupported checks do not fail unless named in ``require``.

    Args:
        fn: the Function, callable or ``torch.library`` custom op to check.
        *inputs: example inputs (tensors and plain Python scalars).
        reference: optional callable ``fn`` must match in outputs and gradients.
        require: checks whose capability ``fn`` promises (unsupported then fails).
        **options: any option of :func:`~torchbp.verify.check_function`.

    Returns:
        The :class:`~torchbp.verify.report.Report`, when nothing failed.

    Raises:
        AssertionError: when a check failed; its message is ``str(report)``.
        TypeError / ValueError: on bad arguments, as :func:`check_function`.

    Examples:
        >>> import torch
        >>> from torchbp.verify import assert_function
        >>> report = assert_function(torch.tanh, torch.randn(3), checks=["gradcheck"])
        >>> report.ok
        True
    """
    __tracebackhide__ = True  # pytest shows the caller's line, not this one
    report = check_function(fn, *inputs, reference=reference, require=require, **options)
    if not report.ok:
        raise AssertionError(str(report))
    return report
