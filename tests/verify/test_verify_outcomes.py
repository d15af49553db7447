"""The four outcomes of a check: pass, fail, unsupported (with how to add it) and skip."""

from __future__ import annotations

import json

import pytest
import torch

import torchbp.verify
from torchbp.verify import FAIL, PASS, SKIP, UNSUPPORTED, CheckResult, Report, cli
from torchbp.verify.checks.explain import capability_gap, outcome_of
from torchbp.verify.checks.outcomes import CheckFailure, CheckUnsupported


def test_status_constants():
    assert (PASS, FAIL, UNSUPPORTED, SKIP) == ("pass", "fail", "unsupported", "skipped")


def test_unsupported_does_not_count_against_ok():
    report = Report(
        "f",
        [
            CheckResult("forward", PASS),
            CheckResult("forward_ad", UNSUPPORTED, "Function has no jvp; to add it: ..."),
            CheckResult("reference", SKIP, "no reference given"),
        ],
    )
    assert report.ok
    assert [c.name for c in report.unsupported] == ["forward_ad"]
    assert report["forward_ad"].unsupported and not report["forward_ad"].failed
    assert report.counts() == {PASS: 1, FAIL: 0, UNSUPPORTED: 1, SKIP: 1}
    text = str(report)
    assert text.splitlines()[0] == "f: OK (1 unsupported)"
    assert "forward_ad [unsupported]: Function has no jvp; to add it: ..." in text
    assert "unsupported=1" in repr(report)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["checks"][1]["status"] == "unsupported"


def test_only_unsupported_is_not_ok():
    # nothing ran and passed: no verdict to give
    assert not Report("f", [CheckResult("vmap", UNSUPPORTED)]).ok


def test_a_failure_still_fails_beside_unsupported():
    report = Report(
        "f", [CheckResult("a", PASS), CheckResult("b", UNSUPPORTED), CheckResult("c", FAIL)]
    )
    assert not report.ok
    assert str(report).splitlines()[0] == "f: FAILED (1 fail, 1 unsupported)"


def test_check_unsupported_message_says_how_to_add_it():
    gap = CheckUnsupported("Function has no jvp", "define a jvp staticmethod", 1e-9, 1e-8)
    assert gap.message == "Function has no jvp; to add it: define a jvp staticmethod"
    assert (gap.missing, gap.how_to_add, gap.abs_err) == (
        "Function has no jvp",
        "define a jvp staticmethod",
        1e-9,
    )


@pytest.mark.parametrize(
    ("text", "how"),
    [
        ("... must implement the jvp function ...", "ctx.save_for_forward"),
        ("... must override the setup_context staticmethod ...", "setup_context"),
        ("... does not have vmap support ...", "generate_vmap_rule"),
        ("trying to differentiate twice a function ...", "once_differentiable"),
        ("... but no autograd formula was registered ...", "register_autograd"),
        ("There was no fake impl registered for op", "register_fake"),
    ],
)
def test_missing_capabilities_are_recognised(text, how):
    gap = capability_gap(RuntimeError(text))
    assert gap is not None and how in gap[1]
    assert isinstance(outcome_of(RuntimeError(text)), CheckUnsupported)


def test_other_errors_are_failures_with_their_context():
    outcome = outcome_of(ValueError("shapes do not match"), "vmap of the forward failed: ")
    assert isinstance(outcome, CheckFailure)
    assert outcome.message == "vmap of the forward failed: ValueError: shapes do not match"


def test_cause_chain_is_searched():
    try:
        try:
            raise RuntimeError("... must implement the jvp function ...")
        except RuntimeError as inner:
            raise ValueError("wrapper") from inner
    except ValueError as outer:
        assert capability_gap(outer) is not None


#: torch.func.vmap's own error for an .item() of a batched tensor
_VMAP_ITEM = "vmap: It looks like you're calling .item() on a Tensor. We don't support vmap"


def test_only_vmaps_own_error_for_an_item_is_unsupported():
    # vmap cannot run a value read (a limitation); an error fn raised while handling it
    # (a fallback of its own that fails) or one quoting its words is fn's, and fails
    assert "amax()" in capability_gap(RuntimeError(_VMAP_ITEM))[1]
    try:
        try:
            raise RuntimeError(_VMAP_ITEM)
        except RuntimeError:
            raise RuntimeError("MyOp's fallback for vmap failed") from None
    except RuntimeError as fallback_failed:
        assert capability_gap(fallback_failed) is None
    assert capability_gap(ValueError(_VMAP_ITEM)) is None


def test_fn_raised_prefix_only_once():
    def bad(x):
        raise RuntimeError("fn-specific problem")

    from torchbp.verify import check_function

    report = check_function(bad, torch.randn(3))
    message = report["forward"].message
    assert message.startswith("fn raised RuntimeError: fn-specific problem"), message
    assert message.count("fn raised") == 1, message


def test_cli_shows_documented_unsupported_distinctly(capsys):
    code = cli.main(
        [
            "--op",
            "linear_cross_entropy",
            "--dtype",
            "float64",
            "--no-compile",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "UNSUPPORTED linear_cross_entropy gradgradcheck: by design" in out
    assert "unsupported" in out.split("ALL PASSED")[0]
    assert "0 failed, 6 unsupported" in out


class _CosTimesGrad(torch.autograd.Function):
    """g * cos(x), the backward of sin, whose own backward is not written."""

    @staticmethod
    def forward(g, x):
        return g * x.cos()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, gg):
        raise NotImplementedError("the double backward of Sin is not implemented")


class SinWithoutDoubleBackward(torch.autograd.Function):
    """A correct sin whose backward runs a Function without a backward."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CosTimesGrad.apply(g, x)


class SinRefusingCreateGraph(SinWithoutDoubleBackward):
    """A correct sin whose backward refuses to be differentiated (create_graph=True)."""

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise NotImplementedError("double backward of Sin: call backward without create_graph")
        (x,) = ctx.saved_tensors
        return g * x.cos()


@pytest.mark.parametrize("fn", [SinWithoutDoubleBackward, SinRefusingCreateGraph])
def test_double_backward_raising_not_implemented_is_unsupported(fn):
    from torchbp.verify import check_function

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    report = check_function(fn, x, checks=["gradcheck", "gradgradcheck"])
    result = report["gradgradcheck"]
    assert result.unsupported, str(report)
    assert "NotImplementedError" in result.message and "double backward of Sin" in result.message
    assert "to add it:" in result.message
    assert report.ok, str(report)
    required = check_function(fn, x, checks=["gradcheck"], require=["gradgradcheck"])
    assert required["gradgradcheck"].failed, str(required)


class SinWithPartialJvpAndVmap(torch.autograd.Function):
    """A correct sin whose jvp and vmap rule are not written yet (they raise
    NotImplementedError, the way to say a capability is absent)."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos()

    @staticmethod
    def jvp(ctx, t):
        raise NotImplementedError("jvp of Sin: not written yet")

    @staticmethod
    def vmap(info, in_dims, x):
        raise NotImplementedError("vmap of Sin: not written yet")


@pytest.mark.parametrize(("check", "what"), [("forward_ad", "jvp"), ("vmap", "vmap")])
def test_jvp_or_vmap_raising_not_implemented_is_unsupported(check, what):
    from torchbp.verify import check_function

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    report = check_function(SinWithPartialJvpAndVmap, x, checks=[check])
    result = report[check]
    assert result.unsupported, str(report)
    assert f"NotImplementedError: {what} of Sin: not written yet" in result.message
    assert report.ok, str(report)


def test_vmap_of_batch_norm_updating_running_stats_is_unsupported():
    # BatchNorm in training mode updates its running statistics in place, which torch.func
    # cannot batch (a PyTorch limitation, not a wrong gradient): before, vmap failed
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    report = torchbp.verify.check_function(torch.nn.BatchNorm1d(4).double(), x, checks="vmap")
    result = report["vmap"]
    assert result.unsupported and report.ok, report
    assert "in place" in result.message and ".eval()" in result.message
    assert "replace_all_batch_norm_modules_" in result.message


class _MaxWithIndices(torch.autograd.Function):
    """``x.max(-1)`` (values and indices); backward scatters the gradient in place into
    zeros made from the saved input: correct, but vmap cannot batch that write when only
    the grad_output is batched."""

    @staticmethod
    def forward(ctx, x):
        values, indices = x.max(dim=-1)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(x, indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        x, indices = ctx.saved_tensors
        grad = torch.zeros_like(x)
        grad.scatter_(-1, indices.unsqueeze(-1), grad_values.unsqueeze(-1))
        return grad


def test_an_in_place_scatter_into_unbatched_zeros_is_unsupported_batching_not_a_failure():
    report = torchbp.verify.check_function(
        _MaxWithIndices,
        torch.randn(3, 4),
        reference=lambda x: torch.max(x, dim=-1),
        checks=["batched_grad", "reference"],
    )
    assert report.ok, report
    batched = report["batched_grad"]
    assert batched.status == "unsupported"
    assert "zeros_like(x).scatter(dim, index, grad)" in batched.message
    required = torchbp.verify.check_function(
        _MaxWithIndices, torch.randn(3, 4), require=["batched_grad"]
    )
    assert required["batched_grad"].status == "fail"


class _DoubleAndSquareUnmaterialized(torch.autograd.Function):
    """``(2x, x²)`` with ``set_materialize_grads(False)``; backward forgets that a
    grad_output is None when its output was not used."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return 2 * x, x * x

    @staticmethod
    def backward(ctx, grad_double, grad_square):
        (x,) = ctx.saved_tensors
        return 2 * grad_double + 2 * x * grad_square


def test_a_backward_crashing_on_a_none_grad_output_is_told_why():
    report = torchbp.verify.check_function(
        _DoubleAndSquareUnmaterialized, torch.randn(3), checks=["gradcheck"]
    )
    message = report["gradcheck"].message
    assert report["gradcheck"].status == "fail"
    assert "backward was given None for grad_square" in message
    assert "set_materialize_grads(False)" in message


class _DoubleAndSquareUnmaterializedVarargs(torch.autograd.Function):
    """:class:`_DoubleAndSquareUnmaterialized` with its grad_outputs taken as ``*grads``."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return 2 * x, x * x

    @staticmethod
    def backward(ctx, *grads):
        (x,) = ctx.saved_tensors
        return 2 * grads[0] + 2 * x * grads[1]


def test_a_none_grad_output_taken_as_varargs_is_named_too():
    report = torchbp.verify.check_function(
        _DoubleAndSquareUnmaterializedVarargs, torch.randn(3), checks=["gradcheck"]
    )
    message = report["gradcheck"].message
    assert "backward was given None for grads[1]" in message, message


class _NoneHandledThenCrash(torch.autograd.Function):
    """Handles a None grad_output as zeros, then crashes for another reason (a mistyped
    shape): the None is not the cause and must not be blamed."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return 2 * x, x * x

    @staticmethod
    def backward(ctx, grad_double, grad_square):
        (x,) = ctx.saved_tensors
        grad = 2 * grad_double if grad_double is not None else torch.zeros_like(x)
        if grad_square is not None:
            grad = grad + 2 * x * grad_square
        return grad.reshape(x.numel() + 1)  # wrong: not the input's shape


def test_a_none_grad_output_backward_handles_is_not_blamed_for_another_crash():
    report = torchbp.verify.check_function(
        _NoneHandledThenCrash, torch.randn(3), checks=["gradcheck"]
    )
    message = report["gradcheck"].message
    assert report["gradcheck"].status == "fail"
    assert "given None" not in message, message


class _GradForAFloat(torch.autograd.Function):
    """x * s for a Python float s, whose backward returns a gradient for s too."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        return x * s

    @staticmethod
    def backward(ctx, g):
        return g * ctx.s, g.sum()


def test_a_gradient_for_a_non_tensor_argument_is_named_with_its_fix():
    # before, each failed check quoted torch's "returned a gradient different than None at
    # position 2" (counted from 1, unlike every other message here)
    x = torch.randn(3, 4, dtype=torch.float64)
    report = torchbp.verify.check_function(_GradForAFloat, x, 2.0, checks=["gradcheck"])
    message = report["gradcheck"].message
    assert report["gradcheck"].failed, str(report)
    assert message == (
        "_GradForAFloat's backward returned a gradient for input 1, which is not a tensor "
        "(a Python number or other non-tensor argument): return None in its place"
    )
