"""``torchbp.convert``: swap supported torch.nn modules for torchbp twins, and back."""

from __future__ import annotations

import pytest
import torch
from tests._support import build_module
from torch import nn

import torchbp
from torchbp import nn as bpnn
from torchbp.ops import module_twins

pytestmark = pytest.mark.usefixtures("seed")

# every supported torch.nn class and its twin
PAIRS = list(module_twins().items())


class Block(nn.Module):
    """A user module holding supported modules in attributes, a list and a dict."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.acts = nn.ModuleList([nn.GELU(), nn.Tanh()])
        self.heads = nn.ModuleDict({"out": nn.Linear(6, 3), "norm": nn.LayerNorm(3)})
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, y):
        h = self.acts[1](self.acts[0](self.fc(x)))
        return self.loss(self.heads["norm"](self.heads["out"](h)), y)


class MyLinear(nn.Linear):
    """A user subclass (may override forward): convert must leave it alone."""

    def forward(self, input):
        return super().forward(input) * 2


def _model():
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1)),
        Block(),
    )


def _types(module):
    return [type(m) for m in module.modules()]


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model[1](model[0](x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("torch_cls, bp_cls", PAIRS, ids=lambda cls: cls.__name__)
def test_each_supported_module_round_trips(torch_cls, bp_cls):
    m = build_module(torch_cls)
    params = list(m.parameters())
    state = {k: v.clone() for k, v in m.state_dict().items()}
    out = torchbp.convert(m)
    assert out is m and type(m) is bp_cls
    assert list(m.parameters()) == params and all(a is b for a, b in zip(m.parameters(), params))
    back = torchbp.convert(m, to="torch")
    assert back is m and type(m) is torch_cls
    assert m.state_dict().keys() == state.keys()
    assert repr(m) == repr(build_module(torch_cls))


def test_recursive_in_containers_and_custom_modules():
    model = _model()
    before = _types(model)
    params = list(model.parameters())
    out = torchbp.convert(model)
    assert out is model
    assert type(model[0][0]) is bpnn.Linear and type(model[0][1]) is bpnn.LeakyReLU
    block = model[1]
    assert type(block) is Block  # the custom module itself stays
    assert type(block.fc) is bpnn.Linear
    assert [type(a) for a in block.acts] == [bpnn.GELU, bpnn.Tanh]
    assert type(block.heads["out"]) is bpnn.Linear
    assert type(block.heads["norm"]) is nn.LayerNorm  # unsupported: left alone
    assert type(block.loss) is bpnn.CrossEntropyLoss
    assert block.loss.label_smoothing == 0.1
    # the same Parameter objects, in the same order
    after = list(model.parameters())
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params))
    # and back: exactly the original classes
    torchbp.convert(model, to="torch")
    assert _types(model) == before


def test_converted_model_matches_original():
    model = _model()
    reference = _model()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 4), torch.randint(3, (5,))
    want = _loss_and_grads(reference, x, y)
    torchbp.convert(model)
    got = _loss_and_grads(model, x, y)
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)


def test_top_level_module_itself_is_converted():
    m = nn.Linear(3, 2)
    assert type(torchbp.convert(m)) is bpnn.Linear
    assert type(torchbp.convert(m, to="torch")) is nn.Linear


def test_user_subclass_and_unsupported_left_alone():
    model = nn.Sequential(MyLinear(3, 3), nn.ReLU(), nn.Dropout(0.0), nn.Conv1d(1, 1, 1))
    torchbp.convert(model)
    assert type(model[0]) is MyLinear
    assert type(model[1]) is bpnn.ReLU
    assert type(model[2]) is nn.Dropout and type(model[3]) is nn.Conv1d
    x = torch.randn(2, 3)
    torch.testing.assert_close(
        model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias) * 2
    )


def test_torchbp_subclass_left_alone_by_to_torch():
    class MyBPLinear(bpnn.Linear):
        pass

    model = nn.Sequential(MyBPLinear(3, 3), bpnn.Tanh())
    torchbp.convert(model, to="torch")
    assert type(model[0]) is MyBPLinear
    assert type(model[1]) is nn.Tanh


def test_to_torch_on_plain_model_is_a_no_op():
    model = _model()
    before = _types(model)
    torchbp.convert(model, to="torch")
    assert _types(model) == before


def test_idempotent():
    model = _model()
    torchbp.convert(model)
    types = _types(model)
    torchbp.convert(model)
    assert _types(model) == types


def test_inplace_false_leaves_original_untouched():
    model = _model()
    before = _types(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = torchbp.convert(model, inplace=False)
    assert converted is not model
    assert _types(model) == before  # original unchanged
    assert type(converted[0][0]) is bpnn.Linear
    assert type(converted[1].heads["out"]) is bpnn.Linear
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
        torch.testing.assert_close(converted.state_dict()[k], v, rtol=0, atol=0)
    # a copy: its parameters are new objects, so training it leaves the original alone
    assert all(a is not b for a, b in zip(converted.parameters(), model.parameters()))
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(1.0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_hooks_and_training_flag_kept():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model.eval()
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(type(m)))
    torchbp.convert(model)
    model(torch.randn(1, 3))
    assert calls == [bpnn.Linear]
    assert not model.training and not model[0].training


@pytest.mark.parametrize("to", ["TORCH", "nn", "", None, "torchbp "])
def test_bad_to_raises(to):
    model = _model()
    before = _types(model)
    with pytest.raises(ValueError, match="to"):
        torchbp.convert(model, to=to)
    assert _types(model) == before


def test_non_module_raises():
    with pytest.raises(TypeError):
        torchbp.convert(torch.randn(3))
