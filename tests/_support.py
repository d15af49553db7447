"""Helpers shared by the tests: devices, dtype tolerances, seeded inputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import torchbp.nn

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The native twin of every torchbp.functional op, by the same name.
NATIVE = SimpleNamespace(
    linear=F.linear,
    sigmoid=torch.sigmoid,
    tanh=torch.tanh,
    relu=F.relu,
    leaky_relu=F.leaky_relu,
    gelu=F.gelu,
    silu=F.silu,
    softmax=F.softmax,
    log_softmax=F.log_softmax,
    nll_loss=F.nll_loss,
    cross_entropy=F.cross_entropy,
)

# Each activation module: (torchbp's, its torch.nn twin).
ACTIVATION_MODULES = {
    "sigmoid": (torchbp.nn.Sigmoid, torch.nn.Sigmoid),
    "tanh": (torchbp.nn.Tanh, torch.nn.Tanh),
    "relu": (torchbp.nn.ReLU, torch.nn.ReLU),
    "leaky_relu": (torchbp.nn.LeakyReLU, torch.nn.LeakyReLU),
    "gelu": (torchbp.nn.GELU, torch.nn.GELU),
    "silu": (torchbp.nn.SiLU, torch.nn.SiLU),
}

# CPU always; CUDA where a GPU exists (marked, so `pytest -m cuda` selects the GPU runs).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]

# Tolerances for comparing with native torch, per dtype: float64 agrees to rounding,
# bfloat16 results may differ by a couple of roundings (8 significant bits).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=4e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=1e-2),
}


def make(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    """A reproducible random tensor."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def grads(fn, *inputs, grad_output=None):
    """(output, [grad of each input]) of ``fn(*inputs)`` with a random or given grad_output."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    if grad_output is None:
        grad_output = make(out.shape, out.dtype, out.device, seed=99)
    out.backward(grad_output)
    return out.detach(), [t.grad for t in leaves]
