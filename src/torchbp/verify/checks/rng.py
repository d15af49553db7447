"""Calls of fn that draw the same random numbers: every check compares calls of fn (two
forwards, the perturbed forwards of the numerical Jacobian, fn against the reference), so
a Function that draws a mask with torch's generator in forward, saves it and uses it in
backward (dropout-like) must see the same mask in each of them."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from torchbp.verify.checks.compare import float_tensors, same_values
from torchbp.verify.checks.jacobians import projected_backward_error
from torchbp.verify.checks.outcomes import CheckFailure

if TYPE_CHECKING:
    from torchbp.verify.checks.context import CheckContext

__all__ = [
    "SameRandomNumbers",
    "draws_random_numbers",
    "outside_generators_drawn",
    "require_gradients_of_own_forward",
    "seeded_rng",
]


@contextmanager
def seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the CPU generator, and that of ``device`` when it is a CUDA device, with
    ``seed``; put both back on exit. No other generator is touched (``torch.manual_seed``
    would reseed every CUDA device for good, under the caller's feet)."""
    if device.type != "cuda":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
        yield


class SameRandomNumbers:
    """``fn`` whose every call starts torch's generators (CPU, and ``device``'s when it is
    a CUDA device) from ``seed``, and puts them back afterwards: two calls draw the same
    numbers, and the caller's generators are left where they were.

    Args:
        fn: the callable to call.
        device: the device of its inputs.
        seed: the state every call starts from.

    Examples:
        >>> noisy = SameRandomNumbers(lambda x: x + torch.rand(()), torch.device("cpu"), 0)
        >>> bool(noisy(torch.zeros(())) == noisy(torch.zeros(())))
        True
    """

    def __init__(self, fn: Callable[..., Any], device: torch.device, seed: int) -> None:
        self.fn = fn
        self.device = device
        self.seed = seed

    def __call__(self, *args: Any) -> Any:
        with seeded_rng(self.device, self.seed):
            return self.fn(*args)

    def around(self, other: Callable[..., Any]) -> SameRandomNumbers:
        """``other`` (e.g. fn compiled) called as this one calls fn."""
        return SameRandomNumbers(other, self.device, self.seed)


def draws_random_numbers(ctx: CheckContext) -> bool:
    """True if fn's outputs on its inputs change with the seed its calls start from: it
    draws from torch's generators (a dropout mask), and a mask drawn by ``rand_like``
    follows its input's memory layout, so other layouts of the inputs give other masks."""
    fn = ctx.fn
    if not isinstance(fn, SameRandomNumbers):
        return False
    other_seed = SameRandomNumbers(fn.fn, fn.device, fn.seed + 1)
    with torch.no_grad():
        first = float_tensors(fn(*ctx.full_inputs(ctx.leaves())))
        second = float_tensors(other_seed(*ctx.full_inputs(ctx.leaves())))
    return len(first) != len(second) or not all(map(same_values, first, second))


def require_gradients_of_own_forward(
    ctx: CheckContext, func: Callable[..., Any], what: str
) -> tuple[float, float] | None:
    """``(abs, rel)`` error of ``func``'s backward against central differences of ``func``
    itself along a random projection ``v^T J u`` (drawn from the check's seed), at the
    differentiable inputs; a failed check naming ``what`` when out of gradcheck's
    tolerances (``atol + rtol * |v^T J u|``).

    For a random fn whose outputs cannot be compared with another run's (another memory
    layout, another backend's generator draws other numbers), this is what stays
    honest: every call of ``func`` starts from one seed, so it is one deterministic
    function of its inputs, and its backward must be that function's gradient (a mask
    drawn in forward and drawn again, in another layout, in backward is not). Float64
    only (central differences in a lower precision are noise): returns None otherwise.
    """
    if ctx.dtype != torch.float64:
        return None
    inputs = [ctx.args[i] for i in ctx.grad_idx]
    abs_err, rel_err, scale = projected_backward_error(func, inputs, ctx.options.eps, ctx.randn)
    if abs_err > ctx.options.atol + ctx.options.rtol * scale:
        raise CheckFailure(
            f"{what}: backward disagrees with central differences of the same forward "
            f"(the same seed) along a random projection v^T J u: abs error {abs_err:.1e} "
            f"(seed {ctx.options.seed}); does backward draw its random numbers again, "
            "in another layout or order than forward? save what forward drew "
            "(ctx.save_for_backward(mask))",
            abs_err,
            rel_err,
        )
    return abs_err, rel_err


def _outside_states() -> dict[str, Any]:
    """The states of the global generators torch does not seed: Python's ``random`` and,
    when NumPy is imported, ``numpy.random``'s."""
    states: dict[str, Any] = {
        "Python's random (random.random, random.shuffle, ...)": random.getstate()
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["NumPy's global generator (np.random.rand, ...)"] = numpy.random.get_state()
    return states


def _same_state(a: Any, b: Any) -> bool:
    """Whether two generator states (nested tuples holding arrays) are equal."""
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    equal = a == b
    return bool(equal.all()) if hasattr(equal, "all") else bool(equal)


def outside_generators_drawn(call: Callable[[], Any]) -> list[str]:
    """The global generators torch does not seed (Python's ``random``, NumPy's) that one
    ``call()`` draws from, by name: fn's calls cannot be made to draw the same numbers
    from them. An error of ``call`` counts as no draw."""
    before = _outside_states()
    try:
        call()
    except Exception:  # noqa: BLE001 - fn's error is reported by the caller's own call
        return []
    after = _outside_states()
    return [name for name, state in before.items() if not _same_state(state, after[name])]
