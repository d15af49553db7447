"""A DistributedDataParallel model is refused by name when the context is created: DDP
all-reduces gradients in autograd hooks, which see no gradient inside the context (it
forms p.grad after the backward), so the processes' gradients stayed unaveraged."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from torch import nn

import torchbp


@pytest.fixture
def one_process_group(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("nested", [False, True], ids=["wrapped", "inside"])
def test_a_distributed_data_parallel_model_is_refused_by_name(one_process_group, nested):
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(torchbp.nn.Linear(3, 4), torchbp.nn.ReLU(), torchbp.nn.Linear(4, 2))
    )
    if nested:
        model = nn.Sequential(model)
    where = "'0' (DistributedDataParallel)" if nested else "the model (DistributedDataParallel)"
    with pytest.raises(TypeError, match=re.escape(where) + r" all-reduces gradients.*ddp\.module"):
        torchbp.per_sample_grads(model, mode="norms")


def test_the_wrapped_module_is_accepted(one_process_group):
    """The advice works: the wrapped module, its step under no_sync()."""
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(torchbp.nn.Linear(3, 2)))
    x = torch.randn(5, 3)
    with ddp.no_sync(), torchbp.per_sample_grads(ddp.module, mode="norms") as ps:
        ddp(x).square().sum().backward()
    assert ps.norms.shape == (5,)


def _data_parallel(devices: int) -> nn.DataParallel:
    """An ``nn.DataParallel`` of a small model, set to ``devices`` devices (ids only: the
    check reads them; on a machine without GPUs it is built with none)."""
    dp = nn.DataParallel(nn.Sequential(torchbp.nn.Linear(3, 4), torchbp.nn.Linear(4, 2)))
    dp.device_ids = list(range(devices))
    return dp


def test_a_data_parallel_model_over_several_devices_is_refused_by_name():
    """nn.DataParallel over several GPUs runs its module's replicas on threads, whose
    Linear calls carry copies of the parameters: not recorded, their gradient reaches the
    parameters through the copies and was left to be refused at the backward as one "from
    an op other than its recorded Linear call" (asking whether the forward ran before the
    context). Refused by name when the context is created."""
    with pytest.raises(TypeError, match=r"the model \(DataParallel\) runs replicas.*dp\.module"):
        torchbp.per_sample_grads(_data_parallel(2), mode="norms")


def test_a_data_parallel_model_without_replicas_is_served():
    """Over no device (a CPU run) DataParallel calls its module itself."""
    dp = _data_parallel(0)
    with torchbp.per_sample_grads(dp, mode="norms") as ps:
        dp(torch.randn(5, 3)).square().sum().backward()
    assert ps.norms.shape == (5,)
