"""The checks of what backward owes autograd (``checks/backward_contract.py``) that the zoo
does not show on its own: ``needs_input_grad`` on a crash and on the inference path."""

from __future__ import annotations

import torch
from tests.verify.test_verify_numerical import DoubleThroughStorage
from tests.verify.zoo.entry import seeded
from tests.verify.zoo.structure import BiasGradUnderWeightFlagLinear, FlagCheckingLinear

from torchbp.verify import CHECKS, check_function


def _linear_inputs():
    return seeded(3, 4), seeded(5, 4, seed=1), seeded(5, seed=2)


class SavesXUnderItsOwnFlag(FlagCheckingLinear):
    """Saves x only when x needs a gradient, but dW needs x: a frozen first layer crashes."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _ = inputs
        ctx.save_for_backward(x if ctx.needs_input_grad[0] else None, w)


class ForwardNeedsAGrad(torch.autograd.Function):
    """Reads ctx.needs_input_grad in forward as if some input always required grad."""

    @staticmethod
    def forward(ctx, x):
        ctx.scale = 2.0 if any(ctx.needs_input_grad) else None
        return x * ctx.scale

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale


def test_the_other_checks_miss_a_gradient_under_the_wrong_flag():
    others = [c for c in CHECKS if c not in ("needs_input_grad", "compile")]
    report = check_function(BiasGradUnderWeightFlagLinear, *_linear_inputs(), checks=others)
    assert report.ok, str(report)
    report = check_function(BiasGradUnderWeightFlagLinear, *_linear_inputs())
    result = report["needs_input_grad"]
    assert result.failed and "no gradient (None) for input 2" in result.message, str(report)


def test_backward_that_crashes_when_one_input_is_frozen_fails():
    report = check_function(SavesXUnderItsOwnFlag, *_linear_inputs(), checks=["needs_input_grad"])
    result = report["needs_input_grad"]
    assert result.failed, str(report)
    assert result.message.startswith("fn or its backward fails when only input 1 requires grad")


def test_forward_that_fails_when_no_input_requires_grad_fails():
    report = check_function(ForwardNeedsAGrad, seeded(3), checks=["needs_input_grad"])
    result = report["needs_input_grad"]
    assert result.failed and "when no input requires grad" in result.message, str(report)


class Float32GradTanh(torch.autograd.Function):
    """tanh whose backward computes in float32 "for speed": autograd silently casts the
    gradient back to float64, so every first derivative is right to about 1e-7."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.float() * (1 - y.float() ** 2)


class MetaGradDouble(torch.autograd.Function):
    """2x whose backward returns its gradient on another device (meta, for a CPU input)."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return (g * 2).to("meta")


def test_a_gradient_of_the_wrong_dtype_is_named_by_grad_shapes():
    report = check_function(Float32GradTanh, seeded(3, 4), reference=torch.tanh)
    result = report["grad_shapes"]
    assert result.failed, str(report)
    assert "returned a torch.float32 gradient for its input 0, which is torch.float64" in (
        result.message
    )


def test_a_gradient_on_the_wrong_device_is_named_as_such():
    report = check_function(MetaGradDouble, seeded(3), checks=["grad_shapes", "gradcheck"])
    for name in ("grad_shapes", "gradcheck"):
        result = report[name]
        assert result.failed, str(report)
        assert "on device meta" in result.message and "on cpu" in result.message, str(report)
        assert "shape" not in result.message, str(report)


class Float32GradForLowPrecision(torch.autograd.Function):
    """x * w computed and differentiated in float32 for bfloat16 inputs: the float32
    gradients autograd rounds to bfloat16 lose nothing (a common mixed-precision style)."""

    @staticmethod
    def forward(x, w):
        return (x.float() * w.float()).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, w = (t.float() for t in ctx.saved_tensors)
        return g.float() * w, g.float() * x


def test_a_wider_gradient_than_the_input_is_accepted():
    x, w = seeded(3, 4), seeded(3, 4, seed=1)
    report = check_function(
        Float32GradForLowPrecision, x, w, dtype=torch.bfloat16, checks=["grad_shapes"]
    )
    assert report["grad_shapes"].passed, str(report)


class ScaledAddFirstScale(torch.autograd.Function):
    """c * x + b for a Python scalar c given first, b broadcast over x's rows."""

    @staticmethod
    def forward(ctx, c, x, b):
        ctx.c = c
        return c * x + b

    @staticmethod
    def backward(ctx, g):
        return None, ctx.c * g, g.sum(0)


class ScaledAddMidScale(torch.autograd.Function):
    """x * alpha + b for a Python scalar alpha between the tensors."""

    @staticmethod
    def forward(ctx, x, alpha, b):
        ctx.alpha = alpha
        return x * alpha + b

    @staticmethod
    def backward(ctx, g):
        return ctx.alpha * g, None, g.sum(0)


class UnreducedBiasMidScale(ScaledAddMidScale):
    @staticmethod
    def backward(ctx, g):
        return ctx.alpha * g, None, g  # bug: b's gradient not summed over the rows


def test_grad_shapes_pairs_gradients_with_tensor_inputs_past_a_scalar_argument():
    # autograd lists only the tensor inputs of a node: the raw gradients (one per forward
    # argument) were paired with them by position, so after a scalar argument each
    # gradient was checked against another input's shape (or not at all)
    x, b = seeded(3, 4), seeded(4, seed=1)
    first = check_function(ScaledAddFirstScale, 2.0, x, b, checks="grad_shapes")
    assert first["grad_shapes"].passed, first
    assert "2 gradient(s)" in first["grad_shapes"].message
    mid = check_function(ScaledAddMidScale, x, 2.0, b, checks="grad_shapes")
    assert mid["grad_shapes"].passed and "2 gradient(s)" in mid["grad_shapes"].message, mid
    bug = check_function(UnreducedBiasMidScale, x, 2.0, b, checks="grad_shapes")
    assert bug["grad_shapes"].failed, bug
    assert "shape (3, 4) for its input 2, which has shape (4,)" in bug["grad_shapes"].message


class FlatViewSum(torch.autograd.Function):
    """``x.sum()`` whose forward takes ``x.view(-1)``: a crash for a transposed ``x``."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.view(-1).sum()

    @staticmethod
    def backward(ctx, g):
        return g.expand(ctx.shape)


def test_a_function_wrong_for_non_contiguous_inputs_fails_saying_so():
    # the example input is contiguous, as most are: every other check passes
    report = check_function(DoubleThroughStorage, seeded(3, 4), skip="compile")
    result = report["grad_output_safety"]
    assert result.failed, report
    assert "output 0 changes when the inputs are non-contiguous" in result.message
    assert [r.name for r in report.failures] == ["grad_output_safety"], report


def test_a_function_crashing_on_non_contiguous_inputs_fails_saying_so():
    report = check_function(FlatViewSum, seeded(3, 4), checks="grad_output_safety")
    result = report["grad_output_safety"]
    assert result.failed, report
    assert "fails for non-contiguous (strided) inputs" in result.message, result.message
    # a reference accepting them (torch.sum) does not excuse it; one refusing them does
    report = check_function(
        FlatViewSum, seeded(3, 4), checks="grad_output_safety", reference=torch.sum
    )
    assert report["grad_output_safety"].failed, report
    report = check_function(
        FlatViewSum,
        seeded(3, 4),
        checks="grad_output_safety",
        reference=lambda x: x.view(-1).sum(),
    )
    assert report["grad_output_safety"].passed, report


def test_a_module_is_given_strided_inputs_but_keeps_its_parameters_layout():
    # a module's parameters are laid out by the module, not by the caller: before, the
    # strided-inputs comparison also gave it non-contiguous parameters, and torch's own
    # Linear + BatchNorm1d in eval mode failed (CPU batch_norm's eval backward reads a
    # strided 1-D weight wrongly, torch 2.13) though no caller's input could cause that
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).double()
    torch.nn.init.normal_(model[1].weight)
    model.eval()
    report = check_function(model, seeded(5, 4), checks="grad_output_safety")
    assert report.ok, report


def test_a_backward_assuming_grad_output_starts_its_storage_fails_grad_output_safety():
    # torch.cat's and split's backward hand on slices of one buffer (a storage offset);
    # a backward reading grad_output at a fixed storage offset passed this check
    from tests.verify.test_verify_check_strength import FlatCatSplittingAtAFixedOffset

    inputs = seeded(3, 4), seeded(2, 5, seed=1)
    report = check_function(FlatCatSplittingAtAFixedOffset, *inputs, checks="grad_output_safety")
    result = report["grad_output_safety"]
    assert result.failed
    assert "gradient of input 1 changes when grad_output is offset" in result.message


class ComplexIdentity(torch.autograd.Function):
    """A copy of a complex tensor; backward hands grad_output on unchanged (right)."""

    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        return g


def test_an_empty_complex_output_passes_grad_output_safety():
    # a strided layout of an empty tensor is still "contiguous" to torch, so the real
    # view's backward (view_as_complex) refused its odd strides: the check's own failure
    z = torch.zeros(0, 3, dtype=torch.complex128)
    result = check_function(ComplexIdentity, z, checks="grad_output_safety")["grad_output_safety"]
    assert result.passed, result


class _SquareMarkingGradOutput(torch.autograd.Function):
    """x^2 whose backward writes NaN into grad_output where x is negative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d x^2/dx = 2x; the write into g is the bug
        g.masked_fill_(x < 0, float("nan"))
        return 2 * x * g


def test_a_backward_writing_nan_into_grad_output_fails_grad_output_safety():
    # before: a grad_output holding NaN after backward was never compared (NaN != NaN)
    report = check_function(_SquareMarkingGradOutput, seeded(3, 4), checks=["grad_output_safety"])
    assert report["grad_output_safety"].failed, report
    assert "modified grad_output 0 in place" in report["grad_output_safety"].message


def _shifted_clearing_its_shift(x, w):
    """x + w, which writes zeros into the positive entries of its non-differentiable w."""
    out = x + w
    w.masked_fill_(w > 0, 0.0)
    return out


def test_fn_writing_into_a_non_differentiable_input_holding_nan_fails_grad_output_safety():
    # before: an input holding a NaN was never compared with its copy (NaN != NaN)
    w = seeded(3, 4, seed=1)
    w[0, 0] = float("nan")
    report = check_function(
        _shifted_clearing_its_shift,
        seeded(3, 4),
        w,
        grad_inputs=[0],
        checks=["grad_output_safety"],
    )
    assert report["grad_output_safety"].failed, report
    assert "modified one of its (non-differentiable) inputs" in report["grad_output_safety"].message


class _ScaleSavedInPlace(torch.autograd.Function):
    """2 x, backward scaling its saved input in place through ``.data`` (autograd's
    version counter does not see it): the caller's tensor changes."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        x.data.mul_(0.5)
        return 2 * g


def test_a_write_into_an_input_in_backward_is_not_taken_for_state():
    # before: "forward or backward modified input 0 in place" with the advice for state
    # forward updates on purpose (a buffer of an nn.Module), for a plain backward bug
    report = check_function(_ScaleSavedInPlace, seeded(3, 4), checks=["grad_output_safety"])
    message = report["grad_output_safety"].message
    assert report["grad_output_safety"].failed, report
    assert message.startswith("backward modified input 0 in place: never write"), message
    assert "nn.Module" not in message
