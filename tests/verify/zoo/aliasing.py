"""Aliasing and mutation: writes into grad_output, into inputs and into saved tensors."""

from __future__ import annotations

import torch
from tests.verify.zoo.entry import ZooEntry, seeded
from tests.verify.zoo.formulas import Softmax, Tanh
from tests.verify.zoo.numerics import Sigmoid


class GradOutputWritingSigmoid(Sigmoid):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.mul_(y * (1 - y))  # right values, written into grad_output


class InputShiftingSoftmax(Softmax):
    @staticmethod
    def forward(x):
        x.sub_(x.amax(-1, keepdim=True))  # max trick applied to the caller's tensor
        e = x.exp()
        return e / e.sum(-1, keepdim=True)


class DataShiftingSoftmax(Softmax):
    @staticmethod
    def forward(x):
        x.data.sub_(x.amax(-1, keepdim=True))  # the same through .data: no version bump
        e = x.exp()
        return e / e.sum(-1, keepdim=True)


# LeCun's scaled tanh, A tanh(B x)
A, B = 1.7159, 2.0 / 3.0


class ScaledTanh(torch.autograd.Function):
    """A tanh(B x); textbook ctx style, saves its output."""

    @staticmethod
    def forward(ctx, x):
        y = A * torch.tanh(B * x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # dy/dx = A B (1 - tanh^2) = B (A - y^2 / A)
        return g * B * (A - y * y / A)


class SavedThenScaledTanh(ScaledTanh):
    @staticmethod
    def forward(ctx, x):
        t = torch.tanh(B * x)
        ctx.save_for_backward(t)
        return t.mul_(A)  # the saved tanh is scaled in place after saving

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return g * A * B * (1 - t * t)  # reads A tanh where it saved tanh


def _scaled_tanh(x):
    return A * torch.tanh(B * x)


class SavedOutputSquaringTanh(Tanh):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y.pow_(2))  # pow_ for pow: squares the saved output (the user's y)


class DataSquaringTanh(Tanh):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        y2 = y.data
        y2.mul_(y2)  # squared in place through .data: autograd cannot notice
        return g * (1 - y2)


ENTRIES = [
    ZooEntry(
        "backward_writes_grad_output",
        "aliasing",
        "sigmoid backward multiplies grad_output in place",
        GradOutputWritingSigmoid,
        Sigmoid,
        lambda: (seeded(3, 4),),
        torch.sigmoid,
        frozenset({"grad_output_safety"}),
    ),
    ZooEntry(
        "forward_overwrites_input",
        "aliasing",
        "softmax subtracts the row max from its input in place, without mark_dirty",
        InputShiftingSoftmax,
        Softmax,
        lambda: (seeded(3, 5),),
        lambda x: torch.softmax(x, -1),
        frozenset({"mutation", "grad_output_safety"}),
    ),
    ZooEntry(
        "forward_overwrites_input_via_data",
        "aliasing",
        "softmax shifts its input through .data (the version counter never sees it)",
        DataShiftingSoftmax,
        Softmax,
        lambda: (seeded(3, 5),),
        lambda x: torch.softmax(x, -1),
        frozenset({"mutation", "grad_output_safety"}),
    ),
    ZooEntry(
        "saved_tensor_modified_after_saving",
        "aliasing",
        "scaled tanh saves tanh(Bx), then returns it scaled in place by A: backward reads A tanh",
        SavedThenScaledTanh,
        ScaledTanh,
        lambda: (seeded(3, 4),),
        _scaled_tanh,
        frozenset({"gradcheck", "reference"}),
    ),
    ZooEntry(
        "backward_squares_saved_output",
        "aliasing",
        "tanh backward calls y.pow_(2) on the saved output (the caller's result changes)",
        SavedOutputSquaringTanh,
        Tanh,
        lambda: (seeded(3, 4),),
        torch.tanh,
        frozenset({"mutation", "gradcheck"}),
    ),
    ZooEntry(
        "backward_squares_saved_output_via_data",
        "aliasing",
        "tanh backward squares the saved output through .data: a second backward differs",
        DataSquaringTanh,
        Tanh,
        lambda: (seeded(3, 4),),
        torch.tanh,
        frozenset({"mutation", "gradcheck"}),
    ),
]
