"""torch.func transforms through torchbp's Functions, each compared with its native twin.

``grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd``, ``vmap``, ``hessian`` of every op in the
table below (float64, so the comparison is tight), and per-sample gradients
``vmap(grad(...))`` of a small MLP with cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from tests._support import ACTIVATION_MODULES, NATIVE, UNARY
from torch import func

import torchbp
import torchbp.functional as BP

pytestmark = pytest.mark.usefixtures("seed")

DTYPE = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-8}


@dataclass
class Case:
    """``fn(ns, *diff, *const)`` for ``ns`` one of torchbp.functional / NATIVE;
    ``make(device)`` returns ``(diff, const)``: the tensors differentiated, the rest."""

    name: str
    fn: Callable
    make: Callable
    forward_ad: bool = True

    def __repr__(self) -> str:
        return self.name


def _randn(device, *shape):
    return torch.randn(*shape, dtype=DTYPE).to(device)


def _x(device):
    return (_randn(device, 4, 5),), ()


def _probs(device, *shape):
    return torch.softmax(_randn(device, *shape), dim=1)


CASES = [
    Case(
        "linear",
        lambda ns, x, w, b: ns.linear(x, w, b),
        lambda d: ((_randn(d, 4, 5), _randn(d, 3, 5), _randn(d, 3)), ()),
    ),
    Case(
        "linear_nobias",
        lambda ns, x, w: ns.linear(x, w),
        lambda d: ((_randn(d, 2, 4, 5), _randn(d, 3, 5)), ()),
    ),
    # every activation and softmax variant
    *(Case(str(v), lambda ns, x, v=v: v.call(ns, x), _x) for v in UNARY),
    Case(
        "nll_loss",
        lambda ns, logp, t, w: ns.nll_loss(logp, t, weight=w, ignore_index=1),
        lambda d: (
            (torch.log_softmax(_randn(d, 4, 5), 1),),
            (torch.tensor([0, 1, 4, 2], device=d), torch.rand(5, dtype=DTYPE).to(d)),
        ),
    ),
    Case(
        "cross_entropy",
        lambda ns, z, t: ns.cross_entropy(z, t),
        lambda d: ((_randn(d, 4, 5),), (torch.tensor([0, 3, 4, 2], device=d),)),
    ),
    Case(
        "cross_entropy_weight_smooth_ignore_sum",
        lambda ns, z, t, w: ns.cross_entropy(
            z, t, weight=w, ignore_index=2, label_smoothing=0.1, reduction="sum"
        ),
        lambda d: (
            (_randn(d, 4, 5),),
            (torch.tensor([0, 2, 4, 1], device=d), torch.rand(5, dtype=DTYPE).to(d)),
        ),
    ),
    Case(
        "cross_entropy_kdim_none",
        lambda ns, z, t: ns.cross_entropy(z, t, reduction="none"),
        lambda d: ((_randn(d, 2, 5, 3),), (torch.randint(5, (2, 3)).to(d),)),
    ),
    Case(
        "cross_entropy_probs",
        lambda ns, z, t: ns.cross_entropy(z, t, label_smoothing=0.2),
        lambda d: ((_randn(d, 4, 5),), (_probs(d, 4, 5),)),
    ),
    # The probability target differentiated too: reverse mode only (forward-mode AD with
    # respect to the target is documented as unsupported).
    Case(
        "cross_entropy_probs_target_grad",
        lambda ns, z, t: ns.cross_entropy(z, t),
        lambda d: ((_randn(d, 4, 5), _probs(d, 4, 5)), ()),
        forward_ad=False,
    ),
]
FORWARD_CASES = [c for c in CASES if c.forward_ad]


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOL)


def _fixed_cotangent(case, diff, const):
    """A fixed random cotangent of the output's shape (so every output entry matters)."""
    out = case.fn(NATIVE, *diff, *const)
    return torch.randn(out.shape, dtype=DTYPE).to(out.device)


def _scalar(case, ns, const, cot):
    """``(*diff) -> <fn(*diff), cot>``: a scalar function for grad / hessian."""
    return lambda *diff: (case.fn(ns, *diff, *const) * cot).sum()


def _vector(case, ns, const):
    return lambda *diff: case.fn(ns, *diff, *const)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_grad(case, device):
    diff, const = case.make(device)
    cot = _fixed_cotangent(case, diff, const)
    argnums = tuple(range(len(diff)))
    got = func.grad(_scalar(case, BP, const, cot), argnums=argnums)(*diff)
    want = func.grad(_scalar(case, NATIVE, const, cot), argnums=argnums)(*diff)
    _close(got, want)
    assert any(g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vjp(case, device):
    diff, const = case.make(device)
    cot = _fixed_cotangent(case, diff, const)
    out, vjp_fn = func.vjp(_vector(case, BP, const), *diff)
    out_ref, vjp_ref = func.vjp(_vector(case, NATIVE, const), *diff)
    _close(out, out_ref)
    _close(vjp_fn(cot), vjp_ref(cot))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_jacrev(case, device):
    diff, const = case.make(device)
    argnums = tuple(range(len(diff)))
    got = func.jacrev(_vector(case, BP, const), argnums=argnums)(*diff)
    want = func.jacrev(_vector(case, NATIVE, const), argnums=argnums)(*diff)
    _close(got, want)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_jvp(case, device):
    diff, const = case.make(device)
    tangents = tuple(torch.randn_like(t) for t in diff)
    got = func.jvp(_vector(case, BP, const), diff, tangents)
    want = func.jvp(_vector(case, NATIVE, const), diff, tangents)
    _close(got, want)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_jacfwd(case, device):
    diff, const = case.make(device)
    argnums = tuple(range(len(diff)))
    got = func.jacfwd(_vector(case, BP, const), argnums=argnums)(*diff)
    want = func.jacfwd(_vector(case, NATIVE, const), argnums=argnums)(*diff)
    _close(got, want)


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_hessian(case, device):
    """``hessian = jacfwd(jacrev(f))``: forward mode over the hand-written backward."""
    diff, const = case.make(device)
    cot = _fixed_cotangent(case, diff, const)
    got = func.hessian(_scalar(case, BP, const, cot))(*diff)
    want = func.hessian(_scalar(case, NATIVE, const, cot))(*diff)
    _close(got, want)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vmap(case, device):
    """vmap over a new leading dim of every argument (targets and class weights too)."""
    batch = 3
    samples = [case.make(device) for _ in range(batch)]
    stacked = [torch.stack(ts) for ts in zip(*(d + c for d, c in samples))]
    got = func.vmap(lambda *a: case.fn(BP, *a))(*stacked)
    want = func.vmap(lambda *a: case.fn(NATIVE, *a))(*stacked)
    _close(got, want)
    # and vmap agrees with the loop it stands for
    loop = torch.stack([case.fn(BP, *d, *c) for d, c in samples])
    _close(got, loop)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vmap_of_vjp(case, device):
    """vmap over cotangents of a vjp: the batched backward of the hand-written formula."""
    diff, const = case.make(device)
    _, vjp_fn = func.vjp(_vector(case, BP, const), *diff)
    _, vjp_ref = func.vjp(_vector(case, NATIVE, const), *diff)
    out = case.fn(NATIVE, *diff, *const)
    cots = torch.randn(3, *out.shape, dtype=DTYPE).to(out.device)
    _close(func.vmap(vjp_fn)(cots), func.vmap(vjp_ref)(cots))


_TARGET_ONLY = {
    "class_indices": lambda ns, z, b: ns.cross_entropy(z, b["y"]),
    "ignore_index": lambda ns, z, b: ns.cross_entropy(z, b["y"], ignore_index=2),
    "none": lambda ns, z, b: ns.cross_entropy(z, b["y"], reduction="none"),
    "weight": lambda ns, z, b: ns.cross_entropy(z, b["y"][0], weight=b["w"]),
    "weight_smoothing": lambda ns, z, b: ns.cross_entropy(
        z, b["y"][0], weight=b["w"], label_smoothing=0.2
    ),
    "probabilities": lambda ns, z, b: ns.cross_entropy(z, b["p"]),
    "probabilities_smoothing": lambda ns, z, b: ns.cross_entropy(z, b["p"], label_smoothing=0.1),
    "grad_of_logits": lambda ns, z, b: func.grad(lambda q: ns.cross_entropy(q, b["y"]))(z),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("call", list(_TARGET_ONLY), ids=str)
def test_vmap_over_the_target_or_weights_alone(call, dtype, device):
    """vmap batching only the target (class indices or probabilities) or the class weights,
    the logits a plain tensor: the fast paths, which write in place into buffers of the
    logits' batch shape, must step aside (they crashed: 'vmap: scatter_add_ ... not
    possible', 'Cannot access storage of BatchedTensorImpl')."""
    z = torch.randn(4, 5).to(device, dtype)
    batched = {
        "y": torch.randint(5, (3, 4)).to(device),
        "w": torch.rand(3, 5).to(device, dtype),
        "p": torch.softmax(torch.randn(3, 4, 5), -1).to(device, dtype),
    }
    fn = _TARGET_ONLY[call]
    key = {"weight": "w", "weight_smoothing": "w"}.get(call, "p" if "prob" in call else "y")
    got = func.vmap(lambda t: fn(BP, z, {**batched, key: t}))(batched[key])
    want = func.vmap(lambda t: fn(NATIVE, z, {**batched, key: t}))(batched[key])
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=1e-2)


# --------------------------------------------------------------------------- per-sample grads


def _mlp(linear, act, device):
    return torch.nn.Sequential(linear(6, 8), act(), linear(8, 4)).to(device, DTYPE)


@pytest.mark.parametrize("act", list(ACTIVATION_MODULES), ids=str)
@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss"])
def test_per_sample_grads_mlp(act, loss, device):
    bp_act, torch_act = ACTIVATION_MODULES[act]
    bp_model = _mlp(torchbp.nn.Linear, bp_act, device)
    native_model = _mlp(torch.nn.Linear, torch_act, device)
    native_model.load_state_dict(bp_model.state_dict())
    params = {k: v.detach() for k, v in bp_model.named_parameters()}
    x = _randn(device, 5, 6)
    y = torch.randint(4, (5,)).to(device)

    def make_loss(model, ns):
        def per_sample(p, xi, yi):
            logits = func.functional_call(model, p, (xi.unsqueeze(0),))
            if loss == "nll_loss":
                return ns.nll_loss(ns.log_softmax(logits, dim=1), yi.unsqueeze(0))
            return ns.cross_entropy(logits, yi.unsqueeze(0))

        return per_sample

    got = func.vmap(func.grad(make_loss(bp_model, BP)), in_dims=(None, 0, 0))(params, x, y)
    want = func.vmap(func.grad(make_loss(native_model, NATIVE)), in_dims=(None, 0, 0))(params, x, y)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == (5, *params[k].shape)
        _close(got[k], want[k])
    # the mean of the per-sample grads is the batch gradient
    bp_model.zero_grad()
    logits = bp_model(x)
    if loss == "nll_loss":
        BP.nll_loss(BP.log_softmax(logits, dim=1), y).backward()
    else:
        BP.cross_entropy(logits, y).backward()
    for k, p in bp_model.named_parameters():
        _close(got[k].mean(0), p.grad)


# --------------------------------------------------------------------------- backward of vmap


def _grads_of_vmap(case, ns, stacked, cot, diff_count):
    """``∂<vmap(fn)(*stacked), cot>/∂(the first diff_count args)`` by ``.backward()`` on
    the batched result (the ensemble pattern), with fresh leaves."""
    leaves = [t.detach().requires_grad_(i < diff_count) for i, t in enumerate(stacked)]
    out = func.vmap(lambda *a: case.fn(ns, *a))(*leaves)
    (out * cot).sum().backward()
    return [t.grad for t in leaves[:diff_count]]


_LOSS_CASES = [c for c in CASES if c.name.startswith(("nll", "cross"))]


@pytest.mark.parametrize("case", _LOSS_CASES, ids=str)
def test_backward_through_vmap(case, device):
    """``.backward()`` on vmap's result: the generated vmap rule pairs one set of batch
    dims with both what is saved for backward and for forward, so the two must match
    (linear, nll_loss, cross_entropy crashed: '_add_batch_dim(): incompatible function
    arguments', 'flat_bdims must not be None')."""
    samples = [case.make(device) for _ in range(3)]
    diff_count = len(samples[0][0])
    stacked = [torch.stack(ts) for ts in zip(*(d + c for d, c in samples))]
    out = func.vmap(lambda *a: case.fn(NATIVE, *a))(*stacked)
    cot = torch.randn(out.shape, dtype=DTYPE).to(out.device)
    got = _grads_of_vmap(case, BP, stacked, cot, diff_count)
    want = _grads_of_vmap(case, NATIVE, stacked, cot, diff_count)
    for g, w in zip(got, want, strict=True):
        _close(g, w)
    if case.forward_ad:  # and forward-mode through the same vmap reads the same saves
        diff, const = tuple(stacked[:diff_count]), stacked[diff_count:]
        tangents = tuple(torch.randn_like(t) for t in diff)
        for ns_got, ns_want in zip(
            _jvp_of_vmap(case, BP, diff, const, tangents),
            _jvp_of_vmap(case, NATIVE, diff, const, tangents),
            strict=True,
        ):
            _close(ns_got, ns_want)


def _jvp_of_vmap(case, ns, diff, const, tangents):
    batched = func.vmap(lambda *a: case.fn(ns, *a))
    return func.jvp(lambda *d: batched(*d, *const), diff, tangents)


@pytest.mark.parametrize(
    ("batched", "wants_grad"),
    [("input", "input"), ("weight", "weight"), ("input", "bias"), ("weight", "bias")],
)
def test_linear_backward_through_vmap_one_input_batched(batched, wants_grad, device):
    """vmap(linear) over one argument while another needs the gradient: backward saves
    only what that gradient needs, forward-mode saves both, and the two must still be
    saved alike under vmap (only input or only weight requiring grad crashed)."""
    args = {
        "input": _randn(device, 4, 5),
        "weight": _randn(device, 3, 5),
        "bias": _randn(device, 3),
    }
    args[batched] = torch.stack([args[batched], 2 * args[batched]])
    in_dims = tuple(0 if k == batched else None for k in args)

    def grad_of(ns):
        leaves = {k: v.detach().requires_grad_(k == wants_grad) for k, v in args.items()}
        out = func.vmap(ns.linear, in_dims)(*leaves.values())
        (out * torch.arange(out.numel(), dtype=DTYPE).to(device).view(out.shape)).sum().backward()
        return leaves[wants_grad].grad

    _close(grad_of(BP), grad_of(NATIVE))


def test_nll_loss_backward_through_vmap_over_the_target_alone(device):
    """vmap of nll_loss batching only the target, then ``.backward()`` outside it: the
    loss rows saved for backward are batched, the target saved for forward too, the
    log-probabilities are not ('flat_bdims must not be None')."""
    logp = torch.log_softmax(_randn(device, 4, 5), -1)
    target = torch.randint(5, (3, 4)).to(device)

    def grad_of(ns):
        leaf = logp.detach().requires_grad_()
        out = func.vmap(ns.nll_loss, (None, 0))(leaf, target)
        (out * torch.arange(1.0, 4.0, dtype=DTYPE).to(device)).sum().backward()
        return leaf.grad

    _close(grad_of(BP), grad_of(NATIVE))


def _double_backward_of_vmap(case, ns, stacked, diff_count):
    """Gradients of vmap's result with ``create_graph=True``, then ``.backward()`` of
    their squared norm: ``(first-order grads, second-order grads)``."""
    leaves = [t.detach().requires_grad_(i < diff_count) for i, t in enumerate(stacked)]
    out = func.vmap(lambda *a: case.fn(ns, *a))(*leaves)
    grads = torch.autograd.grad((out**2).sum(), leaves[:diff_count], create_graph=True)
    sum((g**2).sum() for g in grads).backward()
    return [g.detach() for g in grads], [t.grad for t in leaves[:diff_count]]


_CLASS_INDEX_CE_CASES = [
    c for c in _LOSS_CASES if c.name.startswith("cross") and "probs" not in c.name
]


@pytest.mark.parametrize("case", _CLASS_INDEX_CE_CASES, ids=str)
def test_double_backward_through_vmap(case, device):
    """A double backward through vmap: cross_entropy's second-order backward returned a
    gradient for a class-index target, which vmap's rule then tried to reduce to the
    target's shape ('size {[4]} is not expandable to size {[4, 5]}')."""
    samples = [case.make(device) for _ in range(3)]
    diff_count = len(samples[0][0])
    stacked = [torch.stack(ts) for ts in zip(*(d + c for d, c in samples))]
    got = _double_backward_of_vmap(case, BP, stacked, diff_count)
    want = _double_backward_of_vmap(case, NATIVE, stacked, diff_count)
    for g, w in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        _close(g, w)
