"""add_noise under torch function modes: clip mode's own watch of outside parameters, a
user's mode pushed inside the context, ``torchbp.enable()`` entered before it. The noise
is drawn as one torch function call, which each mode runs with itself off (its ~20 torch
calls a parameter went through every mode's Python dispatch: most of the watch's cost in
a small DP step), and is the same noise, from the same generator stream, as without a
mode."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import torchbp
from torchbp.per_sample import per_sample_grads


class CountingMode(TorchFunctionMode):
    """Counts the torch function calls that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


SIGMA, MAX_NORM, SEED = 1.3, 0.5, 7


def _step(modes_before, mode_inside, *, noise: bool = True) -> list[torch.Tensor]:
    """One clipped step of a fixed model and batch, noised with a generator seeded
    ``SEED`` unless ``noise`` is false, under the modes ``modes_before`` (entered before
    the context) and ``mode_inside`` (pushed inside it, around add_noise)."""
    torch.manual_seed(0)
    model = nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    with contextlib.ExitStack() as before:
        for mode in modes_before:
            before.enter_context(mode)
        with per_sample_grads(model, mode="clip", max_norm=MAX_NORM) as ps:
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
            with mode_inside:
                if noise:
                    ps.add_noise(SIGMA, generator=torch.Generator().manual_seed(SEED))
    return [p.grad for p in model.parameters()]


def test_add_noise_reaches_a_mode_as_one_call():
    counting = CountingMode()
    _step([], counting)
    assert counting.calls == 1


@pytest.mark.parametrize(
    "modes_before",
    [[], [torchbp.enable()], [CountingMode()], [CountingMode(), torchbp.enable()]],
    ids=["none", "enable", "counting", "counting-enable"],
)
@pytest.mark.parametrize("inside", [False, True], ids=["", "user-mode-inside"])
def test_the_noise_is_drawn_as_without_a_mode(modes_before, inside):
    """Clipped + σC·N(0, 1) drawn parameter by parameter from the seeded generator (each
    smaller than a chunk: one draw of its shape), whichever modes are active."""
    clipped = _step([], contextlib.nullcontext(), noise=False)
    generator = torch.Generator().manual_seed(SEED)
    expected = [g + SIGMA * MAX_NORM * torch.randn(g.shape, generator=generator) for g in clipped]
    noised = _step(modes_before, CountingMode() if inside else contextlib.nullcontext())
    for got, want in zip(noised, expected, strict=True):
        torch.testing.assert_close(got, want)


class DroppingMode(TorchFunctionMode):
    """Runs torch's own functions, and returns ``None`` for any other (a mode written for
    the functions it knows)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", "").startswith("torchbp"):
            return None
        return func(*args, **(kwargs or {}))


def test_a_mode_that_drops_the_noise_call_is_refused():
    """Before: add_noise returned as if the noise were drawn, with p.grad clipped only."""
    with pytest.raises(RuntimeError, match="without running it, so no noise was added"):
        _step([], DroppingMode())
