"""Autograd Functions of kinds the other verify test files lack, written as users write
them, each correct (``check_function`` must pass it, with and without a reference), and
beside ten-odd of them a subtly wrong twin (``check_function`` must fail it, naming the
input): restricted domains (log, sqrt, a fractional power, acos, atanh), kinks and ties
(abs at 0, clamp at its bounds, a max pool and an amax with tied values, sort, topk),
cumsum and a cumprod with zeros, index_add / gather / an embedding with duplicate
indices, a masked softmax, a logsumexp with rows of -inf, non-tensor arguments (an int
dim, a tuple of dims, None, a string or an enum reduction, a slice, a complex scale),
keyword-only arguments bound with ``functools.partial``, view outputs (a diagonal, an
expand), ``set_materialize_grads(False)``, an integer or bool input beside float ones,
complex inputs (PyTorch's conjugate Wirtinger convention), ``mark_dirty``,
``once_differentiable``, a backward using ``torch.no_grad`` for a constant mask, and one
whose double backward raises ``NotImplementedError``
(``tests/verify/test_verify_user_kinds.py``)."""

from __future__ import annotations

import enum
import math

import torch
from tests.verify.real_world import SquaredMagnitude  # |z|^2, complex to real: 2 g z
from torch.autograd import Function
from torch.autograd.function import once_differentiable


class Log(Function):
    """log, x > 0: ``setup_context``, ``generate_vmap_rule`` and a ``jvp`` (d log x = dx / x)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.log(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / x

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return t / x


class Sqrt(Function):
    """sqrt saving its output for backward and jvp (d sqrt(x) = dx / (2 sqrt(x)))."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sqrt(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g / (2 * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t / (2 * y)


class FracPow(Function):
    """x ** p for x > 0, the exponent a Python float."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.save_for_backward(x)
        ctx.p = p
        return x**p

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d/dx x^p = p x^(p-1)
        return g * ctx.p * x ** (ctx.p - 1), None


class Acos(Function):
    """acos on (-1, 1): d acos(x) = -dx / sqrt(1 - x^2)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.acos(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return -g / torch.sqrt(1 - x * x)


class Atanh(Function):
    """atanh on (-1, 1) with a ``vmap`` staticmethod: d atanh(x) = dx / (1 - x^2)."""

    @staticmethod
    def forward(x):
        return torch.atanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / (1 - x * x)

    @staticmethod
    def vmap(info, in_dims, x):
        return Atanh.apply(x), in_dims[0]


class Abs(Function):
    """abs, given exact zeros (a kink): gradient sign(x), 0 at 0 as torch.abs's."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.abs()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sign(x)


class Clamp(Function):
    """clamp to float bounds, given inputs at them: gradient 1 inside, bounds included."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        inside = (x >= ctx.lo) & (x <= ctx.hi)
        return g * inside, None, None


class MaxPool2(Function):
    """max pool of window 2, stride 2, given ties: the first tied element gets the gradient."""

    @staticmethod
    def forward(ctx, x):
        pairs = x.unflatten(-1, (-1, 2))
        values, idx = pairs.max(dim=-1)
        ctx.save_for_backward(idx)
        ctx.shape = x.shape
        return values

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        out = torch.zeros(*g.shape, 2, dtype=g.dtype, device=g.device)
        out.scatter_(-1, idx.unsqueeze(-1), g.unsqueeze(-1))
        return out.flatten(-2)


class Sort(Function):
    """sort along an int dim, returning (values, indices), the indices non-differentiable."""

    @staticmethod
    def forward(ctx, x, dim):
        values, idx = torch.sort(x, dim=dim)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(idx)
        ctx.dim = dim
        return values, idx

    @staticmethod
    def backward(ctx, g, g_idx):
        (idx,) = ctx.saved_tensors
        return torch.zeros_like(g).scatter(ctx.dim, idx, g), None


class TopK(Function):
    """topk values; called through :func:`topk`, whose k and dim are keyword-only."""

    @staticmethod
    def forward(ctx, x, k, dim):
        values, idx = torch.topk(x, k, dim=dim)
        ctx.save_for_backward(idx)
        ctx.dim = dim
        ctx.shape = x.shape
        return values

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        return g.new_zeros(ctx.shape).scatter(ctx.dim, idx, g), None, None


def topk(x, *, k, dim=-1):
    """:class:`TopK` with keyword-only options (bound with ``functools.partial``)."""
    return TopK.apply(x, k, dim)


class Cumsum(Function):
    """cumsum along an int dim: its gradient is the reversed cumsum of g."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return x.cumsum(dim)

    @staticmethod
    def backward(ctx, g):
        # dL/dx_i = sum_{j >= i} g_j
        return g.flip(ctx.dim).cumsum(ctx.dim).flip(ctx.dim), None


class Cumprod(Function):
    """cumprod along the last dim, right at zeros (no division by x_i)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.cumprod(-1)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        n = x.shape[-1]
        # dy_j/dx_i = prod_{k <= j, k != i} x_k for i <= j, 0 above
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        # xs[..., i, k] = x_k with x_i replaced by 1
        xs = x.unsqueeze(-2).expand(*x.shape[:-1], n, n).masked_fill(eye, 1.0)
        partial = xs.cumprod(-1)  # [..., i, j] = prod_{k<=j, k!=i}
        upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu()
        jac = partial * upper  # i <= j
        return (jac * g.unsqueeze(-2)).sum(-1)


class IndexAdd(Function):
    """index_add into n rows, the int64 index holding duplicates."""

    @staticmethod
    def forward(ctx, src, index, n):
        ctx.save_for_backward(index)
        return src.new_zeros(n, *src.shape[1:]).index_add(0, index, src)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return g.index_select(0, index), None, None


class MaskedSoftmax(Function):
    """softmax of scores masked_fill-ed with -inf under a bool mask input."""

    @staticmethod
    def forward(ctx, x, mask):
        p = x.masked_fill(mask, float("-inf")).softmax(-1)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        # dx = p * (g - sum(g p))
        return p * (g - (g * p).sum(-1, keepdim=True)), None


class LogSumExp(Function):
    """logsumexp of the last dim; a row of all -inf gives -inf and gradient 0 (as a fully
    masked attention row), where torch.logsumexp's is NaN."""

    @staticmethod
    def forward(ctx, x):
        m = x.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        out = m.squeeze(-1) + (x - m).exp().sum(-1).log()
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, g):
        x, out = ctx.saved_tensors
        # d/dx = softmax(x) = exp(x - out); 0 in a row of all -inf
        finite = torch.isfinite(out).unsqueeze(-1)
        shifted = torch.where(finite, x - out.unsqueeze(-1), torch.full_like(x, -math.inf))
        return g.unsqueeze(-1) * shifted.exp()


class NoGradMaskRelu(Function):
    """relu whose backward builds its (constant) mask under ``torch.no_grad``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            mask = (x > 0).to(g.dtype)
        return g * mask


class _ExpBackward(Function):
    """g * y, whose own backward (the double backward of :class:`FirstOrderExp`) raises
    ``NotImplementedError``."""

    @staticmethod
    def forward(ctx, g, y):
        return g * y

    @staticmethod
    def backward(ctx, gg):
        raise NotImplementedError("double backward of Exp is not implemented")


class FirstOrderExp(Function):
    """exp, differentiable once: its double backward raises ``NotImplementedError``."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _ExpBackward.apply(g, y)


class Reduction(enum.Enum):
    """A loss's reduction, as an enum (or its value, a string)."""

    MEAN = "mean"
    SUM = "sum"


class SquaredError(Function):
    """Summed or mean squared error, the reduction a string or a :class:`Reduction`:
    d/dpred = 2 (pred - target) (/ n for the mean)."""

    @staticmethod
    def forward(ctx, pred, target, reduction):
        diff = pred - target
        ctx.save_for_backward(pred, target)
        ctx.reduction = Reduction(reduction)
        sq = diff * diff
        return sq.mean() if ctx.reduction is Reduction.MEAN else sq.sum()

    @staticmethod
    def backward(ctx, g):
        pred, target = ctx.saved_tensors
        diff = pred - target
        scale = 2.0 / diff.numel() if ctx.reduction is Reduction.MEAN else 2.0
        grad = g * scale * diff
        return grad, -grad, None


class SumDims(Function):
    """sum over a tuple of dims, or over all of them for None."""

    @staticmethod
    def forward(ctx, x, dims, keepdim):
        ctx.shape = x.shape
        ctx.dims = dims
        ctx.keepdim = keepdim
        if dims is None:
            return x.sum()
        return x.sum(dim=dims, keepdim=keepdim)

    @staticmethod
    def backward(ctx, g):
        if ctx.dims is not None and not ctx.keepdim:
            for d in sorted(d % len(ctx.shape) for d in ctx.dims):
                g = g.unsqueeze(d)
        return g.expand(ctx.shape), None, None


class DiagonalView(Function):
    """the diagonal of the last two dims: an output that is a view of the input."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.diagonal(dim1=-2, dim2=-1)

    @staticmethod
    def backward(ctx, g):
        out = g.new_zeros(ctx.shape)
        out.diagonal(dim1=-2, dim2=-1).copy_(g)
        return out


class ExpandRows(Function):
    """n copies of x as an expanded view (stride 0): the gradient sums over them."""

    @staticmethod
    def forward(ctx, x, n):
        return x.unsqueeze(0).expand(n, *x.shape)

    @staticmethod
    def backward(ctx, g):
        return g.sum(0), None


class SplitHalves(Function):
    """(sin(first half), second half squared) under ``set_materialize_grads(False)``: the
    gradient of an unused output arrives as None."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        a, b = x.chunk(2, dim=-1)
        return a.sin(), b * b

    @staticmethod
    def backward(ctx, ga, gb):
        (x,) = ctx.saved_tensors
        a, b = x.chunk(2, dim=-1)
        if ga is None and gb is None:
            return None
        ra = torch.zeros_like(a) if ga is None else ga * a.cos()
        rb = torch.zeros_like(b) if gb is None else gb * 2 * b
        return torch.cat([ra, rb], dim=-1)


class Embedding(Function):
    """embedding lookup, the int index first, with duplicates: index_add sums their rows."""

    @staticmethod
    def forward(ctx, index, weight):
        ctx.save_for_backward(index)
        ctx.n = weight.shape[0]
        return weight[index]

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        gw = g.new_zeros(ctx.n, g.shape[-1]).index_add(
            0, index.reshape(-1), g.reshape(-1, g.shape[-1])
        )
        return None, gw


class ComplexMul(Function):
    """z * w of complex tensors: PyTorch's convention gives g * conj(w) and g * conj(z)."""

    @staticmethod
    def forward(ctx, z, w):
        ctx.save_for_backward(z, w)
        return z * w

    @staticmethod
    def backward(ctx, g):
        z, w = ctx.saved_tensors
        return g * w.conj(), g * z.conj()


class Gather(Function):
    """gather along an int dim, the index holding duplicates: scatter_add sums them."""

    @staticmethod
    def forward(ctx, x, dim, index):
        ctx.save_for_backward(index)
        ctx.dim, ctx.shape = dim, x.shape
        return x.gather(dim, index)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return g.new_zeros(ctx.shape).scatter_add(ctx.dim, index, g), None, None


class ExpInplace(Function):
    """exp in place (``mark_dirty``), saving its output."""

    @staticmethod
    def forward(ctx, x):
        x.exp_()
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y


class CosineSim(Function):
    """cosine similarity of rows, backward ``once_differentiable``."""

    @staticmethod
    def forward(ctx, a, b):
        na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
        s = (a * b).sum(-1, keepdim=True) / (na * nb)
        ctx.save_for_backward(a, b, na, nb, s)
        return s.squeeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        a, b, na, nb, s = ctx.saved_tensors
        g = g.unsqueeze(-1)
        # ds/da = b/(na nb) - s a / na^2
        ga = g * (b / (na * nb) - s * a / (na * na))
        gb = g * (a / (na * nb) - s * b / (nb * nb))
        return ga, gb


class AmaxEven(Function):
    """amax of the last dim, given ties: the gradient split evenly among them (torch.amax's
    rule)."""

    @staticmethod
    def forward(ctx, x):
        m = x.amax(-1, keepdim=True)
        ctx.save_for_backward(x, m)
        return m.squeeze(-1)

    @staticmethod
    def backward(ctx, g):
        x, m = ctx.saved_tensors
        hit = (x == m).to(g.dtype)
        return g.unsqueeze(-1) * hit / hit.sum(-1, keepdim=True)


class Where(Function):
    """where(mask, x, y), the bool mask the first input."""

    @staticmethod
    def forward(ctx, mask, x, y):
        ctx.save_for_backward(mask)
        return torch.where(mask, x, y)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        zero = torch.zeros_like(g)
        return None, torch.where(mask, g, zero), torch.where(mask, zero, g)


class BroadcastMul(Function):
    """x * s with s of shape (1, n), its gradient reduced over the broadcast rows."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s, (g * x).sum(0, keepdim=True)


class SliceRows(Function):
    """x[index] for an index given as a slice, or a tuple with Ellipsis."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.shape, ctx.index = x.shape, index
        return x[index].clone()

    @staticmethod
    def backward(ctx, g):
        out = g.new_zeros(ctx.shape)
        out[ctx.index] = g
        return out, None


class ScaleComplex(Function):
    """z * c for a Python complex c: gradient g * conj(c)."""

    @staticmethod
    def forward(ctx, z, c):
        ctx.c = c
        return z * c

    @staticmethod
    def backward(ctx, g):
        return g * complex(ctx.c).conjugate(), None


class LayerNormRecomputed(Function):
    """layer norm without affine, eps an argument, recomputing its statistics in backward
    (double backward sees their dependence on x)."""

    @staticmethod
    def forward(ctx, x, eps):
        ctx.save_for_backward(x)
        ctx.eps = eps
        return _ln(x, eps)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        xhat, rstd = _ln_parts(x, ctx.eps)
        # dx = rstd (g - mean(g) - xhat mean(g xhat))
        return rstd * (
            g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)
        ), None


def _ln_parts(x, eps):
    """(x - mean) / sqrt(var + eps) and 1 / sqrt(var + eps), over the last dim."""
    mu = x.mean(-1, keepdim=True)
    rstd = (x.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
    return (x - mu) * rstd, rstd


def _ln(x, eps):
    """Layer norm of the last dim, no affine."""
    return _ln_parts(x, eps)[0]


class LayerNormWrongEps(LayerNormRecomputed):
    """Wrong: backward recomputes the statistics with eps 1e-2, not the given one."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        xhat, rstd = _ln_parts(x, 1e-2)
        return rstd * (
            g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)
        ), None


class AttentionRecomputed(Function):
    """softmax(q k^T / sqrt(d)) v, recomputing the probabilities in backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return _attn_p(q, k) @ v

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors
        return _attn_grads(q, k, v, g, 1 / math.sqrt(q.shape[-1]))


def _attn_p(q, k):
    """The attention probabilities softmax(q k^T / sqrt(d))."""
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)


def _attn_grads(q, k, v, g, k_scale):
    """Gradients of q, k and v; ``k_scale`` the key's 1 / sqrt(d)."""
    p = _attn_p(q, k)
    scale = 1 / math.sqrt(q.shape[-1])
    gv = p.transpose(-2, -1) @ g
    gp = g @ v.transpose(-2, -1)
    # softmax: ds = p * (dp - sum(dp p)); s = q k^T scale
    gs = p * (gp - (gp * p).sum(-1, keepdim=True))
    return gs @ k * scale, gs.transpose(-2, -1) @ q * k_scale, gv


class AttentionUnscaledKeyGrad(AttentionRecomputed):
    """Wrong: the key's gradient misses the 1 / sqrt(d) scale."""

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.saved_tensors
        return _attn_grads(q, k, v, g, 1.0)


class CumprodDividing(Cumprod):
    """Wrong at zeros: the textbook shortcut divides by x_i."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        y = x.cumprod(-1)
        # the textbook shortcut: dL/dx_i = sum_{j>=i} g_j y_j / x_i  (0/0 at zeros)
        return (g * y).flip(-1).cumsum(-1).flip(-1) / x


class IndexAddShifted(IndexAdd):
    """Wrong: backward reads the rows one index further."""

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return g.index_select(0, (index + 1) % g.shape[0]), None, None


class MaxPool2GradToBoth(Function):
    """Wrong tie rule: every tied element of a window gets the whole gradient."""

    @staticmethod
    def forward(ctx, x):
        pairs = x.unflatten(-1, (-1, 2))
        values = pairs.amax(dim=-1)
        ctx.save_for_backward(pairs, values)
        return values

    @staticmethod
    def backward(ctx, g):
        pairs, values = ctx.saved_tensors
        hit = (pairs == values.unsqueeze(-1)).to(g.dtype)
        return (hit * g.unsqueeze(-1)).flatten(-2)


class ClampWrongSignAbove(Clamp):
    """Wrong sign on a branch: -g above the upper bound, where it is 0."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        inside = (x >= ctx.lo) & (x <= ctx.hi)
        return g * inside - g * (x > ctx.hi), None, None


class BroadcastMulUnreduced(BroadcastMul):
    """Missing broadcast reduction: s's gradient keeps x's shape."""

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s, g * x


class SortGathering(Sort):
    """Wrong index: gathers g by the sort indices instead of scattering it back."""

    @staticmethod
    def backward(ctx, g, g_idx):
        (idx,) = ctx.saved_tensors
        return g.gather(ctx.dim, idx), None


class CumsumForward(Cumsum):
    """Wrong direction: a forward cumsum of g, not a reversed one."""

    @staticmethod
    def backward(ctx, g):
        return g.cumsum(ctx.dim), None


class AcosWrongSign(Acos):
    """Wrong sign: +g / sqrt(1 - x^2)."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / torch.sqrt(1 - x * x)


class ComplexMulNoConj(ComplexMul):
    """Wrong convention: g * w without the conjugate."""

    @staticmethod
    def backward(ctx, g):
        z, w = ctx.saved_tensors
        return g * w, g * z


class AbsSquaredConj(SquaredMagnitude):
    """Wrong convention: 2 g conj(z)."""

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return 2 * g * z.conj()


class EmbeddingIndexCopy(Embedding):
    """Wrong with duplicates: index_copy keeps one of their rows instead of summing."""

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        gw = g.new_zeros(ctx.n, g.shape[-1]).index_copy(
            0, index.reshape(-1), g.reshape(-1, g.shape[-1])
        )
        return None, gw


class GatherScatterNoAdd(Gather):
    """Wrong with duplicates: scatter keeps one of their values instead of summing."""

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        return g.new_zeros(ctx.shape).scatter(ctx.dim, index, g), None, None


class WhereSwapped(Where):
    """Wrong branch: y gets the gradient where the mask picks x."""

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        zero = torch.zeros_like(g)
        return None, torch.where(mask, g, zero), torch.where(mask, g, zero)


class SquaredErrorRowMean(SquaredError):
    """Wrong mean: divides by the rows, not by every element."""

    @staticmethod
    def backward(ctx, g):
        pred, target = ctx.saved_tensors
        diff = pred - target
        scale = 2.0 / diff.shape[0] if ctx.reduction is Reduction.MEAN else 2.0
        grad = g * scale * diff
        return grad, -grad, None


class AmaxWholeToEachTie(AmaxEven):
    """Wrong tie rule: every tied maximum gets the whole gradient."""

    @staticmethod
    def backward(ctx, g):
        x, m = ctx.saved_tensors
        return g.unsqueeze(-1) * (x == m).to(g.dtype)


class MaxPool2WithJvp(Function):
    """max pool of window 2 returning (values, indices), with ``setup_context``, a
    backward and a jvp: the first tied element's gradient and tangent."""

    @staticmethod
    def forward(x):
        return x.unflatten(-1, (-1, 2)).max(dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, idx = output
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(idx)
        ctx.save_for_forward(idx)

    @staticmethod
    def backward(ctx, g, g_idx):
        (idx,) = ctx.saved_tensors
        out = g.new_zeros(*g.shape, 2)
        return out.scatter(-1, idx.unsqueeze(-1), g.unsqueeze(-1)).flatten(-2)

    @staticmethod
    def jvp(ctx, t):
        (idx,) = ctx.saved_tensors
        return t.unflatten(-1, (-1, 2)).gather(-1, idx.unsqueeze(-1)).squeeze(-1), None


class MaxPool2JvpAddingTies(Function):
    """Wrong tie rule in jvp only: the tangent of a window is the sum of its tied
    elements' tangents (backward, right, gives the first one the gradient)."""

    @staticmethod
    def forward(x):
        return x.unflatten(-1, (-1, 2)).amax(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        hit = (x.unflatten(-1, (-1, 2)) == y.unsqueeze(-1)).to(g.dtype)
        first = hit * (hit.cumsum(-1) == 1)
        return (first * g.unsqueeze(-1)).flatten(-2)

    @staticmethod
    def jvp(ctx, t):
        x, y = ctx.saved_tensors
        hit = (x.unflatten(-1, (-1, 2)) == y.unsqueeze(-1)).to(t.dtype)
        return (hit * t.unflatten(-1, (-1, 2))).sum(-1)
