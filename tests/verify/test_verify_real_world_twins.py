"""check_function on more Functions written as people write them, each beside a subtly
wrong twin (tests/verify/real_world_twins.py): every correct one passes (its unsupported
checks with a reason), and every twin fails, in the check that can see its mistake."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from tests.verify import real_world_twins as rw
from tests.verify.zoo.entry import seeded
from torch.autograd import Function

from torchbp.verify import check_function

#: torch.compile of each Function costs a second or more on 2 cores; it is checked for
#: Functions in tests/verify/test_verify_real_world.py
FAST = {"skip": ["compile"]}


def _clamp_reference(x, low, high):
    return rw.clamp_passing_bounds(x, low, high)


#: name: (correct fn, wrong twin, inputs, reference, options, the check the twin fails)
PAIRS = {
    "fused_bias_gelu": (
        rw.FusedBiasGeluTanh,
        rw.FusedBiasGeluTanhHalfTerm,
        (seeded(2, 3, 5), seeded(5, seed=1)),
        rw.bias_gelu_reference,
        {},
        "gradcheck",
    ),
    "rms_norm": (
        rw.RMSNorm,
        rw.RMSNormNoProjection,
        (seeded(4, 5), seeded(5, seed=1, shift=1.0)),
        rw.rms_norm_reference,
        {},
        "gradcheck",
    ),
    "rms_norm_dtype": (
        rw.RMSNorm,
        rw.RMSNormFloat32WeightGrad,
        (seeded(4, 5), seeded(5, seed=1, shift=1.0)),
        rw.rms_norm_reference,
        {},
        "grad_shapes",
    ),
    "layer_norm": (
        rw.LayerNormRecompute,
        rw.LayerNormUnbiasedInBackward,
        (seeded(4, 5), seeded(5, seed=1, shift=1.0), seeded(5, seed=2)),
        rw.layer_norm_reference,
        {},
        "gradcheck",
    ),
    "rotary": (
        rw.Rotary,
        rw.RotaryUntransposed,
        (seeded(6, 4), *rw.rotary_tables(6, 4)),
        rw.rotary_reference,
        {"grad_inputs": (0,)},
        "gradcheck",
    ),
    "temperature_softmax": (
        rw.TemperatureSoftmax,
        rw.TemperatureSoftmaxNoScale,
        (seeded(4, 5), 2.0),
        rw.temperature_softmax_reference,
        {},
        "gradcheck",
    ),
    "huber_loss": (
        rw.HuberLoss,
        rw.HuberLossSummed,
        (seeded(4, 5, scale=2.0), seeded(4, 5, seed=1), 1.0),
        rw.huber_reference,
        {},
        "gradcheck",
    ),
    "masked_clamp": (
        rw.MaskedClamp,
        rw.MaskedClampUpperOnly,
        (seeded(4, 5, scale=2.0), -1.0, 1.0),
        _clamp_reference,
        {},
        "gradcheck",
    ),
    "checkpointed_block": (
        rw.CheckpointedBlock,
        rw.CheckpointedBlockSwapped,
        (seeded(4, 3), seeded(3, 3, seed=1), seeded(3, 3, seed=2)),
        rw.mlp_block,
        {},
        "gradcheck",
    ),
    "max_with_index": (
        rw.MaxWithIndex,
        rw.MaxWithIndexShifted,
        (seeded(4, 5),),
        rw.max_reference,
        {},
        "gradcheck",
    ),
    "materialize_grads_false": (
        rw.ScaleAndExp,
        rw.ScaleAndExpDropsExp,
        (seeded(4, 5),),
        rw.scale_and_exp_reference,
        {},
        "gradcheck",
    ),
    "once_differentiable_mish": (
        rw.Mish,
        rw.MishWrongSign,
        (seeded(4, 5),),
        F.mish,
        {},
        "gradcheck",
    ),
    "own_vmap_rule": (
        rw.RowScale,
        rw.RowScaleVmapIgnoringInDims,
        (seeded(4, 5), seeded(4, seed=1)),
        rw.row_scale_reference,
        {},
        "vmap_in_dims",
    ),
    "generated_vmap_rule_and_jvp": (
        rw.Cube,
        rw.CubeJvpMissingThree,
        (seeded(4, 5),),
        lambda x: x**3,
        {},
        "forward_ad",
    ),
    "int_output": (
        rw.ClipWithCount,
        rw.ClipWithCountDoubled,
        (seeded(4, 5, scale=2.0), 1.0),
        rw.clip_with_count_reference,
        {},
        "gradcheck",
    ),
    "keyword_only_options": (
        functools.partial(rw.scaled_softplus, beta=2.0, scale=3.0),
        functools.partial(rw.scaled_softplus_no_scale, beta=2.0, scale=3.0),
        (seeded(4, 5),),
        functools.partial(rw.scaled_softplus_reference, beta=2.0, scale=3.0),
        {},
        "gradcheck",
    ),
    "variable_number_of_tensors": (
        rw.weighted_sum,
        lambda w, *xs: rw.WeightedSumLastDropped.apply(w, *xs),
        (seeded(3), seeded(4, 5, seed=1), seeded(4, 5, seed=2), seeded(4, 5, seed=3)),
        rw.weighted_sum_reference,
        {},
        "gradcheck",
    ),
    "in_place_mark_dirty": (
        rw.AddScaledInPlace,
        rw.AddScaledInPlaceNoAlpha,
        (seeded(4, 5), seeded(4, 5, seed=1), 0.5),
        rw.add_scaled_reference,
        {},
        "gradcheck",
    ),
    "binary_cross_entropy": (
        rw.BinaryCrossEntropy,
        rw.BinaryCrossEntropyTargetSign,
        rw.probabilities_and_targets(),
        F.binary_cross_entropy,
        {},
        "gradcheck",
    ),
    "causal_scores": (
        rw.CausalScores,
        rw.CausalScoresUnscaled,
        (seeded(4, 3), seeded(4, 3, seed=1)),
        rw.causal_scores_reference,
        {},
        "gradcheck",
    ),
    "linear_relu": (
        rw.LinearRelu,
        rw.LinearReluWrongTranspose,
        (seeded(4, 5), seeded(5, 5, seed=1)),
        rw.linear_relu_reference,
        {},
        "gradcheck",
    ),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_the_correct_function_passes(name):
    fn, _, inputs, reference, options, _ = PAIRS[name]
    report = check_function(fn, *inputs, reference=reference, **options, **FAST)
    assert report.ok, report


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_its_wrong_twin_fails_where_its_mistake_shows(name):
    _, twin, inputs, reference, options, caught_by = PAIRS[name]
    report = check_function(twin, *inputs, reference=reference, **options, **FAST)
    assert report[caught_by].failed, report


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_its_wrong_twin_fails_in_fast_mode_without_a_reference(name):
    # random projections (the default above 4096 elements) and no reference to lean on
    _, twin, inputs, _, options, caught_by = PAIRS[name]
    report = check_function(twin, *inputs, **options, fast_mode=True, **FAST)
    assert report[caught_by].failed, report


class _FlattenWithView(Function):
    """Flattens with x.view(-1) in forward: refuses a transposed input."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.view(-1)

    @staticmethod
    def backward(ctx, g):
        return g.reshape(ctx.shape)


def test_a_forward_calling_view_is_not_blamed_on_backward():
    # before: "backward calls .view() on a non-contiguous tensor (e.g. a transposed
    # grad_output)", for a .view() in forward given a transposed input
    report = check_function(_FlattenWithView, seeded(3, 4), checks=["grad_output_safety"])
    message = report["grad_output_safety"].message
    assert report["grad_output_safety"].failed, report
    assert "fn or its backward calls .view()" in message and "transposed input" in message


def test_a_factor_on_another_input_is_named_as_such_not_as_the_named_inputs_surrogate():
    # before: "backward of input 0 disagrees ... (backward of input 1 is 0.8944 times the
    # numerical gradient everywhere: ... unless it is a deliberate gradient reversal or
    # scaling layer; if deliberate, ... skip gradcheck)": input 0 is wrong with no factor,
    # so no deliberate scaling explains the failure the message names
    _, twin, inputs, _, _, _ = PAIRS["layer_norm"]
    message = check_function(twin, *inputs, checks=["gradcheck"])["gradcheck"].message
    assert message.startswith("backward of input 0 disagrees"), message
    # the weight's gradient (g * xhat).sum(0) is scaled by the unbiased over the biased
    # 1/std, over 5 features: sqrt(4/5)
    factor = math.sqrt(4 / 5)
    assert f"besides, backward of input 1 is {factor:.4g} times" in message, message
    assert "deliberate" not in message, message


def test_inputs_of_a_restricted_domain_stay_inside_it_in_every_check():
    # before: vmap, vmap_in_dims and interleave FAILED the right BinaryCrossEntropy with
    # torch's "all elements of target should be between 0 and 1": they scaled the
    # probabilities by 1.25 and 1.5 to make other inputs (now scaled down instead)
    inputs = rw.probabilities_and_targets()
    assert float(inputs[0].max()) * 1.25 > 1, "no probability leaves [0, 1] scaled up"
    checks = ["vmap", "vmap_in_dims", "interleave"]
    report = check_function(rw.BinaryCrossEntropy, *inputs, checks=checks)
    assert report.ok and all(report[name].passed for name in checks), report


def test_a_mismatch_on_a_probe_at_the_edge_of_the_domain_is_named_not_a_raw_error():
    # before: "extreme_values [fail]: RuntimeError: all elements of input should be
    # between 0 and 1": looking for a kink at p = 0, the one-sided difference called fn at
    # p = -eps, which it refuses; the mismatch itself was lost
    report = check_function(
        rw.BinaryCrossEntropyUnclamped,
        *rw.probabilities_and_targets(),
        reference=F.binary_cross_entropy,
        checks=["extreme_values"],
    )
    message = report["extreme_values"].message
    assert report["extreme_values"].failed, report
    assert "differs from the reference" in message and "NaN where the reference" in message


#: The checks comparing with central differences (of fn's outputs: gradcheck, forward_ad;
#: of backward's gradients: gradgradcheck).
CENTRAL = ["gradcheck", "gradgradcheck", "forward_ad"]


def _causal_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return seeded(4, 3), seeded(4, 3, seed=1)


def _left_out(report, decided_by: str) -> None:
    """gradcheck and forward_ad passed, their caveats naming the 6 masked scores, saying
    their derivatives were not compared and what decides them; gradgradcheck passed
    having compared them."""
    assert report["gradgradcheck"].passed and not report["gradgradcheck"].caveat, report
    for name in ("gradcheck", "forward_ad"):
        caveat = report[name].caveat
        assert report[name].passed, report
        assert "6 element(s) of output 0 (first at (0, 1))" in caveat, caveat
        assert "derivatives were not compared" in caveat and decided_by in caveat, caveat
    assert "jvp was held to backward there" in report["forward_ad"].caveat, report


def test_the_derivatives_at_a_constant_infinity_are_left_out_with_a_caveat():
    # before da1bc7f: gradcheck FAILED the right CausalScores: "analytical 0 vs numerical
    # nan" at a masked score, -inf at every input near the given ones (inf - inf)
    report = check_function(rw.CausalScores, *_causal_inputs(), checks=CENTRAL)
    assert report.ok, report
    _left_out(report, "give a reference")


@pytest.mark.parametrize("reference", [None, rw.additive_causal_scores_reference])
def test_a_minus_inf_mask_added_inside_fn_passes(reference):
    # before: gradcheck FAILED it, comparing add's derivative 1 at the masked scores with
    # a constant's 0 - the gradient torch's own scores + mask has (a softmax after makes
    # it 0); masked_fill's 0 is as right for the equal function: only a reference decides
    checks = [*CENTRAL, "reference"]
    report = check_function(
        rw.CausalScoresAdditiveMask, *_causal_inputs(), reference=reference, checks=checks
    )
    assert report.ok, report
    decided_by = "give a reference" if reference is None else "the reference check decides"
    _left_out(report, decided_by)


def test_a_reference_whose_check_is_not_run_is_said_to_decide_nothing():
    # reference= given, its check left out: the caveat says to run it, not that it decides
    report = check_function(
        rw.CausalScores,
        *_causal_inputs(),
        reference=rw.causal_scores_reference,
        checks=["gradcheck"],
    )
    caveat = report["gradcheck"].caveat
    assert report.ok and "run the reference check (skipped here)" in caveat, caveat
    assert "the reference check decides" not in caveat, caveat


@pytest.mark.parametrize(
    ("fn", "reference"),
    [
        (rw.CausalScoresUnmaskedGradient, rw.causal_scores_reference),
        (rw.CausalScoresAdditiveMask, rw.causal_scores_reference),
        (rw.CausalScores, rw.additive_causal_scores_reference),
    ],
)
def test_the_reference_decides_the_gradient_at_a_constant_infinity(fn, reference):
    # a backward leaking gradient through a masked_fill mask passes the central-difference
    # checks (it is right for an added mask) and fails against a masked_fill reference,
    # as the additive Function does; masked_fill's 0 fails against an additive reference
    report = check_function(fn, *_causal_inputs(), checks=[*CENTRAL, "reference"])
    assert report.ok, report
    _left_out(report, "give a reference")
    report = check_function(fn, *_causal_inputs(), reference=reference, checks=["reference"])
    message = report["reference"].message
    assert report["reference"].failed, report
    assert "gradient of input 0 differs from the reference" in message, message


def test_gradgradcheck_compares_the_second_derivatives_at_a_constant_infinity():
    # its central differences are of backward's gradients, finite at the masked scores:
    # before, it left them out too, and a double backward wrong there only passed
    inputs = _causal_inputs()
    report = check_function(rw.CausalScoresAdditiveMask, *inputs, checks=["gradgradcheck"])
    assert report["gradgradcheck"].passed and not report["gradgradcheck"].caveat, report
    wrong = rw.CausalScoresAdditiveMaskedDoubleBackward
    report = check_function(wrong, *inputs, checks=["gradcheck", "gradgradcheck"])
    assert report["gradcheck"].passed and report["gradgradcheck"].failed, report


def test_a_jvp_disagreeing_with_backward_at_a_constant_infinity_fails():
    # jvp leaking the tangent through the mask backward applies: with those elements left
    # out of the comparison with central differences, it passed every check, a reference
    # too (whose check compares gradients); jvp must give backward's Jacobian there
    checks = ["forward_ad", "reference"]
    report = check_function(
        rw.CausalScoresUnmaskedTangent,
        *_causal_inputs(),
        reference=rw.causal_scores_reference,
        checks=checks,
    )
    message = report["forward_ad"].message
    assert report["forward_ad"].failed and report["reference"].passed, report
    assert "jvp) disagrees with backward at 6 element(s) of output 0" in message, message


def test_a_forward_overflowing_to_infinity_is_caught_by_the_reference_only():
    # the overflowed logsumexp is inf at and near inputs of ~800: a constant infinity to
    # central differences, which leave its derivatives out; the reference's values differ
    x = seeded(3, 4, shift=800.0)
    report = check_function(rw.LogSumExpUnshifted, x, checks=["gradcheck"])
    assert report.ok, report
    assert "whether fn should be infinite there" in report["gradcheck"].caveat, report
    reference = functools.partial(torch.logsumexp, dim=-1)
    report = check_function(rw.LogSumExpUnshifted, x, reference=reference, checks=["reference"])
    message = report["reference"].message
    assert report["reference"].failed and "output 0 differs" in message, report


def test_an_infinity_of_an_infinite_input_is_left_out():
    # torch's log_softmax given -inf logits: out_j = x_j - logsumexp(x) stays -inf near
    # them, but its derivative in the other logits is -softmax, not 0; central
    # differences cannot measure it, so it is not compared
    x = seeded(3, 4)
    x[0, 1] = x[2, 3] = float("-inf")
    checks = ["gradcheck", "gradgradcheck", "forward_ad"]
    report = check_function(functools.partial(F.log_softmax, dim=-1), x, checks=checks)
    assert report.ok and all(report[name].passed for name in checks), report
    assert "2 element(s) of output 0" in report["gradcheck"].caveat, report
    assert "were not compared" in report["gradcheck"].caveat, report


def test_an_infinity_of_an_input_left_undifferentiated_is_left_out_too():
    # scores + bias with a -inf bias: autograd's derivative of the masked scores in q and
    # k is add's 1, not masked_fill's 0 (a softmax after makes it 0); as for an infinite
    # differentiated input, central differences cannot measure it: not compared
    q, k = seeded(4, 3), seeded(4, 3, seed=1)
    above = torch.ones(4, 4, dtype=torch.bool).triu(1)
    bias = torch.zeros(4, 4, dtype=torch.float64).masked_fill(above, float("-inf"))

    def biased_scores(q, k, bias):
        return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias

    checks = ["gradcheck", "gradgradcheck", "forward_ad"]
    report = check_function(biased_scores, q, k, bias, grad_inputs=(0, 1), checks=checks)
    assert report.ok and all(report[name].passed for name in checks), report
    assert "were not compared" in report["gradcheck"].caveat, report
