"""The op registry: every torchbp op once, with everything that refers to it.

Each :class:`Op` names the op's Function, its functional wrapper and ``nn`` module, their
native twins, the tensor its backward keeps and (for element-wise activations) its
derivative formula. :func:`torchbp.convert`, the verification cases
(:mod:`torchbp.verify.cases`), the Lightning activation choice and every cross-cutting
test table read this registry instead of spelling the op list out again, and
``tests/test_ops.py`` keeps ``functional.__all__``, ``nn.__all__`` and ``autograd.__all__``
in sync with it.

Adding an element-wise activation takes four files: its formula and Function
(``autograd/activations.py``), its wrapper (``functional/activations.py``, re-exported by
``functional/__init__.py``), its module (``nn.py``) and
its entry here.

Examples::

    >>> from torchbp.ops import OPS, activations
    >>> OPS["tanh"].saves
    'output'
    >>> [op.name for op in activations()][:3]
    ['sigmoid', 'tanh', 'relu']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from torchbp import autograd as A
from torchbp import functional as TF
from torchbp import nn as bpnn

__all__ = ["Op", "OPS", "activations", "of_kind", "module_twins"]

Kind = Literal["linear", "activation", "softmax", "loss", "fused_loss"]


@dataclass(frozen=True)
class Op:
    """One op and everything that names it.

    Attributes:
        name: the ``torchbp.functional`` name (also ``torch.nn.functional``'s).
        kind: ``"linear"``, ``"activation"`` (element-wise), ``"softmax"`` (along a dim),
            ``"loss"`` or ``"fused_loss"``.
        function: the :class:`torch.autograd.Function` with the hand-written backward.
        functional: the drop-in wrapper in :mod:`torchbp.functional`.
        module: the drop-in module in :mod:`torchbp.nn` (``None`` if there is none).
        torch_functional: the native function it replaces (``None`` where this torch
            lacks it).
        torch_module: the native module ``module`` subclasses and :func:`torchbp.convert`
            swaps (``None`` if there is none).
        saves: what backward keeps, in words (``"output"``, ``"input"``, ...), with the
            default keywords; :meth:`saves_for` resolves it for others (an in-place form
            keeps its output).
        formula: element-wise activations: the derivative formula
            ``formula(g, saved, *args) = g · f'`` their Function evaluates.
        variants: keyword sets of ``functional`` (and ``module``) that tests and
            verification cover; the first is the default.
        kink: element-wise activations: where ``f'`` jumps (finite-difference checks keep
            their inputs away from it), ``None`` for a smooth one.
        input_if_negative: the keyword (a slope) whose negative value makes an activation
            that saves its output keep its input instead (the output's sign no longer
            tells the branch); the in-place form, which can keep only its output, refuses
            it when autograd records the input.
        in_place: the in-place wrapper ``<name>_`` in :mod:`torchbp.functional`, where
            :mod:`torch.nn.functional` has one (``relu_``, ``leaky_relu_``, ``elu_``).
        extra_modules: more ``(torchbp module, native module)`` twins whose forward runs
            this op's Function with fixed arguments (softmax: ``Softmin``, ``Softmax2d``);
            :meth:`module_pairs` lists them after ``(module, torch_module)``.
        extra_functionals: more ``(torchbp functional, native functional)`` twins, named
            alike, whose body runs this op's Function (softmax: ``softmin``, the softmax
            of ``-input``); :meth:`functionals` lists them after ``functional`` and
            ``in_place``.
    """

    name: str
    kind: Kind
    function: type[Function]
    functional: Callable[..., Any]
    module: type[nn.Module] | None
    torch_functional: Callable[..., Any] | None
    torch_module: type[nn.Module] | None
    saves: str
    formula: Callable[..., torch.Tensor] | None = None
    variants: tuple[dict[str, Any], ...] = field(default=({},))
    kink: float | None = None
    input_if_negative: str | None = None
    in_place: Callable[..., Any] | None = None
    extra_modules: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = ()
    extra_functionals: tuple[tuple[Callable[..., Any], Callable[..., Any]], ...] = ()

    def functionals(self) -> tuple[Callable[..., Any], ...]:
        """Every wrapper of the op in :mod:`torchbp.functional`: :attr:`functional`,
        :attr:`in_place` (if any), then those of :attr:`extra_functionals`."""
        in_place = () if self.in_place is None else (self.in_place,)
        return (self.functional, *in_place, *(ours for ours, _ in self.extra_functionals))

    def module_pairs(self) -> tuple[tuple[type[nn.Module] | None, type[nn.Module] | None], ...]:
        """Every ``(torchbp module, native module)`` of the op: ``(module, torch_module)``,
        then :attr:`extra_modules`."""
        return ((self.module, self.torch_module), *self.extra_modules)

    def saves_for(self, kwargs: dict[str, Any]) -> str:
        """What backward keeps when called with ``kwargs``: ``"output"`` for an in-place
        call (its input is overwritten, as natively), ``"output"`` or ``"input"`` by the
        sign of :attr:`input_if_negative`, else :attr:`saves`."""
        if self.in_place is not None and kwargs.get("inplace", False):
            return "output"
        key = self.input_if_negative
        if key is None:
            return self.saves
        return "input" if kwargs.get(key, 0) < 0 else "output"


# Op(name, kind, Function, functional, nn module, native functional, native module, saves, ...)
# fmt: off
_REGISTRY: tuple[Op, ...] = (
    Op("linear", "linear", A.LinearFunction, TF.linear, bpnn.Linear, F.linear, nn.Linear,
       "input if W needs grad, W if the input does"),
    Op("sigmoid", "activation", A.SigmoidFunction, TF.sigmoid, bpnn.Sigmoid, torch.sigmoid,
       nn.Sigmoid, "output", A.activations.sigmoid_backward),
    Op("tanh", "activation", A.TanhFunction, TF.tanh, bpnn.Tanh, torch.tanh, nn.Tanh, "output",
       A.activations.tanh_backward),
    Op("relu", "activation", A.ReLUFunction, TF.relu, bpnn.ReLU, F.relu, nn.ReLU, "output",
       A.activations.relu_backward, kink=0.0, in_place=TF.relu_),
    Op("leaky_relu", "activation", A.LeakyReLUFunction, TF.leaky_relu, bpnn.LeakyReLU,
       F.leaky_relu, nn.LeakyReLU, "output (input if negative_slope < 0)",
       A.activations.leaky_relu_backward, kink=0.0, input_if_negative="negative_slope",
       variants=({}, {"negative_slope": 0.2}, {"negative_slope": 0.0},
                 {"negative_slope": -0.5}), in_place=TF.leaky_relu_),
    Op("gelu", "activation", A.GELUFunction, TF.gelu, bpnn.GELU, F.gelu, nn.GELU, "input",
       A.activations.gelu_backward,
       variants=({}, {"approximate": "tanh"})),
    Op("silu", "activation", A.SiLUFunction, TF.silu, bpnn.SiLU, F.silu, nn.SiLU, "input",
       A.activations.silu_backward),
    Op("elu", "activation", A.ELUFunction, TF.elu, bpnn.ELU, F.elu, nn.ELU,
       "output (input if alpha < 0)", A.activations.elu_backward, kink=0.0,
       input_if_negative="alpha", variants=({}, {"alpha": 0.5}, {"alpha": -0.5}),
       in_place=TF.elu_),
    Op("softplus", "activation", A.SoftplusFunction, TF.softplus, bpnn.Softplus, F.softplus,
       nn.Softplus, "input", A.activations.softplus_backward, variants=({}, {"beta": 2.0})),
    Op("softmax", "softmax", A.SoftmaxFunction, TF.softmax, bpnn.Softmax, F.softmax,
       nn.Softmax, "output", variants=({"dim": -1}, {"dim": 0}),
       extra_modules=((bpnn.Softmin, nn.Softmin), (bpnn.Softmax2d, nn.Softmax2d)),
       extra_functionals=((TF.softmin, F.softmin),)),
    Op("log_softmax", "softmax", A.LogSoftmaxFunction, TF.log_softmax, bpnn.LogSoftmax,
       F.log_softmax, nn.LogSoftmax, "output", variants=({"dim": -1}, {"dim": 0})),
    Op("nll_loss", "loss", A.NLLLossFunction, TF.nll_loss, bpnn.NLLLoss, F.nll_loss,
       nn.NLLLoss, "target (+ weight) and the (M,) loss rows, never the input"),
    Op("cross_entropy", "loss", A.CrossEntropyFunction, TF.cross_entropy,
       bpnn.CrossEntropyLoss, F.cross_entropy, nn.CrossEntropyLoss,
       "∂loss/∂logits (one logits-sized tensor)"),
    Op("linear_cross_entropy", "fused_loss", A.LinearCrossEntropyFunction,
       TF.linear_cross_entropy, bpnn.LinearCrossEntropyLoss,
       getattr(F, "linear_cross_entropy", None), getattr(nn, "LinearCrossEntropyLoss", None),
       "reduced losses: the gradients of input, weight, bias (O(N·d + C·d)); "
       "'none': input, weight, bias, target"),
)
# fmt: on

#: name -> :class:`Op`, in the order of the README's tables.
OPS: dict[str, Op] = {op.name: op for op in _REGISTRY}


def of_kind(*kinds: Kind) -> list[Op]:
    """The ops of the given kinds, in registry order."""
    return [op for op in OPS.values() if op.kind in kinds]


def activations() -> list[Op]:
    """The element-wise activations, in registry order."""
    return of_kind("activation")


def module_twins() -> dict[type[nn.Module], type[nn.Module]]:
    """Native module class -> torchbp's twin, for every pair of :meth:`Op.module_pairs`
    that has both (exact types)."""
    return {
        native: ours
        for op in OPS.values()
        for ours, native in op.module_pairs()
        if ours is not None and native is not None and issubclass(ours, native)
    }
