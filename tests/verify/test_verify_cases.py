"""The built-in ops' references (``torchbp.verify.cases.OPS``) stay native's when
``torch.nn.functional`` is patched with torchbp's own functions after import (as kernel
libraries patch theirs): otherwise ``torchbp-verify`` would compare torchbp with itself."""

import pytest
import torch
import torch.nn.functional as F

import torchbp.functional as TF
from torchbp.verify.cases import OPS


@pytest.mark.parametrize("name", sorted(OPS))
def test_references_are_natives_when_torch_functional_is_patched(monkeypatch, name):
    def refuse(*args, **kwargs):
        raise AssertionError("the reference called a patched torch.nn.functional")

    for patched in ("linear", "cross_entropy", "nll_loss", name):
        if hasattr(F, patched) and hasattr(TF, patched):
            monkeypatch.setattr(F, patched, refuse)
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    if name == "linear":
        args = (x, torch.randn(3, 6))
    elif name == "linear_cross_entropy":
        args = (x, torch.randn(5, 6), torch.tensor([0, 1, 4, 2]))
    elif name == "nll_loss":
        args = (x.log_softmax(1), torch.tensor([0, 1, 5, 2]))
    elif name == "cross_entropy":
        args = (x, torch.tensor([0, 1, 5, 2]))
    elif name in ("softmax", "softmin", "log_softmax"):
        args = (x, 1)
    else:
        args = (x,)
    OPS[name](*args)  # raises if it reached a patched function
