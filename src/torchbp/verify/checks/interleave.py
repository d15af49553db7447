"""The ``interleave`` check: two calls of fn made before either backward each get their own
gradients, as they do when each call is followed by its backward.

A Function that keeps what backward needs somewhere shared (an attribute of the class, a
module global, a closure) instead of on ``ctx`` passes every single-call check: the second
call overwrites the first's state, which only shows when two graphs are alive at once (two
micro-batches, a siamese network, a Function used twice in one model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchbp.verify.checks.compare import float_tensors, input_grads, require_close, zeros_for_none
from torchbp.verify.checks.context import CheckContext
from torchbp.verify.checks.domain import Transform, first_accepted
from torchbp.verify.checks.explain import explain_error
from torchbp.verify.checks.outcomes import CheckFailure, CheckSkip, Passed

__all__ = ["check_interleave", "second_inputs"]


def _flipped(x: torch.Tensor) -> torch.Tensor:
    """``x`` reversed along all its dims."""
    return x.flip(list(range(x.dim())))


#: A way to make other values of one input from its given ones.
Make = Callable[[torch.Tensor], torch.Tensor]


def _each(make: Make) -> Transform:
    """The transform applying ``make`` to every input."""
    return lambda xs: [make(x) for x in xs]


def _all_but(k: int, make: Make, kth: Make) -> Transform:
    """The transform applying ``make`` to every input but the ``k``-th, ``kth`` to it."""
    return lambda xs: [kth(x) if j == k else make(x) for j, x in enumerate(xs)]


def _flipped_up(x: torch.Tensor) -> torch.Tensor:
    return _flipped(x) * 1.25


def _flipped_down(x: torch.Tensor) -> torch.Tensor:
    return _flipped(x) / 1.25


def _up(x: torch.Tensor) -> torch.Tensor:
    return x * 1.25


def _down(x: torch.Tensor) -> torch.Tensor:
    return x / 1.25


def _second_values(inputs: int) -> list[Transform]:
    """Ways to make the second call's values of ``inputs`` differentiable inputs, in the
    order tried: each flipped and scaled by 1.25 (same shapes, same signs, different
    values at every place that is not symmetric); scaled down instead (a probability, an
    acos input near 1); one of them not flipped (an input fn needs sorted, such as the
    sample points of an interpolation, beside its query points and values: flipping
    the others keeps the second call's values unlike the first's in more than scale, which
    a state bug keyed on their order, the buckets of a searchsorted, would hide behind); none
    flipped, scaled down, then up."""
    ways = [_each(_flipped_up), _each(_flipped_down)]
    if inputs > 1:
        ways += [_all_but(k, _flipped_up, _up) for k in range(inputs)]
        ways += [_all_but(k, _flipped_down, _down) for k in range(inputs)]
    return [*ways, _each(_down), _each(_up)]


def second_inputs(ctx: CheckContext) -> list[torch.Tensor]:
    """Other values for the grad inputs: the first way of :func:`_second_values` whose
    values fn accepts (:func:`~torchbp.verify.checks.domain.first_accepted`: each one
    flipped along all its dims and scaled by 1.25 unless that leaves fn's domain)."""
    ways = _second_values(len(ctx.grad_idx))
    make = ways[first_accepted(ctx, [[way] for way in ways])]
    given = [ctx.args[i].detach() for i in ctx.grad_idx]
    return [x.clone().requires_grad_(True) for x in make(given)]


def _forward(ctx: CheckContext, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [o for o in float_tensors(ctx.call(ctx.fn, leaves)) if o.requires_grad]


def _backward(outs, leaves, vs, which: str) -> list[torch.Tensor]:
    try:
        gs = input_grads(outs, leaves, vs, allow_unused=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckFailure(
            f"backward of the {which} call failed when two calls were made before backward: "
            f"{explain_error(exc)} (fn keeps state outside ctx?)"
        ) from None
    return zeros_for_none(gs, leaves)


def _require_own_gradients(
    ctx: CheckContext, grads: list[torch.Tensor], returned: list[torch.Tensor]
) -> None:
    """Fail unless the gradients ``grads`` still hold what backward ``returned`` after
    another backward ran: a backward that writes into one buffer it keeps (on the class, a
    global, a closure) and returns it is right once, then overwrites the gradients it gave
    before (two micro-batches', or one kept for a later step)."""
    for k, (grad, before) in enumerate(zip(grads, returned)):
        problem = (
            f"gradient of {ctx.input_name(k)} returned by backward changed when another "
            "backward ran"
        )
        note = (
            " (backward returns a buffer it keeps and writes into again - on the class, a "
            "global or a closure; return a new tensor)"
        )
        require_close(grad, before, (0.0, 0.0), problem, note=note)


def check_interleave(ctx: CheckContext) -> Passed:
    """Calls fn on inputs A, then on other inputs B, then runs backward of A and of B; each
    must give the gradients (and outputs) of A's and B's calls made alone, and the
    gradients of A's call made alone must stay as returned when B's backward runs."""
    leaves_a, leaves_b = ctx.leaves(), second_inputs(ctx)
    if all(torch.equal(a, b) for a, b in zip(leaves_a, leaves_b)):
        raise CheckSkip("the example inputs are symmetric: no second set of values to use")
    alone_a, alone_b = ctx.leaves(), second_inputs(ctx)
    outs_alone_a = _forward(ctx, alone_a)
    vs_a = ctx.randn_like_outputs(outs_alone_a)
    expected_a = _backward(outs_alone_a, alone_a, vs_a, "first")
    returned_a = [g.detach().clone() for g in expected_a]
    outs_alone_b = _forward(ctx, alone_b)
    vs_b = ctx.randn_like_outputs(outs_alone_b)
    expected_b = _backward(outs_alone_b, alone_b, vs_b, "second")
    _require_own_gradients(ctx, expected_a, returned_a)

    outs_a = _forward(ctx, leaves_a)
    outs_b = _forward(ctx, leaves_b)
    tolerance = ctx.parity_tolerances()
    worst = (0.0, 0.0)
    for o, (got, exp) in enumerate(zip(outs_a, outs_alone_a)):
        problem = f"output {o} of the first call changed when a second call followed"
        worst = max(worst, require_close(got, exp, tolerance, problem))
    got_a = _backward(outs_a, leaves_a, vs_a, "first")
    got_b = _backward(outs_b, leaves_b, vs_b, "second")
    for which, got, expected in (("first", got_a, expected_a), ("second", got_b, expected_b)):
        for k, (g, e) in enumerate(zip(got, expected)):
            problem = (
                f"gradient of {ctx.input_name(k)} of the {which} of two calls made before "
                "backward differs from the same call followed by its own backward"
            )
            note = (
                " (fn keeps what backward needs outside ctx - on the class, a global or a "
                "closure - so the second call overwrote the first's; save it on ctx; or "
                "backward reads memory it never wrote, e.g. torch.empty filled in part)"
            )
            worst = max(worst, require_close(g, e, tolerance, problem, note=note))
    return Passed("two calls before backward: each gets its own gradients", *worst)
