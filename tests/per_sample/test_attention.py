"""per_sample_grads and nn.MultiheadAttention: its forward hands ``out_proj.weight`` and
``.bias`` to ``F.multi_head_attention_forward`` itself, never calling the Linear, so a
trainable ``out_proj`` (its input projections frozen) was refused only at the backward, as
a parameter reached by "an op other than its recorded Linear call". Now refused at
creation, naming the attention module; frozen, it is fine. Under torchbp.enable() the
out_proj call inside F.multi_head_attention_forward is torchbp's linear on the output
flattened to (T·B, E): it gave norms of shape (T·B,), silently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchbp
from torchbp.per_sample import per_sample_grads


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = torchbp.convert(_Attention())
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.in_proj_bias.requires_grad_(False)
    return model


def test_trainable_out_proj_refused_at_creation_naming_the_attention():
    with pytest.raises(TypeError, match=r"'attn' \(MultiheadAttention\) has a trainable out_proj"):
        per_sample_grads(_model())


def test_frozen_attention_passes_its_output_to_a_trainable_head():
    model = _model()
    model.attn.out_proj.requires_grad_(False)
    x, y = torch.randn(5, 3, 4), torch.tensor([0, 1, 2, 0, 1])
    with per_sample_grads(model, mode="grads") as ps:
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    assert ps.norms.shape == (5,)
    torch.testing.assert_close(model.head.weight.grad_sample.sum(0), model.head.weight.grad)


def test_trainable_out_proj_refused_under_torchbp_enable():
    model = _model()
    model.head.requires_grad_(False)
    with torchbp.enable():
        with pytest.raises(TypeError, match=r"'attn' \(MultiheadAttention\).*\(T\*B, E\)"):
            with per_sample_grads(model) as ps:
                model(torch.randn(5, 3, 4)).sum().backward()
            assert ps.norms.shape == (5,), f"norms of shape {tuple(ps.norms.shape)}"
