"""check_function on the Functions of tests/verify/user_kinds.py: every correct one
passes against its reference (the unsupported checks with a reason), every wrong twin
fails in the check that sees its mistake, naming the input; and the verdicts that were
wrong for such Functions before (an enum, slice or complex argument refused, a gradient
the reference leaves NaN failed, a tie rule passed, a float32 overflow unseen)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from tests.verify import user_kinds as uk
from tests.verify.zoo.entry import seeded
from torch.autograd import Function

from torchbp.verify import check_function

#: torch.compile costs a second or more per Function on 2 cores; checked elsewhere
FAST = {"skip": ["compile"]}


def _positive(*shape):
    return seeded(*shape).abs() + 0.5


def _inside_unit(*shape):
    return seeded(*shape).tanh() * 0.9


def _with_zeros():
    x = seeded(3, 4)
    x[0, 1] = x[2, 2] = 0.0
    return x


def _at_bounds():
    x = seeded(3, 4)
    x[0, 0], x[1, 1] = -0.5, 0.5
    return x


def _pairs_with_ties():
    x = seeded(3, 6)
    x[0, 1], x[2, 5] = x[0, 0], x[2, 4]
    return x


def _row_max_tied():
    x = seeded(3, 4)
    x[0, 2] = x[0, 3] = x[0].max() + 1
    return x


def _cumprod_zeros():
    x = seeded(3, 5)
    x[0, 2] = x[1, 1] = x[1, 3] = 0.0
    return x


def _mask():
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = mask[1, 4] = True
    return mask


def _minus_inf_rows():
    x = seeded(3, 4)
    x[1] = float("-inf")
    x[0, 2] = float("-inf")
    return x


def _complex(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.complex128)


_INDEX = torch.tensor([0, 2, 0, 1, 2])
_GATHER_INDEX = torch.tensor([[0, 0], [3, 1], [2, 2]])
_TOKENS = torch.tensor([[0, 2, 0], [1, 1, 3]])

#: name: (correct fn, builds its inputs, reference or None)
CORRECT = {
    "log": (uk.Log, lambda: (_positive(3, 4),), torch.log),
    "sqrt": (uk.Sqrt, lambda: (_positive(3, 4),), torch.sqrt),
    "frac_pow": (uk.FracPow, lambda: (_positive(3, 4), 1.5), torch.pow),
    "acos": (uk.Acos, lambda: (_inside_unit(3, 4),), torch.acos),
    "atanh": (uk.Atanh, lambda: (_inside_unit(3, 4),), torch.atanh),
    "abs": (uk.Abs, lambda: (_with_zeros(),), torch.abs),
    "clamp": (uk.Clamp, lambda: (_at_bounds(), -0.5, 0.5), None),
    "max_pool": (
        uk.MaxPool2,
        lambda: (_pairs_with_ties(),),
        lambda x: F.max_pool1d(x.unsqueeze(0), 2).squeeze(0),
    ),
    "max_pool_jvp": (
        uk.MaxPool2WithJvp,
        lambda: (_pairs_with_ties(),),
        lambda x: x.unflatten(-1, (-1, 2)).max(dim=-1),
    ),
    "sort": (uk.Sort, lambda: (seeded(3, 5), 1), lambda x, d: torch.sort(x, dim=d)),
    "topk": (
        functools.partial(uk.topk, k=2, dim=0),
        lambda: (seeded(4, 3),),
        lambda x: torch.topk(x, 2, dim=0).values,
    ),
    "cumsum": (uk.Cumsum, lambda: (seeded(3, 4), 0), torch.cumsum),
    "cumprod": (uk.Cumprod, lambda: (_cumprod_zeros(),), lambda x: x.cumprod(-1)),
    "index_add": (
        uk.IndexAdd,
        lambda: (seeded(5, 3), _INDEX, 4),
        lambda src, i, n: src.new_zeros(n, 3).index_add(0, i, src),
    ),
    "masked_softmax": (
        uk.MaskedSoftmax,
        lambda: (seeded(3, 5), _mask()),
        lambda x, m: x.masked_fill(m, float("-inf")).softmax(-1),
    ),
    "logsumexp": (uk.LogSumExp, lambda: (_minus_inf_rows(),), lambda x: x.logsumexp(-1)),
    "no_grad_mask": (uk.NoGradMaskRelu, lambda: (seeded(3, 4),), torch.relu),
    "first_order": (uk.FirstOrderExp, lambda: (seeded(3, 4),), torch.exp),
    "reduction_str": (
        uk.SquaredError,
        lambda: (seeded(3, 4), seeded(3, 4, seed=1), "mean"),
        lambda a, b, r: F.mse_loss(a, b, reduction=r),
    ),
    "reduction_enum": (
        uk.SquaredError,
        lambda: (seeded(3, 4), seeded(3, 4, seed=1), uk.Reduction.SUM),
        lambda a, b, r: F.mse_loss(a, b, reduction=r.value),
    ),
    "sum_dims": (
        uk.SumDims,
        lambda: (seeded(2, 3, 4), (0, 2), False),
        lambda x, d, k: x.sum(dim=d, keepdim=k),
    ),
    "sum_all": (uk.SumDims, lambda: (seeded(2, 3, 4), None, False), lambda x, d, k: x.sum()),
    "diagonal": (
        uk.DiagonalView,
        lambda: (seeded(2, 3, 3),),
        lambda x: x.diagonal(dim1=-2, dim2=-1),
    ),
    "expand": (
        uk.ExpandRows,
        lambda: (seeded(3, 4), 2),
        lambda x, n: x.unsqueeze(0).expand(n, *x.shape),
    ),
    "materialize_false": (
        uk.SplitHalves,
        lambda: (seeded(3, 4),),
        lambda x: (x[:, :2].sin(), x[:, 2:] ** 2),
    ),
    "embedding": (uk.Embedding, lambda: (_TOKENS, seeded(4, 3)), F.embedding),
    "complex_mul": (uk.ComplexMul, lambda: (_complex(3, 4), _complex(3, 4, seed=1)), torch.mul),
    "abs_squared": (uk.SquaredMagnitude, lambda: (_complex(3, 4),), lambda z: z.abs() ** 2),
    "gather": (uk.Gather, lambda: (seeded(3, 4), 1, _GATHER_INDEX), torch.gather),
    "exp_in_place": (uk.ExpInplace, lambda: (seeded(3, 4),), torch.exp),
    "cosine_once": (uk.CosineSim, lambda: (seeded(3, 4), seeded(3, 4, seed=1)), None),
    "amax_ties": (uk.AmaxEven, lambda: (_row_max_tied(),), lambda x: x.amax(-1)),
    "where": (
        uk.Where,
        lambda: (_mask(), seeded(3, 5), seeded(3, 5, seed=1)),
        torch.where,
    ),
    "broadcast_mul": (uk.BroadcastMul, lambda: (seeded(3, 4), seeded(1, 4, seed=1)), torch.mul),
    "slice": (uk.SliceRows, lambda: (seeded(5, 3), slice(1, 4)), lambda x, i: x[i]),
    "ellipsis": (
        uk.SliceRows,
        lambda: (seeded(5, 3), (Ellipsis, slice(0, 2))),
        lambda x, i: x[i],
    ),
    "complex_scale": (uk.ScaleComplex, lambda: (_complex(3, 4), 2 - 1j), torch.mul),
    "layer_norm": (
        uk.LayerNormRecomputed,
        lambda: (seeded(3, 5), 1e-5),
        lambda x, eps: F.layer_norm(x, (5,), eps=eps),
    ),
    "attention": (
        uk.AttentionRecomputed,
        lambda: (seeded(1, 3, 4), seeded(1, 4, 4, seed=1), seeded(1, 4, 2, seed=2)),
        F.scaled_dot_product_attention,
    ),
}

#: name: (wrong twin, the correct Function's case, the check failing it without a
#: reference, the input its message names)
TWINS = {
    "cumprod_divides": (uk.CumprodDividing, "cumprod", "gradcheck", "input 0"),
    "index_add_shifted": (uk.IndexAddShifted, "index_add", "gradcheck", "input 0"),
    "max_pool_ties": (uk.MaxPool2GradToBoth, "max_pool", "gradcheck", "every element"),
    "clamp_sign": (uk.ClampWrongSignAbove, "clamp", "gradcheck", "input 0"),
    "unreduced": (uk.BroadcastMulUnreduced, "broadcast_mul", "grad_shapes", "input 1"),
    "sort_gathers": (uk.SortGathering, "sort", "gradcheck", "input 0"),
    "cumsum_direction": (uk.CumsumForward, "cumsum", "gradcheck", "input 0"),
    "acos_sign": (uk.AcosWrongSign, "acos", "gradcheck", "input 0"),
    "complex_no_conj": (uk.ComplexMulNoConj, "complex_mul", "gradcheck", "input 0"),
    "complex_conj": (uk.AbsSquaredConj, "abs_squared", "gradcheck", "input 0"),
    "embedding_copy": (uk.EmbeddingIndexCopy, "embedding", "gradcheck", "input 1"),
    "gather_scatter": (uk.GatherScatterNoAdd, "gather", "gradcheck", "input 0"),
    "where_branch": (uk.WhereSwapped, "where", "gradcheck", "input 2"),
    "row_mean": (uk.SquaredErrorRowMean, "reduction_str", "gradcheck", "input 0"),
    "amax_ties": (uk.AmaxWholeToEachTie, "amax_ties", "gradcheck", "v^T J u"),
    "layer_norm_eps": (uk.LayerNormWrongEps, "layer_norm", "gradcheck", "input 0"),
    "attention_scale": (uk.AttentionUnscaledKeyGrad, "attention", "gradcheck", "input 1"),
}


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_the_correct_function_passes(name):
    fn, inputs, reference = CORRECT[name]
    report = check_function(fn, *inputs(), reference=reference, **FAST)
    assert report.ok, report


@pytest.mark.parametrize("name", sorted(TWINS))
def test_its_wrong_twin_fails_naming_the_input(name):
    twin, case, caught_by, named = TWINS[name]
    _, inputs, reference = CORRECT[case]
    report = check_function(twin, *inputs(), checks=[caught_by])
    assert report[caught_by].failed and named in report[caught_by].message, report
    if reference is not None and caught_by == "gradcheck":
        report = check_function(twin, *inputs(), reference=reference, checks=["reference"])
        assert report["reference"].failed, report


def test_a_double_backward_raising_not_implemented_is_unsupported_not_failed():
    report = check_function(uk.FirstOrderExp, seeded(3, 4), checks=["gradcheck", "gradgradcheck"])
    assert report.ok and report["gradcheck"].passed, report
    assert report["gradgradcheck"].status == "unsupported", report
    assert "double backward" in report["gradgradcheck"].message, report


class _ExpBackwardSayingNotImplemented(Function):
    @staticmethod
    def forward(ctx, g, y):
        return g * y

    @staticmethod
    def backward(ctx, gg):
        raise RuntimeError("double backward is not implemented for this exp")


class _FirstOrderExpRuntimeError(uk.FirstOrderExp):
    """exp whose double backward raises RuntimeError("... not implemented"), as many
    Functions write it."""

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return _ExpBackwardSayingNotImplemented.apply(g, y)


def test_a_double_backward_raising_a_runtime_error_saying_not_implemented_is_unsupported():
    # before: 'gradgradcheck [fail]: RuntimeError: double backward is not implemented ...'
    checks = ["gradcheck", "gradgradcheck"]
    report = check_function(_FirstOrderExpRuntimeError, seeded(3, 4), checks=checks)
    assert report.ok and report["gradgradcheck"].status == "unsupported", report
    message = report["gradgradcheck"].message
    assert message.startswith("double backward raised RuntimeError: double backward is not"), (
        message
    )


class _JvpWithAnIntegerSoftmax(Function):
    """2 x, whose jvp (a bug) calls softmax on an integer tensor: torch's dispatcher
    raises NotImplementedError '"softmax_lastdim_kernel_impl" not implemented for
    'Long''."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2

    @staticmethod
    def jvp(ctx, t):
        return t * 2 * torch.softmax(torch.ones(1, dtype=torch.long), 0)


def test_a_jvp_crashing_on_a_kernel_missing_for_a_dtype_fails_not_unsupported():
    # before: 'forward_ad [unsupported]: forward-mode AD (jvp) raised NotImplementedError:
    # "softmax_lastdim_kernel_impl" not implemented for 'Long'; to add it: write the jvp'
    # (the report ok): the jvp is there, and crashes
    report = check_function(_JvpWithAnIntegerSoftmax, seeded(4), checks=["forward_ad"])
    assert report["forward_ad"].failed, report
    assert "not implemented for 'Long'" in report["forward_ad"].message, report


@pytest.mark.parametrize(
    "argument",
    [uk.Reduction.MEAN, slice(1, 3), (Ellipsis, slice(0, 2)), 2 - 1j, torch.strided],
    ids=["enum", "slice", "ellipsis", "complex", "layout"],
)
def test_a_constant_argument_of_any_plain_kind_is_passed_through(argument):
    # before: "TypeError: check_function: input 1 is a Reduction; inputs must be tensors
    # ... Convert it with torch.as_tensor(...)" for an enum member, a slice, a complex
    seen = []

    def fn(x, constant):
        seen.append(constant)
        return x * 2

    report = check_function(fn, seeded(3, 4), argument, checks=["gradcheck"])
    assert report.ok and seen and all(s == argument for s in seen), report


def test_a_gradient_the_reference_leaves_nan_is_not_compared_with_a_caveat():
    # before: 'reference [fail]: gradient of input 0 differs from the reference: max abs
    # error nan' for a logsumexp giving 0 at a row of all -inf, where torch's is NaN
    fn, inputs, reference = CORRECT["logsumexp"]
    checks = ["gradcheck", "reference", "extreme_values"]
    report = check_function(fn, *inputs(), reference=reference, checks=checks)
    assert report.ok and all(report[name].passed for name in checks), report
    caveat = report["reference"].caveat
    assert "the reference's gradient is NaN where fn's is finite" in caveat, report
    assert "4 element(s) of the gradient of input 0 (first at (1, 0))" in caveat, report


def _gradient_nan_everywhere(x):
    """x, with a gradient NaN at every element (0 times the NaN derivative of a square
    root of negative numbers, which torch.where does not select): a broken reference."""
    return torch.where(x > -1e9, x, torch.sqrt(-x.abs() - 1))


class _TripledGradient(torch.autograd.Function):
    """The identity with a wrong gradient (three times grad_output)."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g * 3.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_reference_whose_gradient_is_nan_everywhere_compares_nothing_and_passes_nothing(dtype):
    # before: 'reference [pass, not all compared]' (and reference_dtype likewise) for a
    # wrong gradient, every element of it left out as one the reference leaves undefined
    checks = ["reference", "reference_dtype"]
    x = seeded(5).to(dtype)
    report = check_function(_TripledGradient, x, reference=_gradient_nan_everywhere, checks=checks)
    assert not report["reference"].passed, report
    message = report["reference"].message
    assert "the reference's gradient of input 0 is NaN at every element" in message, report
    assert not report["reference_dtype"].passed, report


def test_a_gradient_nan_where_the_reference_is_finite_still_fails():
    class NanWhereMasked(uk.LogSumExp):
        @staticmethod
        def backward(ctx, g):
            x, out = ctx.saved_tensors
            return g.unsqueeze(-1) * (x - out.unsqueeze(-1)).exp()  # NaN in a -inf row

    x = _minus_inf_rows()
    reference = uk.LogSumExp.apply
    report = check_function(NanWhereMasked, x, reference=reference, checks=["reference"])
    assert report["reference"].failed, report


def test_a_tie_rule_giving_each_tied_element_the_whole_gradient_fails_without_a_reference():
    # before: passed every check but reference (one-hot steps and this seed's random
    # direction break the tie; each tied element's 1 lies between their one-sided
    # differences); the direction moving every element alike keeps the tie
    report = check_function(uk.MaxPool2GradToBoth, _pairs_with_ties(), checks=["gradcheck"])
    message = report["gradcheck"].message
    assert report["gradcheck"].failed, report
    assert "moving every element of the inputs by the same amount" in message, message
    assert "whole gradient" in message, message


def test_a_jvp_adding_the_tangents_of_tied_elements_fails():
    # before: passed with seed 1, whose random tangent broke both ties so that each
    # window's sum lay between its one-sided differences
    report = check_function(
        uk.MaxPool2JvpAddingTies, _pairs_with_ties(), checks=["forward_ad"], seed=1
    )
    message = report["forward_ad"].message
    assert report["forward_ad"].failed, report
    assert "jvp for the tangent u moving every element of the inputs" in message, message


class _NaiveLogSumExp(Function):
    """logsumexp without the max trick: exp(x) overflows float32 above x = 88.7."""

    @staticmethod
    def forward(ctx, x):
        e = x.exp()
        total = e.sum(-1, keepdim=True)
        ctx.save_for_backward(e, total)
        return total.log().squeeze(-1)

    @staticmethod
    def backward(ctx, g):
        e, total = ctx.saved_tensors
        return g.unsqueeze(-1) * e / total


class _Exp(Function):
    @staticmethod
    def forward(ctx, x):
        y = x.exp()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y


def _float32_near_95():
    return (seeded(3, 4) * 3 + 95).float()


def test_a_float32_overflow_is_caught_without_a_reference():
    # before: reference_dtype skipped without a reference, and every other check runs in
    # float64, where exp(95) is finite: the naive logsumexp passed
    report = check_function(_NaiveLogSumExp, _float32_near_95(), checks=["reference_dtype"])
    message = report["reference_dtype"].message
    assert report["reference_dtype"].failed, report
    assert "in float32 (the inputs' own dtype): output 0 is inf at index (0,)" in message
    assert "an intermediate overflows" in message, message


@pytest.mark.parametrize(
    "fn",
    [functools.partial(torch.logsumexp, dim=-1), _Exp],
    ids=["stable_logsumexp", "exp_beyond_float32"],
)
def test_a_float32_infinity_fn_is_right_to_give_passes_without_a_reference(fn):
    # exp(95) = 1.8e41 lies beyond float32's range: inf is its right float32 value
    report = check_function(fn, _float32_near_95(), checks=["reference_dtype"])
    assert report["reference_dtype"].passed, report
    assert "not for its values" in report["reference_dtype"].caveat, report


def _double_without_a_half_kernel(x):
    """2 x, refusing float16 as torch's dispatcher refuses an op without a kernel for it
    (torch.cdist on the CPU: '"cdist" not implemented for 'Half'')."""
    if x.dtype == torch.float16:
        raise NotImplementedError("\"double_kernel\" not implemented for 'Half'")
    return x * 2


@pytest.mark.parametrize("with_reference", [False, True], ids=["alone", "with a reference"])
def test_a_fn_without_a_kernel_for_the_inputs_own_dtype_skips_reference_dtype(with_reference):
    # before: 'reference_dtype [fail]: fn raised on the inputs in their own dtype
    # (float16): NotImplementedError: ... not implemented for 'Half'' (without a
    # reference since 8d0bd85): a right fn that torch cannot run in that dtype here
    reference = (lambda x: x * 2) if with_reference else None
    x = seeded(3, 4).half()
    checks = ["reference", "reference_dtype"]
    report = check_function(_double_without_a_half_kernel, x, reference=reference, checks=checks)
    assert report.ok and report["reference_dtype"].skipped, report
    assert "not implemented for 'Half'" in report["reference_dtype"].message, report


def test_a_derivative_beyond_the_narrow_range_times_a_small_grad_output_is_no_overflow():
    # torch.reciprocal's backward -g * (y * y) at float16 inputs of 0.0039: y * y is
    # 65746, beyond float16's 65504, and so is the derivative itself; before, a random
    # normal grad_output of 0.03 made the float64 gradient 1755, 'well inside float16's
    # range', and reference_dtype without a reference FAILED torch's own reciprocal
    x = torch.linspace(0.0036, 0.0039, 20).half()
    report = check_function(torch.reciprocal, x, checks=["reference_dtype"])
    assert report["reference_dtype"].passed, report
