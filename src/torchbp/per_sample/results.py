"""The context's results, formed from one backward's recordings: ``B``, the per-sample
norms, the clip factors, ``p.grad_sample``, the statistics and each ``p.grad``.

:func:`form_results` forms every result before any is written (an error midway, such as
running out of memory for one layer's ``p.grad_sample``, leaves every ``p.grad`` as it
was); :meth:`Results.write` then writes them, which allocates nothing and cannot fail.
The per-layer math is :mod:`torchbp.per_sample.formulas`'.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from torchbp.per_sample import formulas, memory
from torchbp.per_sample.model_check import Layer

__all__ = ["Results", "form_results", "gradient_dtype", "refuse_unwritable_grad"]


@dataclass
class Results:
    """What one backward's recordings give, formed and not yet written.

    ``attributes`` holds ``(p, name, value)`` for ``p.grad_sample`` and the statistics;
    ``grads`` holds ``(p, value, in_place)``: add ``value`` to ``p.grad`` in place, or
    set ``p.grad`` to it.
    """

    batch: int
    norms: torch.Tensor
    factors: torch.Tensor | None
    attributes: list[tuple[nn.Parameter, str, torch.Tensor]]
    grads: list[tuple[nn.Parameter, torch.Tensor, bool]]

    def write(self) -> None:
        """Set the attributes and ``p.grad`` (an in-place add was checked when formed)."""
        for p, name, value in self.attributes:
            setattr(p, name, value)
        for p, value, in_place in self.grads:
            if in_place:
                p.grad.add_(value)
            else:
                p.grad = value


def form_results(
    layers: list[Layer],
    *,
    mode: str,
    max_norm: float | None,
    statistics: bool,
    accounted: set[int],
    forms_param_grads: bool,
) -> Results:
    """Form the results of the layers' recorded traces (taken off the layers as used).

    A stale ``p.grad_sample`` or statistic of an earlier context is set to None first
    (see :func:`_reset`), to free it before the new ones are formed.

    Args:
        layers: the context's layers, in module order.
        mode: ``"norms"``, ``"grads"`` or ``"clip"``.
        max_norm: ``C`` in clip mode.
        statistics: also form ``p.sum_grad_squared`` and ``p.grad_variance``.
        accounted: the ids of the parameters whose contribution counts (the ones the
            backward reached, when it forms ``p.grad``).
        forms_param_grads: whether ``p.grad`` receives the gradients.

    Raises:
        RuntimeError: the recorded inputs disagree on ``B``, or a ``p.grad`` refuses an
            in-place add (both named).
    """
    parameters = [p for layer in layers for p in layer.parameters()]
    batch = _common_batch(layers)
    traces = {id(layer): _joined(layer) for layer in layers if layer.traces}
    norms = _sample_norms(layers, traces, batch, accounted)
    clip = mode == "clip"
    # c_i = min(1, C / ‖grad_i‖)   (a zero norm gets 1)
    factors = formulas.clip_factors(norms, max_norm) if clip else None
    # free the last step's results before forming new ones, and drop those this
    # context does not form (a stale p.grad_sample of an earlier grads-mode step
    # would be read as this step's, and keep B×|θ| alive)
    _reset(parameters, ("grad_sample",), formed=mode == "grads")
    _reset(parameters, ("sum_grad_squared", "grad_variance"), formed=statistics)
    needs_sums = statistics or (forms_param_grads and not clip)
    results = Results(batch, norms, factors, attributes=[], grads=[])
    # Output side first, as the backward would: each layer's recording is dropped
    # once used, so the big early-layer gradients meet few recordings still held.
    for layer in reversed(layers):
        trace = traces.pop(id(layer), None)
        layer.traces.clear()
        sums = None
        if trace is not None and needs_sums:
            # the variance needs Σ_i G_i in float32 at least (see _statistics)
            dtype = formulas.norm_dtype(trace[1].dtype) if statistics else None
            sums = _grad_sums(layer, *trace, dtype=dtype)
        if mode == "grads":
            results.attributes += _samples(layer, trace, batch, accounted)
        if statistics:
            results.attributes += _statistics(layer, trace, sums, batch, accounted)
        if forms_param_grads and trace is not None:
            layer_grads = _clipped_sums(layer, *trace, factors) if clip else sums
            results.grads += _accumulations(layer, layer_grads, accounted)
    return results


def gradient_dtype(p: nn.Parameter) -> torch.dtype:
    """The dtype autograd gives a new ``p.grad``: ``p.grad_dtype`` where set to one
    (torch's option to keep, say, float32 gradients of a bfloat16 parameter, which refuses
    any other dtype; not in every torch version), else ``p.dtype``."""
    grad_dtype = getattr(p, "grad_dtype", None)
    return p.dtype if grad_dtype is None else grad_dtype


def refuse_unwritable_grad(p: nn.Parameter, name: str, action: str) -> None:
    """Raise, naming ``p`` (``name``), if its ``p.grad`` refuses an in-place add, to
    ``action``.

    Raises:
        RuntimeError: ``p.grad`` is sparse, expanded or an inference tensor.
    """
    reason = _in_place_refusal(p.grad)
    if reason is not None:
        raise RuntimeError(
            f"per_sample_grads: p.grad of {name} is {reason}, which cannot "
            f"be written in place to {action}; set it to None or to a plain tensor "
            "(p.grad = p.grad.clone()) first"
        )


def _common_batch(layers: list[Layer]) -> int:
    """``B``, the size of dim 0 of every recorded Linear input.

    Raises:
        RuntimeError: the inputs disagree, naming the layers that saw each size.
    """
    layers_by_batch: dict[int, list[str]] = {}
    for layer in layers:
        for size in dict.fromkeys(g.shape[0] for _, g in layer.traces):
            layers_by_batch.setdefault(size, []).append(repr(layer.name))
    if len(layers_by_batch) == 1:
        return next(iter(layers_by_batch))
    where = "; ".join(
        f"{size} at Linear {', '.join(names)}" for size, names in sorted(layers_by_batch.items())
    )
    raise RuntimeError(
        "per_sample_grads: the recorded Linear inputs disagree on the sample dim "
        f"(sizes {sorted(layers_by_batch)}): {where}; dim 0 of every Linear input must "
        "be the sample (a tensor shared by the samples, of batch 1, cannot go through a "
        "trainable Linear)"
    )


def _sample_norms(
    layers: list[Layer], traces: dict, batch: int, accounted: set[int]
) -> torch.Tensor:
    """``‖grad_i‖ = (Σ_layers ‖G_i‖² + ‖β_i‖²)^½`` over the parameters whose ids are
    ``accounted``, shape ``(B,)``, in the widest layer's
    :func:`~torchbp.per_sample.formulas.norm_dtype` (a float64 head on a float32 body
    gives float64 norms), on the device of the first recorded layer in module order:
    each layer's are formed on its own device and gathered there (a model split
    across devices).

    On the CPU from the squares as they are, and again scaled
    (:func:`~torchbp.per_sample.formulas.layer_norms`) if a norm came out inf or NaN
    (float32's squares overflow from norms of 1.8e19 on, and inf·0 made a zero
    gradient's norm NaN); elsewhere scaled at once, since telling would wait for the
    device. Scaled norms are right wherever they fit their dtype."""
    gs = [g for _, g in traces.values()]
    dtype = functools.reduce(torch.promote_types, (formulas.norm_dtype(g.dtype) for g in gs))
    device = gs[0].device
    scaled = device.type != "cpu"
    norms = _combined_norms(layers, traces, batch, accounted, dtype, device, scaled)
    if not scaled and not bool(norms.isfinite().all()):
        norms = _combined_norms(layers, traces, batch, accounted, dtype, device, scaled=True)
    return norms


def _combined_norms(
    layers: list[Layer],
    traces: dict,
    batch: int,
    accounted: set[int],
    dtype: torch.dtype,
    device: torch.device,
    scaled: bool,
) -> torch.Tensor:
    """The layers' norms (see :func:`_sample_norms`), combined on ``device``."""
    layer_norms = [torch.zeros(batch, dtype=dtype, device=device)]
    for layer in layers:
        if id(layer) not in traces:
            continue
        weight, bias = (_is_in(p, accounted) for p in (layer.weight, layer.bias))
        if weight or bias:
            a, g = traces[id(layer)]
            norms = formulas.layer_norms(a, g, weight=weight, bias=bias, scaled=scaled)
            layer_norms.append(norms.to(device, dtype))
    # ‖grad_i‖ = ‖(‖grad_i^(1)‖, ‖grad_i^(2)‖, ...)‖ over the layers
    return formulas.combined_norms(torch.stack(layer_norms), dim=0, scaled=scaled)


def _samples(layer: Layer, trace, batch: int, accounted: set[int]) -> list:
    """``(p, "grad_sample", value)`` for the layer's parameters: zeros for one whose id
    is not ``accounted`` (the backward contributed nothing to it)."""
    samples = []
    for p, is_weight in ((layer.weight, True), (layer.bias, False)):
        if p is None:
            continue
        if trace is None or id(p) not in accounted:
            value = memory.zeros((batch, *p.shape), like=p)
        elif is_weight:
            value = formulas.weight_grad_samples(*trace)
        else:
            value = formulas.bias_grad_samples(trace[1])
        samples.append((p, "grad_sample", value))
    return samples


def _statistics(layer: Layer, trace, sums, batch: int, accounted: set[int]) -> list:
    """``(p, name, value)`` for ``p.sum_grad_squared`` and ``p.grad_variance`` of the
    layer's parameters, formed from the sums (in :func:`formulas.norm_dtype`) and
    stored in the parameter's dtype; zeros for a parameter whose id is not
    ``accounted``."""
    statistics = []
    for p, is_weight in ((layer.weight, True), (layer.bias, False)):
        if p is None:
            continue
        if trace is None or id(p) not in accounted:
            sum_squared, total = p.new_zeros(p.shape), p.new_zeros(p.shape)
        elif is_weight:
            sum_squared, total = formulas.weight_sum_grad_squared(*trace), sums[0]
        else:
            sum_squared, total = formulas.bias_sum_grad_squared(trace[1]), sums[1]
        variance = formulas.variance(sum_squared, total, batch)
        statistics.append((p, "sum_grad_squared", sum_squared.to(p.dtype)))
        statistics.append((p, "grad_variance", variance.to(p.dtype)))
    return statistics


def _accumulations(layer: Layer, layer_grads: tuple, accounted: set[int]) -> list[tuple]:
    """:func:`_accumulation` of the layer's ``(dW, db)`` (maybe wider than the parameters,
    cast to their :func:`gradient_dtype`) for each parameter whose id is ``accounted``."""
    return [
        _accumulation(p, grad.to(gradient_dtype(p)), layer.parameter_name(what))
        for p, what, grad in zip((layer.weight, layer.bias), ("weight", "bias"), layer_grads)
        if _is_in(p, accounted)
    ]


def _accumulation(p: nn.Parameter, grad: torch.Tensor, name: str) -> tuple:
    """How ``grad`` joins ``p.grad``, as autograd's accumulation does, decided and
    formed before any ``p.grad`` is written: ``(p, grad, True)`` to add it in place to
    the strided ``p.grad`` there, ``(p, value, False)`` to set ``p.grad`` to ``value``:
    ``grad`` laid out like ``p`` where there is none (autograd's gradient layout
    contract), the dense sum where ``p.grad`` is sparse.

    Raises:
        RuntimeError: ``p.grad`` refuses an in-place add (an expanded or an inference
            tensor, which autograd's accumulation fails on too), naming ``p`` (``name``).
    """
    if p.grad is None:
        return p, _laid_out_like(p, grad), False
    if p.grad.layout != torch.strided:
        return p, grad + p.grad, False
    refuse_unwritable_grad(p, name, "add this backward's gradient to it")
    return p, grad, True


def _grad_sums(layer: Layer, a, g, dtype: torch.dtype | None = None) -> tuple:
    """``(dL/dW, dL/db)`` of the recorded backward (``None`` for a frozen one), formed in
    ``dtype`` (default: ``g``'s)."""
    weight = None if layer.weight is None else formulas.weight_grad_sum(a, g, dtype)
    bias = None if layer.bias is None else formulas.bias_grad_sum(g, dtype)
    return weight, bias


def _clipped_sums(layer: Layer, a, g, factors: torch.Tensor) -> tuple:
    """``(Σ_i c_i G_i, Σ_i c_i β_i)`` (``None`` for a frozen one), in
    :func:`formulas.norm_dtype`: small output gradients times small factors fall below
    float16's normal range (6e-5), where ``c_i g_i`` would keep a few bits."""
    dtype = formulas.norm_dtype(g.dtype)
    # (the factors are on the norms' device, which may not be this layer's)
    scaled = formulas.scale_samples(g.to(dtype), factors.to(g.device))
    return _grad_sums(layer, a, scaled, dtype)


def _reset(parameters, names: tuple[str, ...], *, formed: bool) -> None:
    """Set the result attributes ``names`` of ``parameters`` to None: on every parameter
    where this context forms them anew (``formed``), else only where an earlier context
    left a value (no attribute is added)."""
    for p in parameters:
        for name in names:
            if formed or getattr(p, name, None) is not None:
                setattr(p, name, None)


def _joined(layer: Layer):
    """The layer's traces as one ``(a, g)``: every forward call's positions side by side.

    Several calls' are taken off the layer, so that each call's own ``a`` and ``g`` are
    freed once joined (every ``a`` before the ``g`` are): a layer called several times
    (tied Linears included) holds a copy beyond its recording only while one side is
    joined, not through the norms and the rest of the results."""
    if len(layer.traces) == 1:
        return layer.traces[0]
    a_parts, g_parts = [a for a, _ in layer.traces], [g for _, g in layer.traces]
    layer.traces.clear()
    a = None if a_parts[0] is None else _cat_releasing(a_parts)
    return a, _cat_releasing(g_parts)


def _cat_releasing(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` concatenated along the positions (dim 1); the list is emptied, dropping
    its references to them."""
    joined = torch.cat(parts, 1)
    parts.clear()
    return joined


def _laid_out_like(p: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with the strides of ``p`` where ``p`` is dense and not overlapping (a
    weight stored transposed), as autograd stores a new gradient; else ``grad``. In
    ``grad``'s dtype (``p.grad_dtype``, which may differ from ``p.dtype``)."""
    if grad.stride() == p.stride():
        return grad
    # p's strides, where they are dense and not overlapping
    out = torch.empty_like(p, dtype=grad.dtype)
    return grad if out.stride() == grad.stride() else out.copy_(grad)


def _in_place_refusal(grad: torch.Tensor) -> str | None:
    """Why an in-place add into ``grad`` would raise (torch's own checks: a layout other
    than strided, an inference tensor outside inference mode, elements sharing memory),
    or ``None``."""
    if grad.layout != torch.strided:
        return f"a {grad.layout} tensor"
    if grad.is_inference():
        return "an inference tensor (made under torch.inference_mode)"
    if any(stride == 0 and size > 1 for stride, size in zip(grad.stride(), grad.shape)):
        return "an expanded tensor (its elements share memory)"
    return None


def _is_in(p: nn.Parameter | None, ids: set[int]) -> bool:
    return p is not None and id(p) in ids
