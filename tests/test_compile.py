"""torch.compile(fullgraph=True) of small models built from torchbp modules.

``fullgraph=True`` turns any graph break into an error, so each test that compiles proves
there is none; the compiled forward and the gradients it produces must match eager torchbp
and native torch. Most cases use the cheap ``aot_eager`` backend (Dynamo + AOTAutograd,
which traces the hand-written backward too); one case goes through Inductor.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from tests._support import ACTIVATION_MODULES

import torchbp
from torchbp import nn as bpnn

pytestmark = pytest.mark.usefixtures("seed")

# (id, torchbp module, torch module) for every activation variant, in the order the model
# chains them
ACTIVATIONS = [(name, bp, native) for name, (bp, native) in ACTIVATION_MODULES.items()]
IN, HIDDEN, CLASSES, BATCH = 6, 8, 4, 5
WEIGHT = torch.tensor([1.0, 2.0, 0.5, 1.5])
TOL = {"atol": 1e-5, "rtol": 1e-4}


class Net(torch.nn.Module):
    """Linear -> act -> Linear -> act ... -> Linear (one layer per activation), then the sum
    of every loss: cross-entropy (class indices; weight + label smoothing; probabilities),
    NLL of LogSoftmax, and MSE of Softmax against the probability target."""

    def __init__(self, nn, acts):
        super().__init__()
        layers = [nn.Linear(IN, HIDDEN)]
        for act in acts:
            layers += [act(), nn.Linear(HIDDEN, HIDDEN)]
        layers.append(nn.Linear(HIDDEN, CLASSES))
        self.body = torch.nn.Sequential(*layers)
        self.ce = nn.CrossEntropyLoss()
        self.ce_smooth = nn.CrossEntropyLoss(WEIGHT, label_smoothing=0.1)
        self.log_softmax = nn.LogSoftmax(dim=1)
        self.nll = nn.NLLLoss()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x, y, probs):
        z = self.body(x)
        return (
            self.ce(z, y)
            + self.ce_smooth(z, y)
            + self.ce(z, probs)
            + self.nll(self.log_softmax(z), y)
            + torch.nn.functional.mse_loss(self.softmax(z), probs)
        )


def _pair(acts=ACTIVATIONS):
    bp = Net(bpnn, [a[1] for a in acts])
    native = Net(torch.nn, [a[2] for a in acts])
    native.load_state_dict(bp.state_dict())
    x = torch.randn(BATCH, IN)
    y = torch.randint(CLASSES, (BATCH,))
    probs = torch.softmax(torch.randn(BATCH, CLASSES), dim=1)
    return bp, native, (x, y, probs)


def _loss_and_grads(fn, params_of, inputs):
    """Loss, input grad and parameter grads of ``fn(x, y, probs)``; parameters are read
    from ``params_of`` (the eager module behind a compiled one)."""
    params_of.zero_grad(set_to_none=True)
    x, y, probs = inputs
    x = x.clone().requires_grad_()
    loss = fn(x, y, probs)
    loss.backward()
    return loss.detach(), x.grad, {k: p.grad for k, p in params_of.named_parameters()}


def _check(compiled, bp, native, inputs):
    got = _loss_and_grads(compiled, bp, inputs)
    for want in (_loss_and_grads(bp, bp, inputs), _loss_and_grads(native, native, inputs)):
        torch.testing.assert_close(got[0], want[0], **TOL)
        torch.testing.assert_close(got[1], want[1], **TOL)
        assert got[2].keys() == want[2].keys()
        for k in want[2]:
            assert got[2][k] is not None, k
            torch.testing.assert_close(got[2][k], want[2][k], **TOL)


def _compile(model, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True)


def test_compile_every_activation_and_loss_aot_eager():
    """Every activation and loss in one fullgraph compile (AOTAutograd traces the
    hand-written backward), forward and grads equal eager torchbp and native; a second
    call with new values reuses the graph and is still right."""
    bp, native, inputs = _pair()
    compiled = _compile(bp)
    _check(compiled, bp, native, inputs)
    _, _, new_inputs = _pair()
    _check(compiled, bp, native, new_inputs)


def test_compile_single_graph_of_torchbp_functions():
    """One graph for the whole forward, made of torchbp's Functions (captured with their
    backward as ``autograd_function_apply``), with no native softmax / loss kernels."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    acts = [a for a in ACTIVATIONS if a[0] == "leaky_relu"]
    bp, native, inputs = _pair(acts)
    torch._dynamo.reset()
    compiled = torch.compile(bp, backend=counting_backend, fullgraph=True)
    _check(compiled, bp, native, inputs)
    _check(compiled, bp, native, _pair(acts)[2])
    assert len(graphs) == 1
    code = graphs[0].code
    # 3 linear + 1 leaky_relu + 3 cross_entropy + log_softmax + nll + softmax
    assert code.count("higher_order.autograd_function_apply(") == 10
    for native_op in ("cross_entropy(", "nll_loss(", "log_softmax(", "softmax("):
        assert f"torch.nn.functional.{native_op}" not in code


def test_compile_converted_torch_model():
    """A plain torch.nn model passed through torchbp.convert compiles without graph breaks."""
    native = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.SiLU(), torch.nn.Linear(HIDDEN, CLASSES)
    )
    bp = torchbp.convert(native, inplace=False)
    loss_fn = bpnn.CrossEntropyLoss()
    x, y = torch.randn(BATCH, IN), torch.randint(CLASSES, (BATCH,))

    def step(model, x, y):
        return loss_fn(model(x), y)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(bp, x, y)
    loss.backward()
    ref = torch.nn.functional.cross_entropy(native(x), y)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for p, q in zip(bp.parameters(), native.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


class Tiny(torch.nn.Module):
    def __init__(self, nn):
        super().__init__()
        self.body = torch.nn.Sequential(
            nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, CLASSES)
        )
        self.ce = nn.CrossEntropyLoss()

    def forward(self, x, y, probs):
        return self.ce(self.body(x), y)


def test_compile_inductor():
    """One end-to-end Inductor case (generated kernels for forward and hand-written backward)."""
    bp = Tiny(bpnn)
    native = Tiny(torch.nn)
    native.load_state_dict(bp.state_dict())
    _check(_compile(bp, backend="inductor"), bp, native, _pair()[2])


def test_compile_linear_then_inplace_relu():
    acts = [("relu_inplace", lambda: bpnn.ReLU(inplace=True), lambda: torch.nn.ReLU(True))]
    bp, native, inputs = _pair(acts)
    _check(_compile(bp), bp, native, inputs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_linear_cross_entropy_fullgraph(reduction):
    """linear_cross_entropy compiles in one graph (its inference-tensor checks, which
    Dynamo cannot trace, are skipped while compiling: a traced graph never sees one) and
    matches native's cross_entropy(linear(...))."""
    torch.manual_seed(0)
    x = torch.randn(BATCH, IN, requires_grad=True)
    w = torch.randn(CLASSES, IN, requires_grad=True)
    y = torch.randint(CLASSES, (BATCH,))

    def step(x, w, y):
        return torchbp.functional.linear_cross_entropy(x, w, y, reduction=reduction).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w, y), (x, w))
    ref = torch.nn.functional.cross_entropy(x @ w.t(), y, reduction=reduction).sum()
    want = torch.autograd.grad(ref, (x, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# (id, torchbp loss, native loss) of a (T, C) sample's logits and (T,) class indices
_W = torch.rand(CLASSES, dtype=torch.float64)
PER_SAMPLE_LOSSES = [
    ("nll_loss", torchbp.functional.nll_loss, torch.nn.functional.nll_loss),
    ("cross_entropy", torchbp.functional.cross_entropy, torch.nn.functional.cross_entropy),
    (
        "cross_entropy_weight_smoothing",
        lambda z, y: torchbp.functional.cross_entropy(z, y, _W, label_smoothing=0.1),
        lambda z, y: torch.nn.functional.cross_entropy(z, y, _W, label_smoothing=0.1),
    ),
    (
        "cross_entropy_ignore_index",
        lambda z, y: torchbp.functional.cross_entropy(z, y, ignore_index=1),
        lambda z, y: torch.nn.functional.cross_entropy(z, y, ignore_index=1),
    ),
]


@pytest.mark.parametrize(
    ("loss", "native"), [c[1:] for c in PER_SAMPLE_LOSSES], ids=[c[0] for c in PER_SAMPLE_LOSSES]
)
def test_compile_of_per_sample_gradients(loss, native):
    """torch.compile(fullgraph) of vmap(grad(loss)), the per-sample gradient recipe, equals
    native's, float64. Dynamo records the Function's forward there, so cross-entropy's
    in-place exp and gradient buffer must step aside (they crashed it). The loss takes the
    transform's inputs: one computed inside stops on pytorch/pytorch#129845 (docs/ops.md)."""
    z = torch.randn(3, 4, CLASSES, dtype=torch.float64)
    y = torch.randint(CLASSES, (3, 4))
    torch._dynamo.reset()
    compiled = torch.compile(
        torch.func.vmap(torch.func.grad(loss)), backend="aot_eager", fullgraph=True
    )
    torch.testing.assert_close(compiled(z, y), torch.func.vmap(torch.func.grad(native))(z, y))
