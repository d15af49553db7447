"""Element-wise activations with hand-written backward (and jvp).

Each op is a derivative formula ``<op>_backward(g, saved) = g · f'`` in differentiable
torch ops, then the Function that uses it for both backward (``dx = g · f'``) and jvp
(``dy = f' · dx``). ``f'`` is written through whatever is cheapest to keep: the output
``y`` where the formula allows (sigmoid, tanh, ReLU, LeakyReLU with slope >= 0, ELU with
α >= 0: the next Linear keeps ``y`` alive anyway, so saving it costs nothing), otherwise
the input ``x``. Native's LeakyReLU and ELU keep their input, so modifying their output
in place before backward (``h += skip``) trains natively and fails here: their backward
re-raises autograd's "modified by an inplace operation" error with the reason and the
out-of-place form to write instead (:func:`_saved_tensor`). While torch.compile traces,
the out-of-place ones keep the input (:func:`_save_output_or_input`).
:func:`~torchbp.autograd._derivative.derivative` evaluates the formula, or for a
first-order eager backward a fast kernel of :mod:`torchbp.kernels` that computes the same.
The piecewise ones (ReLU, LeakyReLU, ELU, Softplus) also give their curvature
``<op>_curvature(v, saved) = v · ∂f'/∂saved``, from which
:class:`~torchbp.autograd._derivative.DerivativeFunction` differentiates a gradient
computed with ``create_graph=True`` as native does (ReLU's second derivative is 0, not an
error).

In place (ReLU, LeakyReLU, ELU), ``forward`` writes into the input itself, so that what
watches a write by the tensor written (a ``TorchDispatchMode``:
``torch.autograd.graph.allow_mutation_on_saved_tensors`` clones a saved tensor, found by
its data pointer and version, before an op overwrites it) sees it as native's. Where
autograd records the call, the input's version counter then moves by 2 (the write, then
``ctx.mark_dirty``) where native's moves by 1: a later backward's "modified by an inplace
operation" error names version 2 where native's names 1. Writing through ``x.data``
(its own counter, at 0) would move it by 1 but hide the write from such a mode: the
tensor saved by another op was overwritten, and its backward silently wrong.
Autograd checks such a write only after ``forward`` has run, and ``forward`` runs with
grad mode off (it cannot tell a recorded call from one under ``no_grad``), so their
``apply`` (for any ``forward`` signature a subclass gives) refuses, before anything is
written, what native's in-place op refuses before its kernel runs
(:func:`_refuse_unwritable_input`). The check is there, not only in
:mod:`torchbp.functional` (which checks first and calls past it), because the Functions
are public and applied directly: a documented precondition would still let such a call
overwrite the caller's tensor before autograd refuses it.

Complex input (sigmoid, tanh, SiLU; the others refuse it in forward, as native): backward
is ``dx = g · conj(f')``, native's convention, and ``conj(f'(s)) = f'(conj(s))`` for these
real-coefficient formulas, so backward hands the formula ``saved.conj()`` (a no-op for
real tensors); jvp, ``dy = f' · dx``, takes no conjugate.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import NamedTuple

import torch
from torch.autograd import Function

from torchbp import _native
from torchbp.autograd._derivative import derivative

__all__ = [
    "SigmoidFunction",
    "TanhFunction",
    "ReLUFunction",
    "LeakyReLUFunction",
    "GELUFunction",
    "SiLUFunction",
    "ELUFunction",
    "SoftplusFunction",
]

_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


def _save(ctx, tensor: torch.Tensor) -> None:
    """Keep ``tensor`` for backward and jvp; undefined gradients stay ``None``."""
    ctx.save_for_backward(tensor)
    ctx.save_for_forward(tensor)
    ctx.set_materialize_grads(False)


def _save_output_or_input(
    ctx, output: torch.Tensor, x: torch.Tensor, inplace: bool = False, slope: float = 0.0
) -> None:
    """Keep the output where the formula allows (``ctx.saves_output``): in place (the input
    is overwritten), and out of place for a slope >= 0, whose output's sign tells the
    branch; else the input.

    While torch.compile traces, out of place keeps the input: there an in-place op on the
    output after the Function is functionalized without autograd's version check, so a
    backward from the output read the modified values (a silent wrong gradient, where
    native trains or refuses); what the compiled graph keeps is its partitioner's choice
    anyway."""
    ctx.saves_output = inplace or (slope >= 0 and not torch.compiler.is_compiling())
    _save(ctx, output if ctx.saves_output else x)


def _saved_output(ctx, forward) -> torch.Tensor:
    """The output :func:`_save_output_or_input` kept, or ``forward`` of the input it kept."""
    (saved,) = ctx.saved_tensors
    return saved if ctx.saves_output else forward(saved)


# native's errors for an in-place op on a tensor autograd or inference mode keeps unwritten
_LEAF_WRITTEN = "a leaf Variable that requires grad is being used in an in-place operation."
_VIEW_OF_LEAF_WRITTEN = (
    "a view of a leaf Variable that requires grad is being used in an in-place operation."
)
_INFERENCE_TENSOR_WRITTEN = (
    "Inplace update to inference tensor outside InferenceMode is not allowed.You can make "
    "a clone to get a normal tensor before doing inplace update.See "
    "https://github.com/pytorch/rfcs/pull/17 for more details."
)
# native names no_grad or inference mode, which no public attribute of the view tells apart
_UNRECORDED_VIEW_WRITTEN = (
    "A view was created in no_grad mode (or in inference mode) and is being modified inplace "
    "with grad mode enabled. Given that this use case is ambiguous and error-prone, it is "
    "forbidden. You can clarify your code by moving both the view and the inplace either "
    "both inside the no_grad (or inference_mode) block (if you don't want the inplace to be "
    "tracked) or both outside (if you want the inplace to be tracked)."
)


def _refuse_unwritable_input(x) -> None:
    """Native's ``RuntimeError`` for an in-place write to ``x`` that autograd or inference
    mode forbids, raised before anything is written: an inference tensor outside inference
    mode (native's own op writes it, then raises), and where autograd records the call, a
    leaf that requires grad, a view of one, or a view made under ``no_grad`` (or inference
    mode) of a tensor that requires grad. Autograd raises those only after the Function's
    ``forward`` has written into ``x``. Other views that autograd refuses to rebase (one
    of several outputs of ``unbind`` / ``split``) show nothing public that tells them
    apart: autograd still refuses them after the write (``torchbp.functional`` refuses
    them first, by copying into the view with a native op)."""
    if not isinstance(x, torch.Tensor):
        return  # forward's own error
    if x.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(_INFERENCE_TENSOR_WRITTEN)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return  # nothing recorded: native writes it too
    base = x._base  # a view's base (torch's "Tensor Views" documentation checks this)
    if base is None:
        if x.is_leaf:
            raise RuntimeError(_LEAF_WRITTEN)
    elif x.is_leaf and base.requires_grad:  # no history of its own: made unrecorded
        raise RuntimeError(_UNRECORDED_VIEW_WRITTEN)
    elif base.is_leaf:
        raise RuntimeError(_VIEW_OF_LEAF_WRITTEN)


class _InPlaceCapableFunction(Function):
    """Base of the Functions whose argument ``inplace`` makes ``forward`` write into its
    first, ``x``: their ``apply`` is :meth:`_apply_checked`, for any ``forward`` signature
    (a subclass may add arguments, as ``Function.apply`` allows)."""

    @classmethod
    def apply(cls, *args, **kwargs):
        """``Function.apply``, which refuses an in-place write autograd forbids before it
        writes (:func:`_refuse_unwritable_input`)."""
        return cls._apply_checked(*args, **kwargs)

    @classmethod
    @torch.compiler.disable
    def _apply_checked(cls, *args, **kwargs):
        """``Function.apply(*args, **kwargs)``, an in-place call refused first where
        :func:`_refuse_unwritable_input` says so, and returning ``x`` itself as native's
        in-place op does (unrecorded, ``Function.apply`` returns an alias of a dirty input
        that requires grad). ``torchbp.functional`` checks before it calls (and outside
        torch.func transforms skips this ``apply``).

        Dynamo captures a Function's ``apply`` without running this override; where it
        runs it (after a graph break at a Function with ``jvp``), it must not trace it:
        Dynamo crashes on this ``super().apply`` (InternalTorchDynamoError)."""
        call = _bound_call(cls, args, kwargs)
        if call.inplace:
            _refuse_unwritable_input(call.x)
        out = super().apply(*call.args, **call.kwargs)
        return call.x if call.inplace and not torch.is_grad_enabled() else out


class _BoundCall(NamedTuple):
    args: tuple
    kwargs: dict
    x: object  # forward's first argument
    inplace: bool


def _bound_call(function, args, kwargs) -> _BoundCall:
    """``function.apply(*args, **kwargs)``'s arguments, every one positional where they
    bind to its ``forward`` (torch 2.11's ``Function.apply`` hands keywords on to the C
    ``apply``, which takes none), with ``x`` and ``inplace`` (False where ``forward`` has
    none, or where the arguments do not bind: ``Function.apply`` then raises its error)."""
    takes_ctx = function.setup_context is Function.setup_context  # forward(ctx, ...)
    signature, inplace_at = _forward_signature(function.forward, takes_ctx)
    if not kwargs and len(args) == len(signature.parameters) and inplace_at is not None:
        return _BoundCall(args, kwargs, args[0], args[inplace_at])  # nothing to bind
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return _BoundCall(args, kwargs, None, False)
    bound.apply_defaults()
    arguments = bound.arguments
    x = next(iter(arguments.values()), None)
    return _BoundCall(bound.args, bound.kwargs, x, arguments.get("inplace", False))


@functools.cache
def _forward_signature(forward, takes_ctx: bool) -> tuple[inspect.Signature, int | None]:
    """``forward``'s signature as ``Function.apply`` is called (without ``ctx`` where
    ``forward`` takes it: no ``setup_context``), and the position of ``inplace`` among
    its plain positional parameters (None where it is not one). Cached: asking
    ``inspect.signature`` costs more than the rest of the check."""
    signature = inspect.signature(forward)
    parameters = list(signature.parameters.values())[1 if takes_ctx else 0 :]
    positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    plain = positional == [p.name for p in parameters]
    inplace_at = positional.index("inplace") if plain and "inplace" in positional else None
    return signature.replace(parameters=parameters), inplace_at


def _tangent_out(ctx, x_t: torch.Tensor | None, t: torch.Tensor | None):
    """An in-place forward must update its input's tangent in place too."""
    if ctx.inplace and t is not None:
        return x_t.copy_(t)
    return t


# --------------------------------------------------------------------------- sigmoid
def sigmoid_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # σ'(x) = σ(x)(1 - σ(x)) = y (1 - y)
    return g * (y * (1 - y))


class SigmoidFunction(Function):
    """``y = σ(x) = 1 / (1 + e^{-x})``; backward ``dx = g · y (1 - y)`` (saves ``y``; ``x``
    while torch.compile traces, see :func:`_save_output_or_input`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        # torch.sigmoid never overflows for large |x|
        return _native.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_output_or_input(ctx, output, inputs[0])

    @staticmethod
    def backward(ctx, dy):
        y = _saved_output(ctx, _native.sigmoid)
        return derivative("sigmoid", sigmoid_backward, dy, y.conj())

    @staticmethod
    def jvp(ctx, dx):
        y = _saved_output(ctx, _native.sigmoid)
        return derivative("sigmoid", sigmoid_backward, dx, y)


# --------------------------------------------------------------------------- tanh
def tanh_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # tanh'(x) = 1 - tanh²(x) = 1 - y²
    return g * (1 - y * y)


class TanhFunction(Function):
    """``y = tanh(x)``; backward ``dx = g · (1 - y²)`` (saves ``y``; ``x`` while
    torch.compile traces, see :func:`_save_output_or_input`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return _native.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_output_or_input(ctx, output, inputs[0])

    @staticmethod
    def backward(ctx, dy):
        y = _saved_output(ctx, _native.tanh)
        return derivative("tanh", tanh_backward, dy, y.conj())

    @staticmethod
    def jvp(ctx, dx):
        y = _saved_output(ctx, _native.tanh)
        return derivative("tanh", tanh_backward, dx, y)


# --------------------------------------------------------------------------- ReLU
def relu_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # relu'(x) = 1 if x > 0 else 0, read off y = max(x, 0): y > 0 exactly when x > 0 (so x
    # itself, saved while torch.compile traces, gives the same). Written as "y <= 0 -> 0"
    # so that a NaN input passes g through, as native does.
    return torch.where(y <= 0, 0.0, g)


def relu_curvature(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # ∂relu'/∂y = 0: relu' is piecewise constant (native's second derivative is 0 too)
    return torch.zeros_like(v)


class ReLUFunction(_InPlaceCapableFunction):
    """``y = max(x, 0)``; backward ``dx = g · [y > 0]`` (saves ``y``, or ``x`` while
    torch.compile traces out of place, see :func:`_save_output_or_input`; 0 at the kink,
    as native). ``inplace=True`` overwrites ``x`` and marks it dirty."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, inplace):
        if inplace:
            x.clamp_min_(0)
            return x  # the input object itself: Dynamo checks that a dirty input is returned
        return torch.clamp_min(x, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.inplace = inputs
        if ctx.inplace:
            ctx.mark_dirty(x)
        _save_output_or_input(ctx, output, x, ctx.inplace)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return derivative("relu", relu_backward, dy, y, curvature=relu_curvature), None

    @staticmethod
    def jvp(ctx, dx, _inplace):
        (y,) = ctx.saved_tensors
        dy = derivative("relu", relu_backward, dx, y, curvature=relu_curvature)
        return _tangent_out(ctx, dx, dy)


# --------------------------------------------------------------------------- LeakyReLU
def leaky_relu_backward(g: torch.Tensor, saved: torch.Tensor, slope: float) -> torch.Tensor:
    # f'(x) = 1 if x > 0 else slope (slope at x = 0 and for NaN, as native). For slope >= 0,
    # y > 0 exactly when x > 0, so the output can stand in for the input (native saves the
    # input); a negative slope flips y's sign, so then the input is saved.
    return torch.where(saved > 0, g, g * slope)


def leaky_relu_curvature(v: torch.Tensor, saved: torch.Tensor, slope: float) -> torch.Tensor:
    # ∂f'/∂saved = 0: f' is piecewise constant (1 or slope), as native's second derivative
    return torch.zeros_like(v)


# added under autograd's error when an activation's saved output was modified in place
_OUTPUT_MODIFIED_HINT = (
    "torchbp's {name} keeps its output for backward (half the saved memory of native's, "
    "which keeps its input), so an in-place op on it before backward "
    "(nn.Dropout(inplace=True), h += skip) cannot be undone; use the out-of-place form "
    "(nn.Dropout(), h = h + skip)."
)


def _saved_tensor(ctx, name: str) -> torch.Tensor:
    """The one tensor :func:`_save_output_or_input` kept for LeakyReLU or ELU. Where that
    is the output out of place (native keeps the input), autograd's "modified by an
    inplace operation" error (the output changed before backward) is re-raised with why
    and what to write instead; the ``try`` costs nothing until it raises."""
    try:
        (saved,) = ctx.saved_tensors
    except RuntimeError as error:
        output_out_of_place = ctx.saves_output and not ctx.inplace
        if not (output_out_of_place and "modified by an inplace" in str(error)):
            raise
        raise RuntimeError(f"{error}\n{_OUTPUT_MODIFIED_HINT.format(name=name)}") from None
    return saved


def _check_result_tells_branch(ctx, name: str, slope: float) -> None:
    """An in-place call saved its output, whose sign tells the branch only for a slope
    >= 0: refuse a negative one at backward, with native's error (``torchbp.functional``
    refuses it at the call already; this guards a direct ``Function.apply``)."""
    if ctx.inplace and slope < 0:
        raise RuntimeError(
            f"In-place {name} backward calculation is triggered with a negative slope which "
            "is not supported. This is caused by calling in-place forward function with a "
            "negative slope, please call out-of-place version instead."
        )


class LeakyReLUFunction(_InPlaceCapableFunction):
    """``y = x if x > 0 else α x``; backward ``dx = g · (1 if x > 0 else α)``.

    Saves the output for ``α >= 0`` (its sign equals the input's; native saves the input,
    so modifying the output in place before backward fails here, with the out-of-place
    form to write in the error), the input otherwise (a negative slope flips the sign, so
    then only the input tells the branch). ``inplace=True`` overwrites ``x``, marks it
    dirty and saves the output, as native's ``leaky_relu_``, whose backward refuses
    ``α < 0``, as native's.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, negative_slope, inplace):
        # f(x) = x for x > 0 (and at 0, where both branches agree), slope · x otherwise.
        if inplace:
            _native.leaky_relu_(x, negative_slope)
            return x  # the input object itself, as Dynamo requires of a dirty input
        return _native.leaky_relu(x, negative_slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.negative_slope, ctx.inplace = inputs
        if ctx.inplace:
            ctx.mark_dirty(x)
        _save_output_or_input(ctx, output, x, ctx.inplace, ctx.negative_slope)

    @staticmethod
    def backward(ctx, dy):
        _check_result_tells_branch(ctx, "leakyReLu", ctx.negative_slope)
        saved = _saved_tensor(ctx, "LeakyReLU")
        dx = derivative(
            "leaky_relu",
            leaky_relu_backward,
            dy,
            saved,
            ctx.negative_slope,
            curvature=leaky_relu_curvature,
        )
        return dx, None, None

    @staticmethod
    def jvp(ctx, dx, _slope, _inplace):
        _check_result_tells_branch(ctx, "leakyReLu", ctx.negative_slope)
        (saved,) = ctx.saved_tensors
        dy = derivative(
            "leaky_relu",
            leaky_relu_backward,
            dx,
            saved,
            ctx.negative_slope,
            curvature=leaky_relu_curvature,
        )
        return _tangent_out(ctx, dx, dy)


# --------------------------------------------------------------------------- GELU
def gelu_backward(g: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        # y = ½x(1 + tanh u), u = √(2/π)(x + c x³)
        # y' = ½(1 + tanh u) + ½x (1 - tanh²u) √(2/π)(1 + 3c x²)
        x2 = x * x
        t = _native.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x2))
        inner = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * x2)
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner)
    # y = x Φ(x);  y' = Φ(x) + x φ(x),  Φ(x) = ½(1 + erf(x/√2)),  φ(x) = e^{-x²/2}/√(2π)
    cdf = 0.5 * (1 + torch.erf(x / _SQRT_2))
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return g * (cdf + x * pdf)


def gelu_curvature(v: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    # v · y'' of the exact form, with v = g · gg formed first, as native's double backward
    # (an infinite g times a nonzero y'' stays infinite, where autograd through
    # gelu_backward's sum gave inf - inf = NaN). y' = Φ(x) + x φ(x), φ' = -x φ:
    # y'' = φ(x) (2 - x²) (NaN where x² overflows, as native's)
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return v * (pdf * (2 - x * x))


def _gelu_curvature(approximate: str):
    """:func:`gelu_curvature` for the exact form; the tanh form's second derivative stays
    autograd through :func:`gelu_backward` (None), which matches native's at huge x."""
    return gelu_curvature if approximate == "none" else None


class GELUFunction(Function):
    """``y = x Φ(x)`` (``approximate='none'``) or ``½x(1 + tanh(√(2/π)(x + 0.044715x³)))``
    (``'tanh'``); backward ``dx = g · (Φ(x) + x φ(x))`` or the tanh form's derivative.
    Saves ``x``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, approximate):
        return _native.gelu(x, approximate=approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.approximate = inputs
        _save(ctx, x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        curvature = _gelu_curvature(ctx.approximate)
        dx = derivative("gelu", gelu_backward, dy, x, ctx.approximate, curvature=curvature)
        return dx, None

    @staticmethod
    def jvp(ctx, dx, _approximate):
        (x,) = ctx.saved_tensors
        curvature = _gelu_curvature(ctx.approximate)
        return derivative("gelu", gelu_backward, dx, x, ctx.approximate, curvature=curvature)


# --------------------------------------------------------------------------- SiLU
def silu_backward(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # y = x σ(x);  y' = σ(x) (1 + x (1 - σ(x)))
    s = _native.sigmoid(x)
    return g * (s * (1 + x * (1 - s)))


class SiLUFunction(Function):
    """``y = x σ(x)``; backward ``dx = g · σ(x)(1 + x(1 - σ(x)))``. Saves ``x``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return _native.silu(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs[0])

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return derivative("silu", silu_backward, dy, x.conj())

    @staticmethod
    def jvp(ctx, dx):
        (x,) = ctx.saved_tensors
        return derivative("silu", silu_backward, dx, x)


# --------------------------------------------------------------------------- ELU
def elu_backward(g: torch.Tensor, saved: torch.Tensor, alpha: float) -> torch.Tensor:
    # y = x for x > 0, α(eˣ - 1) otherwise;  y' = 1 for x > 0, α eˣ otherwise.
    # For α >= 0 the output is saved: y > 0 exactly when x > 0, and α eˣ = y + α.
    # For α < 0 the input is saved (y's sign no longer tells the branch): α eˣ directly.
    # Written as "saved <= 0 -> negative branch" so that a NaN input passes g, as native.
    if alpha >= 0:
        return torch.where(saved <= 0, g * (saved + alpha), g)
    return elu_input_backward(g, saved, alpha)


def elu_curvature(v: torch.Tensor, saved: torch.Tensor, alpha: float) -> torch.Tensor:
    # ∂f'/∂saved on the negative branch: ∂(y + α)/∂y = 1 (α >= 0, saved y), or
    # ∂(α eˣ)/∂x = α eˣ (α < 0, saved x); 0 for saved > 0. The kink counts as positive
    # here ("saved < 0"), unlike f' itself ("saved <= 0"): native's second derivative does.
    if alpha >= 0:
        return torch.where(saved < 0, v, 0.0)
    return elu_input_curvature(v, saved, alpha)


def elu_input_backward(g: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    # y' from the input, for any α: α eˣ where x <= 0 (a NaN passes g, as above), else 1
    return torch.where(x <= 0, g * (alpha * torch.exp(x)), g)


def elu_input_curvature(v: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    # ∂y'/∂x = α eˣ where x < 0 (the kink counts as positive, as in elu_curvature), else 0
    return torch.where(x < 0, v * (alpha * torch.exp(x)), 0.0)


def _elu_formula(ctx):
    """``(name, formula, curvature)`` for what ``ctx`` saved: :func:`elu_backward` (the
    output for α >= 0, the input for α < 0, as its kernel), or from the input with α >= 0
    (kept so only while torch.compile traces, which uses no kernel)."""
    if ctx.alpha >= 0 and not ctx.saves_output:
        return "elu_input", elu_input_backward, elu_input_curvature
    return "elu", elu_backward, elu_curvature


class ELUFunction(_InPlaceCapableFunction):
    """``y = x if x > 0 else α (eˣ - 1)``; backward ``dx = g · (1 if x > 0 else α eˣ)``.

    Saves the output for ``α >= 0`` (then ``α eˣ = y + α``; native saves the input, so
    modifying the output in place before backward fails here, with the out-of-place form
    to write in the error), the input otherwise. ``inplace=True`` overwrites ``x``, marks
    it dirty and saves the output, as native's ``elu_``. Its backward refuses ``α < 0``,
    as native's (``torchbp.functional.elu`` refuses it at the call): ``α (eˣ - 1) > 0``
    for ``x < 0`` then, so one ``y > 0`` comes from two inputs with different slopes
    (``x = -0.7``, ``α = -2``: ``y = 1.0068``, slope ``α eˣ = -0.99``; ``x = 1.0068``: the
    same ``y``, slope 1), and the overwritten input was the only record of the branch.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, alpha, inplace):
        if inplace:
            _native.elu_(x, alpha)
            return x  # the input object itself, as Dynamo requires of a dirty input
        return _native.elu(x, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.alpha, ctx.inplace = inputs
        if ctx.inplace:
            ctx.mark_dirty(x)
        _save_output_or_input(ctx, output, x, ctx.inplace, ctx.alpha)

    @staticmethod
    def backward(ctx, dy):
        _check_result_tells_branch(ctx, "elu", ctx.alpha)
        saved = _saved_tensor(ctx, "ELU")
        name, formula, curvature = _elu_formula(ctx)
        dx = derivative(name, formula, dy, saved, ctx.alpha, curvature=curvature)
        return dx, None, None

    @staticmethod
    def jvp(ctx, dx, _alpha, _inplace):
        _check_result_tells_branch(ctx, "elu", ctx.alpha)
        (saved,) = ctx.saved_tensors
        name, formula, curvature = _elu_formula(ctx)
        dy = derivative(name, formula, dx, saved, ctx.alpha, curvature=curvature)
        return _tangent_out(ctx, dx, dy)


# --------------------------------------------------------------------------- Softplus
def softplus_backward(g: torch.Tensor, x: torch.Tensor, beta: float, threshold: float):
    # y = log(1 + e^{βx}) / β, and y = x where βx > threshold (linear there, as native);
    # y' = σ(βx), or 1 where βx > threshold. σ never overflows (e^{βx} / (1 + e^{βx}) would).
    bx = x * beta
    return torch.where(bx > threshold, g, g * _native.sigmoid(bx))


def softplus_curvature(v: torch.Tensor, x: torch.Tensor, beta: float, threshold: float):
    # ∂f'/∂x = β σ(βx)(1 - σ(βx)) where βx < threshold, 0 on the linear side. At βx equal
    # to the threshold f' is still σ(βx) (above), but its derivative counts as the linear
    # side's 0 there ("βx < threshold", not "<="): native's second derivative does. Times
    # the 0/1 mask, not selected by it, so that a NaN x gives NaN, as native.
    bx = x * beta
    s = _native.sigmoid(bx)
    return v * (beta * s * (1 - s)) * (bx < threshold).to(v.dtype)


class SoftplusFunction(Function):
    """``y = log(1 + e^{βx}) / β`` (``x`` where ``βx > threshold``); backward
    ``dx = g · σ(βx)`` (``g`` where ``βx > threshold``). Saves ``x``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, beta, threshold):
        return _native.softplus(x, beta, threshold)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.beta, ctx.threshold = inputs
        _save(ctx, x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dx = derivative(
            "softplus",
            softplus_backward,
            dy,
            x,
            ctx.beta,
            ctx.threshold,
            curvature=softplus_curvature,
        )
        return dx, None, None

    @staticmethod
    def jvp(ctx, dx, _beta, _threshold):
        (x,) = ctx.saved_tensors
        return derivative(
            "softplus",
            softplus_backward,
            dx,
            x,
            ctx.beta,
            ctx.threshold,
            curvature=softplus_curvature,
        )
