"""Every correct Function passes: whatever its style, ``check_function`` says OK, and what the
style does not offer comes out ``unsupported`` (with how to add it), never ``fail``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.verify.correct_functions import (
    BroadcastAdd,
    CopyAndSquaredNorm,
    CubeThroughMultiply,
    CustomVmapTanh,
    ExpCosOnce,
    FlatView,
    FloorWithZeroGradient,
    InplaceDouble,
    InplaceDoubleTextbook,
    InplaceScale,
    JvpTanh,
    MaterializeFalseSplit,
    NarrowView,
    NeedsInputGradLinear,
    NoGradForwardTanh,
    OnceDifferentiableMSE,
    OptionalBiasLinear,
    PickedLoss,
    RowMaxWithIndices,
    SetupContextTanh,
    SquareWithMask,
    TextbookTanh,
    TopValues,
    TransposedSquare,
    TransposeView,
    copy_and_squared_norm_reference,
    picked_loss_reference,
    sine_of_sincos,
)

from torchbp.verify import check_function


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _double(x):
    return x * 2


#: (Function, inputs, reference, the checks that must come out unsupported)
CORRECT = {
    "textbook ctx style": (TextbookTanh, (_randn(3, 4),), torch.tanh, {"forward_ad", "vmap"}),
    "setup_context": (SetupContextTanh, (_randn(3, 4),), torch.tanh, {"forward_ad"}),
    "with jvp": (JvpTanh, (_randn(3, 4),), torch.tanh, {"compile"}),
    "custom vmap staticmethod": (CustomVmapTanh, (_randn(3, 4),), torch.tanh, {"forward_ad"}),
    "in place, ctx style": (
        InplaceDoubleTextbook,
        (_randn(3, 4),),
        _double,
        {"forward_ad", "vmap"},
    ),
    "in place, jvp and vmap": (InplaceDouble, (_randn(3, 4),), _double, {"compile"}),
    "non-differentiable float output": (
        SquareWithMask,
        (_randn(3, 4),),
        lambda x: (x * x, (x > 0).to(x.dtype)),
        {"compile"},
    ),
    "integer output": (
        TopValues,
        (_randn(3, 5), 2),
        lambda x, k: torch.topk(x, k, dim=-1),
        {"forward_ad", "vmap"},
    ),
    "integer and ignored inputs": (
        PickedLoss,
        (_randn(4, 5), torch.tensor([0, 3, -100, 4]), -100, 0.5),
        picked_loss_reference,
        {"forward_ad"},
    ),
    "once_differentiable loss": (
        OnceDifferentiableMSE,
        (_randn(3, 4), _randn(3, 4).neg()),
        F.mse_loss,
        {"gradgradcheck", "forward_ad", "vmap"},
    ),
    "materialize_grads False": (
        MaterializeFalseSplit,
        (_randn(3, 4),),
        lambda x: (x * 2, x.sin()),
        {"forward_ad"},
    ),
    "needs_input_grad": (
        NeedsInputGradLinear,
        (_randn(2, 3, 4), _randn(5, 4), _randn(5)),
        F.linear,
        {"forward_ad"},
    ),
    "one output of two used": (sine_of_sincos, (_randn(3, 4),), torch.sin, {"forward_ad"}),
    "max with integer indices": (
        RowMaxWithIndices,
        (_randn(3, 5),),
        lambda x: torch.max(x, dim=-1),
        {"forward_ad", "vmap"},
    ),
    "output a view of the input": (
        TransposeView,
        (_randn(3, 5),),
        torch.t,
        {"forward_ad", "vmap"},
    ),
    "optional tensor input given None": (
        OptionalBiasLinear,
        (_randn(3, 4), _randn(5, 4), None),
        F.linear,
        {"forward_ad", "vmap"},
    ),
    "optional tensor input given": (
        OptionalBiasLinear,
        (_randn(3, 4), _randn(5, 4), _randn(5)),
        F.linear,
        {"forward_ad", "vmap"},
    ),
    "no_grad inside forward": (
        NoGradForwardTanh,
        (_randn(3, 4),),
        torch.tanh,
        {"forward_ad", "vmap"},
    ),
    "view refusing non-contiguous inputs, as torch's": (
        FlatView,
        (_randn(3, 4),),
        lambda x: x.view(-1),
        {"forward_ad"},
    ),
    "backward calls a custom Function": (
        CubeThroughMultiply,
        (_randn(3, 4),),
        lambda x: x**3,
        {"forward_ad", "vmap"},
    ),
    "output a narrow view, jvp and vmap rule": (
        NarrowView,
        (_randn(3, 5), 2),
        lambda x, k: x[..., :k],
        {"compile"},
    ),
    "in place in setup_context, vmap rule": (
        InplaceScale,
        (_randn(3, 4), 1.5),
        lambda x, s: x * s,
        # PyTorch limitations of mark_dirty; Dynamo compiles it on torch 2.11, not 2.13
        {"forward_ad", "vmap", "compile?"},
    ),
    "copy, 0-d and index outputs": (
        CopyAndSquaredNorm,
        (_randn(3, 4),),
        copy_and_squared_norm_reference,
        {"forward_ad", "vmap"},
    ),
    "materialize_grads False and once_differentiable": (
        ExpCosOnce,
        (_randn(3, 4),),
        lambda x: (x.exp(), x.cos()),
        {"gradgradcheck", "forward_ad", "vmap"},
    ),
    "transposed output": (
        TransposedSquare,
        (_randn(3, 4),),
        lambda x: (x * x).t(),
        {"forward_ad", "vmap"},
    ),
    "broadcast input, vmap rule": (
        BroadcastAdd,
        (_randn(3, 4), _randn(4) + 1),
        torch.add,
        {"forward_ad"},
    ),
    "step function: zero gradient, not connected to a graph": (
        FloorWithZeroGradient,
        (_randn(3, 4) * 3,),
        torch.floor,
        {"forward_ad"},
    ),
}


@pytest.mark.parametrize("style", list(CORRECT))
def test_correct_function_passes(style):
    function, inputs, reference, unsupported = CORRECT[style]
    report = check_function(function, *inputs, reference=reference)
    assert report.ok, str(report)
    # "name?": unsupported on some torch versions, passed on others
    required = {name for name in unsupported if not name.endswith("?")}
    optional = {name[:-1] for name in unsupported if name.endswith("?")}
    assert required <= {c.name for c in report.unsupported} <= required | optional, str(report)
    # vmap_in_dims is skipped, not counted unsupported twice, when vmap is unsupported;
    # reference_dtype when no input was cast (float64 inputs: see the test below)
    assert all(
        c.passed
        or (c.name == "vmap_in_dims" and c.skipped and "vmap" in unsupported)
        or (c.name == "reference_dtype" and c.skipped)
        for c in report
        if c.name not in required | optional
    ), str(report)
    for c in report.unsupported:
        assert "; to add it: " in c.message, c.message


@pytest.mark.parametrize("style", list(CORRECT))
def test_correct_function_passes_against_its_reference_in_float32(style):
    # float32 inputs, cast to float64 for the other checks: reference_dtype compares fn and
    # the reference in float32 itself, where a correct Function must not fail either
    function, inputs, reference, _ = CORRECT[style]
    own = [
        x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs
    ]
    report = check_function(function, *own, reference=reference, checks=["reference_dtype"])
    assert report["reference_dtype"].passed, str(report)
    assert report["reference_dtype"].message == "in float32"


def test_in_place_function_runs_on_copies_and_says_so():
    x = _randn(3, 4)
    before = x.clone()
    report = check_function(InplaceDouble, x, reference=_double, skip=["compile"])
    assert report.ok, str(report)
    assert "modifies input 0 in place (mark_dirty)" in report["forward"].message
    assert torch.equal(x, before)


class AddInto(torch.autograd.Function):
    """out += x, returning out (an out= buffer, declared with mark_dirty); out is not
    differentiated (left out of grad_inputs)."""

    @staticmethod
    def forward(x, out):
        return out.add_(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_dirty(inputs[1])

    @staticmethod
    def backward(ctx, g):
        # d(out + x)/dx = 1
        return g, None


def test_in_place_into_an_input_left_out_of_grad_inputs_runs_on_copies():
    x, out = _randn(3, 4), _randn(3, 4) + 1
    out_before = out.clone()
    report = check_function(AddInto, x, out, grad_inputs=[0], reference=torch.add)
    assert report.ok, str(report)
    assert "modifies input 1 in place (mark_dirty)" in report["forward"].message
    assert torch.equal(out, out_before)


def test_in_place_without_mark_dirty_is_still_caught():
    def undeclared_double(x):
        return x.mul_(2) * 1  # writes into its input without telling autograd

    report = check_function(undeclared_double, _randn(3, 4))
    assert not report.ok, str(report)


@torch.compiler.disable
def _run_eagerly(y):
    """Dynamo cannot capture a call to this (a graph break)."""
    return y + 0


def test_compile_without_fullgraph_still_compares_numbers():
    def differs_when_compiled(x):
        y = x * 2
        if torch.compiler.is_compiling():
            y = y * 1.5
        return _run_eagerly(y)

    report = check_function(differs_when_compiled, _randn(3), checks=["compile"])
    assert report["compile"].failed, str(report)
    assert "with graph breaks" in report["compile"].message


def test_compile_with_graph_break_and_same_numbers_is_unsupported():
    def breaks_graph(x):
        return _run_eagerly(x * 2)

    report = check_function(breaks_graph, _randn(3), checks=["compile"])
    assert report.ok and report["compile"].unsupported, str(report)
    assert "cannot capture fn in one graph" in report["compile"].message
    report = check_function(breaks_graph, _randn(3), checks=["compile"], require=["compile"])
    assert not report.ok


def test_compile_of_a_mark_dirty_function_names_dynamos_limitation_and_the_way_around():
    # InplaceScale returns x.mul_(s): eager accepts it (it checks that the dirty input is
    # returned), Dynamo does not see it; "x.mul_(s); return x" is captured in one graph
    report = check_function(InplaceScale, _randn(3, 4), 1.5, checks=["compile"])
    result = report["compile"]
    if result.passed:
        pytest.skip("this torch's Dynamo captures return x.mul_(s) (torch 2.11 does)")
    assert report.ok and result.unsupported, str(report)
    assert "a Dynamo limitation, not a bug in fn" in result.message, result.message
    assert "return x, not return x.mul_(s)" in result.message, result.message
    assert "remove what breaks the graph" not in result.message, result.message


class _Square(torch.autograd.Function):
    """The README's recipe: PyTorch's tutorial style, forward(ctx, x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d(x^2)/dx = 2x
        return 2 * x * g


class _BuggySquare(_Square):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return x * g  # forgot the 2


def test_readme_recipe_prints_ok_for_a_textbook_function_and_failed_for_its_bug():
    text = str(check_function(_Square, torch.randn(3, 4), reference=torch.square))
    assert text.splitlines()[0] == "_Square: OK (2 unsupported)", text
    text = str(check_function(_BuggySquare, torch.randn(3, 4), reference=torch.square))
    assert text.splitlines()[0] == "_BuggySquare: FAILED (2 fail, 2 unsupported)", text
    assert "gradcheck [fail]: backward of input 0 disagrees with numerical gradient" in text
    assert "reference [fail]: gradient of input 0 differs from the reference" in text
