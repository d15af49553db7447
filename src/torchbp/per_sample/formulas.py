"""Per-sample quantities of one affine layer ``y = x Wᵀ + b`` from what its backward sees.

Every function takes the layer's recorded trace: ``a`` (the input, ``(B, T, in)``, or
``None`` when ``W`` is frozen) and ``g = dL/dy`` (``(B, T, out)``), where ``B`` is the
sample dim and ``T`` collects every other leading dim (and every reuse of the layer in
one forward). Sample ``i``'s contribution to the gradients is

    ``G_i = Σ_t g_it a_itᵀ``  (out, in)        ``β_i = Σ_t g_it``  (out,)

so ``Σ_i G_i = dL/dW`` and ``Σ_i β_i = dL/db``. With ``T = 1`` (2-D inputs) ``G_i`` is the
outer product ``g_i a_iᵀ``, whose Frobenius norm is ``‖g_i‖·‖a_i‖``: nothing of size
``out × in`` per sample is ever formed for norms or clipping.
"""

from __future__ import annotations

import torch

from torchbp.per_sample import memory

# Elements of one chunk of materialised per-sample weight gradients (B_chunk, out, in), or
# of the Gram matrices (B_chunk, T, T) of both sides: 2**22 float32 numbers are 16 MiB,
# enough to keep each bmm efficient.
_CHUNK_ELEMENTS = 1 << 22


def _sample_chunks(batch: int, per_sample: int):
    """Slices of the sample dim whose ``per_sample`` elements each (materialised gradients,
    Gram matrices) stay under the chunk budget."""
    step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
    for start in range(0, batch, step):
        yield slice(start, min(start + step, batch))


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the norms, and of the sums of squares of the statistics: float32 at
    least, since ``‖g_i‖²‖a_i‖²`` overflows float16 (max 65504) on unnormalised inputs."""
    return torch.promote_types(dtype, torch.float32)


def squared_norm_dtype(dtype: torch.dtype, device: torch.device, *, wide: bool) -> torch.dtype:
    """The dtype squared norms are formed and summed in: :func:`norm_dtype`, or with
    ``wide`` float64 (but on MPS, which has none). In float32 ``‖g_i‖²‖a_i‖²`` overflows
    once the norm passes 1.8e19, and a sample's ``‖a_i‖²`` alone can overflow while its
    ``g_i`` is 0 (an ignored target, a saturated activation): inf·0 = NaN, which would
    reach every ``p.grad`` through the clip factor."""
    if wide and device.type != "mps":
        return torch.float64
    return norm_dtype(dtype)


def gram_is_cheaper(t: int, in_features: int, out_features: int) -> bool:
    """Whether ``‖G_i‖²`` is cheaper through the two T×T Gram matrices than by forming
    ``G_i``: ``T²(in + out)`` against ``T·in·out`` multiply-adds per sample."""
    return t * (in_features + out_features) <= in_features * out_features


def weight_squared_norms(a: torch.Tensor, g: torch.Tensor, *, wide: bool = False) -> torch.Tensor:
    """``‖G_i‖_F²`` for every sample, shape ``(B,)``, in :func:`squared_norm_dtype`, of
    ``(B, T, ·)`` traces with ``T > 1`` (:func:`layer_squared_norms` forms ``T = 1``
    from the row norms). ``wide``: from samples scaled to at most 1, which no overflow
    of the Gram matrices or of ``G_i`` can turn into inf or NaN where ``‖G_i‖`` fits."""
    batch, t, in_features = a.shape
    out_features = g.shape[-1]
    dtype = norm_dtype(g.dtype)
    out = a.new_empty(batch, dtype=squared_norm_dtype(g.dtype, g.device, wide=wide))
    gram = gram_is_cheaper(t, in_features, out_features)
    per_sample = 2 * t * t if gram else in_features * out_features
    # a chunk of samples at a time, under the chunk budget
    for rows in _sample_chunks(batch, per_sample):
        # G_i is bilinear in (g_i, a_i): ‖G_i‖² = (s_i r_i)² ‖Ĝ_i‖², Ĝ_i the G_i of
        # â_i = a_i / s_i and ĝ_i = g_i / r_i (s_i = r_i = 1 unless wide)
        chunk_a, scale_a = _scaled_samples(a[rows].to(dtype), wide)
        chunk_g, scale_g = _scaled_samples(g[rows].to(dtype), wide)
        if gram:
            scaled = _gram_squared_norms(chunk_a, chunk_g)
        else:
            # Ĝ_i = ĝ_iᵀ â_i  (out, T) @ (T, in), in float32 at least (a float16 sum over
            # T positions overflows where ‖G_i‖ fits)
            scaled = torch.bmm(chunk_g.transpose(1, 2), chunk_a).square().sum((1, 2))
        if not wide:
            out[rows] = scaled
            continue
        scales = scale_a.to(out.dtype) * scale_g.to(out.dtype)
        out[rows] = scales.square_().mul_(scaled.to(out.dtype))
    return out


def _scaled_samples(t: torch.Tensor, wide: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(t_i / s_i, s_i)`` with ``s_i`` the largest magnitude of sample ``t_i`` (1 for an
    all-zero or empty sample), so that every element of ``t_i / s_i`` is at most 1 in
    magnitude; ``(t, None)`` unless ``wide``."""
    if not wide:
        return t, None
    if t.shape[1] * t.shape[2] == 0:
        return t, t.new_ones(t.shape[0])  # (amax refuses an empty reduction)
    scale = t.abs().amax((1, 2))
    scale = torch.where(scale > 0, scale, 1.0)
    return t / scale[:, None, None], scale


def _gram_squared_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``‖G_i‖_F²`` of the samples of ``a``, ``g`` through their T×T Gram matrices."""
    # ‖Σ_t g_it a_itᵀ‖_F² = Σ_{t,s} (a_i a_iᵀ)_ts (g_i g_iᵀ)_ts
    gram_a = torch.bmm(a, a.transpose(1, 2))
    gram_g = torch.bmm(g, g.transpose(1, 2))
    # terms of both signs: when the positions nearly cancel, rounding can leave the
    # sum slightly below its true value ≥ 0 (whose square root would be nan)
    return (gram_a * gram_g).sum((1, 2)).clamp_(min=0)


def _row_norms(t: torch.Tensor, wide: bool) -> torch.Tensor:
    """``‖t_i‖`` over all but the sample dim, without a squared copy of ``t``, in
    :func:`squared_norm_dtype` (torch's float32 norm overflows once it passes 1.8e19)."""
    dtype = squared_norm_dtype(t.dtype, t.device, wide=wide)
    return torch.linalg.vector_norm(t, dim=(1, 2), dtype=dtype)


def bias_squared_norms(g: torch.Tensor, *, wide: bool = False) -> torch.Tensor:
    """``‖β_i‖²`` for every sample, shape ``(B,)``, in :func:`squared_norm_dtype`, of a
    ``(B, T, out)`` trace with ``T > 1`` (:func:`layer_squared_norms` forms ``T = 1``
    from the row norms)."""
    # β_i = Σ_t g_it, summed in float32 at least (float16 overflows where ‖β_i‖ fits)
    return g.sum(1, dtype=squared_norm_dtype(g.dtype, g.device, wide=wide)).square().sum(1)


def layer_squared_norms(
    a: torch.Tensor | None, g: torch.Tensor, *, weight: bool, bias: bool, wide: bool = False
) -> torch.Tensor:
    """``‖G_i‖² + ‖β_i‖²``, counting the ones flagged by ``weight`` and ``bias``, for every
    sample, shape ``(B,)``, in :func:`squared_norm_dtype` (``wide``: in float64, from
    samples scaled to at most 1 for ``T > 1``, so that nothing overflows where the norm
    fits; a few passes more over the layer's data)."""
    if g.shape[1] == 1:
        g2 = _row_norms(g, wide).square_()
        if not weight:
            # ‖β_i‖² = ‖g_i‖²
            return g2
        a2 = _row_norms(a, wide).square_()
        # ‖g_i a_iᵀ‖² + ‖g_i‖² = ‖g_i‖² (‖a_i‖² + 1): two passes over the layer's data
        return g2.mul_(a2.add_(1.0) if bias else a2)
    total = (
        weight_squared_norms(a, g, wide=wide)
        if weight
        else g.new_zeros(g.shape[0], dtype=squared_norm_dtype(g.dtype, g.device, wide=wide))
    )
    return total.add_(bias_squared_norms(g, wide=wide)) if bias else total


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``c_i = min(1, max_norm / norms_i)``, in ``norms``' dtype: 1 for a norm at most
    ``max_norm`` (a zero norm included, also where ``max_norm`` rounds to 0 in that dtype
    and ``max_norm / 0`` would be NaN), NaN for a NaN norm (never taken for a small one:
    the sample's gradient would enter ``p.grad`` unclipped), 0 for an infinite one while
    ``max_norm`` is finite in that dtype (a ``max_norm`` beyond float32's range, say 1e39,
    is inf there: every norm is at most it, factor 1)."""
    return torch.where(norms <= max_norm, 1.0, (max_norm / norms).clamp_(max=1.0))


def scale_samples(g: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``c_i g_i``: with it, :func:`weight_grad_sum` and :func:`bias_grad_sum` give the
    clipped sums ``Σ_i c_i G_i = (c ⊙ g)ᵀ a`` and ``Σ_i c_i β_i``, one matmul a layer."""
    # G_i is linear in g_i: c_i G_i = Σ_t (c_i g_it) a_itᵀ
    return g * factors.to(g.dtype)[:, None, None]


def weight_grad_samples(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Every ``G_i``, shape ``(B, out, in)`` (in huge pages when large: ``memory``)."""
    out = memory.empty((a.shape[0], g.shape[-1], a.shape[-1]), like=g)
    if a.shape[1] == 1:
        # G_i = g_i a_iᵀ: an outer product per sample, one broadcast multiply
        return torch.mul(g[:, 0, :, None], a[:, 0, None, :], out=out)
    # G_i = g_iᵀ a_i   (out, T) @ (T, in)
    return torch.bmm(g.transpose(1, 2), a, out=out)


def bias_grad_samples(g: torch.Tensor) -> torch.Tensor:
    """Every ``β_i``, shape ``(B, out)``."""
    # β_i = Σ_t g_it
    return g.sum(1)


def weight_sum_grad_squared(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``Σ_i G_i ⊙ G_i`` (element-wise square), shape ``(out, in)``, in :func:`norm_dtype`
    (squares overflow float16 early)."""
    batch, t, in_features = a.shape
    out_features = g.shape[-1]
    dtype = norm_dtype(g.dtype)
    if t == 1:
        # Σ_i (g_i a_iᵀ)² = Σ_i g_i² (a_i²)ᵀ = Σ_i (s_i g_i)² (â_i²)ᵀ, â_i = a_i / s_i with
        # s_i a_i's largest magnitude: a_i² alone can overflow float32 while g_i = 0
        # (inf·0 = NaN); s_i g_i overflows only where G_i's largest element does
        scaled_a, scale = _scaled_samples(a.to(dtype), wide=True)
        scaled_g = g[:, 0].to(dtype) * scale[:, None]
        return scaled_g.square().t() @ scaled_a[:, 0].square()
    total = a.new_zeros(out_features, in_features, dtype=dtype)
    for rows in _sample_chunks(batch, in_features * out_features):
        # G_i = g_iᵀ a_i, squared and summed over the chunk's samples
        chunk_a, chunk_g = a[rows].to(dtype), g[rows].to(dtype)
        total += torch.bmm(chunk_g.transpose(1, 2), chunk_a).square().sum(0)
    return total


def bias_sum_grad_squared(g: torch.Tensor) -> torch.Tensor:
    """``Σ_i β_i ⊙ β_i``, shape ``(out,)``, in :func:`norm_dtype`."""
    # β_i = Σ_t g_it, squared element-wise and summed over samples
    return g.sum(1, dtype=norm_dtype(g.dtype)).square().sum(0)


def weight_grad_sum(
    a: torch.Tensor, g: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``Σ_i G_i = dL/dW``, shape ``(out, in)``, formed in ``dtype`` (default: ``g``'s)."""
    dtype = g.dtype if dtype is None else dtype
    rows = a.shape[0] * a.shape[1]  # counted, not inferred: in or out may be 0
    # dL/dW = gᵀ a   over the flattened (B·T) rows
    return g.reshape(rows, g.shape[-1]).to(dtype).t() @ a.reshape(rows, a.shape[-1]).to(dtype)


def bias_grad_sum(g: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Σ_i β_i = dL/db``, shape ``(out,)``, summed in ``dtype`` (default: ``g``'s)."""
    # dL/db = Σ over every row of g
    return g.sum((0, 1), dtype=dtype)


def variance(sum_grad_squared: torch.Tensor, grad_sum: torch.Tensor, batch: int) -> torch.Tensor:
    """Element-wise variance over the ``B`` samples of their contributions ``G_i`` (rounding
    can make the difference below slightly negative: it is clamped at 0). An empty batch
    has no spread: 0, not the 0/0 of the formula. Give both sums in :func:`norm_dtype`:
    in float16 ``Σ_i G_i²`` overflows long before the variance does, and the difference
    cancels most of float16's 11 bits."""
    if batch == 0:
        return torch.zeros_like(sum_grad_squared)
    # Var_i[G_i] = (1/B) Σ_i G_i² - ((1/B) Σ_i G_i)²
    return (sum_grad_squared / batch - (grad_sum / batch).square()).clamp_(min=0)
