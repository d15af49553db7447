"""Functions with a restricted domain (log, sqrt, acos, one refusing non-positive inputs):
a correct one passes on inputs inside its domain, and gets a usage error saying how to give
such inputs - never a failed check - on inputs outside it; from the command line a range
after the shape (``4,5[0.1,2]``) draws them inside."""

from __future__ import annotations

import pytest
import torch
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function, cli
from torchbp.verify.target import FLOAT_DTYPES, TargetError, parse_inputs

FAST_CHECKS = ["forward", "gradcheck", "reference", "extreme_values"]


class Log(torch.autograd.Function):
    """Correct: d log(x)/dx = 1/x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.log()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / x


class Acos(torch.autograd.Function):
    """Correct: d acos(x)/dx = -1/sqrt(1 - x^2)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.acos()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return -g / (1 - x * x).sqrt()


class StrictSqrt(torch.autograd.Function):
    """Correct, refusing non-positive inputs with a ValueError: d sqrt(x)/dx = 1/(2 sqrt(x))."""

    @staticmethod
    def forward(ctx, x):
        if bool((x <= 0).any()):
            raise ValueError("StrictSqrt: x must be positive")
        y = x.sqrt()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g / (2 * y)


class HalfStrictSqrt(StrictSqrt):
    """Wrong: the 2 of 1/(2 sqrt(x)) missing."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g / y


class NanLog(torch.autograd.Function):
    """Wrong: log(x) computed as log(x - 1) + log1p(1/(x - 1)), NaN for x < 1 where the
    reference is finite."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x - 1).log() + torch.log1p(1 / (x - 1))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / x


def positive(*shape: int) -> torch.Tensor:
    return seeded(*shape).abs() + 0.1


@pytest.mark.parametrize(
    ("fn", "reference", "x"),
    [
        (Log, torch.log, positive(3, 4)),
        (Acos, torch.acos, seeded(3, 4).clamp(-0.9, 0.9)),
        (StrictSqrt, torch.sqrt, positive(3, 4)),
    ],
)
def test_a_correct_restricted_domain_function_passes_inside_its_domain(fn, reference, x):
    # before: StrictSqrt failed extreme_values ("fn failed on inputs set to zero, where the
    # reference works"): its ValueError for a probe outside its domain was taken for a crash
    report = check_function(fn, x, reference=reference, checks=FAST_CHECKS)
    assert report.ok, report


def test_a_probe_refused_with_a_value_error_is_named_in_the_note():
    report = check_function(StrictSqrt, positive(3, 4), reference=torch.sqrt, checks=FAST_CHECKS)
    assert "fn refused inputs set to zero" in report["extreme_values"].message, report


@pytest.mark.parametrize(
    ("fn", "reference"), [(Log, torch.log), (Acos, torch.acos), (Log, None), (StrictSqrt, None)]
)
def test_inputs_outside_the_domain_are_a_usage_error_saying_how_to_give_others(fn, reference):
    # before: gradcheck failed against NaN central differences (log, acos), or forward
    # failed with the Function's own ValueError (StrictSqrt): FAILED for a right backward
    with pytest.raises(ValueError, match="domain") as info:
        check_function(fn, seeded(3, 4, scale=2.0), reference=reference, checks=FAST_CHECKS)
    assert "x.abs() + 0.1" in str(info.value)


def test_a_wrong_backward_of_a_restricted_domain_function_still_fails():
    report = check_function(HalfStrictSqrt, positive(3, 4), checks=["gradcheck"])
    assert report["gradcheck"].failed, report


def test_nan_where_the_reference_is_finite_is_fns_fault_not_the_domains():
    report = check_function(NanLog, positive(3, 4), reference=torch.log, checks=FAST_CHECKS)
    assert not report.ok, report


def test_a_range_after_the_shape_draws_uniform_values_inside_it():
    x, y = parse_inputs("200[0.5,2];float32:3,4[-0.9,0.9]")
    assert bool((x >= 0.5).all()) and bool((x <= 2).all()) and x.std() > 0.3
    assert y.dtype == torch.float32 and tuple(y.shape) == (3, 4) and bool((y.abs() <= 0.9).all())


@pytest.mark.parametrize("item", ["3[1,0]", "3[a,2]", "3[1,2", "3[1,2]x", "3[1]", "3[nan,1]"])
def test_a_malformed_range_is_a_usage_error(item):
    with pytest.raises(TargetError, match=r"SHAPE\[LO,HI\]"):
        parse_inputs(item)


def test_a_range_reads_negative_bounds_spaces_and_exponents():
    (x, y) = parse_inputs("50[-2,-1]; 3, 4[ -1e-1 , 2E0 ]")
    assert bool((x >= -2).all()) and bool((x <= -1).all()), x
    assert tuple(y.shape) == (3, 4) and bool((y >= -0.1).all()) and bool((y <= 2).all()), y


def test_a_range_as_wide_as_float64_draws_finite_values():
    # before: every value inf (HI - LO overflowed)
    (x,) = parse_inputs("50[-1e308,1e308]")
    assert bool(torch.isfinite(x).all()) and x.min() < 0 < x.max(), x


def test_a_range_beyond_the_dtype_is_refused():
    # before: float16 values drawn up to 1e5 were cast to inf
    with pytest.raises(TargetError, match="beyond float16's largest value"):
        parse_inputs("float16:4[1,1e5]")


@pytest.mark.parametrize(
    "item",
    [
        "float16:2000[1e-8,1e-6]",  # before: 1e-8 and its neighbours rounded to 0
        "float16:2000[0.1,0.1001]",  # before: 0.0999755859375, below 0.1
        "bfloat16:2000[-1.001,-1]",
        "float32:2000[1e-45,3e-45]",  # subnormal bounds
        "2000[0.1,0.3]",
    ],
)
def test_a_range_in_a_narrow_dtype_keeps_every_value_inside_it(item):
    dtype_name, _, rest = item.rpartition(":")
    low, high = (float(b) for b in rest.partition("[")[2].rstrip("]").split(","))
    (x,) = parse_inputs(item)
    assert x.dtype == FLOAT_DTYPES.get(dtype_name, torch.float64)
    values = x.double()
    assert bool((values >= low).all()) and bool((values <= high).all()), (
        values.min(),
        values.max(),
    )


@pytest.mark.parametrize("item", ["float16:4[1e-9,2e-8]", "bfloat16:4[1.001,1.002]"])
def test_a_range_holding_no_value_of_the_dtype_is_refused(item):
    with pytest.raises(TargetError, match=r"holds no .*16 value"):
        parse_inputs(item)


@pytest.mark.parametrize("item", ["int:4<10[0,1]", "bool:4[0,1]", "complex:4[0,1]"])
def test_a_range_after_a_kind_of_input_without_one_says_ranges_are_for_floats(item):
    # before: "a shape is comma-separated sizes" (bool, complex) or "an integer tensor is
    # int:SHAPE<HIGH", as if the range were not there
    with pytest.raises(TargetError, match=r"a range \[LO,HI\] is for float inputs only"):
        parse_inputs(item)


def test_the_command_line_checks_a_restricted_domain_function_on_a_range(capsys):
    argv = [f"{__name__}:StrictSqrt", "--inputs", "3,4[0.1,2]", "--reference", "torch:sqrt"]
    assert cli.main([*argv, "--no-compile"]) == 0, capsys.readouterr()


def test_the_command_line_advises_a_range_when_fn_refuses_drawn_inputs(capsys):
    code = cli.main([f"{__name__}:StrictSqrt", "--inputs", "3,4", "--no-compile"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--inputs '4,5[0.1,2]'" in err


class StrictLogWithVmapRule(torch.autograd.Function):
    """Correct, refusing non-positive inputs, with setup_context and a generated vmap rule:
    d log(x)/dx = 1/x."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        if bool((x <= 0).any()):
            raise ValueError("StrictLogWithVmapRule: x must be positive")
        return x.log()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / x


def test_a_domain_check_vmap_cannot_run_makes_vmap_unsupported_saying_how_to_write_it():
    # before: FAILED with PyTorch's "data-dependent control flow" error: the if on
    # bool((x <= 0).any()) has no single answer for a batch, a limitation of vmap, while
    # fn's values and gradients are right (FAILED is kept for wrong results)
    report = check_function(StrictLogWithVmapRule, positive(3, 4), checks=["vmap"])
    result = report["vmap"]
    assert report.ok and result.unsupported, report
    assert "a Python if on a tensor's values" in result.message, result.message
    assert "not a wrong result" in result.message and "torch.where" in result.message


class StrictLogWithWrongVmapRule(StrictLogWithVmapRule):
    """Wrong: its vmap staticmethod (which runs the domain check on the unbatched
    tensor, as vmap cannot) computes log1p(x), not log(x)."""

    generate_vmap_rule = False

    @staticmethod
    def vmap(info, in_dims, x):
        if bool((x <= 0).any()):
            raise ValueError("StrictLogWithWrongVmapRule: x must be positive")
        return torch.log1p(x).movedim(in_dims[0], 0), 0


def test_a_vmap_rule_giving_wrong_values_still_fails():
    report = check_function(StrictLogWithWrongVmapRule, positive(3, 4), checks=["vmap"])
    assert report["vmap"].failed, report
    assert "vmap output 0 differs from a Python loop" in report["vmap"].message


def _one_near_zero(*shape: int) -> torch.Tensor:
    x = positive(*shape)
    x[0, 0] = 3e-7  # within gradcheck's eps (1e-6) of 0, the edge of a log's domain
    return x


@pytest.mark.parametrize("fn", [Log, StrictSqrt])
def test_an_input_within_eps_of_the_domain_edge_is_a_usage_error_naming_eps(fn):
    # before: gradcheck failed with fn's ValueError at the input shifted by -eps
    # (StrictSqrt) or against a NaN numerical gradient (Log): FAILED for a right backward
    with pytest.raises(ValueError, match="within eps of the edge of fn's domain") as info:
        check_function(fn, _one_near_zero(3, 4), checks=["gradcheck"])
    assert "shifted by -1e-06" in str(info.value) and "eps=1e-08" in str(info.value)
    report = check_function(fn, _one_near_zero(3, 4), checks=["gradcheck"], eps=1e-8)
    assert report.ok, report


def test_a_wrong_backward_near_the_domain_edge_still_fails():
    report = check_function(HalfStrictSqrt, _one_near_zero(3, 4), checks=["gradcheck"], eps=1e-8)
    assert report["gradcheck"].failed, report


class MaxNormalized(torch.autograd.Function):
    """x / max|x|, the max read as a Python number (a quantizer's scale) and taken for a
    constant by backward (a surrogate: d(x / s)/dx = 1/s with s fixed)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x / x.abs().max().item()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[0].abs().max().item()

    @staticmethod
    def backward(ctx, g):
        return g / ctx.scale


def test_an_item_call_vmap_cannot_run_makes_vmap_unsupported_saying_how_to_write_it():
    # before: FAILED with PyTorch's "calling .item() on a Tensor" error
    report = check_function(MaxNormalized, seeded(3, 4), checks=["vmap"])
    result = report["vmap"]
    assert report.ok and result.unsupported, report
    assert ".item()" in result.message and "amax()" in result.message, result.message


class SqrtGuardingBackward(StrictSqrt):
    """Wrong: backward refuses small outputs with a ValueError (a guard of its own, where
    the reference's gradient is finite)."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        if bool((y < 1e-2).any()):
            raise ValueError("SqrtGuardingBackward: y too small")
        return g / (2 * y)


def test_a_value_error_of_backward_on_a_probe_fails_extreme_values():
    # before: passed, the near-zero probe left out as if forward had refused it
    report = check_function(
        SqrtGuardingBackward, positive(3, 4), reference=torch.sqrt, checks=FAST_CHECKS
    )
    result = report["extreme_values"]
    assert result.failed, report
    assert "backward failed on inputs scaled by 1e-6" in result.message, result.message


class LogWithRaisingBackward(Log):
    """Wrong: backward raises ValueError (a check of its own gone wrong)."""

    @staticmethod
    def backward(ctx, g):
        raise ValueError("LogWithRaisingBackward: cannot differentiate")


def test_a_value_error_of_backward_near_the_domain_edge_fails_not_a_usage_error():
    # before: a usage error ("within eps of the edge of fn's domain"), as fn is NaN at
    # the input shifted by -eps; but the ValueError was backward's, not a refusal of fn's
    report = check_function(LogWithRaisingBackward, _one_near_zero(3, 4), checks=["gradcheck"])
    result = report["gradcheck"]
    assert result.failed and "cannot differentiate" in result.message, report


def test_nan_without_a_reference_is_called_either_outside_the_domain_or_fns_mistake():
    # NanLog is NaN for x < 1, inside log's domain: before, the usage error said only
    # "they lie outside fn's domain", though nothing told that from a wrong forward
    with pytest.raises(ValueError, match="or fn produces NaN where it should not") as info:
        check_function(NanLog, positive(3, 4), checks=FAST_CHECKS)
    low, high = float(positive(3, 4).min()), float(positive(3, 4).max())
    assert f"input 0 of shape (3, 4) in [{low:.3g}, {high:.3g}]" in str(info.value)


class DoubleOfAMatrix(torch.autograd.Function):
    """Correct, refusing a tensor that is not 2-D with a ValueError: d(2 x)/dx = 2."""

    @staticmethod
    def forward(ctx, x):
        if x.dim() != 2:
            raise ValueError(f"DoubleOfAMatrix: expected a 2-D input, got {x.dim()}-D")
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_a_value_error_refusing_a_shape_is_not_called_a_domain_problem_only():
    # before: "they must lie inside fn's domain", for a 1-D input fn refuses by its shape
    with pytest.raises(ValueError, match="shapes or dtypes it refuses") as info:
        check_function(DoubleOfAMatrix, seeded(4))
    assert "input 0 of shape (4,)" in str(info.value)
    assert "or fn raises it by mistake" in str(info.value)


def test_a_domain_check_compile_cannot_capture_in_one_graph_is_unsupported_not_failed():
    # before: FAILED with Dynamo's UserError "Could not guard on data-dependent
    # expression": the if on bool((x <= 0).any()) cannot be captured in one graph (a
    # PyTorch limitation); compiled with graph breaks, fn matches eager
    report = check_function(StrictSqrt, positive(3, 4), checks=["compile"])
    result = report["compile"]
    assert report.ok and result.unsupported, report
    assert "a Python if on a tensor's values" in result.message, result.message
    assert "outputs and gradients match eager" in result.message, result.message


def _reference_of_two_inputs(x, y):
    return x.log() + y


def test_nan_where_the_reference_raises_a_type_error_is_not_called_outside_both_domains():
    # before: "(the reference's too): they lie outside fn's domain", for a reference that
    # raised TypeError (called with one input), which says nothing of the domain
    with pytest.raises(ValueError, match="or fn produces NaN where it should not") as info:
        check_function(NanLog, positive(3, 4), reference=_reference_of_two_inputs)
    assert "the reference raised TypeError" in str(info.value), info.value


class XTimesLogY(torch.autograd.Function):
    """Wrong in x only: d(x log y)/dx = log y, backward gives 2 log y (d/dy = x / y and the
    jvp are right)."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        ctx.save_for_forward(x, y)
        return x * y.log()

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        return 2 * g * y.log(), g * x / y

    @staticmethod
    def jvp(ctx, tx, ty):
        x, y = ctx.saved_tensors
        return tx * y.log() + x * ty / y


def test_a_later_check_near_the_domain_edge_does_not_hide_an_earlier_failure():
    # before: gradcheck failed for input 0 (x, far from any edge: a finite mismatch),
    # then forward_ad met NaN central differences at y = 3e-7 and its usage error replaced
    # the whole report: a wrong backward came back as "pass other inputs", not FAILED
    report = check_function(
        XTimesLogY, seeded(3, 4), _one_near_zero(3, 4), checks=["gradcheck", "forward_ad"]
    )
    assert report["gradcheck"].failed, report
    result = report["forward_ad"]
    assert result.skipped and "within eps of the edge of fn's domain" in result.message, report


def test_an_item_call_compile_cannot_capture_in_one_graph_is_unsupported_not_failed():
    # before: FAILED with Dynamo's InternalTorchDynamoError "PendingUnbackedSymbolNotFound:
    # Pending unbacked symbols {zuf1} not in returned outputs" (torch 2.11 to 2.14): an
    # .item() in a Function's forward cannot be captured in one graph; with graph breaks
    # fn matches eager
    report = check_function(MaxNormalized, seeded(3, 4), checks=["compile"])
    result = report["compile"]
    assert report.ok and result.unsupported, report
    assert ".item()" in result.message, result.message
    assert "outputs and gradients match eager" in result.message, result.message


def _max_normalized_tripled_when_compiled(x):
    """Wrong under torch.compile only: MaxNormalized's output times 3 there, 2 in eager."""
    return MaxNormalized.apply(x) * (3.0 if torch.compiler.is_compiling() else 2.0)


def test_an_item_call_compiled_with_graph_breaks_still_fails_when_it_differs_from_eager():
    report = check_function(_max_normalized_tripled_when_compiled, seeded(3, 4), checks=["compile"])
    result = report["compile"]
    assert result.failed and "with graph breaks" in result.message, report


class HalfLog(Log):
    """Wrong: d log(x)/dx = 1/x, backward gives 1/(2x)."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / (2 * x)


def _one_at_eps(*shape: int) -> torch.Tensor:
    x = positive(*shape)
    x[0, 0] = 1e-6  # exactly gradcheck's eps: log(x - eps) is log(0) = -inf, not NaN
    return x


def test_an_input_eps_from_a_log_s_edge_is_a_usage_error_not_an_infinite_mismatch():
    # before: gradcheck FAILED a right log ("analytical 1e+06 vs numerical inf"): central
    # differences met log(0) = -inf, which the near-edge check (NaN or a ValueError) missed
    with pytest.raises(ValueError, match="within eps of the edge of fn's domain") as info:
        check_function(Log, _one_at_eps(3, 4), checks=["gradcheck"])
    assert "is infinite at 1 element(s) (first at index (0, 0))" in str(info.value)
    assert check_function(Log, _one_at_eps(3, 4), checks=["gradcheck"], eps=1e-8).ok
    report = check_function(HalfLog, _one_at_eps(3, 4), checks=["gradcheck"], eps=1e-8)
    assert report["gradcheck"].failed, report


class SortedGaps(torch.autograd.Function):
    """Correct, refusing an unsorted x (as searchsorted's boundaries must be sorted):
    d (x[i+1] - x[i])^2 / dx[i+1] = 2 (x[i+1] - x[i]) = -d (x[i+1] - x[i])^2 / dx[i]."""

    @staticmethod
    def forward(ctx, x):
        if bool((x.diff() < 0).any()):
            raise ValueError("SortedGaps: x must be sorted ascending")
        gaps = x.diff()
        ctx.save_for_backward(gaps)
        return gaps * gaps

    @staticmethod
    def backward(ctx, g):
        (gaps,) = ctx.saved_tensors
        return _scatter_gaps(2 * gaps * g)


class HalfSortedGaps(SortedGaps):
    """Wrong: the 2 of the square forgotten."""

    @staticmethod
    def backward(ctx, g):
        (gaps,) = ctx.saved_tensors
        return _scatter_gaps(gaps * g)


def _scatter_gaps(per_gap: torch.Tensor) -> torch.Tensor:
    """The gradient of x from that of its gaps x[i+1] - x[i]: +per_gap[i] to x[i+1],
    -per_gap[i] to x[i]."""
    zero = per_gap.new_zeros(1)
    return torch.cat([zero, per_gap]) - torch.cat([per_gap, zero])


def _sorted_with_a_close_pair() -> torch.Tensor:
    # 1e-7 apart, within gradcheck's eps (1e-6): shifting x[0] alone by +eps unsorts x
    return torch.tensor([0.0, 1e-7, 1.0, 2.5], dtype=torch.float64)


@pytest.mark.parametrize("fast_mode", [False, True])
def test_two_values_within_eps_of_each_other_are_a_usage_error_naming_the_element(fast_mode):
    # before: gradcheck FAILED a right Function with its "x must be sorted" ValueError: the
    # near-edge check shifted the whole input, which keeps it sorted, never one element
    with pytest.raises(ValueError, match="within eps of the edge of fn's domain") as info:
        check_function(
            SortedGaps, _sorted_with_a_close_pair(), checks=["gradcheck"], fast_mode=fast_mode
        )
    assert "element (0,) of input 0 shifted by +1e-06" in str(info.value), info.value
    report = check_function(SortedGaps, _sorted_with_a_close_pair(), checks=["gradcheck"], eps=1e-8)
    assert report.ok, report


def test_a_wrong_backward_of_a_function_refusing_unsorted_input_still_fails():
    report = check_function(
        HalfSortedGaps, _sorted_with_a_close_pair(), checks=["gradcheck"], eps=1e-8
    )
    assert report["gradcheck"].failed, report
    report = check_function(HalfSortedGaps, torch.arange(5.0), checks=["gradcheck"])
    assert report["gradcheck"].failed, report


def _large_sorted_with_a_close_pair(gap: float) -> torch.Tensor:
    # 5000 elements, above FULL_JACOBIAN_ELEMENTS (4096): no element is shifted alone
    x = torch.linspace(0.0, 100.0, 5000, dtype=torch.float64)
    x[1] = x[0] + gap
    return x


@pytest.mark.parametrize(("fast_mode", "gap"), [(False, 1e-7), (True, 1e-11)])
def test_two_values_within_eps_in_a_large_input_are_a_usage_error_too(fast_mode, gap):
    # before: gradcheck FAILED a right Function with its "x must be sorted" ValueError
    # above 4096 elements, where the near-edge check shifted only the whole input (in fast
    # mode central differences move every element along a random direction, by less than
    # eps each: a pair 1e-11 apart is unsorted by it)
    x = _large_sorted_with_a_close_pair(gap)
    with pytest.raises(ValueError, match="within eps of the edge of fn's domain") as info:
        check_function(SortedGaps, x, checks=["gradcheck"], fast_mode=fast_mode)
    where = "element (0,) of input 0 shifted by +1e-06" if not fast_mode else "5000 elements"
    assert where in str(info.value), info.value
    assert "x must be sorted ascending" in str(info.value), info.value


def test_a_wrong_backward_refusing_unsorted_input_fails_at_a_large_size():
    x = _large_sorted_with_a_close_pair(1e-3)
    report = check_function(HalfSortedGaps, x, checks=["gradcheck"])
    assert report["gradcheck"].failed, report


class StrictAcos(Acos):
    """Correct, refusing |x| >= 1 with a ValueError (a strict acos)."""

    @staticmethod
    def forward(ctx, x):
        if bool((x.abs() >= 1).any()):
            raise ValueError("StrictAcos: |x| must be below 1")
        return Acos.forward(ctx, x)


@pytest.mark.parametrize(
    ("fn", "x"),
    [
        (StrictAcos, seeded(3, 4).clamp(-0.9, 0.9)),
        (SortedGaps, torch.tensor([0.0, 0.3, 1.0, 2.5], dtype=torch.float64)),
    ],
)
def test_two_calls_before_backward_stay_inside_fns_domain(fn, x):
    # before: interleave FAILED a right strict acos on x.clamp(-0.9, 0.9), the inputs the
    # usage error advises, with its "|x| must be below 1", and SortedGaps with its "x must
    # be sorted": the second call's inputs were the first's flipped and scaled by 1.25
    # (0.9 -> 1.125, an ascending x made descending); now scaled down, or not flipped
    report = check_function(fn, x, checks=["interleave"])
    assert report["interleave"].passed, report


def _entropy_of_a_distribution(p):
    """-sum p log p of a probability vector, refusing one whose sum is not 1 (within
    torch.allclose's 1e-5): moving every element by eps / sqrt(n), the uniform direction
    moves the sum by sqrt(n) eps, off the simplex for n = 200."""
    if not torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype)):
        raise ValueError("p must sum to 1")
    return -(p * p.log()).sum(-1)


@pytest.mark.parametrize("check", ["gradcheck", "forward_ad"])
def test_a_domain_the_uniform_direction_leaves_is_no_usage_error(check):
    # before: check_function raised UsageError 'gradcheck compares with central
    # differences, which evaluate fn at input 0 shifted by -1e-06 (eps), and there fn
    # raised ValueError: p must sum to 1' for inputs on the simplex, which one-hot steps
    # (and torch's gradcheck) keep close enough to it
    p = torch.softmax(seeded(200), -1)
    assert torch.autograd.gradcheck(
        _entropy_of_a_distribution, (p.clone().requires_grad_(),), check_forward_ad=True
    )
    report = check_function(_entropy_of_a_distribution, p, checks=[check])
    assert report[check].passed, report
