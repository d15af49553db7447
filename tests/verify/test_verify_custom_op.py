"""check_function on torch.library custom ops: torch.library.opcheck runs as the ``opcheck``
check, and what PyTorch does not give custom ops comes out unsupported."""

from __future__ import annotations

import functools

import torch

from torchbp.verify import check_function


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _sin_backward(ctx, g):
    (x,) = ctx.saved_tensors
    # d sin(x)/dx = cos(x)
    return g * torch.cos(x)


@torch.library.custom_op("torchbp_verify_test::sin", mutates_args=())
def good_sin(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


@good_sin.register_fake
def _(x):
    return torch.empty_like(x)


good_sin.register_autograd(_sin_backward, setup_context=_save_input)


@torch.library.custom_op("torchbp_verify_test::sin_wrong_grad", mutates_args=())
def sin_wrong_grad(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


@sin_wrong_grad.register_fake
def _(x):
    return torch.empty_like(x)


def _wrong_sign_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return -g * torch.cos(x)  # the sign of d sin/dx flipped


sin_wrong_grad.register_autograd(_wrong_sign_backward, setup_context=_save_input)


@torch.library.custom_op("torchbp_verify_test::sin_no_fake", mutates_args=())
def sin_no_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


sin_no_fake.register_autograd(_sin_backward, setup_context=_save_input)


@torch.library.custom_op("torchbp_verify_test::sin_fake_wrong_shape", mutates_args=())
def sin_fake_wrong_shape(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


@sin_fake_wrong_shape.register_fake
def _(x):
    return x.new_empty(x.shape[0])  # the real kernel keeps every dim


sin_fake_wrong_shape.register_autograd(_sin_backward, setup_context=_save_input)


def test_correct_custom_op_passes_and_runs_opcheck():
    report = check_function(good_sin, _x(3, 4), reference=torch.sin)
    assert report.ok, str(report)
    assert report.name == "torchbp_verify_test::sin"
    assert report["opcheck"].passed and "test_faketensor" in report["opcheck"].message
    assert report["gradcheck"].passed and report["compile"].passed
    assert {c.name for c in report.unsupported} == {"forward_ad", "vmap"}
    assert "custom_op" in report["forward_ad"].message


def test_op_overload_packet_is_accepted():
    report = check_function(torch.ops.torchbp_verify_test.sin, _x(3), checks=["opcheck"])
    assert report.ok and report["opcheck"].passed, str(report)


def test_wrong_backward_of_a_custom_op_fails():
    report = check_function(sin_wrong_grad, _x(3, 4), reference=torch.sin, skip=["compile"])
    assert not report.ok
    assert report["gradcheck"].failed and "disagrees with numerical" in report["gradcheck"].message
    assert report["reference"].failed


def test_missing_fake_is_unsupported():
    report = check_function(sin_no_fake, _x(3), checks=["opcheck", "compile", "gradcheck"])
    assert report.ok, str(report)
    for name in ("opcheck", "compile"):
        assert report[name].unsupported and "register_fake" in report[name].message
    report = check_function(sin_no_fake, _x(3), checks=["gradcheck"], require=["opcheck"])
    assert not report.ok and report["opcheck"].failed


def test_fake_with_the_wrong_shape_fails_opcheck():
    report = check_function(sin_fake_wrong_shape, _x(3, 4), checks=["opcheck"])
    assert report["opcheck"].failed, str(report)
    assert "torch.library.opcheck failed" in report["opcheck"].message


def test_opcheck_is_skipped_for_other_callables():
    report = check_function(torch.sin, _x(3), checks=["opcheck"])
    assert (
        report["opcheck"].skipped and "not a torch.library custom op" in report["opcheck"].message
    )


@torch.library.custom_op("torchbp_verify_test::scaled_sin", mutates_args=())
def scaled_sin(x: torch.Tensor, *, alpha: float) -> torch.Tensor:
    return alpha * torch.sin(x)


@scaled_sin.register_fake
def _(x, *, alpha):
    return torch.empty(x.shape[:-1], dtype=x.dtype)  # wrong: drops the last dim


def _save_input_and_alpha(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.alpha = keyword_only_inputs["alpha"]


def _scaled_sin_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return g * ctx.alpha * torch.cos(x)


scaled_sin.register_autograd(_scaled_sin_backward, setup_context=_save_input_and_alpha)


def test_a_partial_binding_a_keyword_only_argument_is_checked_as_the_custom_op():
    # functools.partial is how a keyword-only argument is given; before, the op was not
    # recognised through it: forward_ad failed on PyTorch's zero tangents of a custom op,
    # and opcheck (here: a fake implementation of the wrong shape) never ran
    report = check_function(
        functools.partial(scaled_sin, alpha=2.0),
        _x(3, 4),
        reference=lambda x: 2.0 * torch.sin(x),
        skip=["compile"],
    )
    assert report.name == "torchbp_verify_test::scaled_sin"
    assert report["forward_ad"].status == "unsupported"
    assert report["opcheck"].status == "fail"
    assert "test_faketensor" in report["opcheck"].message
    assert [c.name for c in report.failures] == ["opcheck"], report


class _SinPlusOne(torch.nn.Module):
    def forward(self, x):
        return good_sin(x) + 1


def test_a_correct_fn_calling_a_custom_op_is_unsupported_for_forward_ad_not_failed():
    # before: forward_ad failed on the zero tangents PyTorch silently gives the custom op
    # ("analytical 0 vs numerical ..."), and vmap blamed a missing setup_context
    for fn in (_SinPlusOne(), lambda x: torch.ops.torchbp_verify_test.sin(x) + 1):
        report = check_function(
            fn, _x(3, 4), reference=lambda x: torch.sin(x) + 1, skip=["compile"]
        )
        assert report.ok, report
        forward_ad = report["forward_ad"]
        assert forward_ad.status == "unsupported"
        assert "fn calls torchbp_verify_test::sin" in forward_ad.message
        assert "torch.library.custom_op" in report["vmap"].message


class _DoubleWithWrongJvp(torch.autograd.Function):
    """``2x`` with a right backward and a jvp that forgets the factor 2."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g

    @staticmethod
    def jvp(ctx, t):
        return t  # wrong: the tangent of 2x is 2t


class _WrongJvpBesideAConstantCustomOp(torch.nn.Module):
    """A wrong jvp on the differentiated path; the custom op sees only a buffer (no input
    and no parameter flows into it, so its zero tangents are right)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", _x(3, 4))

    def forward(self, x):
        return _DoubleWithWrongJvp.apply(x) + good_sin(self.offset)


def test_a_wrong_jvp_fails_beside_a_custom_op_that_no_differentiated_input_reaches():
    # before: any custom op fn called made a failed forward_ad "unsupported", also one on a
    # constant, whose zero tangents are right: the wrong jvp passed as unsupported
    report = check_function(_WrongJvpBesideAConstantCustomOp(), _x(3, 4), checks=["forward_ad"])
    assert report["forward_ad"].status == "fail", report


class _WrongJvpBesideADifferentiatedCustomOp(torch.nn.Module):
    def forward(self, x):
        return _DoubleWithWrongJvp.apply(x) + good_sin(x)


def test_a_wrong_jvp_fails_beside_a_custom_op_on_the_differentiated_path():
    # before: forward AD through the custom op is PyTorch's zero tangents, so the whole
    # check was unsupported and the wrong jvp beside it passed; the jvps are now compared
    # with backward, both without the custom ops' contribution
    report = check_function(
        _WrongJvpBesideADifferentiatedCustomOp(), _x(3, 4), checks=["forward_ad"]
    )
    result = report["forward_ad"]
    assert result.status == "fail", report
    assert "disagrees with backward gradient" in result.message, result.message
    assert "without the custom ops' contribution" in result.message
