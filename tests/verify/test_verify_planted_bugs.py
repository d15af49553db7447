"""Proof that the suite can fail: deliberately broken Functions are caught, for the right reason.

Each bug has a correct twin built from the same pieces that must pass every check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from torchbp.verify import check_function

# ------------------------------------------------------------------------------------------
# sigmoid family: correct twin and bugs
# ------------------------------------------------------------------------------------------


class CompileSafeSigmoid(torch.autograd.Function):
    """No jvp: torch.compile(fullgraph=True) can capture it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)


class GoodSigmoid(CompileSafeSigmoid):
    """Adds forward-mode AD for eager use."""

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * y * (1 - y)


def good_sigmoid(x):
    """The torchbp pattern: the jvp-free twin while compiling, the full class in eager."""
    cls = CompileSafeSigmoid if torch.compiler.is_compiling() else GoodSigmoid
    return cls.apply(x)


class WrongDerivativeSigmoid(GoodSigmoid):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y  # forgot the (1 - y) factor


class OnceDiffSigmoid(GoodSigmoid):
    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)


class InplaceGradSigmoid(GoodSigmoid):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.mul_(y * (1 - y))  # right value, but writes into grad_output


class CombinedStyleSigmoid(torch.autograd.Function):
    """Old style: forward(ctx, x) and no setup_context."""

    @staticmethod
    def forward(ctx, x):
        y = torch.sigmoid(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * y * (1 - y)


class WrongShapeSigmoid(GoodSigmoid):
    @staticmethod
    def forward(x):
        return torch.sigmoid(x).unsqueeze(0)  # an extra leading dim

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return (g * y * (1 - y)).squeeze(0)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t.unsqueeze(0) * y * (1 - y)


# ------------------------------------------------------------------------------------------
# linear: correct twin and the bias bug
# ------------------------------------------------------------------------------------------


class CompileSafeLinear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b):
        return x @ w.t() + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        return g @ w, g2.t() @ x.reshape(-1, x.shape[-1]), g2.sum(0)


class GoodLinear(CompileSafeLinear):
    @staticmethod
    def jvp(ctx, tx, tw, tb):
        x, w = ctx.saved_tensors
        return tx @ w.t() + x @ tw.t() + tb


class UnreducedBiasLinear(GoodLinear):
    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        return g @ w, g2.t() @ x.reshape(-1, x.shape[-1]), g.sum(0)  # only dim 0 reduced


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _linear_inputs():
    return _x(2, 3, 4), _x(5, 4), _x(5)


def good_linear(x, w, b):
    cls = CompileSafeLinear if torch.compiler.is_compiling() else GoodLinear
    return cls.apply(x, w, b)


# The bugs are all in eager code paths; the compile check is covered by the twins below.
FAST = {"skip": ["compile"]}


def test_correct_sigmoid_passes_every_check():
    # float32 inputs: reference_dtype compares in float32, every other check in float64
    report = check_function(good_sigmoid, _x(3, 4).float(), reference=torch.sigmoid)
    assert report.ok, str(report)
    assert all(c.passed for c in report), str(report)


def test_correct_linear_passes_every_check():
    inputs = [t.float() for t in _linear_inputs()]
    report = check_function(good_linear, *inputs, reference=F.linear)
    assert report.ok, str(report)
    assert all(c.passed for c in report), str(report)


def test_jvp_blocks_fullgraph_compile_with_a_clear_reason():
    # a PyTorch limitation, not a bug: unsupported, and the numbers are still compared
    # (compiled with graph breaks)
    report = check_function(GoodSigmoid, _x(3, 4), checks=["compile"])
    assert report.ok and report["compile"].unsupported, str(report)
    assert "cannot capture a Function that defines jvp" in report["compile"].message
    assert "is_compiling" in report["compile"].message
    assert report["compile"].max_abs_err is not None


def test_wrong_derivative_is_caught():
    report = check_function(WrongDerivativeSigmoid, _x(3, 4), reference=torch.sigmoid, **FAST)
    assert not report.ok
    msg = report["gradcheck"].message
    assert report["gradcheck"].failed
    assert "backward of input 0 disagrees with numerical gradient" in msg
    assert "max abs error" in msg and "at index (" in msg
    assert report["gradcheck"].max_abs_err > 1e-2
    assert (
        report["reference"].failed and "gradient of input 0 differs" in report["reference"].message
    )
    assert report["gradgradcheck"].skipped


def test_missing_setup_context_is_unsupported():
    report = check_function(CombinedStyleSigmoid, _x(3, 4), reference=torch.sigmoid, **FAST)
    # its jvp reads ctx.saved_tensors without ctx.save_for_forward: a real bug
    assert report["forward_ad"].failed and "save_for_forward" in report["forward_ad"].message
    assert report["gradcheck"].passed  # plain autograd is fine...
    assert report["vmap"].unsupported  # ...but torch.func is not offered
    assert "Function lacks setup_context: torch.func transforms" in report["vmap"].message
    report = check_function(CombinedStyleSigmoid, _x(3, 4), require=["vmap"], checks=["gradcheck"])
    assert not report.ok and report["vmap"].failed


def test_once_differentiable_is_unsupported():
    report = check_function(OnceDiffSigmoid, _x(3, 4), reference=torch.sigmoid, **FAST)
    assert report.ok, str(report)
    assert report["gradcheck"].passed
    assert report["gradgradcheck"].unsupported
    assert "backward is once_differentiable" in report["gradgradcheck"].message
    assert "double backward is unsupported" in report["gradgradcheck"].message


def test_wrong_output_shape_is_caught():
    report = check_function(WrongShapeSigmoid, _x(3, 4), reference=torch.sigmoid, **FAST)
    assert not report.ok
    assert report["reference"].failed
    assert "output 0 has shape (1, 3, 4) but the reference gives (3, 4)" in (
        report["reference"].message
    )


def test_inplace_grad_output_is_caught():
    report = check_function(InplaceGradSigmoid, _x(3, 4), reference=torch.sigmoid, **FAST)
    assert not report.ok
    safety = report["grad_output_safety"]
    assert safety.failed
    assert "modified grad_output 0 in place" in safety.message


def test_unreduced_bias_gradient_is_caught():
    report = check_function(UnreducedBiasLinear, *_linear_inputs(), reference=F.linear, **FAST)
    assert not report.ok
    shapes = report["grad_shapes"]
    assert shapes.failed
    assert "gradient of shape (3, 5) for its input 2, which has shape (5,)" in shapes.message
    assert "leading" in shapes.message
    # eager autograd silently sums the extra dim away, so plain gradcheck cannot see it
    assert report["gradcheck"].passed


@pytest.mark.parametrize("bad", [WrongDerivativeSigmoid, InplaceGradSigmoid])
def test_report_renders_and_serialises(bad):
    import json

    report = check_function(bad, _x(2, 3), reference=torch.sigmoid, **FAST)
    text = str(report)
    assert "FAILED" in text and "check" in text and "status" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False
    assert {c["name"] for c in data["checks"]} >= {"gradcheck", "vmap", "reference"}


class OffByOneJvpNarrow(torch.autograd.Function):
    """Returns x.narrow(-1, 0, k), a view; its jvp narrows the tangent from 1, not 0."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, k):
        return x.narrow(-1, 0, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.k, ctx.n = inputs[1], inputs[0].shape[-1]

    @staticmethod
    def backward(ctx, g):
        return F.pad(g, (0, ctx.n - ctx.k)), None

    @staticmethod
    def jvp(ctx, t, _):
        return t.narrow(-1, 1, ctx.k)


def test_a_jvp_returning_another_view_of_the_tangent_is_named_for_a_view_output():
    # before, the message said the output is not a view and advised .clone(), which
    # PyTorch refuses for a view output
    x = torch.randn(3, 5, dtype=torch.float64)
    report = check_function(OffByOneJvpNarrow, x, 2, checks=["forward_ad"])
    forward_ad = report["forward_ad"]
    assert forward_ad.failed, report
    assert "forward returns a view of an input" in forward_ad.message
    assert "not the same view" in forward_ad.message
