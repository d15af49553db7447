"""Session 18's GELU backward fixes on CUDA, where they run for the first time.

The default first-order GELU backward on CUDA is the kernel of :mod:`torchbp.kernels.cpu_act`
(its torch ops run on any device, unblocked there): 0eb1c86 (the tanh form's x multiplies
last where x³ overflows; the exact form's Φ = gelu(x)/x is 1 where gelu(x) overflows) and
2a4b083 (Φ from native's gelu). 01c5a56: the exact form's double backward is gg · g · y''
(native's order: an infinite grad_output gives ±inf, not NaN). The inputs are those of
``tests/test_properties_s18_ce_gelu.py``'s properties and regressions, judged as there:
native's NaN pattern (but where native's NaN is its own overflow and the float64 value is
a number), native's infinities, and the rest close to the float64 value or no farther
from it than twice native.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import torchbp

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e30, -1e30, 2.0**-36, -(2.0**-37)]


def _special_inputs(dtype: torch.dtype) -> torch.Tensor:
    """Normal, tiny, subnormal and huge draws, the regressions' magnitudes (x³ overflows,
    x² not; near the dtype's max) and the specials, on CUDA."""
    gen = torch.Generator().manual_seed(1)
    info = torch.finfo(dtype)
    normal = torch.randn(64, generator=gen, dtype=torch.float64)
    tiny = normal * 2.0**-40
    subnormal = normal * info.tiny / 4
    top = math.log10(info.max)
    huge = normal * 10 ** torch.empty(64, dtype=torch.float64).uniform_(1, top, generator=gen)
    edges = torch.tensor([1e13, 1e16, 1.5e19, 2e19, info.max, info.max / 1.5], dtype=torch.float64)
    specials = torch.tensor(SPECIALS, dtype=torch.float64)
    x = torch.cat([normal, tiny, subnormal, huge, edges, -edges, specials])
    return x.to(dtype).cuda()


def _assert_like_native(ours, native, truth, slack, what):
    """As the module says; ``slack``: an absolute error allowed beside the relative one."""
    o, n, t = (v.double() for v in (ours, native, truth))
    overflow = n.isnan() & ~t.isnan()
    assert bool(torch.where(overflow, True, o.isnan() == n.isnan()).all()), f"{what}: NaN"
    assert torch.equal(o[n.isinf()], n[n.isinf()]), f"{what}: infinities"
    finite = n.isfinite() & o.isfinite() & t.isfinite()
    err, native_err = (o - t).abs()[finite], (n - t).abs()[finite]
    info = torch.finfo(ours.dtype)
    tol = 4 * info.eps * t.abs()[finite] + slack[finite] + info.tiny
    bad = (err > tol) & (err > 2 * native_err)
    assert not bad.any(), f"{what}: {o[finite][bad][:4].tolist()} vs {t[finite][bad][:4].tolist()}"


def _grad(fn, x, g, approximate):
    leaf = x.detach().clone().requires_grad_()
    (dx,) = torch.autograd.grad(fn(leaf, approximate=approximate), leaf, g.to(x.dtype))
    return dx


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gelu_backward_on_cuda_at_special_inputs_is_natives(dtype, approximate):
    x = _special_inputs(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g[0], g[1] = math.inf, math.nan
    g = g.cuda()
    ours = _grad(torchbp.functional.gelu, x, g, approximate)
    native = _grad(F.gelu, x, g, approximate)
    truth = _grad(F.gelu, x.double(), g, approximate)
    assert ours.dtype == dtype
    # float32 y' cancels in places (an ulp of 1 for the exact form's Φ as x -> -inf; the
    # tanh form's 1 - t² as t -> ±1): measured up to 17 · 2^-24 |g| for native's CPU kernel
    slack = (32 if approximate == "tanh" else 2) * 2.0**-24 * g.abs()
    _assert_like_native(ours, native, truth, slack, f"gelu({approximate}) backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("infinity", [math.inf, -math.inf])
def test_exact_gelu_double_backward_of_an_infinite_grad_output_on_cuda(dtype, infinity):
    x = torch.tensor([-0.4, 0.3, 1.5, -2.0, 0.0, 40.0, -40.0], dtype=dtype, device="cuda")
    second = []
    for fn in (torchbp.functional.gelu, F.gelu):
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(
            fn(leaf), leaf, torch.full_like(x, infinity), create_graph=True
        )
        (gg,) = torch.autograd.grad(grad, leaf, torch.ones_like(x))
        second.append(gg)
    torch.testing.assert_close(*second, rtol=0, atol=0, equal_nan=True)
