"""The numerical checks (``checks/numerical.py``) beyond what the zoo shows: a backward that
is right for each output alone but wrong when several outputs get a gradient at once."""

from __future__ import annotations

import math

import pytest
import torch
from tests.verify.correct_functions import MaterializeFalseSplit
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function
from torchbp.verify.checks.jacobians import projected_backward_error
from torchbp.verify.checks.numerical import rounded_to


class SplitForgetsFactorWhenBothGrads(torch.autograd.Function):
    """``(2x, sin x)`` with ``set_materialize_grads(False)``, as the tutorial handles None
    grads; the branch for both gradients defined forgets the 2. Each output alone (what
    torch's gradcheck differentiates, the other grad None) gets the right gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return x * 2, x.sin()

    @staticmethod
    def backward(ctx, g_double, g_sin):
        (x,) = ctx.saved_tensors
        if g_double is None and g_sin is None:
            return None
        if g_sin is None:
            return 2 * g_double
        if g_double is None:
            return x.cos() * g_sin
        return g_double + x.cos() * g_sin  # bug: 2 * g_double


def test_backward_wrong_only_when_all_outputs_get_a_gradient_fails_gradcheck():
    report = check_function(SplitForgetsFactorWhenBothGrads, seeded(3, 4), checks="gradcheck")
    result = report["gradcheck"]
    assert result.failed, report
    assert "all 2 outputs at once" in result.message
    assert "input 0" in result.message


def test_correct_multi_output_backward_passes_the_joint_comparison():
    report = check_function(MaterializeFalseSplit, seeded(3, 4), checks="gradcheck")
    assert report["gradcheck"].passed, report


class MulJvpForgetsSecondTerm(torch.autograd.Function):
    """``a * b`` with a right backward and a jvp that forgets ``tb * a``: forward-mode AD
    alone is wrong."""

    @staticmethod
    def forward(a, b):
        return a * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*inputs)
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g * b, g * a

    @staticmethod
    def jvp(ctx, ta, tb):
        a, b = ctx.saved_tensors
        return ta * b  # bug: + tb * a


def test_wrong_jvp_is_located_in_a_whole_sentence():
    # torch's forward-mode gradcheck words its mismatch "Jacobian computed with forward mode
    # mismatch for output 0 with respect to input 1," (the line goes on with the
    # Jacobians): it is a mismatch, which the full comparison locates
    report = check_function(
        MulJvpForgetsSecondTerm, seeded(3), seeded(3, seed=1), checks="forward_ad"
    )
    result = report["forward_ad"]
    assert result.failed, report
    assert not result.message.rstrip().endswith(","), result.message
    assert "forward-mode AD (jvp) of input 1 disagrees" in result.message, result.message
    assert "at index" in result.message, result.message


class DoubleThroughStorage(torch.autograd.Function):
    """``2 x`` computed over ``x``'s storage in memory order, as a kernel written for
    contiguous tensors does: wrong (transposed) for a transposed ``x``."""

    @staticmethod
    def forward(ctx, x):
        return (x.as_strided((x.numel(),), (1,)) * 2).view(x.shape)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_numerical_gradient_of_a_non_contiguous_input_keeps_its_layout():
    # the finite differences perturb the input in its own layout: the mismatch is located
    # (before, they perturbed a contiguous copy, agreed with backward, and only torch's
    # bare 'Jacobian mismatch' line was left)
    report = check_function(DoubleThroughStorage, seeded(4, 3).t(), checks="gradcheck")
    result = report["gradcheck"]
    assert result.failed, report
    assert "backward of input 0 disagrees with numerical gradient" in result.message
    assert "at index" in result.message, result.message


class RowMax(torch.autograd.Function):
    """The max of each row with its index (non-differentiable), the gradient going to the
    index torch.max picks; ``factor`` 1 is right, 2 a planted bug."""

    factor = 1

    @staticmethod
    def forward(ctx, x):
        values, index = x.max(1)
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(index)
        ctx.shape = x.shape
        return values, index

    @staticmethod
    def backward(ctx, g, _):
        (index,) = ctx.saved_tensors
        grad = torch.zeros(ctx.shape, dtype=g.dtype, device=g.device)
        return grad.scatter(1, index.unsqueeze(1), RowMax.factor * g.unsqueeze(1))


def _with_ties() -> torch.Tensor:
    return torch.tensor([[1.0, 1.0, 0.0], [2.0, 3.0, 3.0]], dtype=torch.float64)


def _torch_max(x):
    return tuple(torch.max(x, 1))


def test_a_correct_max_at_a_tie_passes_and_a_wrong_one_fails(monkeypatch):
    # at a tie the max has no derivative: the central difference (0.5 for each tied
    # entry) is no gradient to compare with; before, gradcheck and forward_ad failed, as
    # did torch.max itself. A gradient outside the one-sided derivatives still fails.
    report = check_function(RowMax, _with_ties(), reference=_torch_max, skip="compile")
    assert report.ok, report
    assert "not differentiable" in report["gradcheck"].message
    monkeypatch.setattr(RowMax, "factor", 2)
    buggy = check_function(RowMax, _with_ties(), checks="gradcheck")
    assert buggy["gradcheck"].failed, buggy
    assert "disagrees with numerical gradient" in buggy["gradcheck"].message


def test_torch_relu_and_abs_at_zero_pass():
    # relu's derivative at 0 is one of its one-sided ones; abs's gradient jumps at 0
    x = torch.tensor([0.0, 1.5, -2.0], dtype=torch.float64)
    for fn in (torch.relu, torch.abs):
        report = check_function(fn, x, reference=fn, skip="compile")
        assert report.ok, report


class DoubleInDtype(torch.autograd.Function):
    """``2 x`` returned in a dtype given as an argument (mixed-precision code)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.input_dtype = x.dtype
        return x.to(dtype) * 2

    @staticmethod
    def backward(ctx, g):
        return (g * 2).to(ctx.input_dtype), None


def test_a_gradcheck_failure_of_a_float32_output_says_why_the_numbers_are_off():
    report = check_function(DoubleInDtype, seeded(3, 4), torch.float32, checks="gradcheck")
    result = report["gradcheck"]
    assert result.failed, report
    assert "output 0 is torch.float32 although the inputs are float64" in result.message


class _SquareComputedInFloat32(torch.autograd.Function):
    """x² whose forward (``in_forward``) or backward computes in float32 and casts back to
    the inputs' float64: the outputs (or gradients) are float64 holding float32 numbers."""

    in_forward = True

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        narrow = x.float() if _SquareComputedInFloat32.in_forward else x
        return (narrow * narrow).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if not _SquareComputedInFloat32.in_forward:
            g, x = g.float(), x.float()
        # d x²/dx = 2x
        return (2 * x * g).to(ctx.saved_tensors[0].dtype)


def test_a_gradcheck_failure_of_float64_outputs_computed_in_float32_says_why(monkeypatch):
    # before: only an output of a float32 dtype was named; one cast back to float64 gave
    # a bare "disagrees with numerical gradient"
    monkeypatch.setattr(_SquareComputedInFloat32, "in_forward", True)
    report = check_function(_SquareComputedInFloat32, seeded(3, 4), checks="gradcheck")
    result = report["gradcheck"]
    assert result.failed, report
    assert "fn's float64 outputs hold only torch.float32 numbers" in result.message
    assert "pass a larger eps" in result.message


def test_a_gradgradcheck_failure_of_a_backward_computing_in_float32_says_why(monkeypatch):
    # before: a bare "double backward ... disagrees with numerical gradient", where
    # gradcheck named the float32 rounding (here accepted with parity_atol)
    monkeypatch.setattr(_SquareComputedInFloat32, "in_forward", False)
    checks = ["gradcheck", "gradgradcheck"]
    report = check_function(_SquareComputedInFloat32, seeded(3, 4), checks=checks, parity_atol=1e-5)
    assert report["gradcheck"].passed, report
    result = report["gradgradcheck"]
    assert result.failed, report
    assert "backward's float64 gradients hold only torch.float32 numbers" in result.message
    assert "narrower dtype than its float64 inputs" in result.message
    assert "pass a larger eps" in result.message
    wider = check_function(
        _SquareComputedInFloat32, seeded(3, 4), checks=checks, parity_atol=1e-5, eps=1e-3
    )
    assert wider.ok, wider


def test_float32_numbers_are_told_from_float64_ones():
    exact = torch.tensor([0.5, 3.0, -0.125], dtype=torch.float64)
    assert rounded_to([seeded(3, 4)]) is None
    assert rounded_to([seeded(3, 4).float().double()]) == torch.float32
    assert rounded_to([seeded(3, 4).half().double()]) == torch.float16
    assert rounded_to([torch.arange(4.0, dtype=torch.float64)]) is None  # integers only
    assert rounded_to([exact]) == torch.float16


class _SquareWithGraphPath(torch.autograd.Function):
    """x² whose backward takes a differentiable path when grad mode is on (create_graph),
    beside a plain one; ``graph_factor`` is the graph path's factor, 2 when right."""

    graph_factor = 2.0

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        # d x²/dx = 2x
        if torch.is_grad_enabled():
            return _SquareWithGraphPath.graph_factor * x * g
        return 2 * x * g


def test_a_backward_wrong_only_with_create_graph_fails_gradgradcheck(monkeypatch):
    # before: passed (gradcheck runs the plain path; gradgradcheck differentiates the
    # graph path consistently with itself)
    right = check_function(_SquareWithGraphPath, seeded(3, 4), checks=["gradgradcheck"])
    assert right["gradgradcheck"].passed, right
    monkeypatch.setattr(_SquareWithGraphPath, "graph_factor", 3.0)
    report = check_function(_SquareWithGraphPath, seeded(3, 4), checks=["gradgradcheck"])
    message = report["gradgradcheck"].message
    assert report["gradgradcheck"].failed, report
    assert "backward with create_graph=True gives another gradient of input 0" in message
    assert "torch.is_grad_enabled()" in message


def _fast_gradchecks_projection(n: int) -> torch.Tensor:
    """The u torch's fast gradcheck draws for a float64 input of ``n`` elements (torch
    2.13: a torch.Generator() of its default seed, the same on every run)."""
    u = torch.rand(n, generator=torch.Generator()).double()
    return u / u.norm()


def _error_unseen_by_fast_gradcheck(n: int) -> torch.Tensor:
    z = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u = _fast_gradchecks_projection(n)
    return z - (z @ u) * u  # orthogonal to the one direction fast gradcheck looks along


class _HalfSquaredNormWrongOffProjection(torch.autograd.Function):
    """``(x²).sum() / 2``, whose gradient ``x`` is off by a vector that torch's fast
    gradcheck's fixed projection cannot see."""

    @staticmethod
    def forward(x):
        return (x * x).sum() / 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x + _error_unseen_by_fast_gradcheck(x.numel()))


def test_fast_mode_does_not_rest_on_torchs_one_fixed_projection():
    # before: torch's fast gradcheck (the same u and v on every run, whatever the seed)
    # passed, and the check's own seeded projection was reported as the error of a pass
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.autograd.gradcheck(
        _HalfSquaredNormWrongOffProjection.apply, (x.clone().requires_grad_(True),), fast_mode=True
    )
    report = check_function(
        _HalfSquaredNormWrongOffProjection, x, checks=["gradcheck"], fast_mode=True
    )
    assert report["gradcheck"].status == "fail", report["gradcheck"]
    assert "random projection" in report["gradcheck"].message


class NormalizeSavingTheNorm(torch.autograd.Function):
    """Rows scaled to unit L2 norm, saving the output and the norm that forward computed:
    backward is right, but a double backward sees the norm as a constant."""

    @staticmethod
    def forward(ctx, x):
        norm = x.norm(dim=-1, keepdim=True)
        y = x / norm
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx, g):
        y, norm = ctx.saved_tensors
        return (g - y * (g * y).sum(-1, keepdim=True)) / norm


class NormalizeRecomputingTheNorm(torch.autograd.Function):
    """The same with the norm recomputed in backward from the saved input (x / ‖x‖ without
    an eps: 0/0 = NaN on an all-zero row, where F.normalize gives 0)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x / x.norm(dim=-1, keepdim=True)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        norm = x.norm(dim=-1, keepdim=True)
        y = x / norm
        return (g - y * (g * y).sum(-1, keepdim=True)) / norm


class MaskedCubeDetachingInBackward(torch.autograd.Function):
    """``mask · x³`` saving its input and a mask input (neither a forward-made constant);
    backward detaches one factor of x, so its double backward is wrong for another reason."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(x, mask)
        return mask * x**3

    @staticmethod
    def backward(ctx, g):
        x, mask = ctx.saved_tensors
        return 3 * g * mask * x * x.detach(), None


def test_double_backward_names_a_tensor_forward_computed_and_saved():
    report = check_function(
        NormalizeSavingTheNorm, seeded(3, 4), checks=["gradcheck", "gradgradcheck"]
    )
    assert report["gradcheck"].passed, report
    result = report["gradgradcheck"]
    assert result.failed, report
    assert "possible cause: NormalizeSavingTheNorm saved a (3, 1) tensor" in result.message
    assert "neither an input nor an output" in result.message
    fixed = check_function(NormalizeRecomputingTheNorm, seeded(3, 4), checks="gradgradcheck")
    assert fixed["gradgradcheck"].passed, fixed


def test_double_backward_hint_leaves_out_a_saved_tensor_that_does_not_depend_on_the_inputs():
    """A Function given a constant that fn made from a non-differentiable input (a one-hot
    of integer labels) and saving it: double backward is right to take it for a constant.
    The hint named it as the possible cause ('MaskedCubeDetachingInBackward saved a (3, 4)
    tensor ... misses its dependence on the inputs') of a failure that has another cause;
    only a saved tensor whose values follow the differentiable inputs is named now."""
    labels = torch.tensor([0, 2, 3])

    def cube_of_one_hot(x, labels):
        one_hot = torch.nn.functional.one_hot(labels, 4).to(x.dtype)
        return MaskedCubeDetachingInBackward.apply(x, one_hot)

    report = check_function(cube_of_one_hot, seeded(3, 4), labels, checks="gradgradcheck")
    result = report["gradgradcheck"]
    assert result.failed, report
    assert "possible cause" not in result.message


def test_double_backward_failure_without_a_forward_made_constant_names_none():
    mask = (seeded(3, 4).detach() > 0).double()
    report = check_function(
        MaskedCubeDetachingInBackward, seeded(3, 4), mask, checks="gradgradcheck"
    )
    result = report["gradgradcheck"]
    assert result.failed, report
    assert "possible cause" not in result.message


class SquareWithFloat32Jvp(torch.autograd.Function):
    """x * x whose jvp computes the tangent in float32: PyTorch keeps the tangent it gets
    (a float32 tangent of a float64 output, a float32 Jacobian from jacfwd), and its
    rounding, about 1e-8, is far below gradcheck's tolerances."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return (2 * x * t).float()


def test_a_jvp_returning_a_narrower_tangent_fails_forward_ad():
    result = check_function(SquareWithFloat32Jvp, seeded(3, 4), checks="forward_ad")["forward_ad"]
    assert result.failed, result
    assert "torch.float32 tangent for output 0, which is torch.float64" in result.message, result


class MulForgettingTheSecondGradient(torch.autograd.Function):
    """``x * y`` whose backward returns None for y, as if y needed no gradient."""

    @staticmethod
    def forward(x, y):
        return x * y

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        _, y = ctx.saved_tensors
        return g * y, None


def test_a_backward_returning_none_for_a_grad_input_is_named_in_gradcheck():
    result = check_function(
        MulForgettingTheSecondGradient, seeded(3), seeded(3), checks="gradcheck"
    )["gradcheck"]
    assert result.failed, result
    assert "backward returned None for input 1, which requires grad" in result.message
    assert "grad_inputs=(0,)" in result.message


def test_a_gradcheck_failure_in_a_non_differentiable_output_names_it():
    # the message read "analytical 0 vs numerical ..." only, sending the user to a backward
    # that is never called for that output
    from tests.verify.zoo.structure import ProbsMarkedNonDiff

    report = check_function(ProbsMarkedNonDiff, seeded(3, 5), checks="gradcheck")
    message = report["gradcheck"].message
    assert report["gradcheck"].failed
    assert "output 1 does not require grad (marked non-differentiable?)" in message


class ExpScalingGradOutputInPlace(torch.autograd.Function):
    """exp(x) whose backward multiplies grad_output in place."""

    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.mul_(y)  # d exp(x)/dx = exp(x), but written into grad_output


def test_double_backward_of_a_backward_writing_into_grad_output_blames_backward():
    # grad_output is a leaf that requires grad in double backward: torch's error on the
    # write used to be explained as fn writing into one of its inputs
    result = check_function(ExpScalingGradOutputInPlace, seeded(3, 4))["gradgradcheck"]
    assert result.failed, result
    assert result.message.startswith("backward writes in place into grad_output"), result


class DriftingBackward(torch.autograd.Function):
    """2x whose backward changes with each run (a counter on the class): right on its
    first run only, as a backward reading memory it never wrote is."""

    runs = 0

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        DriftingBackward.runs += 1
        # d(2x)/dx = 2, off by 1e-3 on every other run
        return g * (2 + 1e-3 * (DriftingBackward.runs % 2))


@pytest.mark.parametrize(
    ("shape", "says"),
    [
        # torch's gradcheck sees it (its two Jacobian runs differ): its GradcheckError text
        # was shown as it is ("Backward is not reentrant, i.e., ...")
        ((3,), "backward gives different gradients for the same input and grad_output"),
        # torch's two runs agree (an even number of backward runs each): it passed, then was
        # taken for a backward not linear in grad_output, of a rounding error's size
        ((3, 4), "backward (given the same grad_outputs) gives different results"),
    ],
)
def test_a_backward_not_reentrant_is_explained_in_words(shape, says):
    report = check_function(DriftingBackward, seeded(*shape), checks=["gradcheck"])
    gradcheck = report["gradcheck"]
    assert gradcheck.failed, report
    assert says in gradcheck.message
    assert "reads memory it never wrote" in gradcheck.message


class _SquareWithNanGradient(torch.autograd.Function):
    """x^2 whose backward gives NaN at its first element (d x^2/dx = 2x elsewhere)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (2 * x * g).index_fill(-1, torch.tensor([0]), float("nan"))


def test_a_projection_nan_on_one_side_only_is_an_infinite_error():
    # before: |NaN - finite| is NaN, and NaN > atol + rtol * |v^T J u| is False: the
    # fast_mode and random-fn projections passed a backward giving NaN
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)

    def randn(shape, dtype):
        return torch.randn(shape, dtype=dtype, generator=generator)

    def square(x):
        return (_SquareWithNanGradient.apply(x),)

    abs_err, rel_err, scale = projected_backward_error(square, [x], 1e-6, randn)
    assert math.isinf(abs_err) and math.isinf(rel_err) and math.isfinite(scale)


@pytest.mark.parametrize("step", [torch.round, torch.floor, torch.sign])
def test_a_step_function_with_a_zero_backward_passes_gradgradcheck(step):
    # torch's own backward is zeros not connected to the graph; its derivative, zero, is
    # right (torch.autograd.gradgradcheck passes it)
    x = seeded(3, 4) * 3
    assert torch.autograd.gradgradcheck(step, (x.clone().requires_grad_(True),))
    report = check_function(step, x, checks=["gradcheck", "gradgradcheck"])
    assert report["gradgradcheck"].passed, str(report)


class _SigmoidBackwardUnderNoGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.sigmoid(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        with torch.no_grad():  # double backward sees a constant: silently zero
            return grad * y * (1 - y)


def test_a_backward_under_no_grad_fails_gradgradcheck_naming_the_cause():
    report = check_function(_SigmoidBackwardUnderNoGrad, seeded(3, 4), checks=["gradgradcheck"])
    assert report["gradgradcheck"].failed, str(report)
    assert "backward runs under no_grad" in report["gradgradcheck"].message


class _ReluWrongAtPositives(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * 2  # wrong: the derivative is 1 where x > 0


@pytest.mark.parametrize(
    "x",
    [
        seeded(3, 4).float(),  # float32 numbers, cast to float64 by check_function
        torch.tensor([[0.5, -1.5, 2.25], [-0.75, 1.0, 3.5]], dtype=torch.float64),
    ],
    ids=["float32 inputs", "round numbers"],
)
def test_outputs_copying_inputs_of_float32_numbers_do_not_suggest_fn_computes_in_float32(x):
    # relu's outputs are its inputs' numbers: they hold only float32 numbers because the
    # inputs do, which says nothing of how fn computes
    report = check_function(_ReluWrongAtPositives, x, checks=["gradcheck"])
    assert report["gradcheck"].failed, str(report)
    assert "hold only" not in report["gradcheck"].message


class TanhRecomputedFromDetached(torch.autograd.Function):
    """Recomputes tanh in backward from a detached copy of x and differentiates it with an
    inner torch.autograd.grad, create_graph=True: the gradient is right and connected to
    grad_output, but has no path to x, so its second derivative in x comes out zero."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            copy = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(torch.tanh(copy), copy, g, create_graph=True)
        return grad


def test_a_backward_recomputing_from_a_detached_input_is_named_as_the_cause():
    # before: "analytical 0 vs numerical ..." and nothing more: backward's gradients are
    # connected to the graph (through grad_output), so no hint about a disconnected
    # backward applied, and x itself is saved, so no hint about a saved constant either
    result = check_function(TanhRecomputedFromDetached, seeded(3, 4), checks=["gradgradcheck"])
    message = result["gradgradcheck"].message
    assert result["gradgradcheck"].failed, result
    assert "have no path to input 0 in the autograd graph, only to grad_output" in message
