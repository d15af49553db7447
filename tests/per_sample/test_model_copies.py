"""A copy of the model made inside a per_sample_grads context (``copy.deepcopy``, as for
an EMA / Polyak-averaged model) carries the context's forward hooks, which deepcopy
copies with the modules: they must not act on the copy. A copy's BatchNorm trained after
the context was refused as a module "set after the context was created" to mix samples.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchbp
from torchbp.per_sample import per_sample_grads


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(6).eval().requires_grad_(False)  # running stats: per sample
    return nn.Sequential(torchbp.nn.Linear(4, 6), norm, nn.Tanh(), torchbp.nn.Linear(6, 3))


def test_copy_made_inside_the_context_trains_after_it():
    model = _model()
    x = torch.randn(5, 4)
    with per_sample_grads(model) as ps:
        ema = copy.deepcopy(model)
        model(x).sum().backward()
    assert ps.norms.shape == (5,)
    ema.train()
    ema(x).sum().backward()  # its BatchNorm now mixes samples, as it may outside a context
    reference = _model().train()
    reference.load_state_dict(model.state_dict())
    reference(x).sum().backward()
    for p, q in zip(ema.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_copy_in_training_mode_does_not_hide_the_model_in_training_mode():
    """The guard still refuses the model's own BatchNorm switched to training mode after
    the context was created, with a copy in evaluation mode beside it."""
    model = _model()
    with per_sample_grads(model):
        ema = copy.deepcopy(model)
        ema(torch.randn(5, 4))
        model.train()
        with pytest.raises(TypeError, match=r"'1' \(BatchNorm1d\) normalises with statistics"):
            model(torch.randn(5, 4))
