"""Drop-in :mod:`torch.nn` modules whose forward runs torchbp's Functions.

Each class subclasses its :mod:`torch.nn` namesake and overrides only ``forward``, so
constructor arguments (``device`` / ``dtype`` included), parameter names, initialisation
(``reset_parameters``), ``state_dict`` keys, ``extra_repr`` and ``isinstance`` checks are
exactly torch's: a checkpoint moves between the two without conversion. The one addition:
:class:`LinearCrossEntropyLoss` also takes torchbp's ``chunk_size=`` (keyword only), shown
in its ``extra_repr`` when set; its state and its other arguments are torch's.

``torch.jit.script`` cannot compile them (their forward runs a Python autograd Function)
and says so up front, naming what works: ``torch.compile``, ``torch.jit.trace`` (in
process), or scripting ``torchbp.convert(model, to='torch')``.

Examples::

    >>> import torch, torchbp
    >>> model = torch.nn.Sequential(torchbp.nn.Linear(4, 8), torchbp.nn.ReLU(),
    ...                             torchbp.nn.Linear(8, 3))
    >>> target = torch.tensor([0, 1, 2, 0, 1])
    >>> loss = torchbp.nn.CrossEntropyLoss()(model(torch.randn(5, 4)), target)
    >>> loss.backward()
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchbp import _checks
from torchbp import functional as F

__all__ = [
    "Linear",
    "Sigmoid",
    "Tanh",
    "ReLU",
    "LeakyReLU",
    "GELU",
    "SiLU",
    "ELU",
    "Softplus",
    "Softmax",
    "Softmin",
    "Softmax2d",
    "LogSoftmax",
    "NLLLoss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
]


class _TorchbpModule:
    """Mixed into every torchbp module: :func:`torch.jit.script` refuses it up front, with
    the alternatives, instead of failing deep in TorchScript's frontend."""

    def __prepare_scriptable__(self):
        # torch.jit.script calls this hook on every module before compiling it
        twin = next(c for c in type(self).__mro__ if c.__module__ == __name__)
        raise NotImplementedError(
            f"torch.jit.script cannot compile torchbp.nn.{twin.__name__}: its forward runs a "
            "Python torch.autograd.Function (torchbp's hand-written backward), which "
            "TorchScript cannot compile. Use torch.compile (keeps torchbp's backward), "
            "torch.jit.trace (runs torchbp's backward in this process; the trace cannot be "
            "saved with torch.jit.save), or script a native copy made with "
            "torchbp.convert(model, to='torch') (inplace=False to keep this one)"
        )


class Linear(_TorchbpModule, nn.Linear):
    r"""Affine layer :math:`y = x W^T + b` with torchbp's hand-written backward.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias (default ``True``).
        device, dtype: factory kwargs for the parameters.

    Shape:
        Input ``(*, in_features)``, output ``(*, out_features)``.

    Attributes:
        weight: ``(out_features, in_features)``, initialised from
            :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})`, :math:`k = 1/\text{in\_features}`
            (exactly as :class:`torch.nn.Linear`).
        bias: ``(out_features,)``, same distribution.

    Examples::

        >>> m = Linear(20, 30)
        >>> m(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)


class Sigmoid(_TorchbpModule, nn.Sigmoid):
    r""":math:`\sigma(x) = 1/(1 + e^{-x})`; backward saves only the output.

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> Sigmoid()(torch.tensor([0.0, 2.0]))
        tensor([0.5000, 0.8808])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.sigmoid(input)


class Tanh(_TorchbpModule, nn.Tanh):
    r""":math:`\tanh(x)`; backward :math:`g (1 - y^2)` from the saved output.

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> Tanh()(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.7616])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.tanh(input)


class ReLU(_TorchbpModule, nn.ReLU):
    r""":math:`\max(x, 0)`.

    Args:
        inplace: overwrite the input (default ``False``).

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> ReLU()(torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu(input, inplace=self.inplace)


class LeakyReLU(_TorchbpModule, nn.LeakyReLU):
    r""":math:`x` for :math:`x \ge 0`, :math:`\alpha x` otherwise.

    Args:
        negative_slope: :math:`\alpha` (default ``1e-2``).
        inplace: overwrite the input (default ``False``).

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> LeakyReLU(0.1)(torch.tensor([-1.0, 2.0]))
        tensor([-0.1000,  2.0000])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class GELU(_TorchbpModule, nn.GELU):
    r""":math:`x \Phi(x)` (``approximate='none'``) or its tanh approximation.

    Args:
        approximate: ``'none'`` or ``'tanh'``.

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> GELU()(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.8413])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gelu(input, approximate=self.approximate)


class SiLU(_TorchbpModule, nn.SiLU):
    r""":math:`x \sigma(x)`.

    Args:
        inplace: overwrite the input (default ``False``).

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> SiLU()(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.7311])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.silu(input, inplace=self.inplace)


class ELU(_TorchbpModule, nn.ELU):
    r""":math:`x` for :math:`x > 0`, :math:`\alpha (e^x - 1)` otherwise.

    Args:
        alpha: :math:`\alpha` (default 1).
        inplace: overwrite the input (default ``False``).

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> ELU()(torch.tensor([-1.0, 0.0, 2.0]))
        tensor([-0.6321,  0.0000,  2.0000])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.elu(input, self.alpha, self.inplace)


class Softplus(_TorchbpModule, nn.Softplus):
    r""":math:`\frac{1}{\beta} \log(1 + e^{\beta x})`, linear above the threshold.

    Args:
        beta: :math:`\beta` (default 1).
        threshold: where ``βx`` exceeds it the result is ``x`` (default 20).

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> Softplus()(torch.tensor([0.0, 30.0]))
        tensor([ 0.6931, 30.0000])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softplus(input, self.beta, self.threshold)


class Softmax(_TorchbpModule, nn.Softmax):
    r"""Softmax along ``dim`` with the max trick.

    Args:
        dim: the dim that sums to 1.

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> Softmax(dim=1)(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
        tensor([[0.5000, 0.5000],
                [0.1192, 0.8808]])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softmax(input, self.dim, _stacklevel=5)


class Softmin(_TorchbpModule, nn.Softmin):
    r""":math:`\text{Softmin}(x) = \text{Softmax}(-x)` along ``dim``:
    :func:`torchbp.functional.softmin`, torchbp's softmax of the negated input (its
    backward saves only the output).

    Args:
        dim: the dim that sums to 1 (``None`` picks one as native does, with its
            deprecation warning).

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> Softmin(dim=1)(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
        tensor([[0.5000, 0.5000],
                [0.8808, 0.1192]])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # (_stacklevel=5 as native's: the implicit-dim warning points where native's does)
        return F.softmin(input, self.dim, _stacklevel=5)


class Softmax2d(_TorchbpModule, nn.Softmax2d):
    r"""Softmax over the channels at each spatial location: dim ``-3`` of a ``(C, H, W)``
    or ``(N, C, H, W)`` input.

    Shape: input ``(N, C, H, W)`` or ``(C, H, W)``, output the same shape; any other
    number of dims is a ``ValueError``, as native.

    Examples::

        >>> Softmax2d()(torch.zeros(1, 2, 1, 1)).flatten()
        tensor([0.5000, 0.5000])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # (a torch.fx Proxy has no dims to check: the trace records the softmax alone)
        if isinstance(input, torch.Tensor) and input.dim() not in (3, 4):
            raise ValueError(
                f"Softmax2d: expected input to be 3D or 4D, got {input.dim()}D instead"
            )
        return F.softmax(input, -3)


class LogSoftmax(_TorchbpModule, nn.LogSoftmax):
    r"""Log-softmax along ``dim``.

    Args:
        dim: the dim to normalise over.

    Shape: input ``(*)``, output the same shape.

    Examples::

        >>> LogSoftmax(dim=0)(torch.tensor([1.0, 1.0]))
        tensor([-0.6931, -0.6931])
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(input, self.dim, _stacklevel=5)


class NLLLoss(_TorchbpModule, nn.NLLLoss):
    r"""Negative log-likelihood of log-probabilities.

    Args:
        weight: per-class weights ``(C,)``.
        ignore_index: target value to skip (default ``-100``).
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        size_average, reduce: deprecated, as in torch.

    Shape:
        Input ``(N, C)``, ``(C,)`` or ``(N, C, d1, ..., dK)``; target ``(N)``, ``()`` or
        ``(N, d1, ..., dK)`` of class indices; output a scalar, or the target's shape with
        ``reduction='none'``.

    Examples::

        >>> NLLLoss()(torch.tensor([[-0.5, -1.0], [-2.0, -0.1]]), torch.tensor([0, 1]))
        tensor(0.3000)
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


class CrossEntropyLoss(_TorchbpModule, nn.CrossEntropyLoss):
    r"""Fused log-softmax + NLL cross-entropy of logits.

    Args:
        weight: per-class weights ``(C,)``.
        ignore_index: class-index target to skip (default ``-100``).
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        label_smoothing: ε in [0, 1].
        size_average, reduce: deprecated, as in torch.

    Shape:
        Input ``(N, C)``, ``(C,)`` or ``(N, C, d1, ..., dK)``; target class indices of the
        input's shape without ``C``, or probabilities of the input's shape; output a
        scalar, or the input's shape without ``C`` with ``reduction='none'``.

    Examples::

        >>> import torch.nn.functional as F
        >>> loss = CrossEntropyLoss(label_smoothing=0.1)
        >>> logits, target = torch.randn(3, 5, requires_grad=True), torch.tensor([1, 0, 4])
        >>> native = F.cross_entropy(logits, target, label_smoothing=0.1)
        >>> torch.allclose(loss(logits, target), native)
        True
    """

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


# torch 2.13+ has the native module: torchbp's subclasses it like every other twin (so
# ``convert`` swaps it and ``isinstance`` holds); on older torch it stands alone. Type
# checkers see an ``nn.Module`` base, the one every supported torch has.
_NativeLinearCrossEntropyLoss = getattr(nn, "LinearCrossEntropyLoss", None)
if TYPE_CHECKING:
    _LinearCrossEntropyLossBase = nn.Module
else:
    _LinearCrossEntropyLossBase = _NativeLinearCrossEntropyLoss or nn.Module


class LinearCrossEntropyLoss(_TorchbpModule, _LinearCrossEntropyLossBase):
    r"""Linear layer + cross-entropy in one fused op that never holds the ``(N, C)``
    logits (:func:`torchbp.functional.linear_cross_entropy`).

    Mirrors torch 2.13's ``nn.LinearCrossEntropyLoss`` (same arguments, defaults,
    ``extra_repr`` and errors, but for one deliberate extension: an input of more than
    2 dims, ``(*, d)`` such as ``(B, T, d)`` with targets ``(B, T)``, is taken with every
    leading dim a batch dim, the loss of the flattened ``(B * T, d)`` call; native refuses
    it, and ``F.cross_entropy(F.linear(x, W), t)`` would read dim 1 as the classes).
    It owns the linear layer as ``self.linear`` (an :class:`torch.nn.Linear`
    ``in_features -> num_classes * prod(out_features)``, default init, no bias by
    default), reshaped to ``(C, d1, ..., dK, in)`` in forward, so the
    ``state_dict`` keys (``linear.weight``, ``linear.bias``, and the ``weight`` buffer)
    are the same and a checkpoint moves between the two. On torch 2.13+ it subclasses
    ``nn.LinearCrossEntropyLoss`` (so :func:`torchbp.convert` swaps it); on torch 2.11-2.12,
    which lack it, it is a plain module with the same attributes and state.

    Args:
        in_features: size of each input sample ``d``.
        num_classes: number of classes ``C``.
        out_features: ``(d1, ..., dK)`` of a K-dimensional loss (default ``()``).
        bias: learn a bias for the logits (default ``False``, as torch's).
        device, dtype: factory kwargs for the linear parameters.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        weight: per-class weights ``(C,)``.
        ignore_index: class-index target to skip (``None``, the default, means ``-100``).
        label_smoothing: ε in [0, 1].
        options: ``torch.nn.LinearCrossEntropyOptions`` or ``None``: how many rows per
            chunk (see the functional; torchbp always chunks).
        chunk_size: rows per chunk, overriding ``options`` (default: from a memory budget).

    Shape:
        Input ``(d,)`` or ``(*, d)`` (``(N, d)`` with ``out_features``); target class
        indices of shape ``(*)`` (``(N, d1, ..., dK)``) or probabilities of the logits'
        shape; output a scalar, or the class-index shape with ``reduction='none'``.

    Double backward raises a clear error.

    Examples::

        >>> import torch.nn.functional as F
        >>> loss = LinearCrossEntropyLoss(16, 1000, bias=True, label_smoothing=0.1)
        >>> x, target = torch.randn(32, 16, requires_grad=True), torch.randint(1000, (32,))
        >>> logits = loss.linear(x)  # the layer (loss.weight holds the class weights)
        >>> torch.allclose(loss(x, target), F.cross_entropy(logits, target, label_smoothing=0.1))
        True
    """

    #: rows per chunk (``None``: from ``options`` or the memory budget); a class default so
    #: that a native module switched to this class by ``convert`` has it too
    chunk_size: int | None = None
    #: the class weights, a buffer (declared for type checkers: ``nn.Module`` types any
    #: other attribute as a tensor or a module)
    weight: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: torch.types.Device = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        options: Any = None,
        chunk_size: int | None = None,
    ) -> None:
        op = "LinearCrossEntropyLoss"
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise _checks.ShapeError(
                f"{op}: weight must have shape ({num_classes},), got {tuple(weight.shape)}"
            )
        _checks.check_smoothing(op, label_smoothing)
        _checks.check_linear_cross_entropy_options(op, options)
        _checks.check_chunk_size(op, chunk_size)
        if _NativeLinearCrossEntropyLoss is not None:
            super().__init__(
                in_features,
                num_classes,
                out_features=out_features,
                bias=bias,
                device=device,
                dtype=dtype,
                reduction=reduction,
                weight=weight,
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                options=options,
            )
        else:  # the same attributes and state as the native module
            super().__init__()
            self.register_buffer("weight", weight)
            self.reduction = reduction
            self.num_classes = num_classes
            self.out_features = out_features
            self.ignore_index = ignore_index
            self.label_smoothing = label_smoothing
            rows = math.prod(out_features, start=num_classes)
            self.linear = nn.Linear(in_features, rows, bias=bias, device=device, dtype=dtype)
            self.options = options
        self.chunk_size = chunk_size

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        shape = (self.num_classes, *self.out_features)
        bias = self.linear.bias
        return F.linear_cross_entropy(
            input,
            self.linear.weight.reshape(*shape, self.linear.in_features),
            target,
            linear_bias=None if bias is None else bias.reshape(shape),
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
            f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, options={self.options}"
        )
        return text if self.chunk_size is None else f"{text}, chunk_size={self.chunk_size}"
