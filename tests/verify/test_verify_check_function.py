"""check_function on plain callables: report structure, options and bad input."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.verify.correct_functions import square_function

import torchbp.verify
from torchbp.verify import CHECKS, CheckResult, Report, check_function, tolerances


def _x(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


NO_COMPILE = {"skip": ["compile"]}


def test_native_op_passes_and_report_is_complete():
    report = check_function(torch.tanh, _x(3, 4), reference=torch.tanh, **NO_COMPILE)
    assert report.ok, str(report)
    # opcheck runs only on torch.library custom ops
    assert report.names() == [c for c in CHECKS if c not in ("compile", "opcheck")]
    gc = report["gradcheck"]
    assert gc.passed and gc.max_abs_err is not None and gc.max_abs_err < 1e-6
    assert gc.seconds >= 0
    # native ops have no custom Function node
    assert (
        report["grad_shapes"].skipped
        and "no custom autograd.Function" in report["grad_shapes"].message
    )


def test_str_table_and_to_dict():
    report = check_function(torch.sigmoid, _x(2, 3), checks=["gradcheck", "reference"])
    text = str(report)
    assert text.splitlines()[0].endswith("OK")
    assert "gradcheck" in text and "reference" in text and "max abs err" in text
    assert "no reference given" in text  # skipped checks show their reason
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["ok"] is True
    assert data["meta"]["dtype"] == "float64"
    assert [c["status"] for c in data["checks"]] == ["pass", "pass", "skipped"]


def test_report_ok_semantics():
    assert not Report("empty").ok
    assert not Report("only skipped", [CheckResult("a", "skipped")]).ok
    assert Report("one pass", [CheckResult("a", "pass"), CheckResult("b", "skipped")]).ok
    assert not Report("one fail", [CheckResult("a", "pass"), CheckResult("b", "fail")]).ok
    with pytest.raises(KeyError, match="no check named"):
        Report("x", [CheckResult("a", "pass")])["zzz"]


def test_non_tensor_scalar_args_and_integer_targets():
    x, t = _x(4, 5), torch.tensor([0, 2, 4, 1])
    report = check_function(F.cross_entropy, x, t, None, reference=F.cross_entropy, **NO_COMPILE)
    assert report.ok, str(report)
    assert report.meta["grad_inputs"] == [0]
    report = check_function(F.softmax, _x(3, 4), 1, reference=F.softmax, **NO_COMPILE)
    assert report.ok, str(report)


def test_lower_precision_skips_numerical_checks_with_reason():
    report = check_function(
        torch.sigmoid, _x(3, 4), reference=torch.sigmoid, dtype=torch.float32, **NO_COMPILE
    )
    assert report.ok, str(report)
    for name in ("gradcheck", "gradgradcheck", "forward_ad"):
        assert report[name].skipped and "float64" in report[name].message
    assert report["reference"].passed
    assert report.meta["dtype"] == "float32"


def test_dtype_none_keeps_input_dtype():
    report = check_function(
        torch.tanh, _x(2, 2, dtype=torch.float32), dtype=None, checks=["forward"]
    )
    assert report.meta["dtype"] == "float32"


def test_fast_mode():
    report = check_function(F.linear, _x(3, 4), _x(5, 4), _x(5), fast_mode=True, **NO_COMPILE)
    assert report.ok, str(report)
    assert report.meta["fast_mode"] is True


class _HalvedGradSquare(torch.autograd.Function):
    """x², its gradient halved."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return x * g  # d(x²)/dx is 2x


def test_large_inputs_are_checked_by_random_projections_by_default():
    # torch's full gradcheck on a (256, 512) input builds Jacobians of 131072² entries
    # (137 GB): above 4096 differentiated elements the default is fast_mode, as for a
    # large module. A positive x keeps v^T J u of the halved gradient off by half
    # whatever positive projections gradcheck draws.
    x = torch.rand(64, 65, generator=torch.Generator().manual_seed(0)) + 0.5
    report = check_function(_HalvedGradSquare, x, checks=["gradcheck"])
    assert report.meta["fast_mode"] is True
    assert report["gradcheck"].failed, str(report)
    small = check_function(_HalvedGradSquare, x[:2], checks=["gradcheck"])
    assert small.meta["fast_mode"] is False
    chosen = check_function(torch.square, x, checks=["forward"], fast_mode=False)
    assert chosen.meta["fast_mode"] is False


def test_compile_check_runs_with_chosen_backend():
    report = check_function(torch.tanh, _x(3), checks=["compile"], compile_backend="eager")
    assert report["compile"].passed, str(report)
    assert "eager" in report["compile"].message


def test_reference_shape_mismatch_is_a_failed_check():
    report = check_function(
        torch.tanh, _x(3, 4), reference=lambda x: torch.tanh(x).sum(0), **NO_COMPILE
    )
    assert not report.ok
    assert report["reference"].failed
    assert "has shape (3, 4) but the reference gives (4,)" in report["reference"].message


def test_reference_that_raises_is_a_failed_check():
    def broken(x):
        raise RuntimeError("boom")

    report = check_function(torch.tanh, _x(3), reference=broken, checks=["reference"])
    assert report["reference"].failed and "the reference raised RuntimeError: boom" in (
        report["reference"].message
    )


def test_fn_that_raises_fails_forward_and_skips_the_rest():
    def bad(x):
        return x @ torch.ones(7, 2, dtype=x.dtype)

    report = check_function(bad, _x(3, 4))
    assert not report.ok
    assert report["forward"].failed and report["forward"].message.startswith("fn raised")
    assert all(c.skipped for c in report if c.name != "forward")


def test_detached_output_is_reported():
    report = check_function(lambda x: torch.tanh(x).detach(), _x(3))
    assert report["forward"].failed and "no output requires grad" in report["forward"].message


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: check_function(42, _x(3)), TypeError, "fn must be callable"),
        (lambda: check_function(torch.tanh, [1.0, 2.0]), TypeError, "input 0 is a list"),
        # torch.as_tensor, the advice given before, cannot take tensors or a dict
        (
            lambda: check_function(torch.stack, [_x(3), _x(3)]),
            TypeError,
            r"input 0 is a list holding tensors.*separate inputs.*lambda a, b: fn\(\[a, b\]\)",
        ),
        (
            lambda: check_function(lambda x, d: x * d["s"], _x(3), {"s": 2.0}),
            TypeError,
            r"input 1 is a dict.*functools.partial\(fn, key=value\)",
        ),
        # a function or a NumPy number: torch.as_tensor, the advice given before, is no
        # way to pass an activation argument, and a NumPy dim is a number
        (
            lambda: check_function(lambda x, act: act(x), _x(3), torch.tanh),
            TypeError,
            r"input 1 is a builtin_function_or_method.*functools.partial\(fn, key=value\)",
        ),
        (
            lambda: check_function(torch.sum, _x(3, 4), np.int64(1)),
            TypeError,
            r"input 1 is a int64.*a Python number: int\(value\) or float\(value\)",
        ),
        (lambda: check_function(torch.tanh), ValueError, "at least one example input"),
        (lambda: check_function(torch.tanh, 3.0), TypeError, "none of the inputs is a tensor"),
        (
            lambda: check_function(F.nll_loss, _x(2, 3), torch.tensor([0, 1]), grad_inputs=(1,)),
            ValueError,
            "input 1 is an integer tensor",
        ),
        (
            lambda: check_function(torch.neg, torch.arange(3)),
            ValueError,
            "no floating-point tensor input",
        ),
        # only integer outputs: nothing to differentiate (torch's gradcheck passes it
        # silently; before, a forward failure as though the argmax were broken)
        (
            lambda: check_function(lambda x: x.argmax(-1), _x(3, 4)),
            ValueError,
            r"fn returned only integer or bool tensors \(torch.int64 of shape \(3,\)\)",
        ),
        (
            lambda: check_function(lambda x: (x > 0, x.argmax()), _x(3, 4)),
            ValueError,
            r"only integer or bool tensors \(torch.bool of shape \(3, 4\), torch.int64",
        ),
        (lambda: check_function(torch.tanh, _x(3), bogus=1), TypeError, "unknown option"),
        (lambda: check_function(torch.tanh, _x(3), checks=["nope"]), ValueError, "unknown check"),
        # an empty selection is a mistake (a filter that left nothing), not "run every check"
        (
            lambda: check_function(torch.tanh, _x(3), checks=[]),
            ValueError,
            r"checks is empty.*checks=None",
        ),
        (lambda: check_function(torch.tanh, _x(3), checks=()), ValueError, "checks is empty"),
        # a device that is no device was silently ignored (tensor.to(3.5) returns it as is)
        (lambda: check_function(torch.tanh, _x(3), device=3.5), TypeError, "device must be"),
        (
            lambda: check_function(torch.tanh, _x(3), device="cdua"),
            ValueError,
            "device='cdua' is not a device",
        ),
        pytest.param(
            lambda: check_function(torch.tanh, _x(3), device="cuda"),
            ValueError,
            "device='cuda' is not available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
        (
            lambda: check_function(torch.tanh, _x(3), checks=["gradcheck"], skip="gradcheck"),
            ValueError,
            r"check\(s\) gradcheck are both selected \(checks\) and skipped",
        ),
        (lambda: check_function(torch.tanh, _x(3), reference=5), TypeError, "reference must be"),
        (lambda: check_function(torch.tanh, _x(3), dtype=torch.int32), TypeError, "dtype must"),
        (
            lambda: check_function(torch.tanh, _x(3), grad_inputs=(3,)),
            ValueError,
            "not a valid input position",
        ),
        (
            lambda: check_function(torch.nn.Linear(3, 2), _x(4, 3)),
            ValueError,
            r"fn is an nn.Module with torch.float32 parameters.*dtype=None",
        ),
        (
            lambda: check_function(
                torch.nn.Linear(3, 2).double(), _x(4, 3), reference=torch.nn.Linear(3, 2)
            ),
            ValueError,
            r"reference is an nn.Module with torch.float32 parameters",
        ),
        (
            lambda: check_function(torch.mul, _x(3), _x(3), grad_inputs=[0, -2]),
            ValueError,
            "grad_inputs lists input 0 twice",
        ),
        (
            lambda: check_function(torch.mul, _x(3), _x(3), grad_inputs=[True]),
            ValueError,
            "grad_inputs entry True is not a valid input position",
        ),
        (
            lambda: check_function(torch.nn.Tanh, _x(3)),
            TypeError,
            r"fn is the nn.Module class Tanh, not a module: pass an instance, e.g. Tanh\(\)",
        ),
        (
            lambda: check_function(torch.tanh, _x(3), reference=torch.nn.Tanh),
            TypeError,
            "reference is the nn.Module class Tanh",
        ),
        (lambda: check_function(torch.tanh, _x(3), vmap_batch=0), ValueError, "vmap_batch"),
        # bool("no") is True: a string flag would silently mean the opposite
        (lambda: check_function(torch.tanh, _x(3), fast_mode="no"), TypeError, "fast_mode must"),
        (
            lambda: check_function(torch.tanh, _x(3), compile_fullgraph="False"),
            TypeError,
            "compile_fullgraph must be True or False",
        ),
        (lambda: check_function(torch.tanh, _x(3), vmap_batch=2.5), TypeError, "vmap_batch"),
        (lambda: check_function(torch.tanh, _x(3), eps=0.0), ValueError, "eps must be"),
        (lambda: check_function(torch.tanh, _x(3), atol=-1.0), ValueError, "atol must be"),
        (lambda: check_function(torch.tanh, _x(3), parity_atol=-1), ValueError, "parity_atol"),
        (lambda: check_function(torch.tanh, _x(3), rtol="1e-3"), TypeError, "rtol must be"),
        (lambda: check_function(torch.tanh, _x(3), seed=1.5), TypeError, "seed must be"),
        # torch's generators take 64 bits: 2**64 failed deep inside ('Overflow when unpacking')
        (
            lambda: check_function(torch.tanh, _x(3), seed=2**64),
            ValueError,
            r"seed must be in \[-2\*\*63, 2\*\*64\)",
        ),
        # a non-string label was accepted and ended up as the report's name (5, not "5")
        (lambda: check_function(torch.tanh, _x(3), name=5), TypeError, "name must be a str"),
        (lambda: check_function(torch.tanh, _x(3), name=b"t"), TypeError, "name must be a str"),
        (
            lambda: check_function(torch.tanh, torch.randn(3, device="meta")),
            ValueError,
            "input 0 is on the meta device",
        ),
        (
            lambda: check_function(torch.mul, _x(3), _x(3), device="meta"),
            ValueError,
            "input 0 is on the meta device",
        ),
    ],
)
def test_bad_input_gives_a_clear_error(call, error, match):
    with pytest.raises(error, match=match) as info:
        call()
    # raised by check_function itself, not from deep inside torch
    assert Path(torchbp.verify.__file__).parent in Path(info.traceback[-1].path).parents


def test_tolerances_are_dtype_aware():
    assert (
        tolerances(torch.float64)[1] < tolerances(torch.float32)[1] < tolerances(torch.bfloat16)[1]
    )


def test_autograd_function_subclass_is_accepted_and_named():
    Square = square_function()
    report = check_function(Square, _x(3), reference=lambda x: x**2, **NO_COMPILE)
    assert report.name == "Square"
    assert report.ok, str(report)
    assert report["grad_shapes"].passed


class _Triple(torch.autograd.Function):
    """``3x`` with a correct backward, but no jvp and no vmap rule."""

    @staticmethod
    def forward(x):
        return x * 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 3 * g


def test_no_jvp_is_unsupported_with_how_to_add_it():
    class NoJvp(_Triple):
        generate_vmap_rule = True

    report = check_function(NoJvp, _x(3), checks=["forward_ad"])
    assert report.ok, str(report)
    assert report["forward_ad"].unsupported
    assert "Function has no jvp" in report["forward_ad"].message
    assert "to add it: define a jvp staticmethod" in report["forward_ad"].message


def test_no_vmap_rule_is_unsupported_with_how_to_add_it():
    report = check_function(_Triple, _x(3), checks=["vmap"])
    assert report.ok, str(report)
    assert report["vmap"].unsupported
    assert "Function has no vmap rule" in report["vmap"].message
    assert "generate_vmap_rule = True" in report["vmap"].message


def test_require_turns_unsupported_into_failed():
    report = check_function(_Triple, _x(3), checks=["gradcheck"], require=["vmap", "forward_ad"])
    assert not report.ok
    assert report.names() == ["forward", "gradcheck", "forward_ad", "vmap"]
    assert report["gradcheck"].passed
    for name in ("forward_ad", "vmap"):
        assert report[name].failed
        assert report[name].message.startswith("required but unsupported: ")
    assert "FAILED (2 fail)" in str(report)


def test_require_leaves_supported_checks_alone():
    report = check_function(torch.tanh, _x(3), require=("vmap", "forward_ad"), **NO_COMPILE)
    assert report.ok and report["vmap"].passed and report["forward_ad"].passed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"require": ["nope"]}, "unknown check"),
        ({"require": ["vmap"], "skip": ["vmap"]}, "both required and skipped"),
    ],
)
def test_bad_require_gives_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_function(torch.tanh, _x(3), **kwargs)


def test_undefined_grad_not_handled_is_reported():
    class TwoOut(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x * 2, x * 3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.set_materialize_grads(False)

        @staticmethod
        def backward(ctx, ga, gb):
            return 2 * ga + 3 * gb  # breaks when one of them is None

    report = check_function(TwoOut, _x(3), checks=["undefined_grad"])
    assert report["undefined_grad"].failed
    assert "undefined" in report["undefined_grad"].message


def test_view_in_backward_fails_for_strided_grad_output():
    class ViewLinear(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x, w):
            return x @ w.t()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs)

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            g2 = g.view(-1, g.shape[-1])  # breaks on a transposed grad_output
            return g @ w, g2.t() @ x.reshape(-1, x.shape[-1])

    report = check_function(ViewLinear, _x(2, 3, 4), _x(5, 4), checks=["grad_output_safety"])
    assert report["grad_output_safety"].failed
    assert "use .reshape()" in report["grad_output_safety"].message


def test_check_table_lists_every_check_once_in_run_order():
    from torchbp.verify import CHECK_DESCRIPTIONS
    from torchbp.verify.checks import CHECK_TABLE

    assert tuple(c.name for c in CHECK_TABLE) == CHECKS
    assert CHECKS[0] == "forward" and len(set(CHECKS)) == len(CHECKS)
    assert CHECK_DESCRIPTIONS == {c.name: c.description for c in CHECK_TABLE}
    assert all(callable(c.run) and c.description for c in CHECK_TABLE)
    report = check_function(torch.tanh, _x(3), checks=["reference", "gradcheck"])
    assert report.names() == ["forward", "gradcheck", "reference"]


def test_inputs_of_the_caller_are_never_written():
    # The checks run on copies: a function that writes into an input it does not
    # differentiate (here it counts its calls in it) leaves the caller's tensor as it was.
    def scaled(x, calls):
        calls.add_(1)
        return x * 2

    x, calls = torch.randn(3, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    before = x.clone()
    check_function(scaled, x, calls, grad_inputs=[0], skip=["compile"])
    assert torch.equal(x, before) and calls.item() == 0


def test_assert_function_returns_the_report_or_raises_with_it():
    from torchbp.verify import assert_function

    report = assert_function(_Triple, _x(3), checks=["gradcheck", "vmap"])
    assert report.ok and report["vmap"].unsupported

    class WrongTriple(_Triple):
        @staticmethod
        def backward(ctx, g):
            return 2 * g  # should be 3

    with pytest.raises(AssertionError) as info:
        assert_function(WrongTriple, _x(3), checks=["gradcheck"])
    text = str(info.value)
    assert text.startswith("WrongTriple: FAILED (1 fail)")
    assert "gradcheck [fail]: backward of input 0 disagrees with numerical gradient" in text
    with pytest.raises(AssertionError, match="required but unsupported"):
        assert_function(_Triple, _x(3), checks=["gradcheck"], require=["vmap"])


@pytest.mark.parametrize("as_reference", [False, True])
def test_module_state_of_the_caller_is_never_written(as_reference):
    # a BatchNorm in training mode updates its running statistics on every call: the
    # checks' many calls must not leave the user's module changed
    norm = torch.nn.BatchNorm1d(4).double()
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    if as_reference:
        fn, reference = (lambda x: F.batch_norm(x, None, None, training=True)), norm
    else:
        fn, reference = norm, None
    report = check_function(fn, _x(5, 4), reference=reference, checks=["gradcheck", "reference"])
    assert report.ok, str(report)
    after = norm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), after


def test_a_single_check_name_may_be_given_as_a_string():
    # like require="vmap": checks="gradcheck" is one check, not nine one-letter names
    report = check_function(torch.tanh, _x(3), checks="gradcheck", skip="compile")
    assert report.names() == ["forward", "gradcheck"], str(report)


def test_a_check_gives_the_same_figures_alone_and_among_the_others():
    # the random grad_outputs of a check come from the run's seed, not from how many
    # values the checks before it drew: rerunning only the check that failed reproduces it
    def nearly_tanh(x):
        return torch.tanh(x) * (1 + 1e-9 * x)

    x = _x(3, 4)
    alone = check_function(nearly_tanh, x, reference=torch.tanh, checks=["reference"])
    among = check_function(nearly_tanh, x, reference=torch.tanh, skip=["compile"])
    assert alone["reference"].max_abs_err == among["reference"].max_abs_err


def test_grad_outputs_are_not_the_inputs_drawn_with_the_same_seed():
    # x drawn from a generator seeded 0, like the checks' own: a grad_output equal to x
    # makes the transposed weight gradient x^T g = x^T x symmetric, hiding the bug
    from tests.verify.zoo.formulas import TransposedWeightGradLinear

    x, w, b = (
        torch.randn(*s, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for s in ((3, 4), (4, 4), (4,))
    )
    report = check_function(
        TransposedWeightGradLinear, x, w, b, reference=F.linear, checks=["reference"]
    )
    assert report["reference"].failed, str(report)


def test_checks_on_cpu_leave_the_accelerator_generators_alone(monkeypatch):
    # every check is seeded, but only on the generators of the inputs' device, and those
    # are put back: reseeding the CUDA generator (torch.manual_seed) would leave a
    # training script's GPU dropout masks the same whatever seed it was started with
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    cpu_state = torch.random.get_rng_state()
    check_function(torch.tanh, _x(3), checks=["gradcheck", "vmap"])
    assert reseeded == []
    assert torch.equal(torch.random.get_rng_state(), cpu_state)


def test_a_list_of_scalars_is_passed_like_a_tuple():
    # dims and shapes often come as lists (torch.permute(x, [1, 0]); "=[1, 0]" on the
    # command line); each call gets its own copy, so fn cannot change the caller's
    dims = [1, 0]
    report = check_function(torch.permute, _x(2, 3), dims, checks=["gradcheck"])
    assert report.ok, str(report)
    assert report.meta["inputs"][1] == "[1, 0]"

    def pops(x, dims):
        dims.pop()
        return x * 2

    report = check_function(pops, _x(3), dims, checks=["gradcheck", "reference"], reference=pops)
    assert report.ok and dims == [1, 0], str(report)


def test_state_fn_holds_in_a_closure_or_partial_is_never_written():
    # a lambda around a module, or a partial holding running statistics, is how a model's
    # piece is usually checked: before, the checks' many calls left the BatchNorm's running
    # statistics (and the partial's tensors) changed for the caller
    norm = torch.nn.BatchNorm1d(4).double()
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    report = check_function(lambda x: norm(x), _x(5, 4), checks="gradcheck")
    assert report.ok, report
    assert all(torch.equal(norm.state_dict()[k], v) for k, v in before.items())
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    fn = functools.partial(F.batch_norm, running_mean=mean, running_var=var, training=True)
    assert check_function(fn, _x(5, 4), checks="gradcheck").ok
    assert torch.equal(mean, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(var, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_the_callers_grad_mode_does_not_reach_the_checks(mode):
    # before: under no_grad, forward failed blaming fn ('fn detached its result or computed
    # it under torch.no_grad()'); under inference_mode, 'Inference tensors do not track
    # version counter'
    with mode():
        x = _x(3, 4)
        report = check_function(
            torch.tanh, x, reference=torch.tanh, checks=["gradcheck", "reference"]
        )
        assert not torch.is_grad_enabled()
    assert report.ok, report
    assert report["gradcheck"].passed and report["reference"].passed


class GeneratorDropout(torch.autograd.Function):
    """Inverted dropout drawing its mask from an explicit ``torch.Generator`` argument, as
    reproducible training code passes one; ``forgets_mask`` plants the bug of a backward
    that passes the gradient through unmasked."""

    forgets_mask = False

    @staticmethod
    def forward(ctx, x, p, generator):
        keep = torch.rand(x.shape, generator=generator, dtype=x.dtype) >= p
        mask = keep.to(x.dtype) / (1 - p)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return (g if GeneratorDropout.forgets_mask else g * mask), None, None


def test_a_generator_input_gets_a_fresh_copy_for_every_call(monkeypatch):
    # every call draws the same mask from a copy of the generator in the caller's state,
    # as it would given the same seed, and the caller's generator is not advanced
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    x = torch.randn(4, 5, dtype=torch.float64)
    report = check_function(GeneratorDropout, x, 0.5, generator, skip="compile")
    assert report.ok, report
    assert torch.equal(generator.get_state(), state)
    monkeypatch.setattr(GeneratorDropout, "forgets_mask", True)
    buggy = check_function(GeneratorDropout, x, 0.5, generator, checks="gradcheck")
    assert buggy["gradcheck"].failed, buggy


class SparseTimesDense(torch.autograd.Function):
    """``A @ x`` for a sparse (COO) matrix ``A`` that gets no gradient, as a graph
    convolution multiplies by its sparse adjacency matrix."""

    @staticmethod
    def forward(ctx, adjacency, x):
        ctx.save_for_backward(adjacency)
        return torch.sparse.mm(adjacency, x)

    @staticmethod
    def backward(ctx, g):
        (adjacency,) = ctx.saved_tensors
        return None, torch.sparse.mm(adjacency.t(), g)


def _sparse_adjacency() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 4, generator=g, dtype=torch.float64).relu().to_sparse()


def test_a_sparse_input_is_compared_by_its_values():
    # the checks that an input is left intact compare sparse inputs densely; before,
    # grad_output_safety and mutation failed with torch's "Could not run 'aten::equal'
    # with arguments from the 'SparseCPU' backend"
    x = torch.randn(4, 3, dtype=torch.float64)
    report = check_function(SparseTimesDense, _sparse_adjacency(), x, skip="compile")
    assert report.ok, report


def test_a_sparse_tensor_held_by_fn_is_compared_by_its_values():
    # what fn holds is put back after the checks: a sparse tensor in a partial made
    # check_function itself raise NotImplementedError
    fn = functools.partial(SparseTimesDense.apply, _sparse_adjacency())
    report = check_function(fn, torch.randn(4, 3, dtype=torch.float64), checks="gradcheck")
    assert report.ok, report


def test_a_sparse_input_in_grad_inputs_is_refused_naming_it():
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="input 0 is a sparse tensor"):
        check_function(SparseTimesDense, _sparse_adjacency(), x, grad_inputs=[0, 1])


class VmapGeneratorDropout(torch.autograd.Function):
    """Inverted dropout from an explicit generator, written for torch.func (setup_context,
    generated vmap rule); the mask is a second, non-differentiable output."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, p, generator):
        keep = torch.rand(x.shape, generator=generator, dtype=x.dtype) >= p
        mask = keep.to(x.dtype) / (1 - p)
        return x * mask, mask

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, g, _):
        (mask,) = ctx.saved_tensors
        return g * mask, None, None


def test_a_random_function_with_a_generator_input_is_vmapped_drawing_the_same_numbers():
    # every call draws the same mask (a fresh copy of the generator): a vmap of the calls
    # draws it once for the batch (randomness='same'); before, vmap's default 'error' mode
    # failed vmap and vmap_in_dims with 'called random operation while in randomness error
    # mode'
    def dropped(x, p, generator):
        return VmapGeneratorDropout.apply(x, p, generator)[0]

    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, 5, dtype=torch.float64)
    report = check_function(dropped, x, 0.5, generator, checks=["vmap", "vmap_in_dims"])
    assert report.ok, report
    assert report["vmap"].passed and report["vmap_in_dims"].passed, report


#: A model at module level, as in a script or a notebook: the functions below reach it as
#: a global, not through a closure cell.
_GLOBAL_NORM = torch.nn.BatchNorm1d(4).double()


def _through_global_norm(x):
    return _GLOBAL_NORM(x)


def test_state_fn_reaches_as_a_global_is_never_written():
    # a script's `check_function(lambda x: model(x), x)` or a top-level `def f(x): return
    # model(x)` names the model as a global: before, only closure cells were looked in, and
    # the checks' calls left its BatchNorm running statistics changed for the caller
    before = {k: v.clone() for k, v in _GLOBAL_NORM.state_dict().items()}
    for fn in (_through_global_norm, lambda x: _GLOBAL_NORM(x)):
        assert check_function(fn, _x(5, 4), checks="forward").ok
        after = _GLOBAL_NORM.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), after


def test_grad_inputs_as_a_numpy_integer_or_a_tensor():
    # before: a NumPy integer position (computed with NumPy) raised "'numpy.int64' object
    # is not iterable", and a 0-dim tensor "iteration over a 0-d tensor", from deep inside
    np = pytest.importorskip("numpy")
    report = check_function(torch.mul, _x(3), _x(3), grad_inputs=np.int64(1), checks="forward")
    assert report.ok and report.meta["grad_inputs"] == [1]
    with pytest.raises(TypeError, match="grad_inputs must be an input position or a sequence"):
        check_function(torch.mul, _x(3), _x(3), grad_inputs=torch.tensor(0))


def test_a_meta_tensor_fn_holds_does_not_break_the_run():
    # what fn holds is put back by comparing values; a meta tensor (shape only, e.g. a
    # placeholder in a closure) has none: before, the run ended in aten::equal's
    # NotImplementedError for Meta tensors
    placeholder = torch.empty(3, device="meta")

    def doubled(x):
        assert placeholder.shape == x.shape
        return x * 2

    assert check_function(doubled, _x(3), checks="forward").ok


class _HalfAccumulatedSum(torch.autograd.Function):
    """sum over the last dim whose float32 backward rounds g through float16."""

    @staticmethod
    def forward(ctx, x):
        ctx.dtype = x.dtype
        return x.sum(-1)

    @staticmethod
    def backward(ctx, g):
        g = g.unsqueeze(-1).expand(*g.shape, 4)
        return g.half().to(ctx.dtype) if ctx.dtype == torch.float32 else g


def test_a_float16_accumulator_in_a_float32_backward_fails_reference_dtype():
    # (a dtype branch: test_verify_parity.py) a precision loss, right in float64
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    lost = check_function(
        _HalfAccumulatedSum, x, reference=lambda t: t.sum(-1), checks=["reference_dtype"]
    )
    assert lost["reference_dtype"].failed, str(lost)


def test_reference_dtype_is_skipped_for_a_module_checked_in_dtype():
    module = torch.nn.Linear(4, 2).double()
    x = torch.randn(3, 4)
    report = check_function(module, x, reference=module, checks=["reference_dtype"])
    assert report["reference_dtype"].skipped and "nn.Module" in report["reference_dtype"].message


def test_a_fn_refusing_the_kink_probes_inputs_is_compared_in_full():
    """gradgradcheck's probe for a kink (large inputs: projections would compare less)
    moves every input element at once, along a random direction; a fn refusing inputs off
    its domain raised there and the check failed with fn's error, although the full
    comparison, one element at a time, stays inside the domain and passes."""

    def sparse_cube(weights):  # a kernel for sparse weights: at most 3 nonzeros
        if int(torch.count_nonzero(weights)) > 3:
            raise ValueError("at most 3 nonzero weights")
        return weights**3

    weights = torch.zeros(50, dtype=torch.float64)  # second-order Jacobian: 50 x 100
    weights[:2] = torch.tensor([0.3, 0.7], dtype=torch.float64)
    report = check_function(sparse_cube, weights, checks=["gradgradcheck"])
    result = report["gradgradcheck"]
    assert result.passed, str(report)
    assert "full second-order Jacobian compared" in result.message
