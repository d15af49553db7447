"""Calls of fn that draw the same random numbers: every check compares calls of fn (two
forwards, the perturbed forwards of the numerical Jacobian, fn against the reference), so
a Function that draws a mask with torch's generator in forward, saves it and uses it in
backward (dropout-like) must see the same mask in each of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from torchbp.verify.checks.compare import float_tensors

if TYPE_CHECKING:
    from torchbp.verify.checks.context import CheckContext

__all__ = ["SameRandomNumbers", "draws_random_numbers", "seeded_rng"]


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
    return len(first) != len(second) or any(
        a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first, second)
    )
