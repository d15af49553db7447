"""Autocast: torchbp's output and gradient dtypes equal native's, values agree.

CPU bfloat16 (and float16) autocast always; CUDA float16 / bfloat16 variants skip without a
GPU. Inputs arrive in float32 (autocast casts them) and in the low-precision dtype (what a
layer after an autocast Linear receives).
"""

from __future__ import annotations

import pytest
import torch
from tests._support import ACTIVATION_MODULES, NATIVE, UNARY

import torchbp
import torchbp.functional as BP

pytestmark = pytest.mark.usefixtures("seed")

AMP_DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}, torch.float16: {"atol": 3e-3, "rtol": 3e-3}}

W = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
B = torch.randn(3, generator=torch.Generator().manual_seed(2))
TARGET = torch.tensor([0, 2, 1, 2])
CLASS_WEIGHT = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.5])
PROBS = torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(3)), dim=1)

# name -> fn(ns, x, extras) where extras holds device-placed constants
OPS = {
    "linear": lambda ns, x, e: ns.linear(x, e["w"], e["b"]),
    "linear_nobias": lambda ns, x, e: ns.linear(x, e["w"]),
    # every activation and softmax variant
    **{str(v): lambda ns, x, e, v=v: v.call(ns, x) for v in UNARY},
    "nll_loss": lambda ns, x, e: ns.nll_loss(x, e["t"]),
    "nll_loss_weight_none": lambda ns, x, e: ns.nll_loss(
        x, e["t"], weight=e["cw"], reduction="none"
    ),
    "cross_entropy": lambda ns, x, e: ns.cross_entropy(x, e["t"]),
    "cross_entropy_smooth_weight_sum": lambda ns, x, e: ns.cross_entropy(
        x, e["t"], weight=e["cw"], label_smoothing=0.1, reduction="sum"
    ),
    "cross_entropy_probs": lambda ns, x, e: ns.cross_entropy(x, e["p"]),
}


def _extras(device):
    return {
        "w": W.to(device).requires_grad_(),
        "b": B.to(device).requires_grad_(),
        "t": TARGET.to(device),
        "cw": CLASS_WEIGHT.to(device),
        "p": PROBS.to(device),
    }


def _run(ns, op, x0, extras, device, amp_dtype):
    x = x0.detach().clone().requires_grad_()
    leaves = [x] + [v for v in extras.values() if v.requires_grad]
    for t in leaves[1:]:
        t.grad = None
    with torch.autocast(device, dtype=amp_dtype):
        out = OPS[op](ns, x, extras)
    # a cotangent in the output's dtype, as an upstream op under autocast would send
    g = torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape).to(out.dtype)
    out.backward(g)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", ["float32", "low"])
@pytest.mark.parametrize("op", list(OPS))
def test_op_dtypes_under_autocast(op, in_dtype, amp_dtype, device):
    x0 = torch.randn(4, 5).to(device)
    if in_dtype == "low":
        x0 = x0.to(amp_dtype)
    got, got_grads = _run(BP, op, x0, _extras(device), device, amp_dtype)
    want, want_grads = _run(NATIVE, op, x0, _extras(device), device, amp_dtype)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    tol = TOL[amp_dtype]
    torch.testing.assert_close(got, want, **tol)
    assert got_grads[0] is not None  # the input's
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)  # parameters the op does not use get none
        if g is None:
            continue
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES, ids=str)
def test_autocast_off_inside_leaves_float32(amp_dtype, device):
    """``autocast(enabled=False)`` (and no autocast at all) keeps float32 linear in float32."""
    x = torch.randn(4, 5, device=device)
    with torch.autocast(device, dtype=amp_dtype):
        with torch.autocast(device, enabled=False):
            y = BP.linear(x, W.to(device))
        z = BP.linear(x, W.to(device))
    assert y.dtype == torch.float32
    assert z.dtype == amp_dtype


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("act", list(ACTIVATION_MODULES))
def test_model_under_autocast(act, amp_dtype, device):
    """MLP + cross-entropy: loss dtype, activation dtypes and float32 parameter grads match
    native's, and the values agree to the low-precision tolerance."""
    bp_act, torch_act = ACTIVATION_MODULES[act]

    def build(nn, a):
        return torch.nn.Sequential(nn.Linear(8, 16), a(), nn.Linear(16, 4)).to(device)

    bp = build(torchbp.nn, bp_act)
    native = build(torch.nn, torch_act)
    native.load_state_dict(bp.state_dict())
    x = torch.randn(6, 8, device=device)
    y = torch.randint(4, (6,), device=device)
    results = []
    for model, loss_fn in ((bp, torchbp.nn.CrossEntropyLoss()), (native, torch.nn.functional)):
        with torch.autocast(device, dtype=amp_dtype):
            hidden = model[1](model[0](x))
            logits = model[2](hidden)
            loss = loss_fn(logits, y) if model is bp else loss_fn.cross_entropy(logits, y)
        loss.backward()
        results.append((hidden, logits, loss, [p.grad for p in model.parameters()]))
    (h, z, loss, grads), (h_ref, z_ref, loss_ref, grads_ref) = results
    assert (h.dtype, z.dtype, loss.dtype) == (h_ref.dtype, z_ref.dtype, loss_ref.dtype)
    assert z.dtype == amp_dtype and loss.dtype == torch.float32
    tol = TOL[amp_dtype]
    torch.testing.assert_close(loss, loss_ref, **tol)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == g_ref.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, **tol)


class _ReportsHPU(torch.Tensor):
    """A CPU tensor that reports the ``hpu`` device, as a device backend's tensor subclass
    (or a fake tensor) reports the device its storage is not on."""

    @property
    def device(self):
        return torch.device("hpu")


@pytest.mark.parametrize("amp_dtype", AMP_DTYPES, ids=str)
def test_autocast_on_a_device_beyond_cpu_cuda_xpu_mps_casts(amp_dtype):
    """Proves that autocast is read for any device type torch has one for, through the
    public queries, not only for cpu / cuda / xpu / mps: ``torch.autocast("hpu")`` needs no
    HPU to be entered, and a tensor reporting ``hpu`` gets that autocast's dtype from
    ``linear`` (torchbp ran float32 there, where native casts), and none outside it. It
    does not prove a real HPU's kernels run: the storage is on the CPU."""
    x = torch.randn(4, 5).as_subclass(_ReportsHPU)
    weight = W.detach().clone().as_subclass(_ReportsHPU).requires_grad_()
    with torch.autocast("hpu", dtype=amp_dtype):
        inside = BP.linear(x, weight)
        with torch.autocast("cpu", enabled=False):  # the storage's device: not asked
            still = BP.linear(x, weight)
    outside = BP.linear(x, weight)
    assert (inside.dtype, still.dtype, outside.dtype) == (amp_dtype, amp_dtype, torch.float32)
    inside.float().sum().backward()
    assert weight.grad.dtype == torch.float32


def test_autocast_of_a_privateuse1_backend_is_read_through_public_queries(monkeypatch):
    """Proves that a privateuse1 backend's autocast (which cannot be entered here: no such
    backend module is registered) is read through ``torch.is_autocast_enabled`` and
    ``torch.get_autocast_dtype`` of its device type, as torch reports it (monkeypatched to
    report it on), and that a device without autocast (``meta``, for which torch's
    queries raise) reads as off."""
    from torchbp.functional._autocast import _autocast_dtype

    name = "privateuseone"  # the privateuse1 backend's name until one renames it

    class ReportsPrivateUse1(torch.Tensor):
        @property
        def device(self):
            return torch.device(name)

    x = torch.randn(2).as_subclass(ReportsPrivateUse1)
    assert _autocast_dtype(x) is None
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device: device == name)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: torch.bfloat16)
    assert _autocast_dtype(x) is torch.bfloat16
    assert _autocast_dtype(torch.empty(2, device="meta")) is None


def _fake_autocast(monkeypatch, device_type, dtype):
    """Make torch's public autocast queries and setters report an autocast of
    ``device_type`` to ``dtype`` that is on (kept in a dict: ``torch.autocast(device_type,
    enabled=False)`` turns it off and back on); other device types are left to torch."""
    state = {"enabled": True, "dtype": dtype}
    names = ("is_autocast_enabled", "get_autocast_dtype", "set_autocast_enabled")
    real = {name: getattr(torch, name) for name in (*names, "set_autocast_dtype")}

    def query(key, name):
        return lambda device, *a: state[key] if device == device_type else real[name](device, *a)

    def setter(key, name):
        def set_(device, value):
            if device != device_type:
                return real[name](device, value)
            state[key] = value

        return set_

    monkeypatch.setattr(torch, "is_autocast_enabled", query("enabled", "is_autocast_enabled"))
    monkeypatch.setattr(torch, "get_autocast_dtype", query("dtype", "get_autocast_dtype"))
    monkeypatch.setattr(torch, "set_autocast_enabled", setter("enabled", "set_autocast_enabled"))
    monkeypatch.setattr(torch, "set_autocast_dtype", setter("dtype", "set_autocast_dtype"))
    return state


SOFTMAX_FAMILY = [v for v in UNARY if v.op.kind == "softmax"]


@pytest.mark.parametrize("device_type", ["cuda", "xpu", "mps"])
@pytest.mark.parametrize("variant", SOFTMAX_FAMILY, ids=str)
def test_softmax_family_runs_in_float32_under_cuda_xpu_mps_autocast(
    variant, device_type, monkeypatch
):
    """Proves that softmax, softmin and log_softmax follow native's autocast lists for
    CUDA, XPU and MPS (aten's autocast_mode.cpp: float32 unless a ``dtype`` is given, a
    float64 input left alone), read through torch's public autocast queries of the
    input's device type (torchbp's device query monkeypatched to report ``device_type``,
    torch's autocast queries to report its autocast on, to bfloat16): a bfloat16 input
    gives native's float32 output and a bfloat16 gradient, a float64 input stays float64,
    a given ``dtype`` is kept, and the autocast is on again after the call. It does not
    prove a real device's kernels run (the tensors are on the CPU)."""
    from torchbp.functional import _autocast, softmax_family

    for module in (_autocast, softmax_family):
        monkeypatch.setattr(module, "_device_type", lambda t: device_type)
    state = _fake_autocast(monkeypatch, device_type, torch.bfloat16)
    x0 = torch.randn(4, 5).to(torch.bfloat16)
    x, native_x = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    out = variant.call(BP, x)
    assert state["enabled"]  # switched off for the float32 call only
    want = variant.call(NATIVE, native_x.float())
    g = torch.linspace(-1, 1, 20).reshape(4, 5)
    out.backward(g)
    want.backward(g)
    assert (out.dtype, x.grad.dtype) == (torch.float32, torch.bfloat16)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x.grad, native_x.grad)
    double = variant.call(BP, x0.double())
    given = variant.call(BP, x0, dtype=torch.float16)
    assert (double.dtype, given.dtype) == (torch.float64, torch.float16)
