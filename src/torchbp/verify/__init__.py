"""Verification suite: check any autograd Function (or differentiable callable).

:func:`check_function` runs gradcheck, gradgradcheck, forward-mode AD, vmap, batched and
undefined grads, gradient shapes, one input alone requiring grad, grad_output safety,
torch.compile parity and parity with a reference on example inputs and returns a
:class:`Report` (:func:`assert_function`: the same, raising ``AssertionError`` with the
report when a check failed, for test suites).
Each check ends :data:`PASS`, :data:`FAIL`, :data:`UNSUPPORTED` (a capability fn does not
offer, with how to add it) or :data:`SKIP`; ``report.ok`` is true iff nothing failed.
The ``torchbp-verify`` command (:mod:`torchbp.verify.cli`) runs it over every torchbp op
(:mod:`torchbp.verify.cases`), or over your own Function (``torchbp-verify
module:Symbol --inputs "4,5;4"``).

Examples:
    >>> import torch
    >>> from torchbp.verify import check_function
    >>> report = check_function(torch.sigmoid, torch.randn(3, 4), reference=torch.sigmoid)
    >>> report.ok
    True
"""

from torchbp.verify.assertions import assert_function
from torchbp.verify.checks import CHECK_DESCRIPTIONS, CHECKS, check_function, tolerances
from torchbp.verify.report import FAIL, PASS, SKIP, UNSUPPORTED, CheckResult, Report

__all__ = [
    "CHECKS",
    "CHECK_DESCRIPTIONS",
    "FAIL",
    "PASS",
    "SKIP",
    "UNSUPPORTED",
    "CheckResult",
    "Report",
    "assert_function",
    "check_function",
    "tolerances",
]
