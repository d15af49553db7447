""":func:`check_function` and its checks, one module per kind of check.

- :mod:`.run`: :func:`check_function`, which runs the table of checks and builds the report.
- :mod:`.table`: the table of checks (name, description, function), in the order they run.
- :mod:`.forward`, :mod:`.numerical`, :mod:`.transforms`, :mod:`.backward_contract`,
  :mod:`.parity`, :mod:`.mutation`, :mod:`.interleave`, :mod:`.vmap_dims`, :mod:`.probes`,
  :mod:`.custom_op`: the check functions, by kind.
- :mod:`.context`: :class:`~.context.CheckContext`, the state the checks of one run share.
- :mod:`.options`: argument validation and input preparation.
- :mod:`.outcomes`: how a check ends (passed, failed, unsupported, skipped).
- :mod:`.explain`, :mod:`.compare`, :mod:`.jacobians`: plain-word error messages, tensor
  comparison and Jacobians.
- :mod:`.complex_views`: complex inputs and outputs checked as their real views.
- :mod:`.domain`, :mod:`.unimplemented`: failures that are no fault of fn's derivatives
  (inputs within eps of fn's domain edge, a gradient backward does not offer) made usage
  errors; other inputs kept inside fn's domain.
"""

from torchbp.verify.checks.compare import tolerances
from torchbp.verify.checks.explain import explain_error
from torchbp.verify.checks.options import DEFAULT_OPTIONS
from torchbp.verify.checks.run import check_function
from torchbp.verify.checks.table import CHECK_DESCRIPTIONS, CHECK_TABLE, CHECKS, Check

__all__ = [
    "CHECKS",
    "CHECK_DESCRIPTIONS",
    "CHECK_TABLE",
    "Check",
    "DEFAULT_OPTIONS",
    "check_function",
    "explain_error",
    "tolerances",
]
