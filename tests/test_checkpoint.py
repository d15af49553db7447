"""Activation checkpointing and repeated backward through torchbp's Functions.

* ``torch.utils.checkpoint`` (reentrant and not) around blocks of torchbp modules gives the
  gradients of the un-checkpointed model (and of native torch).
* ``backward(retain_graph=True)`` then a second backward gives the same gradients again
  (nothing a backward needs is consumed or overwritten by the first one), for every op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests._support import ACTIVATION_MODULES, NATIVE, UNARY
from torch.utils.checkpoint import checkpoint

import torchbp
import torchbp.functional as BP
from torchbp.autograd import losses as _losses

pytestmark = pytest.mark.usefixtures("seed")

DT = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-8}


class Net(torch.nn.Module):
    """Two checkpointed segments: ``Linear -> act``, then ``Linear -> act -> Linear`` with
    the losses (cross-entropy + NLL of LogSoftmax) inside the segment."""

    def __init__(self, nn, act, ckpt=None):
        super().__init__()
        self.block1 = torch.nn.Sequential(nn.Linear(6, 8), act())
        self.block2 = torch.nn.Sequential(nn.Linear(8, 8), act(), nn.Linear(8, 4))
        self.log_softmax = nn.LogSoftmax(dim=1)
        self.nll = nn.NLLLoss()
        self.ce = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.ckpt = ckpt

    def _loss(self, h, y):
        z = self.block2(h)
        return self.ce(z, y) + self.nll(self.log_softmax(z), y)

    def forward(self, x, y):
        if self.ckpt is None:
            return self._loss(self.block1(x), y)
        h = checkpoint(self.block1, x, use_reentrant=self.ckpt)
        return checkpoint(self._loss, h, y, use_reentrant=self.ckpt)


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    loss = model(x, y)
    loss.backward()
    return loss.detach(), x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("act", list(ACTIVATION_MODULES))
def test_checkpoint_matches_plain_and_native(act, reentrant, device):
    bp_act, torch_act = ACTIVATION_MODULES[act]
    ckpt_model = Net(torchbp.nn, bp_act, ckpt=reentrant).to(device, DT)
    plain = Net(torchbp.nn, bp_act).to(device, DT)
    native = Net(torch.nn, torch_act).to(device, DT)
    plain.load_state_dict(ckpt_model.state_dict())
    native.load_state_dict(ckpt_model.state_dict())
    x = torch.randn(5, 6, dtype=DT, device=device)
    y = torch.randint(4, (5,), device=device)
    got = _grads(ckpt_model, x, y)
    for want in (_grads(plain, x, y), _grads(native, x, y)):
        torch.testing.assert_close(got[0], want[0], **TOL)
        torch.testing.assert_close(got[1], want[1], **TOL)
        assert len(got[2]) == len(want[2]) == 6
        for g, w in zip(got[2], want[2]):
            assert g is not None
            torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpoint_functional_ops(reentrant, device):
    """Every functional op inside one checkpointed segment, double-checked against native."""

    def segment(ns, x, w, b, y):
        h = ns.linear(x, w, b)
        h = sum(v.call(ns, h) for v in UNARY)  # every activation and softmax variant
        return ns.cross_entropy(h, y) + ns.nll_loss(ns.log_softmax(h, dim=1), y)

    x = torch.randn(5, 6, dtype=DT, device=device)
    w = torch.randn(4, 6, dtype=DT, device=device)
    b = torch.randn(4, dtype=DT, device=device)
    y = torch.randint(4, (5,), device=device)
    results = []
    for ns, ckpt in ((BP, True), (NATIVE, False)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        if ckpt:
            loss = checkpoint(segment, ns, *leaves, y, use_reentrant=reentrant)
        else:
            loss = segment(ns, *leaves, y)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for g, w_ in zip(*results):
        torch.testing.assert_close(g, w_, **TOL)


# --------------------------------------------------------------------------- retain_graph
def _x(device):
    return torch.randn(4, 5, dtype=DT, device=device)


OPS = {
    "linear": lambda ns, x, e: ns.linear(x, e["w"], e["b"]),
    # every activation and softmax variant
    **{str(v): lambda ns, x, e, v=v: v.call(ns, x) for v in UNARY},
    "nll_loss": lambda ns, x, e: ns.nll_loss(x, e["t"], weight=e["cw"]),
    "cross_entropy": lambda ns, x, e: ns.cross_entropy(x, e["t"]),
    "cross_entropy_none": lambda ns, x, e: ns.cross_entropy(
        x, e["t"], label_smoothing=0.2, reduction="none"
    ),
    "cross_entropy_probs_target_grad": lambda ns, x, e: ns.cross_entropy(x, e["p"]),
}


def _extras(device):
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(3, 5, dtype=DT, generator=g).to(device).requires_grad_(),
        "b": torch.randn(3, dtype=DT, generator=g).to(device).requires_grad_(),
        "t": torch.tensor([0, 4, 1, 2], device=device),
        "cw": torch.rand(5, dtype=DT, generator=g).to(device),
        "p": torch.softmax(torch.randn(4, 5, dtype=DT, generator=g), 1).to(device).requires_grad_(),
    }


def _twice(ns, op, x0, device):
    """Grads of the first and of the second backward of one graph (retain_graph=True)."""
    extras = _extras(device)
    x = x0.clone().requires_grad_()
    out = OPS[op](ns, x, extras)
    cot = torch.linspace(-1, 2, out.numel(), dtype=DT, device=device).reshape(out.shape)
    leaves = [x] + [v for v in extras.values() if v.requires_grad]
    first = torch.autograd.grad(out, leaves, cot, retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(out, leaves, cot, allow_unused=True)
    return first, second


@pytest.mark.parametrize("op", list(OPS))
def test_retain_graph_second_backward_same_grads(op, device):
    x0 = _x(device)
    first, second = _twice(BP, op, x0, device)
    ref_first, _ = _twice(NATIVE, op, x0, device)
    assert first[0] is not None
    for a, b, r in zip(first, second, ref_first):
        assert (a is None) == (b is None) == (r is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=0)  # bit-identical
            torch.testing.assert_close(a, r, **TOL)


def test_retain_graph_accumulates_like_native(device):
    """``.backward(retain_graph=True)`` twice accumulates 2x into ``.grad``."""
    x0 = _x(device)
    t = torch.tensor([0, 4, 1, 2], device=device)
    grads = []
    for ns in (BP, NATIVE):
        x = x0.clone().requires_grad_()
        loss = ns.cross_entropy(ns.tanh(x), t)
        loss.backward(retain_graph=True)
        once = x.grad.clone()
        loss.backward()
        torch.testing.assert_close(x.grad, 2 * once, **TOL)
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], **TOL)


@pytest.mark.skipif(not hasattr(_losses, "_CHUNK_ELEMENTS"), reason="no row-chunked CE path")
def test_retain_graph_chunked_cross_entropy(monkeypatch, device):
    """The row-chunked cross-entropy path (forced with a tiny chunk) also survives a second
    backward, and its grads match native."""
    monkeypatch.setattr(_losses, "_CHUNK_ELEMENTS", 10)  # 2 rows of C=5 per chunk
    x0 = torch.randn(7, 5, dtype=DT, device=device)
    t = torch.tensor([0, 4, 1, 2, 3, 3, 0], device=device)
    x = x0.clone().requires_grad_()
    loss = BP.cross_entropy(x, t, label_smoothing=0.1)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    xr = x0.clone().requires_grad_()
    (gr,) = torch.autograd.grad(F.cross_entropy(xr, t, label_smoothing=0.1), xr)
    torch.testing.assert_close(g2, g1, rtol=0, atol=0)
    torch.testing.assert_close(g1, gr, **TOL)
