"""The table of checks: every check's name, what it verifies and the function that runs it,
in the order they run.

A check function takes the run's :class:`~torchbp.verify.checks.context.CheckContext` and
returns :class:`~torchbp.verify.checks.outcomes.Passed`, or raises
:class:`~torchbp.verify.checks.outcomes.CheckFailure` /
:class:`~torchbp.verify.checks.outcomes.CheckUnsupported` /
:class:`~torchbp.verify.checks.outcomes.CheckSkip` (any other exception is turned into one
of these by the runner). To add a check, write its function in
the module of its kind and add a row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torchbp.verify.checks.backward_contract import (
    check_grad_output_safety,
    check_grad_shapes,
    check_needs_input_grad,
    check_undefined_grad,
)
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.custom_op import check_opcheck
from torchbp.verify.checks.forward import check_forward
from torchbp.verify.checks.interleave import check_interleave
from torchbp.verify.checks.mutation import check_mutation
from torchbp.verify.checks.numerical import check_forward_ad, check_gradcheck, check_gradgradcheck
from torchbp.verify.checks.outcomes import Passed
from torchbp.verify.checks.parity import check_compile, check_reference, check_reference_dtype
from torchbp.verify.checks.probes import check_extreme_values
from torchbp.verify.checks.transforms import check_batched_grad, check_vmap
from torchbp.verify.checks.vmap_dims import check_vmap_in_dims

__all__ = ["CHECKS", "CHECK_DESCRIPTIONS", "CHECK_TABLE", "Check"]


@dataclass(frozen=True)
class Check:
    """One row of the table.

    Args:
        name: the check's name in reports and in ``checks=`` / ``skip=``.
        description: what it verifies, in one line.
        run: the function that runs it on a :class:`CheckContext`.
    """

    name: str
    description: str
    run: Callable[[CheckContext], Passed]


#: Every check, in the order it runs (``forward`` first: the others need its outputs).
CHECK_TABLE: tuple[Check, ...] = (
    Check(
        "forward",
        "fn runs, twice with the same outputs, and returns floating tensors that require grad",
        check_forward,
    ),
    Check(
        "gradcheck",
        "backward agrees with the numerical Jacobian, for each output and all at once",
        check_gradcheck,
    ),
    Check(
        "gradgradcheck",
        "double backward agrees with numerical second derivatives",
        check_gradgradcheck,
    ),
    Check(
        "forward_ad",
        "forward-mode AD (jvp) agrees with the numerical Jacobian",
        check_forward_ad,
    ),
    Check(
        "vmap",
        "torch.func.vmap of the forward and of per-sample grads equals a loop",
        check_vmap,
    ),
    Check(
        "vmap_in_dims",
        "torch.func.vmap over a non-zero in_dims and with unbatched inputs equals a loop",
        check_vmap_in_dims,
    ),
    Check(
        "batched_grad",
        "backward with batched grad_outputs (is_grads_batched) equals a loop",
        check_batched_grad,
    ),
    Check(
        "undefined_grad",
        "backward treats undefined (None) output grads as zeros",
        check_undefined_grad,
    ),
    Check(
        "grad_shapes",
        "each autograd.Function backward returns grads of its inputs' shapes, dtypes, devices",
        check_grad_shapes,
    ),
    Check(
        "needs_input_grad",
        "no input or one input alone requiring grad: the same outputs and that input's gradient",
        check_needs_input_grad,
    ),
    Check(
        "grad_output_safety",
        "backward leaves grad_output/inputs intact; strided grads and inputs change nothing",
        check_grad_output_safety,
    ),
    Check(
        "mutation",
        "fn leaves inputs intact (or mark_dirty), backward leaves inputs/outputs, repeatable",
        check_mutation,
    ),
    Check(
        "interleave",
        "two calls made before backward each get their own gradients",
        check_interleave,
    ),
    Check(
        "compile",
        "torch.compile (fullgraph) forward and backward equal eager",
        check_compile,
    ),
    Check(
        "opcheck",
        "a torch.library custom op passes torch.library.opcheck (schema, autograd, fake)",
        check_opcheck,
    ),
    Check(
        "reference",
        "outputs and all gradients equal the reference callable's",
        check_reference,
    ),
    Check(
        "reference_dtype",
        "outputs and gradients equal the reference's in the inputs' own dtypes too "
        "(without one: finite there where fn's are in float64)",
        check_reference_dtype,
    ),
    Check(
        "extreme_values",
        "outputs and gradients on scaled-up, near-zero and zero inputs equal the reference's",
        check_extreme_values,
    ),
)

#: Every check's name, in the order it runs.
CHECKS: tuple[str, ...] = tuple(check.name for check in CHECK_TABLE)

#: What each check verifies, in one line, by name.
CHECK_DESCRIPTIONS: dict[str, str] = {check.name: check.description for check in CHECK_TABLE}
