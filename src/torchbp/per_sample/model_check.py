"""Which modules of a model per-sample gradients can be attributed through, checked before
any forward runs.

A trainable parameter is attributable when it belongs to a :class:`torchbp.nn.Linear`:
its Function's backward sees each sample's input and output gradient. Parameter-free
modules (activations, Dropout, Flatten, Identity, containers, user-defined wrappers) and
modules whose parameters are all frozen are trusted to act on each sample separately,
except the ones known to mix the samples of a batch (BatchNorm in training mode; a
softmax, GLU or CosineSimilarity along dim 0; a Flatten or Unflatten of it), which are
refused; a module whose dim is picked from the input's ndim (a softmax's ``dim=None``, a
negative dim, Softmax2d's -3) is refused at the forward, for an input on which that dim
is the sample dim, and so is one whose settings were changed to mix samples after the
check (a BatchNorm switched to training mode).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchbp import nn as bpnn

# Modules that act along ``dim``, and how: along dim 0 they mix samples.
_ACTION_ALONG_DIM = {
    nn.Softmax: "normalises",
    nn.LogSoftmax: "normalises",
    nn.Softmin: "normalises",
    nn.GLU: "gates one half by the other",
    nn.CosineSimilarity: "reduces",
}
_ALONG_DIM = tuple(_ACTION_ALONG_DIM)
# (the lazy ones are not subclasses of the others)
_BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)

# torch modules whose Linear children see their input as it is given: sequence-first
# (T, B, ·) unless built with batch_first=True
_SEQUENCE_FIRST_CAPABLE = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class Layer:
    """One :class:`torchbp.nn.Linear` with at least one trainable parameter.

    ``weight`` / ``bias`` are its trainable parameters (``None`` when frozen or absent);
    ``tied`` lists ``(name, module)`` for the model's other Linear modules with its weight
    and bias, whose calls are this layer's; ``traces`` collects, per forward call, the
    recorded ``(a, g)`` (see ``recorder``).
    """

    name: str
    module: bpnn.Linear
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    tied: list[tuple[str, bpnn.Linear]] = field(default_factory=list)
    traces: list = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]

    def modules(self) -> list[tuple[str, bpnn.Linear]]:
        """``(name, module)`` of every Linear module whose calls this layer records."""
        return [(self.name, self.module), *self.tied]

    @property
    def weight_formed_per_call(self) -> bool:
        """Whether the module's (frozen) weight is formed anew at every access, by a
        ``torch.nn.utils.parametrize`` parametrization: it has no identity to match the
        layer's calls by, so they are matched by the trainable bias."""
        return parametrize.is_parametrized(self.module, "weight")

    def parameter_name(self, what: str) -> str:
        """``"parameter 0.weight"`` for ``what="weight"`` of the layer ``"0"``."""
        return f"parameter {self.name + '.' if self.name else ''}{what}"


def describe(name: str, module: nn.Module) -> str:
    """``'encoder.0' (BatchNorm1d)``, or ``the model (MLP)`` for the root."""
    where = f"{name!r}" if name else "the model"
    return f"{where} ({type(module).__name__})"


def _trainable(p: nn.Parameter | None) -> nn.Parameter | None:
    return p if p is not None and p.requires_grad else None


def _has_trainable(module: bpnn.Linear) -> bool:
    """Whether the Linear's weight or bias requires grad."""
    return any(_trainable(p) is not None for p in (module.weight, module.bias))


@functools.cache
def _may_mix(cls: type) -> bool:
    """Whether modules of this class can mix samples, depending on their settings."""
    return issubclass(cls, (*_BATCH_NORMS, *_ALONG_DIM, nn.Softmax2d, nn.Flatten, nn.Unflatten))


def _mixing_reason(module: nn.Module) -> str | None:
    """Why ``module`` mixes the samples of a batch, or ``None`` if it does not."""
    if not _may_mix(type(module)):
        return None
    if isinstance(module, _BATCH_NORMS) and (module.training or not module.track_running_stats):
        return "normalises with statistics of the whole batch, so it mixes samples"
    if isinstance(module, _ALONG_DIM) and module.dim == 0:
        return f"{_action_along_dim(module)} along dim 0, the sample dim"
    if isinstance(module, nn.Flatten) and module.start_dim == 0:
        return "flattens the sample dim (start_dim=0)"
    if isinstance(module, nn.Unflatten) and module.dim == 0:
        return "reshapes the sample dim (dim=0)"
    return None


def _mixing_remedy(module: nn.Module) -> str:
    """What stops ``module``, one that :func:`_mixing_reason` names, from mixing samples."""
    if isinstance(module, _BATCH_NORMS):
        return (
            "switch it to eval mode with running stats, or use a per-sample norm "
            "(GroupNorm, LayerNorm) instead"
        )
    if isinstance(module, nn.Flatten):
        return "give it start_dim=1"
    return "give it a dim other than 0"


def _action_along_dim(module: nn.Module) -> str:
    """What ``module``, one of :data:`_ALONG_DIM`, does along its dim."""
    return next(action for cls, action in _ACTION_ALONG_DIM.items() if isinstance(module, cls))


def _dim_setting(module: nn.Module) -> tuple[str, int | None, str] | None:
    """``(what, value, remedy)`` for the dim ``value`` that ``module`` picks from its
    input's ndim (a softmax's ``dim=None``, a negative dim, Softmax2d's fixed -3), or
    ``None`` if it has none."""
    if isinstance(module, _ALONG_DIM) and (module.dim is None or module.dim < 0):
        return _setting("dim", module.dim)
    if isinstance(module, nn.Flatten) and module.start_dim < 0:
        return _setting("start_dim", module.start_dim)
    if isinstance(module, nn.Unflatten) and isinstance(module.dim, int) and module.dim < 0:
        return _setting("dim", module.dim)
    if isinstance(module, nn.Softmax2d):
        # normalises over the channels of (C, H, W) or (B, C, H, W): dim -3
        return "(which normalises along dim -3)", -3, "give it (B, C, H, W) inputs"
    return None


def _setting(name: str, value: int | None) -> tuple[str, int | None, str]:
    return f"with {name}={value}", value, f"give {name} as a non-negative dim other than 0"


def _resolved_dim(value: int | None, ndim: int) -> int:
    """The dim ``value`` picks for an ``ndim``-D input: ``None`` is softmax's implicit
    choice (dim 0 for 0-, 1- and 3-D inputs, else dim 1)."""
    if value is None:
        return 0 if ndim in (0, 1, 3) else 1
    return value + ndim if value < 0 else value


def sample_dim_guards(model: nn.Module) -> list[tuple[nn.Module, Callable]]:
    """``(module, forward pre-hook)`` for each module that can mix samples depending on its
    settings: the hook refuses, at the forward, an input it would mix, which
    :func:`attributable_layers` cannot tell before the forward: a dim picked from the
    input's ndim that is dim 0, the sample dim, or settings changed since (a BatchNorm
    switched to training mode, a dim set to 0). Register each with ``with_kwargs=True``:
    it reads the input whether it is passed by position or by keyword."""
    return [
        (module, _sample_dim_guard(describe(name, module), weakref.ref(module)))
        for name, module in model.named_modules()
        if _may_mix(type(module))
    ]


def _sample_dim_guard(where: str, guarded: weakref.ref) -> Callable:
    def refuse_sample_dim(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is not guarded():
            # a copy of the module (copy.deepcopy copies its hooks), made while the
            # context was open: not the model's, and it outlives the context
            return
        # the first input, by position or, as in softmax(input=x), by keyword
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not torch.is_grad_enabled() or not isinstance(x, torch.Tensor):
            return  # an evaluation forward: no backward to attribute
        reason = _mixing_reason(module)
        if reason is not None:
            raise TypeError(
                f"per_sample_grads: {where} {reason} (set after the context was created); "
                "per-sample gradients are undefined through it"
            )
        setting = _dim_setting(module)
        if setting is None:
            return
        what, value, remedy = setting
        if _resolved_dim(value, x.dim()) == 0:
            raise ValueError(
                f"per_sample_grads: {where} {what} acts along dim 0, the sample dim, for "
                f"this {x.dim()}-D input, so it mixes samples and per-sample gradients are "
                f"undefined through it; {remedy}"
            )

    return refuse_sample_dim


def _refuse_unattributable(where: str, module: nn.Module, linear_owners: dict[int, str]) -> None:
    """Raise if ``module`` has trainable parameters of its own that its recorded Linear
    call does not see: all of them, except a :class:`torchbp.nn.Linear`'s weight and bias
    (a subclass's extra parameters, such as a LoRA adapter, reach the loss elsewhere).
    ``linear_owners`` (see :func:`_linear_owners`) names the model's Linear holding such a
    parameter too (an embedding tied to an output layer), which freezing it would freeze.

    Raises:
        TypeError: naming the module and the parameters, with what to do about them.
    """
    linear = isinstance(module, bpnn.Linear)
    named = [
        (n, p)
        for n, p in module.named_parameters(recurse=False)
        if p.requires_grad and not (linear and n in ("weight", "bias"))
    ]
    if not named:
        return
    trainable = [n for n, _ in named]
    ties = "".join(
        f"; {n} is tied to {linear_owners[id(p)]} (the same Parameter): freezing it "
        "freezes that too"
        for n, p in named
        if id(p) in linear_owners
    )
    if type(module) is nn.Linear:
        hint = "convert the model first: torchbp.convert(model)"
    else:
        hint = (
            "only torchbp.nn.Linear parameters can be attributed to samples; freeze "
            "the others with requires_grad_(False)"
        )
    raise TypeError(
        f"per_sample_grads: {where} has trainable parameters ({', '.join(trainable)}) "
        f"whose per-sample gradients torchbp cannot form; {hint}{ties}"
    )


def _linear_owners(model: nn.Module) -> dict[int, str]:
    """``{id(p): "'head' (Linear)'s weight"}`` for the weight and bias of each
    :class:`torchbp.nn.Linear` of ``model`` (the first module holding it)."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, bpnn.Linear):
            for what in ("weight", "bias"):
                p = getattr(module, what)
                if p is not None:
                    owners.setdefault(id(p), f"{describe(name, module)}'s {what}")
    return owners


def _refuse_shared(where: str, owner: dict[int, str], *parameters: nn.Parameter | None) -> None:
    """Record ``where`` as the owner of ``parameters`` in ``owner`` (by id), raising if one
    already has another.

    Raises:
        ValueError: naming both modules.
    """
    for p in parameters:
        if p is None:
            continue
        if id(p) in owner:
            raise ValueError(
                f"per_sample_grads: {where} shares a trainable parameter with "
                f"{owner[id(p)]}, but not both its weight and its bias; Linear modules "
                "may share a trainable parameter only by sharing both (or the weight, with "
                "no bias in either): their calls are then one layer's. Share the other "
                "parameter too, or give each module its own copy"
            )
        owner[id(p)] = where


def _calls_recorded_by(module: bpnn.Linear, layers: list[Layer]) -> Layer | None:
    """The layer among ``layers`` whose Linear has the weight and the bias of ``module``
    (the same Parameters, or no bias), or ``None``: the recorder keys a call by its weight
    and bias, so ``module``'s calls are that layer's calls, summed per sample like several
    calls of one module (the per-sample gradient of a tied weight is the sum of its uses')."""
    return next(
        (
            layer
            for layer in layers
            if layer.module.weight is module.weight and layer.module.bias is module.bias
        ),
        None,
    )


def _refuse_uninitialized(where: str, module: bpnn.Linear) -> None:
    """Raise if a trainable weight or bias of ``module`` is an uninitialized parameter
    (a lazy module before its first forward): it has no shape yet, and no hook can be
    registered on it.

    Raises:
        ValueError: naming the module and the parameters (as torch raises ValueError for
            the use of an uninitialized parameter).
    """
    names = [
        what
        for what in ("weight", "bias")
        if isinstance(getattr(module, what), nn.UninitializedParameter)
        and getattr(module, what).requires_grad
    ]
    if names:
        raise ValueError(
            f"per_sample_grads: {where} has uninitialized parameters ({', '.join(names)}); "
            "run one forward of the model (a dummy batch) to initialize them before "
            "creating the context"
        )


def _refuse_plain_tensors(where: str, module: bpnn.Linear) -> None:
    """Raise if the trainable weight or bias of ``module`` is a tensor that is not an
    :class:`~torch.nn.Parameter`: a plain tensor left in the module by
    ``torch.func.functional_call`` (a module listed twice in the model, on some torch
    versions), one set by a forward pre-hook (the deprecated
    ``torch.nn.utils.weight_norm``), or one assigned after ``del module.weight``. Its
    gradient would reach another leaf than the one the context hooks and accounts for,
    if any (a tensor computed from a Parameter passes its gradient on through the Linear
    backward, which inside the context forms none), so the results would be silently
    wrong. A parametrized weight (``torch.nn.utils.parametrize``) is a tensor formed by
    each forward too: it is refused by the checks of its parametrization's parameters
    (as a weight_norm one is, by its module's ``weight_g`` and ``weight_v``, while they
    are trainable).

    Raises:
        TypeError: naming the module and the attribute, with what to do about it.
    """
    for what in ("weight", "bias"):
        tensor = getattr(module, what)
        if tensor is None or not tensor.requires_grad or isinstance(tensor, nn.Parameter):
            continue
        if parametrize.is_parametrized(module, what):
            continue
        raise TypeError(
            f"per_sample_grads: {where}'s {what} is a {type(tensor).__name__} that requires "
            f"grad but is not an nn.Parameter (left by torch.func.functional_call on a module "
            f"listed twice in the model, set by a forward pre-hook such as the deprecated "
            f"torch.nn.utils.weight_norm's, or assigned after del module.{what}?); the "
            f"context accounts for Parameters only: put a Parameter back (module.{what} = "
            f"nn.Parameter(...)), or freeze the tensor with requires_grad_(False)"
        )


def _refuse_frozen_parametrizations(where: str, module: bpnn.Linear) -> None:
    """Raise if ``module``, a Linear with a trainable parameter, has a parametrized bias
    (``torch.nn.utils.parametrize``) whose parametrizations are all frozen: the tensor is
    formed anew by every forward, so no call of the module has the parameters its calls
    are recorded by (a parametrization with trainable parameters is refused by name as the
    module holding them). A frozen parametrized weight alone is served: the calls are
    matched by the trainable bias, whose per-sample gradient needs no weight (see
    :attr:`Layer.weight_formed_per_call`).

    Raises:
        TypeError: naming the module and the parametrized tensors, with the way out.
    """
    if not parametrize.is_parametrized(module):
        return
    if any(p.requires_grad for p in module.parametrizations.parameters()):
        return
    names = [what for what in ("weight", "bias") if parametrize.is_parametrized(module, what)]
    if names == ["weight"]:
        return
    raise TypeError(
        f"per_sample_grads: {where} has a parametrized {' and '.join(names)} "
        "(torch.nn.utils.parametrize), formed anew by every forward, frozen or not, so its "
        "calls cannot be matched to the layer; remove the parametrization for the "
        "per-sample step (parametrize.remove_parametrizations(module, "
        f"{names[0]!r}, leave_parametrized=True))"
    )


def _refuse_unusual_shapes(where: str, module: bpnn.Linear) -> None:
    """Raise if ``module`` has a trainable parameter and a weight that is not 2-D (a 1-D
    weight, which linear calls as a ``(1, in)`` copy), or a trainable bias of another
    shape than ``(out_features,)`` (a ``(1,)``, 0-dim or ``(1, out)`` bias, which the
    linear call broadcasts): the per-sample formulas take ``G_i = Σ_t g_it a_itᵀ`` of
    shape ``(out, in)`` and ``β_i = Σ_t g_it`` of shape ``(out,)``.

    Raises:
        ValueError: naming the module and the parameter's shape.
    """
    weight, bias = module.weight, module.bias
    trainable_bias = bias is not None and bias.requires_grad
    if weight.dim() != 2 and (weight.requires_grad or trainable_bias):
        raise ValueError(
            f"per_sample_grads: {where} has a {weight.dim()}-D weight of shape "
            f"{tuple(weight.shape)}; per-sample gradients are formed for a Linear with a "
            "2-D (out_features, in_features) weight only"
        )
    if trainable_bias and tuple(bias.shape) != (weight.shape[0],):
        out_features = weight.shape[0]
        raise ValueError(
            f"per_sample_grads: {where} has a trainable bias of shape {tuple(bias.shape)}, "
            f"broadcast to its {out_features} outputs; per-sample gradients are formed for "
            f"a bias of shape ({out_features},) only: give it that shape, or freeze it"
        )


def _sequence_first_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` for the modules of ``model`` that run sequence-first: a
    Transformer encoder or decoder layer built with ``batch_first=False`` (which it
    keeps in its attention, ``self_attn.batch_first``)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _SEQUENCE_FIRST_CAPABLE)
        and getattr(getattr(module, "self_attn", None), "batch_first", True) is False
    }


def _refuse_sequence_first(where: str, name: str, sequence_first: dict[str, nn.Module]) -> None:
    """Raise if the trainable Linear named ``name`` is inside a module of
    ``sequence_first`` (see :func:`_sequence_first_modules`): its inputs are ``(T, B, ·)``,
    so dim 0, which the context takes for the sample, is the position; with ``T == B``
    every result would be per position, silently.

    Raises:
        TypeError: naming the Linear and the module it is in.
    """
    parts = name.split(".")
    for enclosing in (".".join(parts[:i]) for i in range(len(parts))):
        if enclosing in sequence_first:
            outer = describe(enclosing, sequence_first[enclosing])
            raise TypeError(
                f"per_sample_grads: {where} is inside {outer}, built with batch_first=False: "
                "its inputs are sequence-first (T, B, ...), so their dim 0 is the position, "
                "not the sample, and per-sample gradients would be per position; build it "
                "with batch_first=True and give it (B, T, ...) inputs"
            )


def _refuse_attention_projection(where: str, module: nn.Module) -> None:
    """Raise if ``module`` is an :class:`~torch.nn.MultiheadAttention` whose ``out_proj``
    has a trainable parameter: its forward passes ``out_proj.weight`` and ``.bias`` to
    ``F.multi_head_attention_forward``, never calling the Linear module. That calls
    ``linear`` on them with the attention output flattened sequence-first to
    ``(T·B, E)``: a native op whose gradient reaches the parameters unrecorded, or, under
    :func:`torchbp.enable`, torchbp's linear, whose rows are then (position, sample)
    pairs, not samples (norms of shape ``(T·B,)``, silently).

    Raises:
        TypeError: naming the attention module.
    """
    if not isinstance(module, nn.MultiheadAttention):
        return
    if any(p.requires_grad for p in module.out_proj.parameters()):
        raise TypeError(
            f"per_sample_grads: {where} has a trainable out_proj, whose weight and bias "
            "its forward passes to F.multi_head_attention_forward, not through the Linear "
            "module: linear runs there on the output flattened to (T*B, E), whose rows are "
            "not samples, so their per-sample gradients cannot be recorded; freeze it "
            "(out_proj.requires_grad_(False)) or the whole attention"
        )


def _refuse_complex(where: str, **parameters: nn.Parameter | None) -> None:
    """Raise if a trainable Linear parameter is complex: its gradient is ``gᵀ conj(x)``
    and its squared norm ``|G|²``, where the per-sample formulas are the real ones.

    Raises:
        TypeError: naming the module and the parameters.
    """
    names = [n for n, p in parameters.items() if p is not None and p.is_complex()]
    if names:
        raise TypeError(
            f"per_sample_grads: {where} has complex trainable parameters ({', '.join(names)}); "
            "per-sample gradients, norms and clipping are formed for real parameters only"
        )


def _refuse_distributed_data_parallel(model: nn.Module) -> None:
    """Refuse a model that is, or holds, a ``DistributedDataParallel``: its gradient
    all-reduce runs in autograd hooks that see no gradient inside the context (the context
    forms ``p.grad`` after the backward), so the replicas' gradients would silently stay
    unaveraged."""
    for name, module in model.named_modules():
        if isinstance(module, nn.parallel.DistributedDataParallel):
            raise TypeError(
                f"per_sample_grads: {describe(name, module)} all-reduces gradients in "
                "autograd hooks, which see no gradient inside the context (it forms p.grad "
                "after the backward), so the processes' gradients would not be averaged: "
                "pass the wrapped module (ddp.module), run the step under ddp.no_sync(), "
                "and all-reduce p.grad after the context"
            )


def _refuse_data_parallel_replicas(model: nn.Module) -> None:
    """Refuse a model that is, or holds, an ``nn.DataParallel`` over several devices: each
    forward scatters the batch and runs it through replicas of the module on threads of
    their own, whose Linear calls carry copies of the parameters, which the context cannot
    record (the gradient reaching the parameters through the copies would be refused at
    the backward as one from an unrecorded op). One over a single device, or none (a CPU
    run), calls the module itself and is served."""
    for name, module in model.named_modules():
        if isinstance(module, nn.DataParallel) and len(module.device_ids) > 1:
            raise TypeError(
                f"per_sample_grads: {describe(name, module)} runs replicas of its module on "
                f"{len(module.device_ids)} devices, whose Linear calls carry copies of the "
                "parameters, so their per-sample contributions cannot be recorded: pass "
                "the wrapped module (dp.module) and call it on one device, or use "
                "DistributedDataParallel's module, one process per device"
            )


def attributable_layers(model: nn.Module) -> list[Layer]:
    """The model's Linear layers with trainable parameters, in module order.

    Raises:
        TypeError: the model is or holds a ``DistributedDataParallel`` or an
            ``nn.DataParallel`` over several devices, a module mixes
            samples, a trainable Linear is inside a Transformer
            layer built with ``batch_first=False``, a module has trainable parameters
            that are not a :class:`torchbp.nn.Linear`'s, or is a Linear with complex trainable
            parameters, a trainable weight or bias that is not an ``nn.Parameter``, or a
            trainable parameter and a parametrized bias (named in the message).
        ValueError: a trainable parameter is shared by two Linear modules that do not
            share both their weight and their bias (a module sharing both is not a layer
            of its own: its calls are recorded for the first one's), or a Linear's
            trainable parameter is uninitialized (a lazy module before its first forward)
            or it has a trainable parameter and a weight that is not 2-D or a trainable
            bias not of shape ``(out_features,)`` (named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"per_sample_grads: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    _refuse_distributed_data_parallel(model)
    _refuse_data_parallel_replicas(model)
    layers: list[Layer] = []
    owner: dict[int, str] = {}
    linear_owners = _linear_owners(model)
    sequence_first = _sequence_first_modules(model)
    for name, module in model.named_modules():
        where = describe(name, module)
        if isinstance(module, bpnn.LinearCrossEntropyLoss):
            raise TypeError(
                f"per_sample_grads: {where} is not supported: the fused linear + "
                "cross-entropy never forms the per-sample logit gradients; use "
                "torchbp.nn.Linear followed by torchbp.nn.CrossEntropyLoss instead"
            )
        reason = _mixing_reason(module)
        if reason is not None:
            raise TypeError(
                f"per_sample_grads: {where} {reason}; per-sample gradients are undefined "
                f"through it (remove it, or {_mixing_remedy(module)})"
            )
        # first: a Linear's own extra parameters explain a weight that is not one of them
        # (torch.nn.utils.weight_norm's, formed from weight_g and weight_v)
        _refuse_unattributable(where, module, linear_owners)
        _refuse_attention_projection(where, module)
        if isinstance(module, bpnn.Linear) and _has_trainable(module):
            _refuse_sequence_first(where, name, sequence_first)
            _refuse_frozen_parametrizations(where, module)
        recording = _calls_recorded_by(module, layers) if isinstance(module, bpnn.Linear) else None
        if recording is not None:
            recording.tied.append((name, module))
        elif isinstance(module, bpnn.Linear):
            _refuse_uninitialized(where, module)
            _refuse_plain_tensors(where, module)
            _refuse_unusual_shapes(where, module)
            weight, bias = _trainable(module.weight), _trainable(module.bias)
            _refuse_complex(where, weight=weight, bias=bias)
            _refuse_shared(where, owner, weight, bias)
            if weight is not None or bias is not None:
                layers.append(Layer(name, module, weight, bias))
    return layers


def trainability(model: nn.Module) -> list[tuple[str, nn.Parameter, bool]]:
    """``(name, parameter, requires_grad)`` for every parameter of ``model``."""
    return [(name, p, p.requires_grad) for name, p in model.named_parameters()]


def refuse_changed_parameters(
    model: nn.Module, snapshot: list[tuple[str, nn.Parameter, bool]]
) -> None:
    """Raise, naming it, if a parameter of ``model`` was replaced, added, frozen or made
    trainable since :func:`trainability` took ``snapshot``: the layers accounted for were
    picked by it.

    Raises:
        RuntimeError: a parameter differs from the snapshot's.
    """
    now = dict(model.named_parameters())
    hint = "it accounts for the parameters of the model at its creation"
    for name, p, requires_grad in snapshot:
        if now.pop(name, None) is not p:
            raise RuntimeError(
                f"per_sample_grads: parameter {name!r} was replaced or removed since the "
                f"context was created; {hint}: change the model before creating it"
            )
        if p.requires_grad != requires_grad:
            change = "frozen" if requires_grad else "made trainable"
            raise RuntimeError(
                f"per_sample_grads: parameter {name!r} was {change} (requires_grad="
                f"{p.requires_grad}) since the context was created; {hint}: set "
                "requires_grad before creating it"
            )
    for name in now:
        raise RuntimeError(
            f"per_sample_grads: parameter {name!r} was added since the context was created; "
            f"{hint}: change the model before creating it"
        )
