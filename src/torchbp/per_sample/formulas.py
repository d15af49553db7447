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


def gram_is_cheaper(t: int, in_features: int, out_features: int) -> bool:
    """Whether ``‖G_i‖²`` is cheaper through the two T×T Gram matrices than by forming
    ``G_i``: ``T²(in + out)`` against ``T·in·out`` multiply-adds per sample."""
    return t * (in_features + out_features) <= in_features * out_features


def weight_norms(a: torch.Tensor, g: torch.Tensor, *, scaled: bool = False) -> torch.Tensor:
    """``‖G_i‖_F`` for every sample, shape ``(B,)``, in :func:`norm_dtype`, of ``(B, T, ·)``
    traces with ``T > 1`` (:func:`layer_norms` forms ``T = 1`` from the row norms).
    ``scaled``: from positions rescaled to at most 1, so that no square overflows or
    underflows where ``‖G_i‖`` fits (a few passes more over the layer's data); otherwise
    from the squares as they are (``‖a_i‖²`` alone overflows float32 from 1.8e19 on, and
    inf·0 gives an ignored sample's norm NaN)."""
    batch, t, in_features = a.shape
    out_features = g.shape[-1]
    dtype = norm_dtype(g.dtype)
    out = a.new_empty(batch, dtype=dtype)
    gram = gram_is_cheaper(t, in_features, out_features)
    per_sample = 2 * t * t if gram else in_features * out_features
    # a chunk of samples at a time, under the chunk budget
    for rows in _sample_chunks(batch, per_sample):
        chunk_a, chunk_g = a[rows].to(dtype), g[rows].to(dtype)
        if scaled:
            chunk_a, chunk_g, scale = _balanced(chunk_a, chunk_g)
        if gram:
            squared = _gram_squared_norms(chunk_a, chunk_g)
        else:
            # Ĝ_i = ĝ_iᵀ â_i  (out, T) @ (T, in), in float32 at least (a float16 sum over
            # T positions overflows where ‖G_i‖ fits)
            squared = torch.bmm(chunk_g.transpose(1, 2), chunk_a).square().sum((1, 2))
        # ‖G_i‖ = m_i ‖Ĝ_i‖  (m_i = 1 unless scaled)
        out[rows] = squared.sqrt_().mul_(scale) if scaled else squared.sqrt_()
    return out


def _balanced(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(â, ĝ, m)`` with ``G_i = m_i Σ_t ĝ_it â_itᵀ``, every element of ``â`` and ``ĝ`` at
    most 1 in magnitude, and the largest element of the largest term 1."""
    # G_i = Σ_t (s_it g_it)(a_it / s_it), s_it the largest |a_it|: each s_it |g_itj| is
    # the largest element of row j of the term g_it a_itᵀ (finite where the term is), so
    # positions of very different sizes keep their share; with m_i the largest of them,
    # ĝ_it = s_it g_it / m_i
    a_scale = _largest_magnitudes(a, (2,))
    g = g * a_scale
    g_scale = _largest_magnitudes(g, (1, 2))
    return a / a_scale, g / g_scale, g_scale[:, 0, 0]


def _largest_magnitudes(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The largest ``|t|`` over ``dims`` (kept), where it is finite and not 0, else 1: a
    divisor that leaves every element at most 1 in magnitude, and an inf or NaN as it is
    (an inf over itself would be NaN where torch.func's norm is inf)."""
    if any(t.shape[d] == 0 for d in dims):
        return t.new_ones([1 if d in dims else n for d, n in enumerate(t.shape)])
    # max(max t, -min t): two reductions without the copy |t| (NaN propagates)
    largest = torch.maximum(t.amax(dims, keepdim=True), t.amin(dims, keepdim=True).neg_())
    return torch.where(largest.isfinite() & (largest > 0), largest, 1.0)


def _gram_squared_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``‖G_i‖_F²`` of the samples of ``a``, ``g`` through their T×T Gram matrices."""
    # ‖Σ_t g_it a_itᵀ‖_F² = Σ_{t,s} (a_i a_iᵀ)_ts (g_i g_iᵀ)_ts
    gram_a = torch.bmm(a, a.transpose(1, 2))
    gram_g = torch.bmm(g, g.transpose(1, 2))
    # terms of both signs: when the positions nearly cancel, rounding can leave the
    # sum slightly below its true value ≥ 0 (whose square root would be nan)
    return (gram_a * gram_g).sum((1, 2)).clamp_(min=0)


def row_norms(t: torch.Tensor, *, scaled: bool = False) -> torch.Tensor:
    """``‖t_i‖`` over all but the sample dim, in :func:`norm_dtype` (see
    :func:`combined_norms` for ``scaled``)."""
    return combined_norms(t.flatten(1), dim=1, scaled=scaled)


def bias_norms(g: torch.Tensor, *, scaled: bool = False) -> torch.Tensor:
    """``‖β_i‖`` for every sample, shape ``(B,)``, in :func:`norm_dtype`, of a
    ``(B, T, out)`` trace."""
    # β_i = Σ_t g_it, summed in float32 at least (float16 overflows where ‖β_i‖ fits)
    return combined_norms(g.sum(1, dtype=norm_dtype(g.dtype)), dim=1, scaled=scaled)


def combined_norms(norms: torch.Tensor, dim: int, *, scaled: bool = False) -> torch.Tensor:
    """``(Σ n²)^½`` over ``dim`` of ``norms``, in :func:`norm_dtype`, without a squared
    copy. torch's vector_norm squares the elements as they are, which overflows float32
    from 1.8e19 on and underflows below 1e-19; ``scaled``: of ``norms`` divided by their
    largest magnitude, right wherever the result fits (one pass and a copy more)."""
    dtype = norm_dtype(norms.dtype)
    if not scaled:
        return torch.linalg.vector_norm(norms, dim=dim, dtype=dtype)
    # ‖n‖ = m ‖n / m‖, m the largest |n|
    scale = _largest_magnitudes(norms.to(dtype), (dim,))
    return torch.linalg.vector_norm(norms / scale, dim=dim).mul_(scale.squeeze(dim))


def layer_norms(
    a: torch.Tensor | None, g: torch.Tensor, *, weight: bool, bias: bool, scaled: bool = False
) -> torch.Tensor:
    """``(‖G_i‖² + ‖β_i‖²)^½``, counting the ones flagged by ``weight`` and ``bias``, for
    every sample, shape ``(B,)``, in :func:`norm_dtype` (see :func:`weight_norms` for
    ``scaled``)."""
    if g.shape[1] == 1:
        g_norms = row_norms(g, scaled=scaled)
        if not weight:
            # ‖β_i‖ = ‖g_i‖
            return g_norms
        a_norms = row_norms(a, scaled=scaled)
        # ‖g_i a_iᵀ‖ = ‖g_i‖ ‖a_i‖, and with the bias ‖g_i‖ (‖a_i‖² + 1)^½: two passes over
        # the layer's data (a few more if scaled)
        return g_norms.mul_(torch.hypot(a_norms, a_norms.new_ones(())) if bias else a_norms)
    parts = []
    if weight:
        parts.append(weight_norms(a, g, scaled=scaled))
    if bias:
        parts.append(bias_norms(g, scaled=scaled))
    return combined_norms(torch.stack(parts), dim=0, scaled=scaled)


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
        # Σ_i (g_i a_iᵀ)² = Σ_i g_i² (a_i²)ᵀ = Σ_i (σ_i g_i)² (a_i / σ_i)²ᵀ, σ_i = (s_i / r_i)^½
        # with s_i, r_i the largest |a_i|, |g_i|: both factors at most (s_i r_i)^½, the
        # largest |G_i|, in magnitude, so neither square overflows where G_i's do (a_i²
        # alone can, and inf times a 0 of g_i² or of a square that underflowed is NaN)
        a, g = a[:, 0].to(dtype), g[:, 0].to(dtype)
        a_root = _largest_magnitudes(a, (1,)).sqrt_()
        g_root = _largest_magnitudes(g, (1,)).sqrt_()
        scaled_g = (g / g_root).mul_(a_root).square_()
        return scaled_g.t() @ (a / a_root).mul_(g_root).square_()
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
