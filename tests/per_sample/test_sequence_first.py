"""per_sample_grads and torch's Transformer layers, whose Linear children see the layer's
input as given: sequence-first ``(T, B, d)`` unless built with ``batch_first=True``.

With ``batch_first=False`` dim 0 of ``linear1`` / ``linear2``'s inputs is the position:
when ``T == B`` the context took positions for samples and gave wrong norms and
gradients, silently (else it refused at the backward, the sample dims disagreeing, without
naming the cause). Now refused at creation, naming the Linear and the layer.
"""

from __future__ import annotations

import pytest
import torch
from tests.per_sample._truth import assert_matches_truth, per_sample_truth, summed_cross_entropy
from torch import nn

import torchbp
from torchbp.per_sample import per_sample_grads


class _Encoder(nn.Module):
    """A Transformer encoder layer on (B, T, d) inputs, mean-pooled, and a head; its
    attention and norms frozen (their parameters are not torchbp Linears')."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.enc = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


def _model(batch_first: bool) -> nn.Module:
    torch.manual_seed(0)
    model = torchbp.convert(_Encoder(batch_first)).double()
    for name, p in model.named_parameters():
        if "self_attn" in name or "norm" in name:
            p.requires_grad_(False)
    return model


def test_batch_first_false_refused_naming_the_linear_and_its_layer():
    with pytest.raises(
        TypeError, match=r"'enc.linear1' \(Linear\) is inside 'enc' \(TransformerEncoderLayer\)"
    ):
        per_sample_grads(_model(batch_first=False))


def test_decoder_layer_at_the_root_refused():
    torch.manual_seed(0)
    layer = torchbp.convert(nn.TransformerDecoderLayer(4, 2, 8, dropout=0.0))
    layer.requires_grad_(False)
    layer.linear2.bias.requires_grad_(True)
    with pytest.raises(TypeError, match=r"'linear2' \(Linear\) is inside the model \(Transfo"):
        per_sample_grads(layer)


def test_frozen_linears_of_a_sequence_first_layer_are_fine():
    model = _model(batch_first=False)
    model.enc.requires_grad_(False)
    assert [p for p in model.parameters() if p.requires_grad] == list(model.head.parameters())
    per_sample_grads(model)


# torch.func's fallback for the attention kernel under vmap (slower, not wrong)
@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_batch_first_true_matches_torch_func():
    """With T == B, where positions and samples have the same count."""
    model = _model(batch_first=True)
    x, y = torch.randn(5, 5, 4, dtype=torch.double), torch.tensor([0, 1, 2, 0, 1])
    truth = per_sample_truth(model, x, y)
    with per_sample_grads(model, mode="grads") as ps:
        summed_cross_entropy(model, x, y).backward()
    assert_matches_truth(model, ps, truth)
