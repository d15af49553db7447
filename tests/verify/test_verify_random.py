"""Random fns (``checks/rng.py``): every call starts torch's generators from one seed, so a
correct dropout passes; where a check cannot compare a random fn's runs (another input
layout, another dtype, inductor's own generator) it compares what stays honest and says
what it did not (``caveat``), and a random fn wrong there still fails."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tests.verify.zoo.entry import seeded

from torchbp.verify import check_function

P = 0.5


def _mask(like: torch.Tensor) -> torch.Tensor:
    """An inverted-dropout mask drawn in ``like``'s memory layout (``rand_like``)."""
    return (torch.rand_like(like) >= P).to(like.dtype) / (1 - P)


def _dropout_reference(x):
    return x * _mask(x)


class Dropout(torch.autograd.Function):
    """Correct: draws its mask in forward and saves it; d(x * m)/dx = m."""

    @staticmethod
    def forward(ctx, x):
        mask = _mask(x)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask


class RedrawnDropout(torch.autograd.Function):
    """Correct, memory-saving: saves the generator state and draws the same mask again in
    backward (``torch.rand(shape)`` in both, so in the same order for any layout)."""

    @staticmethod
    def forward(ctx, x):
        ctx.state = torch.get_rng_state()
        return x * (torch.rand(x.shape, dtype=x.dtype) >= P).to(x.dtype) / (1 - P)

    @staticmethod
    def backward(ctx, g):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(ctx.state)
            mask = (torch.rand(g.shape, dtype=g.dtype) >= P).to(g.dtype) / (1 - P)
        return g * mask


class RedrawnInAnotherLayout(torch.autograd.Function):
    """Wrong for a transposed x: forward draws the mask in x's memory order (``rand_like``),
    backward draws it again in the contiguous order: another mask than forward used."""

    @staticmethod
    def forward(ctx, x):
        ctx.state = torch.get_rng_state()
        return x * _mask(x)

    @staticmethod
    def backward(ctx, g):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(ctx.state)
            mask = (torch.rand(g.shape, dtype=g.dtype) >= P).to(g.dtype) / (1 - P)
        return g * mask


class StorageOrderDropout(torch.autograd.Function):
    """Wrong for a non-contiguous x: reads x's storage as if it were contiguous (a kernel
    taking ``data_ptr``), consistently in forward and backward."""

    @staticmethod
    def forward(ctx, x):
        mask = (torch.rand(x.numel(), dtype=x.dtype) >= P).to(x.dtype) / (1 - P)
        ctx.save_for_backward(mask)
        ctx.layout = (x.shape, x.stride())
        return (x.as_strided((x.numel(),), (1,)) * mask).view(x.shape)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        shape, stride = ctx.layout
        grad = torch.empty_strided(shape, stride, dtype=g.dtype)
        grad.as_strided((grad.numel(),), (1,)).copy_(g.reshape(-1) * mask)
        return grad


class WrongWhenCompiled(Dropout):
    """Dropout wrong only when compiled: the traced backward doubles the gradient."""

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask * (2.0 if torch.compiler.is_compiling() else 1.0)


def test_a_correct_dropout_passes_and_says_what_the_layout_check_left_out():
    # before, a transposed input's differing mask made the check pass silently
    report = check_function(Dropout, seeded(4, 5), reference=_dropout_reference, skip="compile")
    assert report.ok, report
    safety = report["grad_output_safety"]
    assert safety.passed and "transposed inputs were not compared" in safety.caveat, safety
    assert "grad_output_safety [pass, not all compared]" in str(report)
    assert str(report).startswith("Dropout: OK (2 unsupported, 1 not all compared)"), report
    assert report.to_dict()["checks"][0]["caveat"] == ""  # forward compared everything


def test_a_mask_drawn_again_in_another_layout_in_backward_fails():
    # before: passed (outputs for a transposed input differ anyway for a random fn)
    report = check_function(RedrawnInAnotherLayout, seeded(4, 5), skip="compile")
    safety = report["grad_output_safety"]
    assert safety.failed, report
    assert "for transposed inputs: backward disagrees with central differences" in safety.message


def test_a_random_fn_reading_storage_as_contiguous_fails():
    # before: passed; rows sliced from wider ones get the mask contiguous inputs get
    report = check_function(StorageOrderDropout, seeded(4, 5), skip="compile")
    safety = report["grad_output_safety"]
    assert safety.failed, report
    assert "rows sliced from wider ones, in the contiguous order" in safety.message
    assert "fn assumes contiguous inputs" in safety.message


def test_a_float32_dropout_passes_reference_dtype_against_the_reference_in_float32():
    # before: failed, the reference in float64 draws another mask than fn in float32
    x = seeded(4, 5).float()
    report = check_function(Dropout, x, reference=_dropout_reference, skip="compile")
    result = report["reference_dtype"]
    assert report.ok and result.passed, report
    assert "reference run in float32 too" in result.caveat, result


def test_a_dropout_drawing_its_mask_again_in_backward_is_batched_grad_unsupported():
    # before: failed with PyTorch's "random operations inside of vmap" error
    report = check_function(RedrawnDropout, seeded(4, 5), reference=_redrawn_reference)
    batched = report["batched_grad"]
    assert report.ok and batched.unsupported, report
    assert "backward draws random numbers" in batched.message


def _redrawn_reference(x):
    return x * (torch.rand(x.shape, dtype=x.dtype) >= P).to(x.dtype) / (1 - P)


def test_a_dropout_under_inductor_checks_the_compiled_fn_against_itself():
    # before: failed, inductor's generated code draws another mask than eager
    report = check_function(Dropout, seeded(4, 5), checks=["compile"], compile_backend="inductor")
    compile_result = report["compile"]
    assert report.ok and compile_result.passed, report
    assert "not compared with eager's" in compile_result.caveat


def test_a_random_fn_wrong_only_when_compiled_fails_under_inductor():
    report = check_function(
        WrongWhenCompiled, seeded(4, 5), checks=["compile"], compile_backend="inductor"
    )
    assert report["compile"].failed, report
    assert "backward disagrees with central differences" in report["compile"].message


def test_numpy_and_python_random_are_named_with_the_fix():
    def numpy_noise(x):
        return x * torch.from_numpy(np.random.rand(*x.shape))

    def python_noise(x):
        return x * random.random()

    for fn, name in ((numpy_noise, "NumPy's global generator"), (python_noise, "Python's random")):
        forward = check_function(fn, seeded(2, 3), skip="compile")["forward"]
        assert forward.failed, forward
        assert f"draws random numbers from {name}" in forward.message
        assert "draw with torch instead" in forward.message


def test_a_random_module_whose_vmap_draws_otherwise_is_compared_with_one_sample_vmaps():
    # before: vmap failed ("differs from a Python loop"): the attention dropout of a
    # batched input draws other numbers under vmap than in plain calls
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(4, 1, 8, dropout=0.2, batch_first=True).double()
    report = check_function(layer, seeded(2, 3, 4), checks=["vmap", "vmap_in_dims"])
    vmap, in_dims = report["vmap"], report["vmap_in_dims"]
    assert vmap.passed and in_dims.passed, report
    assert "compared with vmap over one sample at a time" in vmap.caveat
    assert "compared with vmap over the same samples batched along dim 0" in in_dims.caveat


class _MaskWithVmapRule(torch.autograd.Function):
    """x * mask, its mask saved (as output / x) for backward; subclasses add a vmap rule."""

    @staticmethod
    def forward(x):
        return x * _mask(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output / inputs[0])

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        # d(x mask)/dx = mask
        return g * mask


class SharedMaskIgnoredInVmap(_MaskWithVmapRule):
    """x * mask with a vmap rule that draws one mask per sample although vmap asked for
    randomness='same' (one mask for the batch), as calls one by one draw."""

    @staticmethod
    def vmap(info, in_dims, x):
        x = x.movedim(in_dims[0], 0)
        return x * _mask(x), 0


def test_a_vmap_rule_drawing_per_sample_under_same_randomness_still_fails():
    report = check_function(SharedMaskIgnoredInVmap, seeded(4, 5), checks=["vmap"])
    assert report["vmap"].failed, report
    assert "differs from a Python loop" in report["vmap"].message


def test_a_random_op_on_a_batched_tensor_is_vmap_unsupported():
    # before: failed with PyTorch's "same randomness with a batched tensor input" error
    def bernoulli_mask(x):
        return x * torch.bernoulli(torch.full_like(x, 0.5))

    report = check_function(bernoulli_mask, seeded(3, 4), checks=["vmap"])
    assert report["vmap"].unsupported, report
    assert "randomness='same'" in report["vmap"].message


class IgnoresInDims(_MaskWithVmapRule):
    """x * mask whose vmap rule draws one mask for the batch, as randomness='same' asks,
    but takes the batch dim to be 0 whatever in_dims says."""

    @staticmethod
    def vmap(info, in_dims, x):
        return x * _mask(x[0]), 0


def test_a_random_fn_with_a_vmap_rule_ignoring_in_dims_still_fails():
    report = check_function(IgnoresInDims, seeded(4, 4), checks=["vmap", "vmap_in_dims"])
    assert report["vmap"].passed, report
    assert report["vmap_in_dims"].failed, report


class _SameMaskRule(torch.autograd.Function):
    """x * mask * 2 (half the elements dropped, the rest doubled), with its own vmap rule
    drawing one mask of the unbatched shape for the batch (randomness='same'), as calls one
    by one draw; ``SCALE`` is the factor the rule applies (2 when right)."""

    SCALE = 2.0

    @staticmethod
    def forward(x):
        mask = (torch.rand(x.shape, dtype=x.dtype) > 0.5).to(x.dtype)
        return x * mask * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output / inputs[0])

    @staticmethod
    def backward(ctx, g):
        (scaled_mask,) = ctx.saved_tensors
        # d(2 x mask)/dx = 2 mask
        return g * scaled_mask


class RightSameMaskRule(_SameMaskRule):
    @classmethod
    def vmap(cls, info, in_dims, x):
        x = x.movedim(in_dims[0], 0)
        mask = (torch.rand(x.shape[1:], dtype=x.dtype) > 0.5).to(x.dtype)
        return x * mask * cls.SCALE, 0


class WrongSameMaskRule(RightSameMaskRule):
    SCALE = 6.0


def test_a_random_fns_own_vmap_rule_is_compared_with_calls_one_by_one():
    # before: a wrong rule (6 for 2) passed, compared with vmap over one sample at a time
    # (the same rule) after the comparison with plain calls failed
    assert check_function(RightSameMaskRule, seeded(3, 4), checks=["vmap"])["vmap"].passed
    result = check_function(WrongSameMaskRule, seeded(3, 4), checks=["vmap"])["vmap"]
    assert result.failed, result
    assert "has its own vmap rule, WrongSameMaskRule.vmap" in result.message


class _LinearThenMask(torch.nn.Module):
    """A float64 linear layer, then the random Function ``mask`` (with a vmap rule)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask
        self.linear = torch.nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x):
        return self.mask.apply(self.linear(x))


@pytest.mark.parametrize("wrapped", ["nn.Module", "lambda"])
def test_a_vmap_rule_of_a_function_fn_calls_is_compared_with_calls_one_by_one(wrapped):
    # before: the rule was found only when fn was the Function itself: inside a module or
    # a wrapper, a wrong rule passed, compared with vmap over one sample at a time
    def wrap(mask):
        if wrapped == "lambda":
            return lambda x: mask.apply(x)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return _LinearThenMask(mask)

    right = check_function(wrap(RightSameMaskRule), seeded(3, 4), checks=["vmap"])["vmap"]
    assert right.passed and not right.caveat, right
    result = check_function(wrap(WrongSameMaskRule), seeded(3, 4), checks=["vmap"])["vmap"]
    assert result.failed, result
    assert "calls a Function with its own vmap rule, WrongSameMaskRule.vmap" in result.message


class _GeneratedRuleMask(_SameMaskRule):
    generate_vmap_rule = True


def test_only_a_hand_written_vmap_staticmethod_counts_as_the_functions_own_rule():
    from torchbp.verify.checks.transforms import own_vmap_rule

    assert own_vmap_rule(RightSameMaskRule) == "RightSameMaskRule.vmap"
    assert own_vmap_rule(RightSameMaskRule.apply) == "RightSameMaskRule.vmap"
    assert own_vmap_rule(_GeneratedRuleMask) is None
    assert own_vmap_rule(_GeneratedRuleMask.apply) is None
    assert own_vmap_rule(torch.sin) is None


def _function_named_scale_with_a_vmap_rule():
    """Another module's Function that happens to be named ``_Scale`` too, with its own
    vmap rule (never called by the fn under test)."""

    class _Scale(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

        @staticmethod
        def vmap(info, in_dims, x):
            return x * 2, in_dims[0]

    return _Scale


class _Scale(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        # d(3 x)/dx = 3
        return grad * 3


class _DropoutThenScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.layer = torch.nn.TransformerEncoderLayer(
                4, 1, 8, dropout=0.2, batch_first=True, dtype=torch.float64
            )

    def forward(self, x):
        return _Scale.apply(self.layer(x))


def test_a_vmap_rule_of_another_function_of_the_same_name_is_not_blamed():
    # before: the graph node "_ScaleBackward" was matched by name to the other module's
    # _Scale, so the random module (vmap draws other dropout masks than its calls) failed,
    # blamed on a vmap rule it never calls, instead of being compared one sample at a time
    other = _function_named_scale_with_a_vmap_rule()
    result = check_function(_DropoutThenScale(), seeded(2, 3, 4), checks=["vmap"])["vmap"]
    assert result.passed, result
    assert "compared with vmap over one sample at a time" in result.caveat
    assert other.vmap is not None  # alive during the check


def _rule_less_function_named_wrong_same_mask_rule():
    """Another module's Function named ``WrongSameMaskRule`` too, without a vmap rule."""

    class WrongSameMaskRule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 1

        @staticmethod
        def backward(ctx, grad):
            return grad

    return WrongSameMaskRule


def test_a_wrong_vmap_rule_is_found_though_a_rule_less_function_bears_its_name():
    # before: the graph's Functions were matched to rules by class name, and a name borne
    # by a rule-less Function too was left out, so the wrong rule of the Function the
    # module calls was compared with itself (vmap over one sample at a time) and passed
    namesake = _rule_less_function_named_wrong_same_mask_rule()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = _LinearThenMask(WrongSameMaskRule)
    result = check_function(module, seeded(3, 4), checks=["vmap"])["vmap"]
    assert result.failed, result
    assert "calls a Function with its own vmap rule, WrongSameMaskRule.vmap" in result.message
    assert namesake.vmap is torch.autograd.Function.vmap  # alive, rule-less, during the check
