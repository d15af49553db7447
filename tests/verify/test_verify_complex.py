"""Complex Functions (``checks/complex_views.py``): a backward right in PyTorch's
convention (the conjugate Wirtinger derivative) passes, one that forgets a ``conj`` fails,
for complex inputs, outputs or both."""

from __future__ import annotations

import pytest
import torch

from torchbp.verify import check_function


class ComplexMul(torch.autograd.Function):
    """``a * b`` of complex tensors; ``conj`` False plants the classic bug of a backward
    written as for real numbers (``g * b`` instead of ``g * conj(b)``)."""

    conj = True

    @staticmethod
    def forward(a, b):
        return a * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        if ComplexMul.conj:
            a, b = a.conj(), b.conj()
        return g * b, g * a


class Polar(torch.autograd.Function):
    """``r e^{i t}`` from real ``r`` and ``t``: real inputs, a complex output."""

    conj = True

    @staticmethod
    def forward(ctx, r, t):
        ctx.save_for_backward(r, t)
        return torch.polar(r, t)

    @staticmethod
    def backward(ctx, g):
        r, t = ctx.saved_tensors
        phase = torch.polar(torch.ones_like(r), t)
        g = g.conj() if Polar.conj else g
        return (g * phase).real, (g * 1j * r * phase).real


class SquaredModulus(torch.autograd.Function):
    """``|z|²``, real, of a complex ``z``: gradient ``2 z`` in PyTorch's convention."""

    conj = True

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return (z * z.conj()).real

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return 2 * g * (z if SquaredModulus.conj else z.conj() * 1j)


def _complex(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.complex128)


def _positive(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5


CASES = {
    "complex in and out": (ComplexMul, lambda: (_complex(3, seed=0), _complex(3, seed=1))),
    "real in, complex out": (Polar, lambda: (_positive(3, seed=0), _positive(3, seed=1))),
    "complex in, real out": (SquaredModulus, lambda: (_complex(2, 3, seed=2),)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_correct_complex_function_passes_and_a_missing_conj_fails(case, monkeypatch):
    # before, complex inputs were refused ('only real tensors work') and a complex output
    # failed forward ('fn returned no floating-point tensor (got Tensor)')
    function, inputs = CASES[case]
    report = check_function(function, *inputs(), skip="compile")
    assert report.ok, report
    monkeypatch.setattr(function, "conj", False)
    buggy = check_function(function, *inputs(), checks="gradcheck")
    assert buggy["gradcheck"].failed, buggy


def test_complex_inputs_are_described_as_complex_and_left_intact():
    a, b = _complex(3, seed=0), _complex(3, seed=1)
    before = a.clone()
    report = check_function(ComplexMul, a.to(torch.complex64), b, reference=torch.mul)
    assert report.ok, report
    assert report.meta["inputs"][0] == {"shape": [3], "dtype": "complex128", "contiguous": True}
    assert report.meta["complex_inputs"] == [0, 1]
    assert torch.equal(a, before)


class _ComplexTriple(torch.autograd.Function):
    """3 z for a complex z, whose jvp flattens the tangent with the subclass's ``flat``."""

    @staticmethod
    def flat(t):
        return t.reshape(-1)

    @staticmethod
    def forward(z):
        return (z.reshape(-1) * 3).reshape(z.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        # d(3z)/dz = 3, real: the gradient is 3 g
        return 3 * g

    @classmethod
    def jvp(cls, ctx, t):
        return (cls.flat(t) * 3).reshape(t.shape)


class _ComplexTripleJvpByView(_ComplexTriple):
    @staticmethod
    def flat(t):
        return t.view(-1)


class _ComplexTripleByView(_ComplexTriple):
    @staticmethod
    def forward(z):
        return (z.view(-1) * 3).view(z.shape)


def _complex_input() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, generator=g, dtype=torch.complex128)


def test_a_complex_fn_assuming_contiguous_inputs_or_tangents_fails_naming_the_layout():
    # before: complex inputs reached fn contiguous whatever layout the checks chose (their
    # real views were made contiguous to become complex again), so both passed
    report = check_function(_ComplexTripleByView, _complex_input(), checks=["grad_output_safety"])
    assert report["grad_output_safety"].failed, report
    assert "non-contiguous (strided) inputs" in report["grad_output_safety"].message
    report = check_function(_ComplexTripleJvpByView, _complex_input(), checks=["forward_ad"])
    assert report["forward_ad"].failed, report
    assert "non-contiguous (transposed) inputs and tangents" in report["forward_ad"].message


def test_a_complex_fn_using_reshape_passes_for_transposed_inputs_and_tangents():
    report = check_function(
        _ComplexTriple, _complex_input(), checks=["forward_ad", "grad_output_safety"]
    )
    assert report.ok and not report.unsupported, report
