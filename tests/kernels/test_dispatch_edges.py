"""Which path a backward takes, at the edges of "nothing differentiates its result".

A first-order backward (grad mode off) may still be differentiated by forward-mode AD:
``torch.autograd.grad`` of a loss whose inputs are dual tensors (forward-over-reverse, a
Hessian-vector product) records the tangent of every op of the backward. The fast paths
(in-place kernels, ``out=`` ops, a saved buffer scaled in place and detached) cannot carry
tangents, so such a backward must take the differentiable reference formulas and give
native's tangent.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import torchbp.functional as TF

TARGET = torch.tensor([0, 3, 1, 4, 2, 0])


def hessian_vector(loss_fn, x, v):
    """``(∇f(x), H v)`` by forward-mode AD over ``torch.autograd.grad``."""
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.clone().requires_grad_(), v)
        (grad,) = torch.autograd.grad(loss_fn(dual), dual)
        primal, tangent = fwAD.unpack_dual(grad)
    assert tangent is not None, "the gradient lost its tangent"
    return primal, tangent


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64).to(dtype)
    return x, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_hessian_vector_product_matches_native(dtype, reduction, smoothing):
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    x, v = inputs(dtype)
    want = hessian_vector(lambda z: F.cross_entropy(z, TARGET, **kw), x, v)
    got = hessian_vector(lambda z: TF.cross_entropy(z, TARGET, **kw), x, v)
    torch.testing.assert_close(got, want)
