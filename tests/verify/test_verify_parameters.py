"""check_function on an nn.Module: its parameters are differentiated as inputs, so a custom
Function inside it with a wrong weight gradient fails (before, only the inputs' gradients
were checked and such a module was reported OK)."""

import functools

import pytest
import torch

from torchbp.verify import check_function


class _ScaledProduct(torch.autograd.Function):
    """``(x * w).sum(1)``, with the weight's gradient halved when ``wrong``."""

    @staticmethod
    def forward(ctx, x, w, wrong):
        ctx.save_for_backward(x, w)
        ctx.wrong = wrong
        return (x * w).sum(1)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.unsqueeze(1)
        return g * w, g * x * (0.5 if ctx.wrong else 1.0), None


class _Product(torch.nn.Module):
    def __init__(self, wrong: bool) -> None:
        super().__init__()
        self.wrong = wrong
        self.w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, x):
        return _ScaledProduct.apply(x, self.w, self.wrong)


def test_a_wrong_parameter_gradient_fails_naming_the_parameter():
    module = _Product(wrong=True)
    report = check_function(module, torch.randn(3, 4), checks=["gradcheck"])
    assert not report.ok
    assert "parameter 'w' (input 1)" in report["gradcheck"].message
    assert report.meta["parameters"] == ["w"]
    module.w.requires_grad_(False)  # a frozen parameter is not differentiated
    frozen = check_function(module, torch.randn(3, 4), checks=["gradcheck"])
    assert frozen.ok, frozen
    assert "parameters" not in frozen.meta


def test_the_reference_follows_the_parameters_it_reads():
    module = _Product(wrong=True)
    report = check_function(
        module,
        torch.randn(3, 4),
        reference=lambda x: (x * module.w).sum(1),
        checks=["reference", "extreme_values"],
    )
    assert report["reference"].status == "fail"
    assert "gradient of parameter 'w'" in report["reference"].message


def test_a_reference_that_does_not_read_the_parameters_compares_the_inputs_only():
    module = _Product(wrong=False)
    weight = module.w.detach().clone()  # the reference's own copy: no gradient for module.w
    report = check_function(
        module,
        torch.randn(3, 4),
        reference=lambda x: (x * weight).sum(1),
        checks=["gradcheck", "reference", "extreme_values"],
    )
    assert report.ok, report
    assert report.meta["parameters"] == ["w"]


class _LargeProduct(_Product):
    def __init__(self, wrong: bool) -> None:
        super().__init__(wrong)
        weight = torch.randn(80, 64, generator=torch.Generator().manual_seed(1))
        self.w = torch.nn.Parameter(weight.double())


def test_a_large_module_is_checked_by_random_projections_and_still_flagged():
    # 5120 parameter elements: a full numerical Jacobian would take minutes. gradcheck's
    # fast mode compares v^T J u for one u per input and one v per output, positive
    # (uniform) vectors; with a positive x the weight's block v^T (g * x) u is positive
    # too, so the halved weight gradient is off by half of it whatever u and v are drawn:
    # the test cannot pass by a lucky projection (with a signed x, v^T J u can be ~0)
    x = torch.rand(80, 64, generator=torch.Generator().manual_seed(0)) + 0.5
    report = check_function(_LargeProduct(wrong=True), x, checks=["gradcheck"])
    assert report.meta["fast_mode"] is True
    assert report["gradcheck"].status == "fail", report
    assert "parameter 'w'" in report["gradcheck"].message
    chosen = check_function(_LargeProduct(wrong=False), x, checks=["mutation"], fast_mode=False)
    assert chosen.meta["fast_mode"] is False


class _ScaledModule(torch.nn.Module):
    def __init__(self, wrong: bool) -> None:
        super().__init__()
        self.inner = _Product(wrong)

    def forward(self, x, *, scale):
        return self.inner(x) * scale


def test_a_module_given_through_functools_partial_has_its_parameters_checked():
    # functools.partial is how a keyword argument of a module's forward is bound; before,
    # the module was not seen through it and a wrong weight gradient was reported OK
    report = check_function(
        functools.partial(_ScaledModule(wrong=True), scale=2.0),
        torch.randn(3, 4),
        checks=["gradcheck"],
    )
    assert report.meta["parameters"] == ["inner.w"]
    assert "parameter 'inner.w' (input 1)" in report["gradcheck"].message, report


def test_a_partial_of_a_module_of_another_dtype_is_refused_before_the_checks():
    module = _ScaledModule(wrong=False).float()
    with pytest.raises(ValueError, match="fn is an nn.Module with torch.float32 parameters"):
        check_function(functools.partial(module, scale=2.0), torch.randn(3, 4))


class _TorchProduct(torch.nn.Module):
    """The reference of :class:`_Product`: a module of its own with a parameter ``w``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, x):
        return (x * self.w).sum(1)


def test_a_reference_module_given_as_a_bound_method_runs_with_the_same_parameters():
    # as a reference module does: before, its bound method ran with its own weight (other
    # values) and the correct module failed the reference check
    reference = _TorchProduct()
    for given in (reference.forward, functools.partial(reference)):
        report = check_function(
            _Product(wrong=False), torch.randn(3, 4), reference=given, checks=["reference"]
        )
        assert report.ok, report


def test_a_lazy_module_not_yet_initialized_is_refused_saying_how_to_initialize_it():
    # before: torch's ValueError from UninitializedParameter.numel, for fn and dtype=None
    for fn, reference in (
        (torch.nn.LazyLinear(3), None),
        (torch.nn.Linear(4, 3), torch.nn.LazyLinear(3)),
    ):
        with pytest.raises(ValueError, match="uninitialized parameters.*call it once"):
            check_function(fn, torch.randn(2, 4), reference=reference, dtype=None)


class _ComplexScale(torch.nn.Module):
    """``z * w``: a complex input scaled by a real parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, z):
        return z * self.w


def test_a_reference_module_runs_with_the_same_parameters_for_complex_inputs_too():
    # before: the reference module, wrapped to take the complex inputs' real views, was
    # not seen as a module and ran with its own parameter (other values): a correct fn
    # failed the reference check
    z = torch.randn(3, dtype=torch.complex128)
    report = check_function(_ComplexScale(), z, reference=_ComplexScale(), checks=["reference"])
    assert report.ok, report


def test_a_report_on_a_partial_is_named_after_what_it_calls():
    # before: 'partial', the type of every functools.partial
    for fn, name in (
        (functools.partial(_ScaledModule(wrong=False), scale=2.0), "_ScaledModule"),
        (functools.partial(torch.nn.functional.softmax, dim=-1), "softmax"),
    ):
        assert check_function(fn, torch.randn(3, 4), checks=["forward"]).name == name


class _Lookup(torch.autograd.Function):
    """``weight[indices]``, with the weight's gradient doubled when ``wrong``."""

    @staticmethod
    def forward(ctx, indices, weight, wrong):
        ctx.save_for_backward(indices)
        ctx.num_rows, ctx.wrong = weight.shape[0], wrong
        return weight[indices]

    @staticmethod
    def backward(ctx, g):
        (indices,) = ctx.saved_tensors
        grad = g.new_zeros(ctx.num_rows, g.shape[-1]).index_add(0, indices, g)
        return None, grad * (2 if ctx.wrong else 1), None


class _Embedding(torch.nn.Embedding):
    def __init__(self, wrong: bool):
        super().__init__(6, 3, dtype=torch.float64)
        self.wrong = wrong

    def forward(self, indices):
        return _Lookup.apply(indices, self.weight, self.wrong)


@pytest.mark.parametrize("wrong", [False, True])
def test_a_module_given_only_integer_inputs_has_its_parameters_checked(wrong):
    # an embedding takes only indices: its weight is what gets differentiated, and
    # check_function refused it ('no floating-point tensor input to differentiate')
    report = check_function(_Embedding(wrong), torch.tensor([0, 2, 2, 5]), checks="gradcheck")
    assert report["gradcheck"].failed == wrong, report
    assert report.meta["parameters"] == ["weight"]
