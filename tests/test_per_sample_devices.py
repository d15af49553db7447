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


# ---------------------------------------------------- the day's per_sample changes, per device
GRAD_DTYPE = hasattr(nn.Parameter(torch.zeros(1)), "grad_dtype")


@pytest.mark.skipif(not GRAD_DTYPE, reason="this torch has no Tensor.grad_dtype")
def test_float32_gradients_of_a_bfloat16_model_clipped_and_noised(device):
    """``p.grad_dtype`` (float32 main gradients of a bfloat16 model, as mixed-precision
    training keeps them) on each device: clip mode forms ``p.grad`` in float32 on the
    parameter's device, the float64 model's clipped sum within bfloat16's rounding, and
    ``add_noise`` adds, with a generator of that device, noise of the expected size."""
    x = torch.randn(16, 4, dtype=torch.float64)
    wide = mlp()
    with per_sample_grads(wide, "clip", 0.1):
        wide(x).square().sum().backward()
    model = mlp().bfloat16().to(device)
    for p in model.parameters():
        p.grad_dtype = torch.float32
    with per_sample_grads(model, "clip", 0.1) as ps:
        model(x.bfloat16().to(device)).float().square().sum().backward()
        clipped = [p.grad.clone() for p in ps.parameters]
        ps.add_noise(1.0, generator=torch.Generator(device).manual_seed(0))
    for p, q, before in zip(model.parameters(), wide.parameters(), clipped):
        assert p.grad.dtype == torch.float32 and p.grad.device == p.device
        torch.testing.assert_close(before.double().cpu(), q.grad, rtol=0.05, atol=0.01)
    noise = torch.cat([(p.grad - g).flatten() for p, g in zip(model.parameters(), clipped)])
    assert 0.06 < float(noise.std()) < 0.15  # noise_multiplier * max_norm = 0.1, 51 draws


def test_clip_mode_refuses_a_trainable_model_in_front_on_each_device(device):
    """Clip mode's forward hook walks the output's autograd graph for trainable
    parameters outside the model: on each device it refuses a torch Linear run before
    the model, before any gradient, and lets the model alone train."""
    model, front = mlp().to(device), nn.Linear(4, 4).double().to(device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"shape \(4, 4\) that is not one of the model's"):
        with per_sample_grads(model, "clip", 1.0):
            model(front(x)).sum().backward()
    assert all(p.grad is None for p in [*model.parameters(), *front.parameters()])
    with per_sample_grads(model, "clip", 1.0) as ps:
        model(front(x).detach()).sum().backward()
    assert all(p.grad is not None and p.grad.device == x.device for p in ps.parameters)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["norms", "grads", "clip"])
def test_a_per_sample_step_on_cuda_waits_for_no_host_sync(mode):
    """A training step inside the context (creating it, the forward with its hooks, the
    backward with the per-sample results, clip mode's noise) queues GPU work without
    waiting for it: a host sync per step (an ``.item()``, a ``bool`` of a tensor, a copy
    from the CPU) would stall every DP-SGD step. ``set_sync_debug_mode('error')`` makes
    any such sync raise; the first pass, not checked, warms the libraries up."""
    model = nn.Sequential(torchbp.nn.Linear(4, 6), torchbp.nn.GELU(), torchbp.nn.Linear(6, 3))
    model.cuda()
    x = torch.randn(16, 4, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    previous = torch.cuda.get_sync_debug_mode()
    try:
        for checked in ("default", "error"):
            model.zero_grad(set_to_none=True)
            torch.cuda.set_sync_debug_mode(checked)
            with per_sample_grads(model, mode, 0.1 if mode == "clip" else None) as ps:
                model(x).square().sum().backward()
                if mode == "clip":
                    ps.add_noise(1.0, generator=generator)
            torch.cuda.set_sync_debug_mode(previous)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert all(p.grad.isfinite().all() for p in model.parameters())
