"""per_sample_grads for a model whose parameters are on more than one device (a pipeline
split): every result is formed on its layer's device, and the per-sample norms, tiny
``(B,)`` tensors, are gathered on the first recorded layer's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchbp
from torchbp.per_sample import formulas, per_sample_grads


class OnAnotherDevice(torch.Tensor):
    """A CPU tensor standing for one on a second device: an op mixing it with a plain
    tensor raises torch's device mismatch error, and ``.to(device)`` copies it to a
    plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            return torch.Tensor.to(args[0].as_subclass(torch.Tensor), *args[1:], **kwargs)
        if any(type(t) is torch.Tensor for t in _tensors((*args, *kwargs.values()))):
            raise RuntimeError("Expected all tensors to be on the same device")
        return super().__torch_function__(func, types, args, kwargs)


def _tensors(values) -> list[torch.Tensor]:
    """The tensors among ``values`` and the lists or tuples in it."""
    tensors = []
    for value in values:
        if isinstance(value, (list, tuple)):
            tensors += _tensors(value)
        elif isinstance(value, torch.Tensor):
            tensors.append(value)
    return tensors


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(torchbp.nn.Linear(4, 6), nn.Tanh(), torchbp.nn.Linear(6, 3)).double()


def test_norms_of_layers_on_another_device_are_gathered(monkeypatch):
    """The per-layer norms were combined into a tensor on the first layer's device:
    for a model split across devices, torch's device mismatch error at the end of the
    backward. Each layer's are now moved to that device first."""
    model, x = mlp(), torch.randn(5, 4, dtype=torch.float64)
    with per_sample_grads(model) as ps:
        model(x).sum().backward()
    expected = ps.norms.clone()
    layer_norms = formulas.layer_norms
    calls = []

    def output_layer_elsewhere(*args, **kwargs):
        calls.append(None)  # in module order: the output layer's come second
        norms = layer_norms(*args, **kwargs)
        return norms.as_subclass(OnAnotherDevice) if len(calls) == 2 else norms

    monkeypatch.setattr(formulas, "layer_norms", output_layer_elsewhere)
    model.zero_grad()
    with per_sample_grads(model) as ps:
        model(x).sum().backward()
    assert len(calls) == 2
    assert type(ps.norms) is torch.Tensor
    torch.testing.assert_close(ps.norms, expected, rtol=0, atol=0)


class MoveTo(nn.Module):
    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_model_split_between_cpu_and_cuda(mode):
    """A model whose first Linear is on the CPU and whose second is on CUDA gives the
    results of the same model on one device, each on its parameter's device."""
    whole, split = mlp(), mlp()
    split[2].cuda()
    split.insert(2, MoveTo("cuda"))
    x = torch.randn(5, 4, dtype=torch.float64)
    max_norm = 0.1 if mode == "clip" else None
    results = []
    for model in (whole, split):
        with per_sample_grads(model, mode, max_norm, statistics=True) as ps:
            model(x).square().sum().backward()
        results.append((ps, [p for p in model.parameters() if p.requires_grad]))
    (ps_whole, whole_params), (ps_split, split_params) = results
    assert ps_split.norms.device.type == "cpu"
    torch.testing.assert_close(ps_split.norms, ps_whole.norms)
    for ours, ref in zip(split_params, whole_params):
        for name in ("grad", "grad_sample", "sum_grad_squared", "grad_variance"):
            value = getattr(ours, name, None)
            if value is None:
                assert getattr(ref, name, None) is None, name
                continue
            assert value.device == ours.device, name
            torch.testing.assert_close(value.cpu(), getattr(ref, name), msg=name)


@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_model_on_the_meta_device(mode):
    """A model on the meta device (a dry run of the training step, shapes only) failed at
    its first forward inside the context with torch's 'unknown device type for autocast'
    (the context asked whether autocast was on for a device type that has none); it runs
    now, every result of the right shape on meta."""
    model = mlp().to("meta")
    with per_sample_grads(model, mode, 1.0 if mode == "clip" else None) as ps:
        model(torch.randn(5, 4, dtype=torch.float64, device="meta")).sum().backward()
        if mode == "clip":
            ps.add_noise(1.0)
    assert ps.norms.shape == (5,) and ps.norms.device.type == "meta"
    for p in ps.parameters:
        assert p.grad.shape == p.shape and p.grad.device.type == "meta"
        if mode == "grads":
            assert p.grad_sample.shape == (5, *p.shape)


def test_add_noise_on_meta_takes_any_generator():
    """torch.randn on the meta device draws nothing and takes a generator of any device,
    but add_noise refused a seeded CPU generator for a model on meta ('generator is on
    cpu, but parameters are on meta'), so a dry run of the training step on meta failed
    where the real one would not."""
    model = mlp().to("meta")
    with per_sample_grads(model, "clip", 1.0) as ps:
        model(torch.randn(5, 4, dtype=torch.float64, device="meta")).sum().backward()
        ps.add_noise(1.0, generator=torch.Generator().manual_seed(0))
    assert all(p.grad.device.type == "meta" for p in ps.parameters)
