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
    # no tangent: a zero one (native's ReLU gives zeros, its LeakyReLU none)
    return primal, torch.zeros_like(primal) if tangent is None else tangent


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


def hessian_vector_by_double_backward(loss_fn, x, v):
    """``(∇f(x), H v)`` by reverse-over-reverse (what native supports for every op)."""
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
    (hv,) = torch.autograd.grad(grad, x, v)
    return grad.detach(), hv


ACTIVATIONS = {
    "sigmoid": (torch.sigmoid, TF.sigmoid),
    "tanh": (torch.tanh, TF.tanh),
    "relu": (F.relu, TF.relu),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.1), lambda x: TF.leaky_relu(x, 0.1)),
    "leaky_relu_negative": (lambda x: F.leaky_relu(x, -0.1), lambda x: TF.leaky_relu(x, -0.1)),
    "gelu": (F.gelu, TF.gelu),
    "gelu_tanh": (
        lambda x: F.gelu(x, approximate="tanh"),
        lambda x: TF.gelu(x, approximate="tanh"),
    ),
    "silu": (F.silu, TF.silu),
    "elu": (F.elu, TF.elu),
    "softplus": (F.softplus, TF.softplus),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_hessian_vector_product_matches_native(name, dtype):
    # the incoming gradient 2 f(x) carries a tangent
    native, ours = ACTIVATIONS[name]
    x, v = inputs(dtype)
    want = hessian_vector_by_double_backward(lambda z: native(z).square().sum(), x, v)
    got = hessian_vector(lambda z: ours(z).square().sum(), x, v)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- meta tensors
META_CASES = {
    "relu": lambda x: TF.relu(x).sum(),
    "cross_entropy": lambda x: TF.cross_entropy(x, TARGET.to(x.device)),
    "cross_entropy_ignore": lambda x: TF.cross_entropy(x, TARGET.to(x.device), ignore_index=3),
    "cross_entropy_bf16": lambda x: TF.cross_entropy(x.bfloat16(), TARGET.to(x.device)),
    "cross_entropy_inplace": lambda x: TF.cross_entropy(x * 1, TARGET.to(x.device), inplace=True),
    "nll_loss": lambda x: TF.nll_loss(x, TARGET.to(x.device)),
}


@pytest.mark.parametrize("name", META_CASES)
def test_meta_tensors_run_forward_and_backward_as_native(name):
    # A meta tensor has a shape and no values (shape and memory estimates): the paths
    # that look at values (class-index checks, the ReLU kernel's finiteness check) step
    # aside, as native's kernels do.
    x = torch.empty(6, 5, device="meta", requires_grad=True)
    loss = META_CASES[name](x)
    assert loss.device.type == "meta"
    loss.backward()
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_hessian_vector_product_with_a_plain_incoming_gradient(name, dtype):
    # f(x).sum(): the incoming gradient (ones) carries no tangent, the saved tensor does
    native, ours = ACTIVATIONS[name]
    x, v = inputs(dtype)
    want = hessian_vector_by_double_backward(lambda z: native(z).sum(), x, v)
    got = hessian_vector(lambda z: ours(z).sum(), x, v)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- inplace, C = 0
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True], ids=["ignored", "probabilities"])
def test_inplace_cross_entropy_of_no_classes_matches_native(soft, reduction):
    # (N, 0) logits: every class-index target is ignore_index, or (N, 0) probabilities.
    # inplace=True has nothing to write, and gives native's loss and an empty gradient.
    leaf = torch.empty(3, 0, requires_grad=True)
    target = torch.empty(3, 0) if soft else torch.full((3,), -100)
    native = F.cross_entropy(leaf * 1, target, reduction=reduction)
    ours = TF.cross_entropy(leaf * 1, target, reduction=reduction, inplace=True)
    torch.testing.assert_close(ours, native, equal_nan=True)
    (grad,) = torch.autograd.grad(ours.sum(), leaf, allow_unused=True, materialize_grads=True)
    assert grad.shape == (3, 0)


# --------------------------------------------------------------------------- nested tensors
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_backward_of_a_jagged_nested_tensor_matches_native(name, dtype):
    # A nested tensor has storage and values, but its ops take no out= and it has no flat
    # view: the first-order backward runs the formula, as for dense tensors native's
    # gradient of each component (native's own nested backward lacks LeakyReLU's).
    native, ours = ACTIVATIONS[name]
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, generator=gen).to(dtype) for n in (2, 4)]
    weights = [torch.randn(n, 3, generator=gen).to(dtype) for n in (2, 4)]
    nested = torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)
    try:
        native(nested.detach())
    except NotImplementedError:  # torch 2.11's nested tensors lack aten.leaky_relu
        pytest.skip(f"this torch ({torch.__version__}) has no {name} of a nested tensor")
    (ours(nested).values() * torch.cat(weights)).sum().backward()
    want = []
    for part, weight in zip(parts, weights):
        leaf = part.clone().requires_grad_()
        (native(leaf) * weight).sum().backward()
        want.append(leaf.grad)
    torch.testing.assert_close(nested.grad.values(), torch.cat(want))
