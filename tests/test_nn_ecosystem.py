"""PyTorch's model tools on a torchbp.nn model, against the same tools on its torch.nn twin.

The drop-in promise reaches past a module's own forward: users export, trace, copy,
reparametrise, prune, hook, average and clip models. Each test applies one tool to a
torchbp MLP and to the same MLP built from ``torch.nn`` (same weights), compares the
outputs and the gradients, and checks that torchbp's Functions are what ran (the backward
graph's nodes; an exported program's stack traces): a tool that silently ran native's ops
would give the same numbers (docs/dropin.md, "PyTorch tools on torchbp modules").
"""

from __future__ import annotations

import copy
import io
import pickle
from collections import Counter

import pytest
import torch
import torch.nn.utils.prune
from torch import nn

import torchbp
import torchbp._execution

pytestmark = pytest.mark.usefixtures("seed")

TOL = {"atol": 1e-12, "rtol": 1e-10}
DT = torch.float64


def _mlp(lib) -> nn.Sequential:
    return nn.Sequential(
        lib.Linear(6, 8), lib.Tanh(), lib.Linear(8, 8), lib.GELU(), lib.Linear(8, 3)
    )


def _twins() -> tuple[nn.Module, nn.Module]:
    """A torchbp MLP and its torch.nn twin with the same float64 weights."""
    native = _mlp(nn).to(DT)
    bp = _mlp(torchbp.nn).to(DT)
    bp.load_state_dict(native.state_dict())
    return bp, native


def _uses_torchbp(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torchbp") for m in model.modules())


#: the backward nodes of torchbp's Functions (``LinearFunctionBackward``, ...)
_TORCHBP_NODES = {op.function.__name__ + "Backward" for op in torchbp.ops.OPS.values()}

#: what a forward of ``_mlp(torchbp.nn)`` records: one node per layer, all torchbp's
_MLP_NODES = Counter(LinearFunctionBackward=3, TanhFunctionBackward=1, GELUFunctionBackward=1)


def _torchbp_nodes(out: torch.Tensor) -> Counter:
    """The torchbp Function nodes of ``out``'s backward graph, by class name: equal
    outputs and gradients alone would not notice a tool that ran native's ops instead."""
    found: Counter = Counter()
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in _TORCHBP_NODES:
            found[type(node).__name__] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _out_and_grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """Output, loss gradient w.r.t. the input and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    expected = _MLP_NODES if _uses_torchbp(model) else Counter()
    assert _torchbp_nodes(out) == expected, "torchbp's Functions did not run (or native's did)"
    torch.nn.functional.cross_entropy(out, target).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return out.detach(), x.grad, grads


def _assert_same(model_a, model_b, batch: int = 5) -> None:
    x = torch.randn(batch, 6, dtype=DT)
    target = torch.randint(0, 3, (batch,))
    out_a, gx_a, grads_a = _out_and_grads(model_a, x, target)
    out_b, gx_b, grads_b = _out_and_grads(model_b, x, target)
    torch.testing.assert_close(out_a, out_b, **TOL)
    torch.testing.assert_close(gx_a, gx_b, **TOL)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, **TOL)


def _traced_from(exported: torch.export.ExportedProgram) -> set[str]:
    """The torchbp files whose code the exported program's operators were traced from
    (``linear.py``, ...: each node's stack trace, where torch.export records it)."""
    files = set()
    for node in exported.graph.nodes:
        for line in (node.meta.get("stack_trace") or "").splitlines():
            if "torchbp/autograd/" in line.replace("\\", "/"):
                files.add(line.split("torchbp/autograd/")[1].split('"')[0])
    return files


def test_export_with_a_dynamic_batch_runs_other_batch_sizes():
    bp, native = _twins()
    batch = torch.export.Dim("batch")
    example = (torch.randn(4, 6, dtype=DT),)
    exported = torch.export.export(bp, example, dynamic_shapes=({0: batch},))
    # the program holds torchbp's forward passes (equal outputs alone would not show it)
    assert {"linear.py", "activations.py"} <= _traced_from(exported), exported.graph
    module = exported.module()
    for n in (2, 9):
        x = torch.randn(n, 6, dtype=DT)
        torch.testing.assert_close(module(x), native(x), **TOL)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_the_torchbp_modules_and_their_results(how):
    bp, native = _twins()
    if how == "deepcopy":
        copied = copy.deepcopy(bp)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(bp))
    else:
        buffer = io.BytesIO()
        torch.save(bp, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    assert _uses_torchbp(copied)
    _assert_same(copied, native)


def test_load_state_dict_assign_from_meta():
    bp, native = _twins()
    with torch.device("meta"):
        fresh = _mlp(torchbp.nn)
    fresh.load_state_dict(native.state_dict(), assign=True)
    _assert_same(fresh, native)


def test_meta_construction_then_to_empty():
    with torch.device("meta"):
        bp = _mlp(torchbp.nn)
    bp = bp.to_empty(device="cpu").to(DT)
    native = _mlp(nn).to(DT)
    bp.load_state_dict(native.state_dict())
    _assert_same(bp, native)


class _Scale(nn.Module):
    def forward(self, w):
        return 0.5 * w


@pytest.mark.parametrize(
    "reparametrise",
    [
        pytest.param(
            lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight", _Scale()),
            id="parametrize",
        ),
        pytest.param(lambda m: torch.nn.utils.parametrizations.weight_norm(m), id="weight_norm"),
        pytest.param(
            lambda m: torch.nn.utils.parametrizations.spectral_norm(m, n_power_iterations=3),
            id="spectral_norm",
        ),
        pytest.param(
            lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.4), id="prune"
        ),
    ],
)
def test_reparametrised_linear_matches_native(reparametrise):
    bp, native = _twins()
    for model in (bp, native):
        torch.manual_seed(3)  # spectral_norm draws its power-iteration vectors
        reparametrise(model[2])
    bp.eval(), native.eval()  # spectral_norm: no power iteration per forward
    _assert_same(bp, native)


def test_full_backward_hooks_see_native_grads():
    bp, native = _twins()
    seen = {}

    def hook(name):
        def record(module, grad_input, grad_output):
            seen.setdefault(name, []).append((grad_input[0].clone(), grad_output[0].clone()))

        return record

    for name, model in (("bp", bp), ("native", native)):
        for layer in model:
            layer.register_full_backward_hook(hook(name))
    _assert_same(bp, native)
    assert len(seen["bp"]) == len(seen["native"]) == len(bp)
    for (gi_a, go_a), (gi_b, go_b) in zip(seen["bp"], seen["native"]):
        torch.testing.assert_close(gi_a, gi_b, **TOL)
        torch.testing.assert_close(go_a, go_b, **TOL)


@pytest.mark.parametrize("which", ["jacobian", "hessian"])
def test_autograd_functional_jacobian_and_hessian(which):
    bp, native = _twins()
    recorded = []
    bp.register_forward_hook(lambda module, args, out: recorded.append(_torchbp_nodes(out)))
    x = torch.randn(6, dtype=DT)
    if which == "jacobian":
        results = [torch.autograd.functional.jacobian(m, x) for m in (bp, native)]
    else:
        results = [
            torch.autograd.functional.hessian(lambda v, m=m: m(v).sum(), x) for m in (bp, native)
        ]
    torch.testing.assert_close(results[0], results[1], **TOL)
    assert recorded == [_MLP_NODES]  # the derivatives are torchbp's backward passes


def test_clip_grad_norm_and_an_optimizer_step_with_a_scheduler():
    bp, native = _twins()
    x = torch.randn(7, 6, dtype=DT)
    target = torch.randint(0, 3, (7,))
    norms = []
    for model in (bp, native):
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), target).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1))
            optimizer.step()
            scheduler.step()
    torch.testing.assert_close(torch.stack(norms[:3]), torch.stack(norms[3:]), **TOL)
    _assert_same(bp, native)


def test_averaged_model_tracks_the_same_average():
    bp, native = _twins()
    averages = [torch.optim.swa_utils.AveragedModel(m) for m in (bp, native)]
    for model, average in zip((bp, native), averages):
        with torch.no_grad():
            for step in range(3):
                for p in model.parameters():
                    p.add_(0.1 * (step + 1))
                average.update_parameters(model)
    assert _uses_torchbp(averages[0].module)
    _assert_same(averages[0].module, averages[1].module)


def test_quantize_dynamic_leaves_torchbp_linears_as_they_are():
    """torch.ao matches exact types: torchbp's Linear stays float, with the float model's
    outputs (not wrong ones); docs/dropin.md says to convert back to torch first."""
    bp, native = _twins()
    bp, native = bp.float(), native.float()
    quantized = torch.ao.quantization.quantize_dynamic(bp, {nn.Linear}, dtype=torch.qint8)
    assert all(type(m) is type(n) for m, n in zip(quantized, bp))
    x = torch.randn(4, 6)
    torch.testing.assert_close(quantized(x), native(x))


def _ensemble_grads(lib, members: list[nn.Module], x: torch.Tensor, target: torch.Tensor):
    """The torch.func ensemble pattern: stack the members' parameters, vmap a stateless
    call of a meta-device copy over them, one loss over every member's logits."""
    params, buffers = torch.func.stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")

    def call(p, b, inputs):
        return torch.func.functional_call(base, (p, b), (inputs,))

    out = torch.func.vmap(call, (0, 0, None))(params, buffers, x)
    lib.CrossEntropyLoss()(out.flatten(0, 1), target.repeat(len(members))).backward()
    return out, {name: p.grad for name, p in params.items()}


def test_vmap_ensemble_backward_matches_torch_nn():
    """stack_module_state + vmap(functional_call) + one backward over the stacked
    parameters (crashed in Linear's backward: '_add_batch_dim(): incompatible function
    arguments ... Invoked with: None, 0, 1')."""

    def members(lib):
        torch.manual_seed(1)
        return [
            nn.Sequential(lib.Linear(4, 8), lib.Tanh(), lib.Linear(8, 3)).to(DT) for _ in range(3)
        ]

    x = torch.randn(5, 4, dtype=DT)
    target = torch.randint(3, (5,))
    out, grads = _ensemble_grads(torchbp.nn, members(torchbp.nn), x, target)
    want_out, want_grads = _ensemble_grads(nn, members(nn), x, target)
    torch.testing.assert_close(out, want_out, **TOL)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOL)


#: the torchbp modules that take ``inplace=True``
_INPLACE = ("ReLU", "LeakyReLU", "ELU", "SiLU")


def _traced_grads(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    torch.nn.functional.cross_entropy(out, target).backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", _INPLACE)
def test_jit_trace_of_an_inplace_activation_runs_torchbps_function(name):
    """``Linear -> ReLU(inplace=True)`` (torchvision's ResNets, most MLPs): the trace
    failed torch's check, and every call of it raised 'inplace ReLUFunction not supported
    in the JIT' (TorchScript cannot run a Function that marks its input dirty); traced,
    the activation runs out of place and is copied in."""
    bp, native = (
        nn.Sequential(lib.Linear(6, 8), getattr(lib, name)(inplace=True), lib.Linear(8, 3))
        for lib in (torchbp.nn, nn)
    )
    bp, native = bp.to(DT), native.to(DT)
    bp.load_state_dict(native.state_dict())
    traced = torch.jit.trace(bp, torch.randn(4, 6, dtype=DT))
    assert f"{name}Function" in str(traced.inlined_graph)  # torchbp's, not native's
    x, target = torch.randn(7, 6, dtype=DT), torch.randint(0, 3, (7,))
    got, want = _traced_grads(traced, x, target), _traced_grads(native, x, target)
    torch.testing.assert_close(got, want, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), want[0], **TOL)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_of_cross_entropy_inplace_keeps_the_logits():
    """``cross_entropy(..., inplace=True)`` traced: as under torch.compile, the gradient is
    not written over the logits (the trace failed as the in-place activations did)."""

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torchbp.nn.Linear(6, 4)

        def forward(self, x, target):
            return torchbp.functional.cross_entropy(self.fc(x), target, inplace=True)

    model = Classifier().to(DT)
    x, target = torch.randn(5, 6, dtype=DT), torch.randint(0, 4, (5,))
    traced = torch.jit.trace(model, (x, target))
    x2, target2 = torch.randn(9, 6, dtype=DT), torch.randint(0, 4, (9,))
    loss = traced(x2, target2)
    want = torch.nn.functional.cross_entropy(model.fc(x2), target2)
    torch.testing.assert_close(loss, want, **TOL)
    got_grads = torch.autograd.grad(loss, list(model.parameters()))
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(got_grads, want_grads, **TOL)


class _SegmentationHead(nn.Module):
    """Per-pixel logits ``(N, C, H, W)`` (a linear's output moved to a convolution's
    layout) and a loss of them; class weights (``softmax`` of a parameter, so computed:
    they require grad only under grad mode) with probability targets."""

    def __init__(self, loss: str) -> None:
        super().__init__()
        self.fc = torchbp.nn.Linear(6, 4)
        self.class_logits = nn.Parameter(torch.randn(4))
        self.loss = loss

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self._logits(x)
        if self.loss == "nll_loss":
            return torchbp.functional.nll_loss(logits.log_softmax(1), target)
        if self.loss == "cross_entropy":
            return torchbp.functional.cross_entropy(logits, target, label_smoothing=0.1)
        weight = 4 * self.class_logits.softmax(0)
        return torchbp.functional.cross_entropy(logits, target, weight=weight)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # (N, H, W, C) -> (N, C, H, W), laid out as a convolution gives it
        return self.fc(x).movedim(-1, 1).contiguous()

    def native(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self._logits(x)
        if self.loss == "nll_loss":
            return nn.functional.nll_loss(logits.log_softmax(1), target)
        if self.loss == "cross_entropy":
            return nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
        weight = 4 * self.class_logits.softmax(0)
        return nn.functional.cross_entropy(logits, target, weight=weight)


def _segmentation_batch(n: int, loss: str):
    x = torch.randn(n, 3, 2, 6, dtype=DT)
    if loss == "probabilities":
        return x, torch.randn(n, 4, 3, 2, dtype=DT).softmax(1)
    return x, torch.randint(0, 4, (n, 3, 2))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss", "probabilities"])
def test_jit_trace_of_a_k_dim_loss_takes_one_path_whatever_the_grad_mode(loss, grad_mode):
    """K-dim losses chose their path by whether the logits (or probability targets' class
    weights) required grad, which the trace's own check (under ``no_grad``) saw otherwise:
    tracing failed ('Graphs differed across invocations'), and a trace made under
    ``no_grad`` dropped the class weights' gradient."""
    model = _SegmentationHead(loss).to(DT)
    with torch.set_grad_enabled(grad_mode == "grad"):
        traced = torch.jit.trace(model, _segmentation_batch(2, loss))
    x, target = _segmentation_batch(5, loss)
    got, want = traced(x, target), model.native(x, target)
    torch.testing.assert_close(got, want, **TOL)
    params = list(model.parameters())
    if loss != "probabilities":
        params.remove(model.class_logits)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got_grads, torch.autograd.grad(want, params), **TOL)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("shape", [(4, 6), (2, 4, 6), (2, 3, 4, 6)], ids=["2d", "3d", "4d"])
def test_jit_trace_of_a_linear_on_batched_input(shape):
    """A Linear on ``(B, T, d)`` input (every transformer block): tracing failed ('Cannot
    insert a Tensor that requires grad as a constant') at the ``resize_`` that adds the bias
    inside the GEMM."""
    bp, native = torchbp.nn.Linear(6, 3).to(DT), nn.Linear(6, 3).to(DT)
    bp.load_state_dict(native.state_dict())
    traced = torch.jit.trace(bp, torch.randn(shape, dtype=DT))
    x = torch.randn(5, *shape[1:], dtype=DT, requires_grad=True)
    got, want = traced(x), native(x)
    assert type(got.grad_fn).__name__ == "LinearFunctionBackward"
    torch.testing.assert_close(got, want, **TOL)
    wrt = [x, *native.parameters()]
    got_grads = torch.autograd.grad(got.sum(), [x, *bp.parameters()])
    torch.testing.assert_close(got_grads, torch.autograd.grad(want.sum(), wrt), **TOL)


def _exportable(lib) -> nn.Sequential:
    """Every kind of torchbp layer (an in-place activation too), a native LayerNorm after
    them: a parameter left without its gradient would go unnoticed by a plain backward."""
    return nn.Sequential(
        lib.Linear(6, 8),
        lib.ReLU(inplace=True),
        lib.Linear(8, 8),
        lib.GELU(),
        lib.Linear(8, 4),
        lib.LogSoftmax(-1),
        nn.LayerNorm(4),
    )


# torch < 2.13's Dynamo folds torch.compiler.is_exporting() to True under every
# torch.compile: torchbp keeps its backward under compile there and cannot tell a strict
# export (torchbp._execution.exporting); documented in docs/ops.md
STRICT_OR_NOT = [
    pytest.param(
        True,
        id="strict",
        marks=pytest.mark.skipif(
            not torchbp._execution._DYNAMO_READS_EXPORT_FLAG,
            reason="strict export of torchbp layers needs torch >= 2.13 (docs/ops.md)",
        ),
    ),
    pytest.param(False, id="non_strict"),
]


@pytest.mark.parametrize("strict", STRICT_OR_NOT)
def test_exported_program_trains_as_the_native_one(strict):
    """torch.export's program holds ATen operators, whose autograd gives its gradients.
    Strict export recorded each torchbp Function's forward under no_grad: the torchbp
    layers' parameters got no gradient (the LayerNorm's alone did) and the in-place ReLU
    passed gradients through unchanged."""
    native = _exportable(nn).to(DT)
    bp = _exportable(torchbp.nn).to(DT)
    bp.load_state_dict(native.state_dict())
    x = torch.randn(2, 5, 6, dtype=DT)
    module = torch.export.export(bp, (x,), strict=strict).module()
    x = torch.randn(2, 5, 6, dtype=DT, requires_grad=True)
    got, want = module(x), native(x)
    torch.testing.assert_close(got, want, **TOL)
    target = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [x, *module.parameters()], target)
    want_grads = torch.autograd.grad(want, [x, *native.parameters()], target)
    torch.testing.assert_close(got_grads, want_grads, **TOL)


class _ActivatedViews(nn.Module):
    """Views (column slices, a transposed slice) of a Linear's outputs, activated in place
    by ``functional``'s relu_ / leaky_relu_ / elu_."""

    def __init__(self, functional):
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.functional = functional

    def forward(self, x):
        h = self.linear(x)
        relu, leaky, elu = h * 1.0, h * 2.0, h * 3.0  # a view bumps its base's version
        self.functional.relu_(relu[:, :2])
        self.functional.leaky_relu_(leaky[:, 2:4], 0.2)
        self.functional.elu_(elu.t()[4:])
        return torch.cat([relu, leaky, elu], dim=1)


@pytest.mark.parametrize("strict", STRICT_OR_NOT)
def test_exported_in_place_activations_of_views_train_as_native(strict):
    """While exporting, the Function's forward runs as plain ops: computing out of place
    and copying into the view (eager's way for a recorded view) let ``clamp_min`` / ``elu``
    save the view the copy then overwrote, and the exported module's backward failed
    ("modified by an inplace operation"); native's in-place kernels record it."""
    native = _ActivatedViews(torch.nn.functional).to(DT)
    bp = _ActivatedViews(torchbp.functional).to(DT)
    bp.load_state_dict(native.state_dict())
    x = torch.randn(3, 4, dtype=DT)
    module = torch.export.export(bp, (x,), strict=strict).module()
    got, want = module(x), native(x)
    torch.testing.assert_close(got, want, **TOL)
    target = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, list(module.parameters()), target)
    want_grads = torch.autograd.grad(want, list(native.parameters()), target)
    torch.testing.assert_close(got_grads, want_grads, **TOL)


def _onnx_bytes(model: nn.Module, args: tuple, dynamo: bool) -> bytes:
    """``torch.onnx.export`` of ``model`` (``dynamo=True``: through torch.export; else the
    TorchScript-based exporter, which traces), as bytes; skipped without onnx (both
    exporters write with it)."""
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
        return torch.onnx.export(
            model, args, dynamo=True, verbose=False
        ).model_proto.SerializeToString()
    buffer = io.BytesIO()
    torch.onnx.export(model, args, buffer, dynamo=False)
    return buffer.getvalue()


def _onnx_run(model_bytes: bytes, args: tuple) -> torch.Tensor:
    """The first output of an ONNX model, run by onnx's reference evaluator."""
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load_from_string(model_bytes)
    feeds = {node.name: a.numpy() for node, a in zip(proto.graph.input, args)}
    return torch.from_numpy(ReferenceEvaluator(proto).run(None, feeds)[0])


def _onnx_model(lib) -> nn.Sequential:
    """Every torchbp layer that ONNX exports as native's does (in-place ones too)."""
    return nn.Sequential(
        lib.Linear(6, 8),
        lib.ReLU(inplace=True),
        lib.Linear(8, 8),
        lib.GELU(),
        lib.LeakyReLU(0.1, inplace=True),
        lib.ELU(),
        lib.Softplus(2.0),
        lib.GELU(approximate="tanh"),
        lib.SiLU(),
        lib.Sigmoid(),
        lib.Tanh(),
        lib.Softmin(-1),
        lib.Linear(8, 4),
        lib.LogSoftmax(-1),
        lib.Softmax(0),
    )


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("how", ["convert", "enable"])
def test_onnx_export_computes_natives_output(how, dynamo):
    """A converted model, and a native one exported under ``torchbp.enable()``: the ONNX
    file computes what the native model does."""
    native = _onnx_model(nn).eval()
    x = torch.randn(5, 6)
    want = native(x)
    if how == "convert":
        model_bytes = _onnx_bytes(torchbp.convert(native, inplace=False), (x,), dynamo)
    else:
        with torchbp.enable():
            model_bytes = _onnx_bytes(native, (x,), dynamo)
    torch.testing.assert_close(_onnx_run(model_bytes, (x,)), want, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"reduction": "none"}, {"reduction": "sum", "weight": torch.rand(5)}],
    ids=["mean", "none", "sum_weighted"],
)
def test_onnx_export_of_linear_cross_entropy_loss_computes_natives_loss(kwargs, dynamo):
    """The TorchScript-based exporter replaced cross_entropy's Function (run by the
    unfused pair that export and trace take) by the operators its forward recorded,
    which also compute the logits' gradient: the file returned that gradient's sum, a
    wrong loss, silently. (B, T, in) input, as torchbp takes it."""
    native = nn.Linear(6, 5)
    bp = torchbp.nn.LinearCrossEntropyLoss(6, 5, bias=True, **kwargs).eval()
    bp.linear.load_state_dict(native.state_dict())
    x, target = torch.randn(2, 3, 6), torch.randint(5, (2, 3))
    target[0, 0] = -100
    logits = native(x).reshape(-1, 5)
    want = nn.functional.cross_entropy(logits, target.reshape(-1), **kwargs)
    if kwargs.get("reduction") == "none":
        want = want.reshape(2, 3)
    got = _onnx_run(_onnx_bytes(bp, (x, target), dynamo), (x, target))
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.parametrize("target_kind", ["indices", "probabilities"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"label_smoothing": 0.1},
        {"reduction": "none", "label_smoothing": 0.2},
        {"reduction": "sum", "weight": torch.rand(5), "label_smoothing": 0.1},
        {"weight": torch.rand(5)},
    ],
    ids=["smoothed_mean", "smoothed_none", "smoothed_sum_weighted", "weighted_mean"],
)
def test_onnx_export_of_linear_cross_entropy_loss_forms_compute_natives_composition(
    kwargs, target_kind
):
    """The TorchScript-based exporter records torchbp's linear + cross_entropy (which
    export in every form) for LinearCrossEntropyLoss: label smoothing and probability
    targets, which native's cross-entropy symbolic refuses, export too, computing
    native's ``cross_entropy(linear(x))``."""
    native = nn.Linear(6, 5)
    bp = torchbp.nn.LinearCrossEntropyLoss(6, 5, bias=True, **kwargs).eval()
    bp.linear.load_state_dict(native.state_dict())
    x = torch.randn(2, 3, 6)
    if target_kind == "indices":
        target = torch.randint(5, (2, 3))
        target[0, 0] = -100
        flat_target = target.reshape(-1)
    else:
        target = torch.rand(2, 3, 5).softmax(-1)
        flat_target = target.reshape(-1, 5)
    want = nn.functional.cross_entropy(native(x).reshape(-1, 5), flat_target, **kwargs)
    if kwargs.get("reduction") == "none":
        want = want.reshape(2, 3)
    got = _onnx_run(_onnx_bytes(bp, (x, target), dynamo=False), (x, target))
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)


#: ``ignore_index`` keywords of a loss, and the target value planted in row 0 (None: none)
_IGNORED = {
    "none_ignored": ({}, None),
    "default_ignore_index": ({}, -100),
    "ignore_index_2": ({"ignore_index": 2}, 2),
}


#: (loss module, reduction, ``_IGNORED`` key, dynamo): every case for the TorchScript-based
#: exporter (which traces the Functions' forward), one per loss for the dynamo one (which
#: exports the ATen operators of torch.export; ~1 s each)
_LOSS_EXPORTS = [
    (loss, reduction, ignored, False)
    for loss in ("CrossEntropyLoss", "NLLLoss")
    for reduction in ("mean", "sum", "none")
    for ignored in _IGNORED
] + [(loss, "none", "default_ignore_index", True) for loss in ("CrossEntropyLoss", "NLLLoss")]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.parametrize(("loss", "reduction", "ignored", "dynamo"), _LOSS_EXPORTS)
def test_onnx_export_of_a_loss_computes_natives_loss(loss, reduction, ignored, dynamo):
    """The TorchScript-based exporter replaced cross_entropy's Function by the operators
    its forward recorded, which also build the logits' gradient in place: the export
    failed (``aten::unsqueeze``), or wrote a file computing a wrong loss."""
    kwargs, planted = _IGNORED[ignored]
    bp = getattr(torchbp.nn, loss)(reduction=reduction, **kwargs).eval()
    native = getattr(nn, loss)(reduction=reduction, **kwargs)
    x, target = torch.randn(4, 5), torch.randint(5, (4,))
    if planted is not None:
        target[0] = planted
    got = _onnx_run(_onnx_bytes(bp, (x, target), dynamo), (x, target))
    torch.testing.assert_close(got, native(x, target), atol=1e-6, rtol=1e-5)


def _cross_entropy_call(form: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """``(CrossEntropyLoss kwargs, logits, target)`` of one form of call."""
    logits, target = torch.randn(4, 5), torch.randint(5, (4,))
    target[0] = -100
    if form == "k_dim":
        logits, target = torch.randn(2, 5, 3), torch.randint(5, (2, 3))
        target[0, 0] = -100
    if form == "unbatched":
        logits, target = torch.randn(5), torch.tensor(2)
    if form == "probabilities":
        target = torch.rand(4, 5).softmax(1)
    kwargs = {"weighted": {"weight": torch.rand(5)}, "smoothed": {"label_smoothing": 0.1}}
    return kwargs.get(form, {}), logits, target


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("form", ["k_dim", "unbatched", "weighted", "smoothed", "probabilities"])
def test_onnx_export_of_cross_entropy_computes_natives_loss(form, reduction):
    """Every form of cross-entropy call exports to a file computing native's loss with
    the TorchScript-based exporter (whose native symbolic refuses an unbatched call, label
    smoothing and probabilities)."""
    kwargs, logits, target = _cross_entropy_call(form)
    bp = torchbp.nn.CrossEntropyLoss(reduction=reduction, **kwargs).eval()
    want = nn.CrossEntropyLoss(reduction=reduction, **kwargs)(logits, target)
    got = _onnx_run(_onnx_bytes(bp, (logits, target), dynamo=False), (logits, target))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_of_softmax2d_computes_natives_output(dynamo):
    """Softmax2d (over dim -3 of an image batch) exports as native's."""
    x = torch.randn(2, 3, 4, 5)
    got = _onnx_run(_onnx_bytes(torchbp.nn.Softmax2d(), (x,), dynamo), (x,))
    torch.testing.assert_close(got, nn.Softmax2d()(x), atol=1e-6, rtol=1e-5)


class _ClassifierLoss(nn.Module):
    """A linear head's K-dim loss: ``(N, T, d)`` features -> ``(N, C, T)`` logits."""

    def __init__(self, lib, **loss_kwargs) -> None:
        super().__init__()
        self.head, self.loss = lib.Linear(6, 5), lib.CrossEntropyLoss(**loss_kwargs)

    def forward(self, x, target):
        # (permute, not movedim(-1, 1): the TorchScript-based exporter folds the sizes
        # after a negative movedim wrongly, native's ops too)
        return self.loss(self.head(x).permute(0, 2, 1), target)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_onnx_export_of_a_linear_heads_k_dim_loss_computes_natives_loss(label_smoothing):
    """Logits that require grad (a torchbp Linear's), permuted to (N, C, T): the K-dim
    rows are gathered by a Function too, which the TorchScript-based exporter inlines."""
    native = _ClassifierLoss(nn, label_smoothing=label_smoothing)
    bp = _ClassifierLoss(torchbp.nn, label_smoothing=label_smoothing).eval()
    bp.load_state_dict(native.state_dict())
    x, target = torch.randn(2, 3, 6), torch.randint(5, (2, 3))
    target[0, 0] = -100
    got = _onnx_run(_onnx_bytes(bp, (x, target), dynamo=False), (x, target))
    torch.testing.assert_close(got, native(x, target).detach(), atol=1e-6, rtol=1e-5)
