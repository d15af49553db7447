"""What the Linear Function tells an open ``per_sample_grads`` context, call by call.

:class:`torchbp.autograd.LinearFunction` looks up the thread's active :class:`Recorder`
in ``setup_context`` and, if there is one, asks it for a :class:`Use` of that call; in
backward it hands the Use its saved input ``x`` and its output gradient ``g``. The Use
files them, shaped ``(B, T, features)``, on its layer's ``traces`` and tells the backward
to skip ``dW`` and ``db``; nothing else happens during the backward.
"""

from __future__ import annotations

import math

import torch

from torchbp.per_sample.model_check import Layer


class Recorder:
    """Routes each Linear call to its layer (by the identity of the weight Parameter)."""

    def __init__(self, layers: list[Layer]) -> None:
        self._by_weight = {id(layer.module.weight): layer for layer in layers}
        self.finalised = False
        self.closed = False  # the context has exited
        # a backward was refused before the results were formed: they never will be
        self.failed = False

    def on_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """A :class:`Use` for this call, or ``None`` if it needs no recording.

        ``setup_context`` runs with grad mode off whether or not a graph is being built,
        so every call of a tracked layer gets a Use; one whose backward never runs (an
        evaluation forward under ``torch.no_grad()``) records nothing. Errors wait for
        the backward for the same reason.
        """
        layer = self._by_weight.get(id(weight))
        if layer is None or layer.module.bias is not bias:
            if weight.requires_grad or (bias is not None and bias.requires_grad):
                return Stray(self, tuple(weight.shape))
            return None
        return Use(self, layer, x.shape)


class Use:
    """One forward call of one Linear layer; receives that call's backward."""

    __slots__ = ("recorder", "layer", "x_shape", "recorded")

    def __init__(self, recorder: Recorder, layer: Layer, x_shape: torch.Size) -> None:
        self.recorder = recorder
        self.layer = layer
        self.x_shape = x_shape
        self.recorded = False

    def on_backward(self, x: torch.Tensor | None, g: torch.Tensor) -> bool:
        """File ``(a, g)`` as ``(B, T, features)``; return False: the Linear backward skips
        dW and db, which the context forms afterwards (one matmul each, as the backward
        would), so that autograd never holds or accumulates them."""
        if self.recorder.closed:
            raise RuntimeError(
                f"per_sample_grads: the backward through Linear {self.layer.name!r} ran after "
                "its per_sample_grads context had closed; call loss.backward() inside the "
                "with block"
            )
        if self.recorded or self.recorder.finalised:
            raise RuntimeError(
                f"per_sample_grads: a second backward through Linear {self.layer.name!r} "
                "inside one context; a context records one forward and backward: open a "
                "new one per step"
            )
        if len(self.x_shape) < 2:
            self.recorder.failed = True
            raise ValueError(
                f"per_sample_grads: Linear {self.layer.name!r} got an input of shape "
                f"{tuple(self.x_shape)}; it needs a leading sample dim: (B, ..., in_features)"
            )
        self.recorded = True
        batch = self.x_shape[0]
        # T: the product of the dims between the sample dim and the features
        positions = math.prod(self.x_shape[1:-1])
        a = None
        if self.layer.weight is not None:
            a = x.reshape(batch, positions, x.shape[-1])
        g = g.reshape(batch, positions, g.shape[-1])
        self.layer.traces.append((a, g))
        return False


class Stray:
    """A torchbp linear call with trainable parameters the context does not account for."""

    __slots__ = ("recorder", "weight_shape")

    def __init__(self, recorder: Recorder, weight_shape: tuple[int, ...]) -> None:
        self.recorder = recorder
        self.weight_shape = weight_shape

    def on_backward(self, x: torch.Tensor | None, g: torch.Tensor) -> bool:
        self.recorder.failed = True
        raise RuntimeError(
            "per_sample_grads: a torchbp linear with a trainable weight of shape "
            f"{self.weight_shape} is not a torchbp.nn.Linear of the model given to "
            "per_sample_grads (a Linear outside that model, a functional linear call, or "
            "a weight cast by autocast, which is not supported); its per-sample "
            "contribution cannot be recorded"
        )
