"""check_function on autograd Functions written the way public repositories write them
(tests/verify/real_world.py): the correct ones pass, and the ones real code ships with a
surrogate gradient, a float32 computation or saved statistics fail with a message that
says why and what to do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.verify import real_world as rw
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function


def _labels(*values: int) -> torch.Tensor:
    return torch.tensor(values)


CORRECT = {
    "memory_efficient_swish": (rw.MemoryEfficientSwish, (seeded(4, 5),), F.silu),
    # no reference: at the integer probe of extreme_values (ties, points on the simplex's
    # faces) autograd through sort / gather / clamp gives another one-sided gradient
    "sparsemax_dim0": (rw.Sparsemax, (seeded(4, 5), 0), None),
    "sigmoid_focal_loss": (
        rw.SigmoidFocalLoss,
        (seeded(4, 5), _labels(0, 3, 5, 1)),
        rw.focal_loss_reference,
    ),
    "docs_linear_no_bias": (rw.DocsLinear, (seeded(4, 5), seeded(3, 5, seed=1)), F.linear),
    "docs_linear": (
        rw.DocsLinear,
        (seeded(4, 5), seeded(3, 5, seed=1), seeded(3, seed=2)),
        F.linear,
    ),
    "top_k_values": (rw.TopKValues, (seeded(4, 5), 2), lambda x, k: torch.topk(x, k, -1)),
    "inplace_leaky_relu": (rw.InplaceLeakyRelu, (seeded(4, 5),), F.leaky_relu),
    "sum_and_product": (
        rw.SumAndProduct,
        (seeded(4, 5), seeded(4, 5, seed=1)),
        lambda a, b: (a + b, a * b),
    ),
    "loss_and_accuracy": (rw.LossAndAccuracy, (seeded(4, 5), _labels(0, 1, 2, 3)), None),
    "classmethod_softmax": (
        rw.ClassmethodScaledSoftmax,
        (seeded(4, 5), 2.0),
        lambda x, t: torch.softmax(t * x, -1),
    ),
}


#: torch 2.11's compiled backward of some correct Functions is wrong (plain torch.compile
#: with aot_eager, checked outside verify): DocsLinear's forward adding into its output in
#: place, TanhPromoted's; there verify's compile check rightly fails them
_COMPILE_WRONG_ON_THIS_TORCH = {"docs_linear"} if torch.__version__ < "2.13" else set()


def _ok_but_for_this_torchs_compile(report, expect_compile_failure: bool) -> bool:
    failed = {r.name for r in report.checks if r.failed}
    return failed == ({"compile"} if expect_compile_failure else set())


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_a_correct_real_world_function_passes(name):
    fn, inputs, reference = CORRECT[name]
    report = check_function(fn, *inputs, reference=reference)
    assert _ok_but_for_this_torchs_compile(report, name in _COMPILE_WRONG_ON_THIS_TORCH), report


@pytest.mark.parametrize(
    ("fn", "inputs", "said"),
    [
        (rw.RoundSTE, (seeded(4, 5),), "numerical gradient of input 0 is zero everywhere"),
        (rw.GradientReversal, (seeded(4, 5), 0.5), "is -0.5 times the numerical gradient"),
    ],
    ids=["straight_through_round", "gradient_reversal"],
)
def test_a_surrogate_gradient_fails_gradcheck_saying_how_to_check_it_otherwise(fn, inputs, said):
    # before: a bare "analytical 1 vs numerical 0", nothing on what to do about a
    # gradient that is meant to differ
    report = check_function(fn, *inputs)
    result = report["gradcheck"]
    assert result.failed, report
    assert said in result.message
    assert "skip=['gradcheck']" in result.message
    assert "reference=" in result.message


def test_the_advice_for_a_surrogate_gradient_checks_it_against_the_intended_one():
    # the advice of the message: skip gradcheck, give the intended gradient as reference
    def straight_through(x):
        return x + (torch.round(x) - x).detach()

    report = check_function(
        rw.RoundSTE, seeded(4, 5), skip=["gradcheck"], reference=straight_through
    )
    assert report.ok, report

    def reversed_identity(x, alpha):
        return x.detach() * (1 + alpha) - alpha * x

    report = check_function(
        rw.GradientReversal, seeded(4, 5), 0.5, skip=["gradcheck"], reference=reversed_identity
    )
    assert report.ok, report
    wrong = check_function(
        rw.GradientReversal, seeded(4, 5), 0.5, skip=["gradcheck"], reference=lambda x, a: x
    )
    assert wrong["reference"].failed, wrong


def test_a_wrong_backward_off_by_a_factor_is_named_as_such():
    class HalfSquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return x * g  # wrong: d x²/dx = 2x

    result = check_function(HalfSquare, seeded(3, 4), checks="gradcheck")["gradcheck"]
    assert result.failed
    # before: "a constant factor missing or extra, or a gradient reversal or scaling
    # layer", as though a deliberate surrogate were as likely as the bug it almost always is
    assert "is 0.5 times the numerical gradient everywhere: a bug, a constant factor" in (
        result.message
    )
    assert "unless it is a deliberate gradient reversal" in result.message


def test_a_numerical_gradient_zero_from_rounding_is_not_called_a_surrogate():
    # a forward rounding to float16 has central differences over eps=1e-6 of exactly zero;
    # before, the message also claimed "a piecewise-constant one ... with a
    # straight-through estimator", for a right backward of a smooth function
    class SinInHalf(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.half().sin().to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.cos()

    result = check_function(SinInHalf, seeded(4, 5), checks="gradcheck")["gradcheck"]
    assert result.failed
    assert "fn's float64 outputs hold only torch.float16 numbers" in result.message
    assert "straight-through" not in result.message, result.message


class _SumsToOne(torch.autograd.Function):
    """x log x of a probability vector, refusing one that does not sum to 1 (a validating
    forward); backward off by a factor 2."""

    @staticmethod
    def forward(ctx, p):
        if not torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype)):
            raise ValueError("p must sum to 1")
        ctx.save_for_backward(p)
        return p * p.log()

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return 2 * g * (p.log() + 1)


def test_a_forward_refusing_inputs_shifted_by_eps_keeps_its_gradcheck_message():
    # float32 probabilities cast to float64: the float32-outputs hint evaluates fn at the
    # inputs shifted by eps, which no longer sum to 1; before, fn's ValueError there
    # replaced the mismatch it was explaining ("gradcheck fail: ValueError: p must sum
    # to 1")
    p = torch.softmax(seeded(2, 30), -1).float().double()
    result = check_function(_SumsToOne, p, checks="gradcheck")["gradcheck"]
    assert result.failed
    assert "disagrees with numerical gradient" in result.message, result.message
    assert "is 2 times the numerical gradient everywhere: a bug" in result.message


def test_a_function_computing_in_float32_on_float32_inputs_is_named():
    # before: the hint that fn computes in float32 was left out whenever the inputs held
    # only float32 numbers, i.e. for the float32 inputs (torch's default dtype) most
    # callers pass, so a right backward failed with a bare "disagrees with numerical"
    report = check_function(rw.TanhInFloat32, seeded(4, 5).float(), reference=torch.tanh)
    result = report["gradcheck"]
    assert result.failed, report
    assert "fn's float64 outputs hold only torch.float32 numbers" in result.message
    assert "x.to(torch.promote_types(x.dtype, torch.float32)) upcasts only" in result.message
    wider = check_function(rw.TanhInFloat32, seeded(4, 5).float(), reference=torch.tanh, eps=1e-3)
    assert wider.ok, wider

    class TanhPromoted(torch.autograd.Function):  # the message's advice
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.tanh(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - torch.tanh(x) ** 2)

    promoted = check_function(TanhPromoted, seeded(4, 5).float(), reference=torch.tanh)
    assert _ok_but_for_this_torchs_compile(promoted, torch.__version__ < "2.13"), promoted


def test_a_layer_norm_saving_its_statistics_fails_double_backward_naming_them():
    inputs = (seeded(4, 5), seeded(5, seed=1), seeded(5, seed=2))
    report = check_function(rw.SavedStatisticsLayerNorm, *inputs, reference=rw.layer_norm_reference)
    assert report["gradcheck"].passed, report
    assert report["reference"].passed, report
    result = report["gradgradcheck"]
    assert result.failed, report
    # before: "SavedStatisticsLayerNorm saved a (4, 5) tensor and SavedStatisticsLayerNorm
    # saved a (4, 1) tensor ... although it is neither"
    assert "SavedStatisticsLayerNorm saved a (4, 5) and a (4, 1) tensor" in result.message
    assert "although they are neither" in result.message
    assert "@once_differentiable" in result.message


class _WobblingGatherRows(torch.autograd.Function):
    """embedding-style row gather whose backward sums in an order that changes from run
    to run (CUDA's atomic index_add), emulated by a last-bit wobble drawn from a generator
    the checks do not seed."""

    wobble = torch.Generator().manual_seed(1)

    @staticmethod
    def forward(ctx, weight, index):
        ctx.save_for_backward(index)
        ctx.rows = weight.shape[0]
        return weight.index_select(0, index)

    @staticmethod
    def backward(ctx, g):
        (index,) = ctx.saved_tensors
        summed = g.new_zeros((ctx.rows, *g.shape[1:])).index_add_(0, index, g)
        noise = torch.randn(summed.shape, generator=_WobblingGatherRows.wobble, dtype=g.dtype)
        return summed * (1 + 1e-15 * noise), None


def test_a_backward_nondeterministic_within_nondet_tol_passes_gradgradcheck():
    # before: torch's gradgradcheck got grad_outputs that did not require grad, so a
    # backward constant in the inputs had no differentiable output and torch wanted its
    # numerical derivative exactly zero, ignoring nondet_tol ("Numerical gradient for
    # function expected to be zero"); torch.autograd.gradgradcheck itself passes it
    inputs = (seeded(5, 3), torch.tensor([0, 2, 2, 4, 0]))
    report = check_function(
        _WobblingGatherRows, *inputs, reference=lambda w, i: w[i], nondet_tol=1e-12
    )
    assert report.ok, report
    assert report["gradgradcheck"].passed, report
    strict = check_function(_WobblingGatherRows, *inputs, checks="gradcheck")
    assert "pass nondet_tol" in strict["gradcheck"].message


class _Relu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0)


class _ReluDetachedBackward(_Relu):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.detach() * (x > 0)  # wrong for double backward: d(grad)/d(g) is lost


def _counting_gradgradcheck(monkeypatch):
    calls = []
    real = torch.autograd.gradgradcheck

    def counting(*args, **kwargs):
        calls.append(kwargs.get("fast_mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "gradgradcheck", counting)
    return calls


def test_fast_gradgradcheck_on_kinks_builds_the_full_jacobians_once(monkeypatch):
    # before: torch's fast gradgradcheck ran first, failed across relu's kinks and built
    # the full Jacobians for its message, then the full comparison built them again
    # (~10 s on a 40x40 input); it now runs only where its verdict counts
    calls = _counting_gradgradcheck(monkeypatch)
    x = seeded(8, 8).round()  # exact zeros: relu's kink
    report = check_function(_Relu, x, checks="gradgradcheck", fast_mode=True)
    assert report.ok, report
    assert "full second-order Jacobian compared" in report["gradgradcheck"].message
    assert calls == []
    smooth = check_function(_Relu, x + 0.5, checks="gradgradcheck", fast_mode=True)
    assert smooth.ok, smooth
    assert calls == [True]  # away from kinks torch's fast verdict still runs


def test_a_wrong_double_backward_on_kinks_still_fails_in_fast_mode():
    x = seeded(8, 8).round()
    report = check_function(_ReluDetachedBackward, x, checks="gradgradcheck", fast_mode=True)
    assert report["gradgradcheck"].failed, report


def test_a_bias_gradient_left_for_autograd_to_sum_is_named_with_how_to_accept_it():
    # before: the message said autograd's sum "hides the bug", with no way to accept a
    # Function relying on it on purpose (its values are right, as gradcheck confirms)
    def reference(x, bias):
        return F.gelu(x + bias, approximate="tanh")

    inputs = (seeded(4, 5), seeded(5, seed=1))
    report = check_function(rw.FusedBiasGelu, *inputs, reference=reference)
    assert report["gradcheck"].passed, report
    result = report["grad_shapes"]
    assert result.failed, report
    assert "shape (4, 5) for its input 1, which has shape (5,)" in result.message
    assert "skip=['grad_shapes']" in result.message
    # what the unreduced gradient costs: 15 float64 elements more than the bias's 5
    assert "a gradient 120 bytes larger than needed (4 times the input's size)" in (result.message)
    accepted = check_function(rw.FusedBiasGelu, *inputs, reference=reference, skip="grad_shapes")
    assert accepted.ok, accepted


class _ReluOneAtZero(_Relu):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x >= 0)  # relu'(0) = 1: valid, but native torch.relu picks 0


class _ReluTwiceAtZero(_Relu):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ((x > 0) + 2 * (x == 0))  # wrong: 2 is no derivative of relu at 0


def test_a_valid_gradient_at_a_kink_other_than_the_references_is_named_so():
    # before: "(underflow, or another value or gradient at a kink?)" whether fn's choice
    # at the kink is valid (between the one-sided differences) or not; sparsemax against
    # an autograd reference (sort, gather, clamp) picks another face at ties
    report = check_function(_ReluOneAtZero, seeded(4, 5), reference=torch.relu)
    result = report["extreme_values"]
    assert result.failed, report
    assert "a valid choice; the reference picks another" in result.message
    assert "skip=['extreme_values']" in result.message
    sparse = check_function(rw.Sparsemax, seeded(4, 5), 0, reference=rw.sparsemax_reference)
    # torch 2.14's sort picks the same face at the ties as fn (a pass); 2.11/2.13 another
    result = sparse["extreme_values"]
    assert result.passed or "a valid choice; the reference picks another" in result.message
    wrong = check_function(_ReluTwiceAtZero, seeded(4, 5), reference=torch.relu)
    assert wrong["extreme_values"].failed, wrong
    assert "valid choice" not in wrong["extreme_values"].message


def test_running_statistics_updated_in_place_are_checked_through_a_module():
    # before: the write into the running statistics failed mutation and
    # grad_output_safety with advice (mark_dirty, write into a copy) that does not fit
    # state updated on purpose; the module route the message now names passes
    stats = (torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    inputs = (seeded(4, 5), seeded(5, seed=1), seeded(5, seed=2), *stats)
    report = check_function(rw.TrainingBatchNorm, *inputs, grad_inputs=(0, 1, 2))
    for name in ("mutation", "grad_output_safety"):
        assert report[name].failed, report
        assert "make it a buffer of an nn.Module" in report[name].message
    module = rw.TrainingBatchNormModule(5).double()

    def reference(x):
        weight, bias = module.weight, module.bias
        return F.batch_norm(x, None, None, weight, bias, training=True)

    report = check_function(module, seeded(4, 5), reference=reference)
    assert report.ok, report
    assert module.running_mean.eq(0).all()  # put back after the checks


def test_a_hand_written_checkpoint_fails_what_it_gets_wrong_and_only_that():
    # gradients right; double backward silently zero (autograd.grad without
    # create_graph in backward: before, worded "double backward unsupported" in a fail),
    # and the inputs kept as ctx attributes: a write after forward goes unnoticed
    inputs = (seeded(4, 5), seeded(5, 3, seed=1))
    report = check_function(rw.checkpointed_tanh_layer, *inputs, reference=rw.tanh_layer)
    assert report["gradcheck"].passed and report["reference"].passed, report
    failed = {r.name for r in report.failures}
    assert failed == {"gradgradcheck", "mutation"}, report
    assert "torch.autograd.grad without create_graph" in report["gradgradcheck"].message
    assert "ctx.x = x" in report["mutation"].message


def test_tables_given_no_gradient_are_named_with_grad_inputs_not_as_a_scaled_gradient():
    # before: a None gradient (zero everywhere) read as "0 times the numerical gradient:
    # a gradient reversal or scaling layer?" beside the grad_inputs advice
    inputs = (seeded(6, 4), *rw.rotary_tables(6, 2))
    result = check_function(rw.RotaryEmbedding, *inputs, checks="gradcheck")["gradcheck"]
    assert result.failed
    assert "grad_inputs=(0,)" in result.message
    assert "times the numerical gradient" not in result.message
    report = check_function(rw.RotaryEmbedding, *inputs, grad_inputs=(0,))
    assert report.ok, report


def test_a_single_entry_jacobian_is_not_named_a_scaled_gradient():
    # one entry is a multiple of any other number: "times the numerical gradient
    # everywhere" would name a pattern a 0-dim input cannot show
    class SinTooSteep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.cos() * 1.3

    result = check_function(SinTooSteep, torch.tensor(0.7), checks="gradcheck")["gradcheck"]
    assert result.failed
    assert "times the numerical gradient" not in result.message


def test_a_complex_function_is_compiled_in_one_graph():
    # before: the real-view wrapper of complex inputs read storage_offset(), which Dynamo
    # cannot trace, so every complex fn came out compile "unsupported" (a graph break of
    # the checks', not fn's: torch.compile(fullgraph=True) captures it)
    z = torch.complex(seeded(3, 4), seeded(3, 4, seed=1))
    report = check_function(rw.SquaredMagnitude, z, reference=lambda z: z.abs() ** 2)
    assert report.ok, report
    assert report["compile"].passed, report


def test_a_classmethod_function_is_told_to_use_staticmethods_to_compile():
    # before: "remove what breaks the graph" for Dynamo's failure to bind a classmethod
    report = check_function(rw.ClassmethodScaledSoftmax, seeded(4, 5), 2.0)
    result = report["compile"]
    assert not result.failed, report
    if "failed to bind arguments" in result.message:  # Dynamo's words in torch 2.13
        assert "declare the Function's forward and backward @staticmethod" in result.message
