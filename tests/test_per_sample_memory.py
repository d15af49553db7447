"""torchbp.per_sample.memory: huge-page buffers for materialised per-sample gradients."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

import torchbp
from torchbp.per_sample import memory, per_sample_grads

linux_only = pytest.mark.skipif(
    not memory._HAS_MADVISE or not sys.platform.startswith("linux"),
    reason="MADV_HUGEPAGE is Linux-only",
)


@pytest.fixture
def always_huge(monkeypatch):
    """Every CPU buffer takes the huge-page path, however small."""
    monkeypatch.setattr(memory, "MIN_BYTES", 0)


@linux_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_empty_is_an_aligned_writable_tensor(always_huge, dtype):
    like = torch.ones(2, dtype=dtype)
    t = memory.empty((3, 5, 7), like=like)
    assert t.shape == (3, 5, 7) and t.dtype == dtype and t.device.type == "cpu"
    assert t.is_contiguous()
    assert t.data_ptr() % memory.HUGE_PAGE == 0
    t.fill_(2.5)
    assert bool((t == 2.5).all())


@linux_only
def test_the_mapping_lives_as_long_as_a_view(always_huge):
    view = memory.zeros((64, 1024), like=torch.ones(1))[5]
    gc.collect()
    view.add_(1.0)  # would fault if the mapping had been unmapped
    assert view.sum().item() == 1024.0


@linux_only
def test_zeros_reads_as_zeros(always_huge):
    t = memory.zeros((4, 1 << 20), like=torch.ones(1))
    assert t.data_ptr() % memory.HUGE_PAGE == 0
    assert not t.any()


def test_small_or_non_cpu_buffers_use_torchs_allocator(monkeypatch):
    def never(nbytes):
        raise AssertionError("huge-page path taken")

    monkeypatch.setattr(memory, "_huge_page_buffer", never)
    small = memory.empty((4, 4), like=torch.ones(1))
    assert small.shape == (4, 4)
    meta = memory.zeros((1 << 20, 64), like=torch.ones(1, device="meta"))
    assert meta.device.type == "meta" and meta.shape == (1 << 20, 64)
    if memory._HAS_MADVISE:  # the guard above is live: a large CPU buffer does call it
        monkeypatch.setattr(memory, "MIN_BYTES", 0)
        with pytest.raises(AssertionError, match="huge-page path"):
            memory.empty((4, 4), like=torch.ones(1))


def test_a_refused_mapping_falls_back(monkeypatch, always_huge):
    def refuse(nbytes):
        return None

    monkeypatch.setattr(memory, "_huge_page_buffer", refuse)
    t = memory.zeros((3, 4), like=torch.ones(1, dtype=torch.float64))
    assert t.dtype == torch.float64 and not t.any()


@linux_only
@pytest.mark.parametrize("shape", [(6, 5), (6, 3, 5)])
def test_grads_mode_in_huge_pages_equals_the_usual_memory(monkeypatch, shape):
    """The same per-sample gradients (bit for bit), and an unreached layer's are zeros."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torchbp.nn.Linear(5, 8), torchbp.nn.Tanh(), torchbp.nn.Linear(8, 3))
    unused = torchbp.nn.Linear(5, 2)
    model.add_module("unused", unused)
    model.forward = lambda x: model[2](model[1](model[0](x)))
    x = torch.randn(*shape)
    target = torch.randint(3, shape[:-1])

    def samples():
        model.zero_grad(set_to_none=True)
        with per_sample_grads(model, mode="grads"):
            logits = model(x)
            if logits.dim() == 3:
                logits = logits.transpose(1, 2)
            torchbp.nn.CrossEntropyLoss()(logits, target).backward()
        return {n: p.grad_sample.clone() for n, p in model.named_parameters()}

    usual = samples()
    monkeypatch.setattr(memory, "MIN_BYTES", 0)
    huge = samples()
    assert unused.weight.grad_sample.data_ptr() % memory.HUGE_PAGE == 0
    for name in usual:
        assert torch.equal(usual[name], huge[name]), name
    assert not huge["unused.weight"].any()
