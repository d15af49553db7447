"""Backward and jvp must be linear (``checks/linearity.py``): gradcheck's Jacobians use
one-hot grad_outputs and tangents, for which a backward clipping or taking ``abs`` of its
grad_output, or a jvp multiplying tangents, is right."""

from __future__ import annotations

import pytest
import torch
from tests.verify.correct_functions import identity, square_function
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function
from torchbp.verify.checks.compare import difference


@pytest.mark.parametrize(
    "backward_of_g",
    [torch.abs, lambda g: g.clamp(-1.0, 1.0), lambda g: g * g.sum()],
    ids=["abs", "clipped", "scaled by its sum"],
)
def test_a_backward_not_linear_in_grad_output_fails_gradcheck(backward_of_g):
    # before: every check passed without a reference (one-hot grad_outputs only)
    fn = square_function(backward_of_g, identity)
    report = check_function(fn, seeded(3, 4), checks=["gradcheck"])
    assert report["gradcheck"].failed, report
    assert "backward is not linear in grad_output" in report["gradcheck"].message


@pytest.mark.parametrize(
    "jvp_of_t", [torch.abs, lambda t: t * t.sum()], ids=["abs", "scaled by its sum"]
)
def test_a_jvp_not_linear_in_the_tangent_fails_forward_ad(jvp_of_t):
    # before: passed (the forward Jacobian is built from one-hot tangents)
    fn = square_function(identity, jvp_of_t)
    report = check_function(fn, seeded(3, 4), checks=["forward_ad"])
    assert report["forward_ad"].failed, report
    assert "jvp is not linear in the tangent" in report["forward_ad"].message


def test_a_linear_backward_and_jvp_pass():
    fn = square_function(identity, identity)
    report = check_function(fn, seeded(3, 4), checks=["gradcheck", "forward_ad"])
    assert report.ok and not report.unsupported, report


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_a_backward_rounding_to_float16_is_named_as_lost_precision(scale):
    # a departure of a rounding error's size is not an abs or clamp of grad_output, at any
    # magnitude: relative to the gradient's (large inputs, large absolute rounding errors)
    fn = square_function(lambda g: g.half().to(g.dtype), identity)
    report = check_function(fn, seeded(3, 4, scale=scale), checks=["gradcheck"])
    message = report["gradcheck"].message
    assert report["gradcheck"].failed, report
    assert "of a rounding error's size" in message and "narrower dtype" in message


def test_a_backward_nondeterministic_within_nondet_tol_passes():
    # gradcheck's nondet_tol (a backward with atomic adds on CUDA) applies to the two runs
    # the linearity check compares, as to torch's own
    state = {"runs": 0}

    def drifting(g):
        state["runs"] += 1
        return g * (1 + 1e-12 * (state["runs"] % 2))

    fn = square_function(drifting, identity)
    report = check_function(fn, seeded(3, 4), checks=["gradcheck"], nondet_tol=1e-9)
    assert report["gradcheck"].passed, report


def test_a_backward_nondeterministic_beyond_nondet_tol_names_the_difference_and_nondet_tol():
    # a correct backward summing in another order on each run (atomic adds) was told only
    # of unwritten memory, state or random numbers, never of the option that accepts it
    state = {"runs": 0}

    def drifting(g):
        state["runs"] += 1
        return g * (1 + 1e-12 * (state["runs"] % 2))

    fn = square_function(drifting, identity)
    report = check_function(fn, seeded(3, 4), checks=["gradcheck"])
    message = report["gradcheck"].message
    assert report["gradcheck"].failed, report
    assert "by up to" in message and "pass nondet_tol above that difference" in message


class _ComplexDouble(torch.autograd.Function):
    """2 z for a complex z, whose jvp takes the absolute value of the tangents' imaginary
    parts: right for gradcheck's one-hot tangents 1 and 1j, wrong for any other."""

    @staticmethod
    def forward(z):
        return 2 * z

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        # d(2z)/dz = 2, real: the gradient is 2 g
        return 2 * g

    @staticmethod
    def jvp(ctx, t):
        return 2 * torch.complex(t.real, t.imag.abs())


def test_a_jvp_not_linear_in_the_imaginary_parts_of_complex_tangents_fails_forward_ad():
    # complex inputs are checked as their real views: the random tangents have random
    # imaginary parts too
    z = torch.complex(seeded(3, 4), seeded(3, 4, seed=1))
    report = check_function(_ComplexDouble, z, checks=["forward_ad"])
    assert report["forward_ad"].failed, report
    assert "jvp is not linear in the tangent" in report["forward_ad"].message


class _ProductAbsInY(torch.autograd.Function):
    """x * y, whose gradient of y alone takes the absolute value of grad_output."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return x * y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        # d(xy)/dx = y, d(xy)/dy = x (the latter wrongly of |g|)
        return g * y, g.abs() * x


def test_a_backward_not_linear_for_its_second_input_only_fails_naming_it():
    report = check_function(_ProductAbsInY, seeded(3, 4), seeded(3, 4, seed=1))
    assert report["gradcheck"].failed, report
    message = report["gradcheck"].message
    assert "backward is not linear in grad_output: the gradient of input 1" in message


class _SquareIntoBuffer(torch.autograd.Function):
    """x^2, whose backward writes every gradient into one buffer it keeps and returns it."""

    buffer = None

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if _SquareIntoBuffer.buffer is None or _SquareIntoBuffer.buffer.shape != x.shape:
            _SquareIntoBuffer.buffer = torch.empty_like(x)
        # d x^2/dx = 2x
        return torch.mul(g, 2 * x, out=_SquareIntoBuffer.buffer)


def test_a_backward_reusing_its_buffer_is_the_interleave_checks_finding_not_linearitys():
    # each gradient is right when read at once: gradcheck passes, interleave names the buffer
    report = check_function(_SquareIntoBuffer, seeded(3, 4), checks=["gradcheck", "interleave"])
    assert report["gradcheck"].passed, report
    assert report["interleave"].failed, report


def _nan_on_alternate_dense_runs(state):
    """A grad_output map giving NaN at one entry on every other call with a dense
    grad_output (the linearity check's random ones), unchanged otherwise: one-hot
    grad_outputs (gradcheck's Jacobian) never see it."""

    def flaky(g):
        if int((g != 0).sum()) < 2:
            return g
        state["runs"] += 1
        return g.index_fill(-1, torch.tensor([0]), float("nan")) if state["runs"] % 2 else g

    return flaky


def test_a_backward_nan_in_one_run_only_is_named_as_not_repeatable():
    # before: NaN > nondet_tol is False, so a result NaN in one run and finite in the
    # other passed the repeatability check
    fn = square_function(_nan_on_alternate_dense_runs({"runs": 0}), identity)
    report = check_function(fn, seeded(3, 4), checks=["gradcheck"])
    message = report["gradcheck"].message
    assert report["gradcheck"].failed, report
    assert "different results for the same inputs and vectors on two runs" in message
    assert "NaN or infinite in one run only" in message


def test_the_difference_of_two_runs_counts_only_one_sided_nan_or_inf():
    # NaN in both runs, or the same infinity, is the same result; NaN on one side only, or
    # infinities that differ, an infinite difference (never a NaN, which passes any tol)
    nan, inf = float("nan"), float("inf")
    first = torch.tensor([nan, nan, 1.0, inf, inf, -inf, 1.0])
    again = torch.tensor([nan, 1.0, nan, inf, 1.0, inf, 3.0])
    expected = torch.tensor([0.0, inf, inf, 0.0, inf, inf, 2.0])
    assert torch.equal(difference(first, again), expected)


class _ProductInFloat32(torch.autograd.Function):
    """x @ w whose backward computes in float32 on purpose (a mixed-precision kernel)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, g):
        x, w = (t.float() for t in ctx.saved_tensors)
        g = g.float()
        # d(x w)/dx = g w^T, d(x w)/dw = x^T g, rounded to float32
        return (g @ w.T).to(ctx.saved_tensors[0].dtype), (x.T @ g).to(ctx.saved_tensors[1].dtype)


class _TwoProductsInFloat16(torch.autograd.Function):
    """(x @ w, x @ w^T), whose backward computes in float16 on purpose: its gradients for
    both grad_outputs at once differ from the sum of those for each alone by a rounding."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w, x @ w.T

    @staticmethod
    def backward(ctx, g1, g2):
        dtype = g1.dtype
        x, w, g1, g2 = (t.half() for t in (*ctx.saved_tensors, g1, g2))
        # d(x w)/dx = g1 w^T, d(x w^T)/dx = g2 w; d(x w)/dw = x^T g1, d(x w^T)/dw = g2^T x
        return (g1 @ w.T + g2 @ w).to(dtype), (x.T @ g1 + g2.T @ x).to(dtype)


_LOW_PRECISION_CASES = {
    "float32, linear in grad_output": (
        _ProductInFloat32,
        (seeded(8, 16), seeded(16, 8, seed=1)),
        "not linear in grad_output",
        1e-5,
    ),
    "float16, several grad_outputs": (
        _TwoProductsInFloat16,
        (seeded(8, 16), seeded(16, 16, seed=1)),
        "differs from the sum of its gradients for each output alone",
        1e-1,
    ),
}


@pytest.mark.parametrize("case", list(_LOW_PRECISION_CASES))
def test_a_backward_in_low_precision_on_purpose_names_parity_tolerances_to_accept_it(case):
    # before: loosening gradcheck's atol/rtol changed nothing and the message named no
    # option; the comparisons of backward with itself use the parity tolerances
    fn, inputs, finding, parity_tol = _LOW_PRECISION_CASES[case]
    report = check_function(fn, *inputs, checks=["gradcheck"], atol=1e-1, rtol=1e-1)
    message = report["gradcheck"].message
    assert report["gradcheck"].failed, report
    assert finding in message and "of a rounding error's size" in message
    assert "parity_atol" in message and "parity_rtol" in message
    accepted = check_function(
        fn,
        *inputs,
        checks=["gradcheck"],
        atol=1e-1,
        rtol=1e-1,
        parity_atol=parity_tol,
        parity_rtol=parity_tol,
    )
    assert accepted["gradcheck"].passed, accepted


def _non_finite_when_dense(value):
    """A vector map giving ``value`` everywhere for a vector with two or more nonzeros,
    the vector itself otherwise: right for every one-hot vector (gradcheck's Jacobians),
    wrong for every dense one (training's)."""

    def branching(v):
        return torch.where(v.count_nonzero() > 1, torch.full_like(v, value), v)

    return branching


_JACOBIAN_PATHS = {
    "full Jacobian": ((3, 4), {}),
    "projections": ((8, 9), {"fast_mode": False}),
    "torch fast_mode": ((3, 4), {"fast_mode": True}),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("path", list(_JACOBIAN_PATHS))
def test_a_backward_non_finite_for_dense_grad_outputs_only_fails_gradcheck(value, path):
    # before: passed (one-hot grad_outputs gave finite gradients; NaN == NaN in the
    # linearity comparison), also for a Jacobian too large to compare in full; torch's
    # fast_mode (dense random vectors) failed, saying only "Jacobian mismatch"
    shape, options = _JACOBIAN_PATHS[path]
    fn = square_function(_non_finite_when_dense(value), identity)
    report = check_function(fn, seeded(*shape), checks=["gradcheck"], **options)
    message = report["gradcheck"].message
    assert report["gradcheck"].failed, report
    assert f"{value} for dense random grad_outputs: the gradient of input 0" in message
    assert "backward must be finite for every finite grad_output" in message


@pytest.mark.parametrize("fast_mode", [False, True])
def test_a_jvp_non_finite_for_dense_tangents_only_fails_forward_ad(fast_mode):
    fn = square_function(identity, _non_finite_when_dense(float("nan")))
    report = check_function(fn, seeded(3, 4), checks=["forward_ad"], fast_mode=fast_mode)
    message = report["forward_ad"].message
    assert report["forward_ad"].failed, report
    assert "jvp gives nan for dense random tangents: the tangent of output 0" in message


class _SqrtAtZero(torch.autograd.Function):
    """sqrt(x), whose derivative 1 / (2 sqrt(x)) is infinite at 0, as torch.sqrt's is."""

    @staticmethod
    def forward(ctx, x):
        y = x.sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        # d sqrt(x)/dx = 1 / (2 sqrt(x))
        return g / (2 * y)


def test_a_non_finite_gradient_where_fn_has_no_finite_derivative_is_no_finiteness_finding():
    # the infinite derivative of sqrt at 0 is right: the finiteness requirement stays
    # silent where fn's own central differences are not finite
    x = seeded(3, 4).abs() + 0.5
    x[1, 2] = 0.0
    fn_report = check_function(_SqrtAtZero.apply, x, checks=["gradcheck"])
    torch_report = check_function(torch.sqrt, x, checks=["gradcheck"])
    assert "for dense random" not in fn_report["gradcheck"].message, fn_report
    assert fn_report["gradcheck"].status == torch_report["gradcheck"].status


def _scaled_when_dense(g):
    """grad_output itself when it has one nonzero (gradcheck's one-hot ones), else 1.5
    times it: linear in dense grad_outputs, wrong for every one of them."""
    return torch.where(g.count_nonzero() > 1, 1.5 * g, g)


@pytest.mark.parametrize("path", list(_JACOBIAN_PATHS))
def test_a_backward_wrong_for_dense_grad_outputs_only_fails_gradcheck(path):
    # before: every check passed without a reference (the one-hot Jacobian is right, and
    # backward is linear in dense grad_outputs); torch's fast_mode said "Jacobian mismatch"
    shape, options = _JACOBIAN_PATHS[path]
    fn = square_function(_scaled_when_dense, identity)
    report = check_function(fn, seeded(*shape), checks=["gradcheck"], **options)
    message = report["gradcheck"].message
    assert report["gradcheck"].failed, report
    assert "backward for dense random grad_outputs v disagrees with central differences" in (
        message
    )
    assert "another path for a grad_output with several nonzeros" in message


def test_a_max_at_ties_in_several_rows_is_no_dense_grad_output_finding():
    # each tie's derivative is any between its one-sided ones, whatever the sign of the
    # grad_output of its row: torch.max passes
    x = torch.tensor([[1.0, 1.0, 0.0], [2.0, 3.0, 3.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    report = check_function(lambda t: torch.max(t, 1).values, x, checks=["gradcheck"])
    assert report["gradcheck"].passed, report


@pytest.mark.parametrize("path", list(_JACOBIAN_PATHS))
def test_a_jvp_wrong_for_dense_tangents_only_fails_forward_ad(path):
    # before: passed (one-hot tangents build a right forward Jacobian, and the jvp is
    # linear in dense tangents); torch's fast_mode said "Jacobian ... mismatch"
    shape, options = _JACOBIAN_PATHS[path]
    fn = square_function(identity, _scaled_when_dense)
    report = check_function(fn, seeded(*shape), checks=["forward_ad"], **options)
    message = report["forward_ad"].message
    assert report["forward_ad"].failed, report
    assert "jvp for dense random tangents u disagrees with central differences" in message
    assert "the tangent of output 0" in message and "at index" in message


def test_a_jvp_at_ties_is_no_dense_tangent_finding():
    x = torch.tensor([[1.0, 1.0, 0.0], [2.0, 3.0, 3.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    report = check_function(lambda t: torch.max(t, 1).values, x, checks=["forward_ad"])
    assert report["forward_ad"].passed, report


def test_a_once_differentiable_point_is_no_dense_vector_finding():
    # 5 t|t| at 0: derivative 0, but a central difference there errs by 5 eps u² (its
    # second derivative jumps), within gradcheck's atol for one-hot steps (u = 1); before,
    # the dense-vector comparisons moved elements by up to ~4 eps and failed it; a
    # direction of norm 1 keeps gradcheck's accuracy
    report = check_function(
        lambda t: 5 * torch.sign(t) * t * t,
        torch.zeros(20, 20, dtype=torch.float64),
        checks=["gradcheck", "forward_ad"],
    )
    assert report.ok, report


def test_a_once_differentiable_point_passes_fast_modes_own_projection():
    # before: fast_mode's projection v^T J u (drawn from the seed, beside torch's) moved
    # elements by up to ~4 eps, failing 5 t|t| at 0, which torch's fast gradcheck passes
    report = check_function(
        lambda t: 5 * torch.sign(t) * t * t,
        torch.zeros(20, 20, dtype=torch.float64),
        checks=["gradcheck"],
        fast_mode=True,
    )
    assert report.ok, report


def test_a_kink_passes_fast_modes_own_projection_of_double_backward():
    # relu(t)² at inputs of exactly 0: its backward 2 relu(t) g has a kink there, where a
    # central difference is no derivative; before, fast_mode's own projection failed it
    # (the full comparison excuses such entries, checking them against one-sided ones;
    # 4900 elements: fast_mode by default)
    x = seeded(70, 70).clamp(min=0.0)
    report = check_function(lambda t: torch.relu(t) ** 2, x, checks=["gradcheck", "gradgradcheck"])
    assert report.ok, report


@pytest.mark.parametrize("scale", [1e5, 1e6])
def test_a_shift_invariant_fn_of_large_inputs_passes_along_the_uniform_direction(scale):
    # log_softmax moves by nothing along the uniform direction: v^T J u is 0, a sum of
    # terms g_j u_j of order 1 cancelling, and central differences of outputs of order
    # 1e6 carry rounding of order 1e-4 there; before, the slack relative to that 0 (atol
    # only) failed it, which torch's gradcheck (rtol of each Jacobian entry) passes
    x = seeded(3, 5) * scale
    fn = lambda t: torch.log_softmax(t, -1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(),), raise_exception=False)
    report = check_function(fn, x, checks=["gradcheck"])
    assert report["gradcheck"].passed, report


@pytest.mark.parametrize(
    "fn",
    [lambda t: t[..., 1:] - t[..., :-1], lambda t: t - t.mean(-1, keepdim=True)],
    ids=["differences", "centred"],
)
@pytest.mark.parametrize("scale", [1e5, 1e6])
def test_a_shift_invariant_fn_of_large_inputs_passes_forward_ad(fn, scale):
    # each output element is 0 along the uniform tangent, and outputs of 1e5 round by
    # ~1e-11, 1e-5 over a step of 1e-6: before, 'jvp for the tangent u moving every
    # element of the inputs by the same amount disagrees with central differences' (and
    # at 1e6 for dense random tangents: atol + rtol |J u| only), which torch's gradcheck
    # passes
    x = seeded(4, 6) * scale + scale
    inputs = (x.clone().requires_grad_(),)
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, raise_exception=False)
    report = check_function(fn, x, checks=["forward_ad"])
    assert report["forward_ad"].passed, report


@pytest.mark.parametrize(
    "fn",
    [torch.sign, lambda t: 3 * t + torch.sign(t)],
    ids=["sign", "a line with a step"],
)
def test_a_jump_at_every_element_is_no_dense_vector_finding(fn):
    # a step at 0: its central differences there are a jump over 2 eps (1 / eps), no
    # derivative, which gradcheck's one-hot comparison excuses; before, 'backward for
    # dense random grad_outputs v disagrees with central differences along a random
    # direction u: v^T J u is 0 from backward, 1.65883e+06 from central differences'
    # (and jvp likewise) for the 0 gradient of torch's own sign
    report = check_function(fn, torch.zeros(3, 4), checks=["gradcheck", "forward_ad"])
    assert report.ok, report


def test_a_wrong_gradient_beside_a_jump_still_fails_for_dense_grad_outputs():
    # the elements off the jump are still compared: 2 x (right) off 0, wrong for dense
    # grad_outputs only
    x = torch.cat([torch.zeros(4), seeded(8)])
    fn = square_function(_scaled_when_dense, identity)
    report = check_function(lambda t: fn.apply(t) + torch.sign(t), x, checks=["gradcheck"])
    assert report["gradcheck"].failed, report
    assert "another path for a grad_output with several nonzeros" in (
        report["gradcheck"].message
    ), report
