"""``_execution.values_inspectable`` by tensor kind: a plain tensor answers by its own
device (its storage is there), a subclass by its storage's (a fake tensor's is on meta)."""

from __future__ import annotations

import pytest
import torch

from torchbp._execution import values_inspectable


def _fake_cpu_tensor() -> torch.Tensor:
    # FakeTensorMode has no public import path (as tests/test_public_api_only.py uses it)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(3)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.randn(3), True),
        (lambda: torch.nn.Parameter(torch.randn(3)), True),
        (lambda: torch.empty(3, device="meta"), False),
        (lambda: torch.nn.Parameter(torch.empty(3, device="meta")), False),
        (_fake_cpu_tensor, False),
    ],
    ids=["plain", "parameter", "meta", "meta-parameter", "fake-cpu"],
)
def test_values_inspectable_by_tensor_kind(make, expected):
    t = make()
    assert values_inspectable(t) is expected
