"""The ``forward`` check (``checks/forward.py``): a random fn is named as such, up front."""

from __future__ import annotations

import pytest
import torch
from tests.verify.correct_functions import TextbookTanh
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function


class MaskedDropout(torch.autograd.Function):
    """Inverted dropout drawing its mask with torch's global generator in forward and saving
    it for backward: random, but each call consistent with itself."""

    @staticmethod
    def forward(ctx, x, p):
        mask = (torch.rand_like(x) >= p).to(x.dtype) / (1 - p)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask, None


def _same_draws_dropout(x, p):
    return x * (torch.rand_like(x) >= p).to(x.dtype) / (1 - p)


def test_a_dropout_like_function_passes_and_leaves_the_callers_generator_alone():
    # before, forward failed (two calls drew two masks) with ".eval()" advice; every call
    # of fn and of the reference now starts from the run's seed, so they draw the same mask
    x = seeded(4, 6)
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    report = check_function(MaskedDropout, x, 0.5, reference=_same_draws_dropout)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert report.ok and not report.failures, str(report)
    assert report["gradcheck"].passed and report["reference"].passed, str(report)
    assert report["grad_output_safety"].passed, str(report)  # a transposed x: another mask


def test_dropout_in_training_mode_passes():
    # before, forward failed with ".eval()" advice: a correct model in training mode
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).double()
    report = check_function(model, seeded(2, 4), skip="compile")
    assert report.ok, report


def test_a_fn_keeping_state_between_calls_fails_forward_saying_so():
    calls = []

    def drifting(x):
        calls.append(1)
        return x * len(calls)

    report = check_function(drifting, seeded(2, 4), skip="compile")
    forward = report["forward"]
    assert forward.failed, report
    assert "different outputs on two calls with the same inputs" in forward.message
    assert "keeps state between calls" in forward.message
    assert [r.name for r in report if r.failed] == ["forward"]


class ShuffledSum(torch.autograd.Function):
    """The sum of x in a random order: deterministic up to float rounding."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.reshape(-1)[torch.randperm(x.numel())].sum()

    @staticmethod
    def backward(ctx, g):
        return g.expand(ctx.shape)


def test_fn_deterministic_up_to_rounding_passes_forward():
    report = check_function(ShuffledSum, seeded(64, 3), skip="compile", reference=torch.sum)
    assert report.ok, report


def test_deterministic_fn_passes_forward():
    assert check_function(TextbookTanh, seeded(3, 4), checks="forward").ok


class Float32OnlySquare(torch.autograd.Function):
    """x², refusing any dtype but float32 (a kernel written for float32 only)."""

    @staticmethod
    def forward(ctx, x):
        if x.dtype != torch.float32:
            raise TypeError(f"Float32OnlySquare takes float32, got {x.dtype}")
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_fn_refusing_the_cast_dtype_is_told_how_to_keep_its_own():
    # the caller gave float32; check_function cast it to float64 (its default) without a word
    x = seeded(3, 4).float()
    message = check_function(Float32OnlySquare, x, checks="forward")["forward"].message
    assert "takes float32, got torch.float64" in message
    assert "cast from torch.float32 to torch.float64 by the dtype option" in message
    assert "dtype=None" in message
    assert check_function(Float32OnlySquare, x, dtype=None, skip="compile").ok


def test_fn_raising_on_inputs_not_cast_gets_no_dtype_hint():
    message = check_function(Float32OnlySquare, seeded(3, 4), checks="forward")["forward"].message
    assert "takes float32" in message and "dtype option" not in message


def test_error_that_is_not_about_dtypes_gets_no_dtype_hint():
    def broken(x):
        raise RuntimeError("shapes (3, 4) and (5,) do not match")

    message = check_function(broken, seeded(3, 4).float(), checks="forward")["forward"].message
    assert message.startswith("fn raised RuntimeError: shapes (3, 4) and (5,) do not match")
    assert "dtype" not in message, message


def test_torch_dtype_error_after_the_cast_gets_the_hint():
    weight = seeded(2, 4).float()  # a float32 weight captured by fn, inputs cast to float64
    message = check_function(lambda x: x @ weight.t(), seeded(3, 4).float(), checks="forward")[
        "forward"
    ].message
    assert "dtype=None" in message, message


def test_error_naming_only_the_callers_dtype_gets_the_hint():
    def float32_only(x):
        if x.dtype != torch.float32:
            raise TypeError("float32 only")
        return x * 2

    message = check_function(float32_only, seeded(3, 4).float(), checks="forward")[
        "forward"
    ].message
    assert "float32 only" in message and "dtype=None" in message, message


class DoubleReluToSparse(torch.autograd.Function):
    """``relu(2 x)`` returned as a sparse COO tensor (most entries of an activation map are
    zero); ``factor`` is backward's derivative of ``2 x``: 2 is right, 3 a planted bug."""

    factor = 2

    @staticmethod
    def forward(ctx, x):
        y = (2 * x).relu()
        ctx.save_for_backward(y)
        return y.to_sparse()

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.to_dense() * (y > 0) * DoubleReluToSparse.factor


def _sparse_reference(x):
    return (2 * x).relu().to_sparse()


def test_a_function_with_a_sparse_output_is_checked_through_its_dense_values(monkeypatch):
    # before, forward failed with torch's "Could not run 'aten::eq.Tensor' with arguments
    # from the 'SparseCPU' backend" and nothing was checked
    x = torch.randn(3, 4, dtype=torch.float64)
    report = check_function(DoubleReluToSparse, x, reference=_sparse_reference, skip="compile")
    assert report.ok, report
    assert report["batched_grad"].unsupported, report
    monkeypatch.setattr(DoubleReluToSparse, "factor", 3)
    buggy = check_function(DoubleReluToSparse, x, checks="gradcheck")
    assert buggy["gradcheck"].failed, buggy
    assert "disagrees with numerical gradient" in buggy["gradcheck"].message


def test_complex_input_checked_as_its_real_view_is_not_said_to_be_cast():
    # a complex128 input reaches fn as complex128 (its real view is only how the checks
    # differentiate it); before, a dtype error of fn was blamed on a cast "from
    # torch.complex128 to torch.float64 by the dtype option" that never happened
    w = torch.ones(3, 3, dtype=torch.complex64)
    z = torch.randn(3, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    message = check_function(lambda z: torch.mm(z, w).abs(), z, checks="forward")["forward"]
    assert "same dtype" in message.message and "dtype option" not in message.message, message
    # a complex64 input the dtype option (float64) does cast reaches fn as complex128
    message = check_function(lambda z: torch.mm(z, w).abs(), z.to(torch.complex64))["forward"]
    assert "cast from torch.complex64 to torch.complex128 by the dtype option" in (
        message.message
    ), message


class UnpackingLinear(torch.autograd.Function):
    """A bug: ``n, d = x.shape`` takes a 2-D x only, where ``x @ w.t()`` takes any
    leading dims; a 3-D x raises Python's ValueError of unpacking, not a refusal."""

    @staticmethod
    def forward(ctx, x, w):
        n, d = x.shape
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


def test_a_value_error_of_a_bug_in_the_first_call_names_the_line_and_shows_its_traceback():
    # before: "fn's first call raised ValueError: too many values to unpack (expected 2)"
    # with nothing saying where, and fn's traceback dropped (raise ... from None)
    with pytest.raises(ValueError, match="too many values to unpack") as info:
        check_function(UnpackingLinear, seeded(2, 3, 4), seeded(5, 4))
    message = str(info.value)
    assert "(at test_verify_forward.py:" in message and "in forward: n, d = x.shape)" in message
    assert "either fn has a bug there" in message, message
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and "too many values to unpack" in str(cause)


def test_a_failing_first_call_names_the_line_of_fn_that_raised():
    def broken(x):
        return x @ x  # (3, 4) @ (3, 4): a RuntimeError inside torch, called from this line

    message = check_function(broken, seeded(3, 4), checks="forward")["forward"].message
    assert message.startswith("fn raised RuntimeError"), message
    assert "in broken: return x @ x" in message, message
