"""Fused linear + cross-entropy that never materialises the ``(N, C)`` logits.

Shapes: input ``x`` ``(N, d)``, linear weight ``W`` ``(C, d)``, bias ``b`` ``(C,)``,
logits ``z = x Wᵀ + b`` ``(N, C)`` (never held whole), class-index target ``(N,)`` or
probability target ``(N, C)``.

Per row the cross-entropy of :mod:`torchbp.autograd.cross_entropy` has the form
``ℓ_i = a_i lse_i - Σ_c B_ic z_ic`` with ``G_i := ∂ℓ_i/∂z_i = a_i p_i - B_i``. With a
per-row scale ``s_i`` (``1`` for ``sum``, ``1/Σ w_{y_i}`` for ``mean``, the upstream
gradient ``g_i`` for ``none``; 0 on ignored rows) the chain rule through ``z = x Wᵀ + b``:

* ``dx_i = s_i G_i W``                     — ``(m, C) @ (C, d)`` per chunk of rows,
* ``dW   = Σ_i s_i G_iᵀ x_i = Gᵀ (s ⊙ x)`` — accumulated over chunks (in float32 for half),
* ``db   = Σ_i s_i G_i = sᵀ G``,
* ``dt_ic = -(1-ε) w_c logp_ic s_i``       — probability targets that require grad.

The scale ``s`` is applied to the ``(m, d)`` operands, never to the ``(m, C)`` chunk, so
``∂ℓ/∂z`` is used exactly as ``ce_rows`` returns it.

Half inputs, memory for one rounding: ``sum`` / ``mean`` keep the saved ``dx``, ``dW``,
``db`` in float32 from forward to backward, so that multiplying by an upstream gradient
``g != 1`` (``loss / accumulation_steps``, a loss weight) rounds them once, not twice. That
holds ``2·(N·d + C·d)`` bytes more than half copies would. Measured (CPU, bf16, N=2048,
d=256, C=8192, ``mean``): saved 10.0 MiB (5.0 MiB with half copies); peak extra over
forward + backward 98 MiB (89 MiB), the rest of the increase being the float32 copy of
``W`` for ``dx``'s GEMM off CUDA; native's pair saves a 32 MiB bf16 log-softmax alone.
``none`` saves the inputs either way (5.0 MiB). Kept deliberately: ``g`` is unknown in
forward, and rounding to half there and multiplying later is the double rounding this
avoids. A probability target's ``dt`` is the exception: it is ``(N, C)``, so it is saved
in the target's dtype, and for a half target and ``g != 1`` it is rounded twice (≈1 eps
rather than 0.5; native's bf16/f16 target gradient is off by up to ~10² eps).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd import Function

from torchbp._execution import may_reuse_saved, values_inspectable
from torchbp.autograd.cross_entropy import accumulation_dtype, ce_rows, log_softmax_rows

__all__ = ["LinearCrossEntropyFunction", "chunk_size_from_options", "default_chunk_size"]

# Default chunk of rows: its (chunk, C) working set — one logits buffer, reused for
# every chunk, in which ce_rows builds ∂ℓ/∂z in place (half inputs add a float32
# gradient buffer) — stays within this many bytes. Larger chunks make the three GEMMs
# more efficient (the dW update is a rank-chunk update of a (C, d) matrix); 48 MiB on CPU
# (chunk 384 for C = 32768 in float32) keeps the extra peak of the N=4096, d=512,
# C=32768 case at ~0.09x the unfused pair's, with margin under the 0.1x goal (64 MiB gave
# 0.0998x). On CUDA, larger chunks also mean fewer kernel launches.
CHUNK_BUDGET_BYTES = {"cpu": 48 << 20, "cuda": 256 << 20}
_DEFAULT_BUDGET = 48 << 20

_DOUBLE_BACKWARD = (
    "torchbp linear_cross_entropy: double backward is not supported (the gradients are "
    "computed chunk by chunk and the logits are never kept). For higher-order derivatives "
    "use torchbp.functional.cross_entropy(torchbp.functional.linear(...), ...)."
)


def default_chunk_size(rows: int, classes: int, dtype: torch.dtype, device) -> int:
    """Rows per chunk such that the ``(chunk, C)`` logits buffer (plus, for half inputs,
    its float32 gradient buffer) fits ``CHUNK_BUDGET_BYTES[device type]``; a multiple of
    8 when possible, at least 1, at most ``rows``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    # The logits buffer, in which the gradient is built in place (full precision); half
    # inputs add a float32 gradient buffer.
    per_row = max(classes, 1) * (itemsize if itemsize >= 4 else itemsize + 4)
    budget = CHUNK_BUDGET_BYTES.get(torch.device(device).type, _DEFAULT_BUDGET)
    chunk = budget // per_row
    if chunk >= 16:
        chunk -= chunk % 8
    return int(max(1, min(max(rows, 1), chunk)))


def chunk_size_from_options(
    options, rows: int, features: int, classes: int, dtype: torch.dtype, device
) -> int:
    """Rows per chunk for torch's ``LinearCrossEntropyOptions`` (torch >= 2.13), read as
    its documentation defines the fields:

    * ``batch_chunk_size`` (with ``chunking_method`` ``'auto'`` or ``None``): that many rows;
    * ``chunking_method='aspect_ratio[:k]'``: the ``(chunk, C)`` logits buffer about the
      size of the ``(N, d)`` input, divided by ``k``:
      ``next_pow2(ceil(N / ceil(C / d))) // k`` rows (a ``batch_chunk_size`` that
      disagrees is a ``ValueError``, as native's);
    * ``chunking_method='auto'`` alone: torchbp's own memory budget
      (:func:`default_chunk_size`), not torch's per-device table;
    * ``chunking_method=None`` alone: one chunk of all ``N`` rows.

    Always at least 1 and at most ``max(N, 1)``. ``acc_policy``, ``acc_dtype`` and
    ``allow_retain_graph`` do not change torchbp's numerics (float32 accumulation for half
    inputs, the input's dtype otherwise; ``retain_graph=True`` always works).
    """
    most = max(rows, 1)
    method = options.chunking_method
    given = options.batch_chunk_size
    if method is None or (method == "auto" and given is not None):
        return most if given is None else max(1, min(given, most))
    if method == "auto":
        return default_chunk_size(rows, classes, dtype, device)
    _name, _sep, divisor = method.partition(":")
    divisor = int(divisor) if divisor else 1
    # logits chunk (m, C) ≈ input (N, d): m = N / ceil(C / d), rounded up to a power of 2
    wanted = -(-rows // max(1, -(-classes // max(features, 1))))
    chunk = min((1 << max(wanted - 1, 0).bit_length()) // divisor, rows)
    if given is not None and given != chunk:
        raise ValueError(
            f"linear_cross_entropy: options.batch_chunk_size (={given}) and "
            f"options.chunking_method ({method!r}) give different chunk sizes ({given} vs "
            f"{chunk}); pass only one"
        )
    return max(1, min(chunk, most))


def _mm_acc(grad: torch.Tensor, g_mm: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``G W`` in the accumulation dtype (``grad``'s), never rounded to a half dtype on the
    way: ``grad`` is ``G`` in that dtype and ``g_mm`` the same ``G`` in ``w``'s dtype.
    ``g_mm @ w`` when that is the accumulation dtype; ``grad @ w`` for a float32 ``w``
    (half inputs off CUDA, ``w`` converted once by the caller); on CUDA one GEMM of the
    half operands with a float32 output (a float32 GEMM if that is unavailable)."""
    if g_mm.dtype == grad.dtype:
        return torch.mm(g_mm, w)
    if w.dtype == grad.dtype:
        return torch.mm(grad, w)
    try:
        return torch.mm(g_mm, w, out_dtype=grad.dtype)  # cuBLAS: half in, fp32 out
    except (RuntimeError, TypeError):
        return torch.mm(grad, w.to(grad.dtype))


def _addmm_acc(dw: torch.Tensor, grad: torch.Tensor, g_mm: torch.Tensor, xs: torch.Tensor):
    """``dW += Gᵀ xs`` with ``dW``, ``grad`` (``G``) and ``xs`` (``s ⊙ x``) in the
    accumulation dtype and ``g_mm`` the same ``G`` in the input's dtype: each chunk's
    product is formed in the accumulation dtype (never rounded to a half dtype, nor ``xs``,
    which for float16 and ``mean`` over many rows would be subnormal) and summed across
    chunks in it, so there is no half-precision drift over many chunks. Off CUDA a float32
    GEMM. On CUDA one GEMM of the half operands with a float32 output: there ``xs`` *is*
    rounded to the half dtype (one rounding per operand, as native's GEMM of ``s ⊙ G`` and
    ``x``; the float32 GEMM is the fallback)."""
    if g_mm.dtype == dw.dtype:
        dw.addmm_(g_mm.t(), xs)
        return
    if dw.is_cuda:
        try:  # cuBLAS: half in, fp32 out
            dw.add_(torch.mm(g_mm.t(), xs.to(g_mm.dtype), out_dtype=dw.dtype))
            return
        except (RuntimeError, TypeError):
            pass
    dw.addmm_(grad.t(), xs)


class _Problem(NamedTuple):
    """What the chunk loop computes the loss and gradients of: ``x`` (N, d), ``w`` (C, d),
    ``b`` (C,) or None, ``target`` (N,) or (N, C), class ``weight`` (C,) or None, and the
    loss options."""

    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None
    target: torch.Tensor
    weight: torch.Tensor | None
    ignore_index: int
    smoothing: float
    chunk: int


def _lce_chunks(problem: _Problem, scale, want, rows_out=None):
    """The chunk loop shared by forward and the ``none`` backward.

    ``scale``: ``None`` (no gradients), a 0-dim tensor (the same ``s`` for every row) or
    an ``(N,)`` tensor; ignored rows are zeroed here. ``want = (dx, dW, db, dt)`` flags.
    Fills ``rows_out`` (N,) with the per-row losses when given. Returns
    ``(dx, dW, db, dt)``, ``None`` where not wanted: ``dx``, ``dW`` and ``db`` in the
    accumulation dtype (the caller rounds them once) and ``dt`` in the target's.
    """
    x, w, b, target, weight, ignore_index, smoothing, chunk = problem
    n, d = x.shape
    classes = w.shape[0]
    acc = accumulation_dtype(x.dtype)
    soft = target.is_floating_point()
    want_dx, want_dw, want_db, want_dt = want
    any_grad = scale is not None and any(want)
    # Out-of-place accumulation under torch.func transforms (the scale is then batched).
    inplace = scale is None or values_inspectable(scale)
    dev = x.device

    if scale is not None:
        scale = scale.to(acc)
        if not soft:
            # Ignored rows contribute exactly 0, even when s is inf or NaN (a mean over no
            # valid rows divides by 0; native leaves those rows' gradient 0 too).
            scale = torch.where(target != ignore_index, scale, torch.zeros((), dtype=acc))
        elif scale.dim() == 0:
            scale = scale.expand(n)

    dx = dw = db = dt = None
    dx_parts, dt_parts = [], []
    if want_dx and inplace:
        dx = torch.empty((n, d), dtype=acc, device=dev)
    if want_dw:
        dw = torch.zeros((classes, d), dtype=acc, device=dev)
    if want_db:
        db = torch.zeros(classes, dtype=acc, device=dev)
    if want_dt and inplace:
        dt = torch.empty((n, classes), dtype=target.dtype, device=dev)
    w_t = w.t()
    # W for dx's GEMM: in float32 for half inputs off CUDA, where no GEMM of half operands
    # gives a float32 product (see _mm_acc); one (C, d) copy for the whole loop
    w_dx = w.to(acc) if want_dx and x.dtype != acc and not x.is_cuda else w
    # One (chunk, C) buffer for the logits, reused across chunks; ce_rows builds ∂ℓ/∂z
    # in place in it (full precision), or in a second, float32 buffer (half inputs, or
    # when the soft target's gradient needs the logits afterwards).
    rows = min(chunk, n)
    zbuf = torch.empty((rows, classes), dtype=x.dtype, device=dev)
    gbuf = zbuf
    if x.dtype != acc or want_dt:
        gbuf = torch.empty((rows, classes), dtype=acc, device=dev)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        xc = x[start:stop]
        # z = x Wᵀ + b for this chunk only, into a buffer reused across chunks.
        z = zbuf[: stop - start]
        if b is None:
            torch.mm(xc, w_t, out=z)
        else:
            torch.addmm(b, xc, w_t, out=z)
        loss, grad, _lse = ce_rows(
            z, target[start:stop], weight, ignore_index, smoothing, out=gbuf[: stop - start]
        )
        if rows_out is not None:
            rows_out[start:stop].copy_(loss)
        if not any_grad:
            continue
        s = scale[start:stop]
        if want_dt:
            # ∂ℓ_i/∂t_ic = -(1-ε) w_c logp_ic, logp = (z - m) - log Σ e^{z - m}; not z - lse,
            # whose rounding swamps logp for large logits (0.06 at 1e6 in float32)
            logp, _lse = log_softmax_rows(z.to(acc))
            part = logp * (-(1 - smoothing) * s).unsqueeze(1)
            if weight is not None:
                part = part * weight.to(acc)
            if inplace:
                dt[start:stop].copy_(part)
            else:
                dt_parts.append(part.to(target.dtype))
        # G (chunk, C) in the GEMMs' dtype: for half inputs rounded once, from float32.
        # (The logits are no longer needed: the rounded copy goes into their buffer.)
        g_mm = grad if grad.dtype == x.dtype else z.copy_(grad)
        if want_dx:
            # dx_i = s_i (G_i W); for half inputs G W and the scaling in float32 (dx is
            # rounded once, by the caller)
            if inplace and x.dtype == acc:
                torch.mm(g_mm, w, out=dx[start:stop]).mul_(s.unsqueeze(1))
            elif inplace:
                torch.mul(_mm_acc(grad, g_mm, w_dx), s.unsqueeze(1), out=dx[start:stop])
            else:
                dx_parts.append(_mm_acc(grad, g_mm, w_dx) * s.unsqueeze(1))
        if want_dw:
            # dW += Gᵀ (s ⊙ x)
            xs = xc.to(acc) * s.unsqueeze(1)
            if inplace:
                _addmm_acc(dw, grad, g_mm, xs)
            else:
                dw = dw + grad.t() @ xs
        if want_db:
            # db += sᵀ G (float32 G)
            if inplace:
                db.addmv_(grad.t(), s)
            else:
                db = db + grad.t() @ s
    if not inplace:
        if want_dx:
            dx = torch.cat(dx_parts) if dx_parts else x.new_zeros((n, d), dtype=acc)
        if want_dt:
            dt = torch.cat(dt_parts) if dt_parts else target.new_zeros((n, classes))
    return dx, dw, db, dt


def _no_double_backward(grads, anchors):
    """With ``create_graph=True``, return the gradients behind a node that raises a clear
    error if anything differentiates through them (as ``once_differentiable`` does, but
    also when the incoming gradient does not require grad, and with our message).

    ``anchors`` (the tensors the gradients depend on: the incoming gradient and the
    Function's saved anchor output, whose node leads to the inputs) join the node's inputs,
    so that differentiating the gradients with respect to the op's inputs or to the
    incoming gradient (``autograd.grad``, a Hessian, a jvp by the double-backward trick)
    reaches the node and raises, rather than finding no path and answering zero/None."""
    if not torch.is_grad_enabled():
        return grads
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    # Fresh leaves that require grad: the guard's outputs then always do, so the error also
    # fires when nothing the gradients were computed from requires grad.
    leaves = [g.detach().requires_grad_() for g in present]
    linked = [a for a in anchors if a is not None and a.requires_grad]
    it = iter(_DoubleBackwardGuard.apply(len(leaves), *leaves, *linked))
    return tuple(next(it) if g is not None else None for g in grads)


class _DoubleBackwardGuard(Function):
    """``forward(count, *tensors)``: identity on the first ``count`` tensors (the rest only
    link the node into the graph), whose backward raises :data:`_DOUBLE_BACKWARD` as a
    ``NotImplementedError`` (a ``RuntimeError``): a capability the op does not have.

    The outputs are ``detach()``-ed aliases of the inputs: the same memory (no copy), but
    not autograd views, so the caller may modify a returned gradient in place (a view made
    inside a Function could not be)."""

    @staticmethod
    def forward(count, *tensors):
        return tuple(t.detach() for t in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_grads):
        raise NotImplementedError(_DOUBLE_BACKWARD)


class LinearCrossEntropyFunction(Function):
    """``cross_entropy(x Wᵀ + b, target)`` over chunks of rows, logits never held whole.

    Forward, per chunk of ``m`` rows: ``z = x_c Wᵀ + b`` ``(m, C)``, then the fused
    cross-entropy rows (``ℓ``, ``G = ∂ℓ/∂z = a p - B``, ``lse``; see
    :mod:`torchbp.autograd.cross_entropy`). Backward (math in the module docstring):
    ``dx = s ⊙ (G W)``, ``dW = Gᵀ (s ⊙ x)``, ``db = sᵀ G``.

    * ``reduction='sum'`` / ``'mean'``: the gradients are computed in forward, in the same
      chunk loop (3 matmuls in all, as the unfused pair), with ``s`` the reduction's scale.
      Saved: ``dx`` ``(N, d)``, ``dW`` ``(C, d)``, ``db`` ``(C,)`` (and ``dt`` ``(N, C)``
      for a probability target that requires grad) — O(N·d + C·d), not O(N·C); ``dx``,
      ``dW``, ``db`` in float32 for half inputs. Backward multiplies them by the scalar
      upstream gradient: in place, handing them over as the gradients, when the graph is
      not retained (no device sync, no second copy); into new tensors with
      ``retain_graph=True``, which therefore works. Half-precision ``dx``, ``dW``, ``db``
      are rounded once, after that product (not before it as well; ``dt``: see the module
      docstring).
    * ``reduction='none'``: the upstream gradient ``g`` (one per row) is unknown in
      forward, and ``dW = Σ_i g_i G_iᵀ x_i`` cannot be recovered from a ``g``-free summary.
      Forward computes the losses only (1 matmul) and saves the inputs; backward
      recomputes the logits chunk by chunk with ``s = g`` (3 matmuls): 4 matmuls in all.

    Peak extra memory: the ``(chunk, C)`` working set plus the outputs above (and, for
    half inputs off CUDA, a float32 copy of ``W`` for ``dx``'s GEMM); ``dx``,
    ``dW`` and ``db`` are accumulated in float32 for half inputs and rounded once to the
    input's / parameter's dtype, in backward. Nothing the caller passed is written to.

    Arguments (all positional): ``input (N, d)``, ``linear_weight (C, d)``,
    ``linear_bias (C,) | None``, ``target (N,) | (N, C)``, ``weight (C,) | None``,
    ``ignore_index``, ``label_smoothing``, ``reduction`` (``'none' | 'sum' | 'mean'``),
    ``denominator`` (0-dim tensor, for ``'mean'``), ``chunk_size``, ``needs`` (four bools:
    which of ``dx, dW, db, dt`` to compute in forward for ``'sum'`` / ``'mean'``).
    Returns ``(loss, dx, dW, db, dt, anchor)``: ``loss`` is ``()`` (or ``(N,)`` for
    ``'none'``) in the accumulation dtype; ``dx`` .. ``dt`` are non-differentiable internals
    (or ``None``); ``anchor`` is a differentiable ``()`` zero that backward saves, to link
    the double-backward error into the graph (see :func:`_no_double_backward`).

    Double backward raises a clear error (torch's chunked path raises too); use the
    unfused ``cross_entropy(linear(...))`` for higher-order derivatives. There is no
    ``jvp`` (forward-mode AD is unsupported) and no vmap rule, hence no jvp-free twin.
    """

    @staticmethod
    def forward(
        input,
        linear_weight,
        linear_bias,
        target,
        weight,
        ignore_index,
        label_smoothing,
        reduction,
        denominator,
        chunk_size,
        needs,
    ):
        n = input.shape[0]
        acc = accumulation_dtype(input.dtype)
        rows = torch.empty(n, dtype=acc, device=input.device)
        scale = None
        want = (False, False, False, False)
        if reduction != "none" and any(needs):
            want = tuple(bool(f) for f in needs)
            one = torch.ones((), dtype=acc, device=input.device)
            scale = one / denominator.to(acc) if reduction == "mean" else one
        options = (ignore_index, label_smoothing, chunk_size)
        problem = _Problem(input, linear_weight, linear_bias, target, weight, *options)
        dx, dw, db, dt = _lce_chunks(problem, scale, want, rows_out=rows)
        anchor = rows.new_zeros(())
        if reduction == "none":
            return rows, None, None, None, None, anchor
        loss = rows.sum()
        if reduction == "mean":
            loss = loss / denominator.to(acc)
        # dx, dW, db stay in the accumulation dtype: backward rounds them once, after
        # multiplying by the upstream gradient.
        return loss, dx, dw, db, dt, anchor

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x, w, b, target, weight, ignore_index, smoothing, reduction, _den, chunk, _needs) = inputs
        _loss, dx, dw, db, dt, anchor = output
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.label_smoothing = smoothing
        ctx.chunk_size = chunk
        ctx.grad_dtypes = tuple(t.dtype if t is not None else None for t in (x, w, b, target))
        if reduction == "none":
            # Recomputed in backward: keep the inputs (alive anyway), not the gradients.
            ctx.save_for_backward(x, w, b, target, weight, anchor)
        else:
            ctx.save_for_backward(dx, dw, db, dt, anchor)
        ctx.mark_non_differentiable(*[t for t in (dx, dw, db, dt) if t is not None])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, _g_dx, _g_dw, _g_db, _g_dt, _g_anchor):
        none = (None,) * 7
        if grad_loss is None:
            return (None, None, None, None, *none)
        # (dx, dW, db, dt): needs_input_grad is False for a None bias
        want = ctx.needs_input_grad[:4]
        if ctx.reduction == "none":
            x, w, b, target, weight, anchor = ctx.saved_tensors
            problem = _Problem(
                x, w, b, target, weight, ctx.ignore_index, ctx.label_smoothing, ctx.chunk_size
            )
            with torch.no_grad():
                grads = _lce_chunks(problem, grad_loss, want)
        else:
            *saved, anchor = ctx.saved_tensors
            # The saved gradients already carry the reduction's scale: multiply by g. When
            # the graph is not retained they are released right after this call, so they
            # are scaled in place and handed over (autograd adopts them as .grad: no second
            # (C, d) copy); with retain_graph=True (or create_graph, or under torch.func)
            # they stay untouched and the result is a new tensor.
            reuse = may_reuse_saved(grad_loss)
            grads = (
                (t.mul_(grad_loss) if reuse else t * grad_loss.to(t.dtype))
                if t is not None and f
                else None
                for t, f in zip(saved, want)
            )
        # Rounded once, to the inputs' dtypes (from float32 for half inputs).
        dx, dw, db, dt = (
            g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.grad_dtypes)
        )
        return (*_no_double_backward((dx, dw, db, dt), (grad_loss, anchor)), *none)
