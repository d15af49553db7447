"""Activations: parity with native, gradcheck / gradgradcheck, kinks, NaN/inf, in-place."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from tests._support import (
    ACTIVATIONS,
    DEVICES,
    TOL,
    Variant,
    grads,
    make,
    takes_inplace,
)
from torch.autograd import gradcheck, gradgradcheck

import torchbp.functional as TF
from torchbp.autograd import ELUFunction, LeakyReLUFunction, ReLUFunction
from torchbp.ops import activations

# Every activation with each of its registry variants, and LeakyReLU's slope 0 too (its
# negative side flat: the output alone no longer tells the branch apart from a zero input).
CASES = ACTIVATIONS
# The activations with an in-place form, called with their defaults.
INPLACE = [Variant(op, dict(op.variants[0])) for op in activations() if takes_inplace(op)]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (0, 4)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def away_from_kink(x: torch.Tensor, kink: float | None) -> torch.Tensor:
    # |x - kink| >= 0.1: finite differences with eps 1e-6 never straddle the kink.
    if kink is None:
        return x
    return x + 0.1 * torch.where(x >= kink, 1.0, -1.0).to(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_parity_with_native(case, shape, dtype, device):
    ours, native = case.ours, case.native
    x = make(shape, dtype, device, scale=3.0)
    out, (gx,) = grads(ours, x)
    ref, (rx,) = grads(native, x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(gx, rx, **TOL[dtype])


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded_grad", "transposed_grad"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_non_contiguous(case, layout):
    ours, native = case.ours, case.native
    base = make((6, 8), torch.float64, scale=2.0)
    x = {"transposed": base.t(), "sliced": base[:, ::2]}.get(layout, base)
    assert layout.endswith("grad") or not x.is_contiguous()
    if layout == "expanded_grad":
        g = torch.ones(()).to(torch.float64).expand(x.shape)
    elif layout == "transposed_grad":
        g = make(x.shape[::-1], torch.float64, seed=5).t()
    else:
        g = None
    out, (gx,) = grads(ours, x, grad_output=g)
    ref, (rx,) = grads(native, x, grad_output=g)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(gx, rx, **TOL[torch.float64])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck_and_gradgradcheck(case):
    ours = case.ours
    x = away_from_kink(make((3, 4), torch.float64), case.op.kink).requires_grad_()
    flags = dict(check_undefined_grad=True, check_batched_grad=True)
    assert gradcheck(ours, (x,), check_forward_ad=True, check_batched_forward_grad=True, **flags)
    assert gradgradcheck(ours, (x,), check_fwd_over_rev=True, **flags)


@pytest.mark.parametrize("case", [c for c in CASES if c.op.kink is not None], ids=str)
def test_gradient_at_kink_equals_native(case):
    ours, native = case.ours, case.native
    x = torch.tensor([-1.0, -0.0, 0.0, 1e-30, 1.0], dtype=torch.float64)
    if case.op.kink:  # the same steps around a kink away from 0
        x = x + case.op.kink
    _, (gx,) = grads(ours, x, grad_output=torch.full((5,), 3.0, dtype=torch.float64))
    _, (rx,) = grads(native, x, grad_output=torch.full((5,), 3.0, dtype=torch.float64))
    assert torch.equal(gx, rx)


def _second_derivative(fn, x):
    """``d/dx Σ (dL/dx)`` where ``dL/dx`` is the first-order gradient of ``Σ fn(x)``
    computed with ``create_graph=True`` and a cotangent that does not require grad."""
    x = x.detach().clone().requires_grad_()
    (gx,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    return gx.detach(), ggx


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradient_is_differentiable_as_natives(case):
    # ReLU's second derivative is 0 in native (not "does not require grad"); at a kink it
    # is native's value too (ELU's counts 0 as the positive side there).
    x = torch.tensor([-1.5, -0.0, 0.0, 0.7, 2.0], dtype=torch.float64)
    if case.op.kink:
        x = x + case.op.kink
    ours, native = _second_derivative(case.ours, x), _second_derivative(case.native, x)
    torch.testing.assert_close(ours, native)


@pytest.mark.parametrize("beta, threshold", [(2.0, 1.0), (0.5, 2.0), (-1.0, 3.0)])
def test_softplus_second_derivative_at_its_threshold_is_natives(beta, threshold):
    # Softplus switches to the identity where βx > threshold; at βx == threshold its
    # first derivative is still σ(βx) (as native), but native's second derivative counts
    # the point as linear (βx < threshold): 0. torchbp differentiated its formula there
    # (β σ'(βx), 0.056 at β = 2, threshold = 1).
    x = torch.tensor([threshold / beta - 0.25, threshold / beta], dtype=torch.float64)
    options = dict(beta=beta, threshold=threshold)
    ours = _second_derivative(lambda z: TF.softplus(z, **options), x)
    native = _second_derivative(lambda z: torch.nn.functional.softplus(z, **options), x)
    torch.testing.assert_close(ours, native)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_nan_and_inf_propagate_as_native(case):
    ours, native = case.ours, case.native
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, -2.0])
    out, (gx,) = grads(ours, x, grad_output=torch.ones(5))
    ref, (rx,) = grads(native, x, grad_output=torch.ones(5))
    torch.testing.assert_close(out, ref, equal_nan=True)
    torch.testing.assert_close(gx, rx, equal_nan=True)


def test_sigmoid_saturates_without_overflow():
    x = torch.tensor([-1000.0, 1000.0, -80.0, 80.0], requires_grad=True)
    y = TF.sigmoid(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert y[0] == 0 and y[1] == 1 and torch.all(x.grad[:2] == 0)


def test_tanh_derivative_is_one_minus_tanh_squared():
    x = make((50,), torch.float64).requires_grad_()
    TF.tanh(x).sum().backward()
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def test_leaky_relu_definition():
    # f(x) = x for x >= 0, α x otherwise.
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    torch.testing.assert_close(TF.leaky_relu(x, 0.1), torch.tensor([-0.2, -0.05, 0.0, 0.5, 2.0]))


@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_inplace_matches_native_under_autograd(case):
    x0 = make((4, 5), torch.float64)
    results = []
    for fn in (case.ours, case.native):
        leaf = x0.clone().requires_grad_()
        h = leaf * 2  # a non-leaf, as in a real network
        out = fn(h, inplace=True)
        assert out is h  # the result lives in the input's storage
        (out * out).sum().backward()
        results.append((out.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_inplace_on_leaf_requiring_grad_raises_like_native(case):
    x = make((3,), torch.float32).requires_grad_()
    for fn in (case.ours, case.native):
        with pytest.raises(RuntimeError, match="leaf Variable"):
            fn(x, inplace=True)


@pytest.mark.parametrize("view", [False, True])
@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_refused_inplace_on_a_leaf_leaves_its_values_intact(case, view):
    # native refuses before writing; torchbp's Function wrote over the leaf (a Parameter,
    # say) and only then raised, so a caller catching the error had lost its values
    leaf = make((3, 4), torch.float32).requires_grad_()
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad is being used"):
        case.ours(leaf[1:] if view else leaf, inplace=True)
    assert torch.equal(leaf.detach(), before)


def _made_under_no_grad(h: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return h[1:]


# views of a non-leaf (h = leaf * 2): autograd lets an in-place op modify the first ones,
# and refuses the others (one of several views made by one op; one made under no_grad)
VIEWS_OF_A_NONLEAF = {
    "slice": (lambda h: h[1:], True),
    "transposed": (lambda h: h.t(), True),
    "view": (lambda h: h.view(-1), True),
    "unbind": (lambda h: h.unbind(0)[1], False),
    "split": (lambda h: h.split(2)[0], False),
    "no_grad": (_made_under_no_grad, False),
}


@pytest.mark.parametrize("view", VIEWS_OF_A_NONLEAF)
@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_inplace_on_a_view_is_natives_and_a_refused_one_keeps_its_values(case, view):
    # relu / leaky_relu / elu wrote into a view that autograd refuses (an unbind or split
    # output, a view made under no_grad) and only then raised, so a caller catching the
    # error had lost the values (no_grad views were also called 'a leaf Variable'); now
    # they are refused before anything is written, with native's message
    as_view, allowed = VIEWS_OF_A_NONLEAF[view]
    x0 = make((4, 5), torch.float64)
    results = []
    for fn in (case.ours, case.native):
        leaf = x0.clone().requires_grad_()
        h = leaf * 2
        v = as_view(h)
        before = h.detach().clone()
        if not allowed:
            with pytest.raises(RuntimeError) as refused:
                fn(v, inplace=True)
            assert torch.equal(h.detach(), before)
            results.append(str(refused.value))
            continue
        out = fn(v, inplace=True)
        assert out is v
        (h * h).sum().backward()
        results.append((h.detach(), leaf.grad))
    if allowed:
        torch.testing.assert_close(results[0], results[1])
    else:
        assert results[0].endswith(results[1]) or results[1] in results[0]


@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_compiled_inplace_on_a_view_gives_natives_gradient(case):
    # on a view the activation runs out of place and is copied in; while compiling it keeps
    # its input, which the copy overwrote without a version check: ELU's backward read
    # alpha e^y for alpha e^x, silently
    x0 = make((3, 4), torch.float64, scale=2.0)
    weights = make((3, 4), torch.float64, seed=5)

    def loss(fn, x):
        h = x * 2
        fn(h[1:], inplace=True)
        return (h * h * weights).sum()

    torch.compiler.reset()
    grads = []
    for fn, run in ((case.ours, torch.compile(loss, backend="aot_eager")), (case.native, loss)):
        x = x0.clone().requires_grad_()
        run(fn, x).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_compiled_inplace_then_modified_in_place_gets_the_true_gradient(case):
    # act(h, inplace=True); h += skip under torch.compile: the in-place Function kept its
    # output, which the compiled graph let ``h += skip`` overwrite without autograd's
    # version check, so backward read the mask / slope of h + skip, silently (native
    # refuses at compile); the gradient is that of the same math written out of place
    x0, skip = make((3, 4), torch.float64, scale=2.0), make((3, 4), torch.float64, seed=3)

    def loss(x):
        h = x * 2
        case.ours(h, inplace=True)
        h += skip
        return (h * h).sum()

    torch.compiler.reset()
    x = x0.clone().requires_grad_()
    torch.compile(loss, backend="aot_eager", fullgraph=True)(x).backward()
    want = x0.clone().requires_grad_()
    ((case.native(want * 2) + skip) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, want.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_compiled_grad_of_an_inplace_activation_is_natives(case):
    # torch.compile(torch.func.grad(f)) with an in-place activation of an intermediate
    # crashed in Dynamo (InternalTorchDynamoError: "Cannot access storage of TensorWrapper",
    # asking whether the tensor was torch.func-wrapped), where the out-of-place one compiles
    x0, skip = make((3, 4), torch.float64, scale=2.0), make((3, 4), torch.float64, seed=3)

    def loss(act, inplace):
        def fn(x):
            h = x * 2
            h = act(h, inplace=True) if inplace else act(h)
            return ((h + skip) ** 2).sum()

        return fn

    torch.compiler.reset()
    got = torch.compile(torch.func.grad(loss(case.ours, True)), backend="aot_eager")(x0)
    want = torch.func.grad(loss(case.native, False))(x0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def _inplace_loss(fn):
    """``x -> sum((2x)²)`` after ``fn(2x, inplace=True)``: an in-place activation inside a
    function that torch.func differentiates."""

    def loss(x):
        h = x * 2
        fn(h, inplace=True)
        return (h * h).sum()

    return loss


@pytest.mark.parametrize(
    "transform",
    [
        torch.func.grad,
        lambda f: torch.func.vmap(torch.func.grad(f)),
        lambda f: torch.func.jacrev(torch.func.grad(f)),
    ],
    ids=["grad", "vmap(grad)", "jacrev(grad)"],
)
@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_inplace_under_torch_func_gives_natives_gradient(case, transform):
    # relu / leaky_relu / elu (inplace=True) crashed under torch.func ('An input that has
    # been returned as-is as output is being saved for backward'), where native runs
    x = make((2, 4, 3), torch.float64)
    ours = transform(_inplace_loss(case.ours))(x)
    native = transform(_inplace_loss(case.native))(x)
    torch.testing.assert_close(ours, native)


@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_inplace_forward_mode_tangent_is_natives(case):
    # A dual non-leaf (not a view: the Function itself writes in place and marks it
    # dirty) must get its tangent updated in place too, to native's tangent and values.
    x0 = make((3, 4), torch.float64)
    t0 = make((3, 4), torch.float64, seed=7)
    results = []
    for fn in (case.ours, case.native):
        leaf = x0.clone().requires_grad_()
        with fwAD.dual_level():
            h = fwAD.make_dual(leaf * 1, t0) * 2  # a dual non-view that requires grad
            out = fn(h, inplace=True)
            assert out is h
            primal, tangent = fwAD.unpack_dual(h)
            results.append((primal.detach().clone(), tangent.detach().clone()))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_inplace_under_no_grad_returns_the_input_itself_as_native(case):
    # e.g. clamping a Parameter in place: native returns that Parameter; torchbp's Function
    # returned a detached alias (another object, a plain Tensor not requiring grad)
    ours, native = (torch.nn.Parameter(make((3, 4), torch.float32)) for _ in range(2))
    with torch.no_grad():
        got, want = case.ours(ours, inplace=True), case.native(native, inplace=True)
    assert want is native and got is ours
    assert torch.equal(ours.detach(), native.detach())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_no_input_or_grad_output_overwritten(case):
    ours = case.ours
    x = make((4, 6), torch.float32, scale=2.0).requires_grad_()
    g = make((4, 6), torch.float32, seed=3)
    x_before, g_before = x.detach().clone(), g.clone()
    ours(x).backward(g)
    assert torch.equal(x.detach(), x_before) and torch.equal(g, g_before)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_retain_graph_second_backward(case):
    ours = case.ours
    x = make((5,), torch.float64).requires_grad_()
    y = ours(x).sum()
    (g1,) = torch.autograd.grad(y, x, retain_graph=True)
    (g2,) = torch.autograd.grad(y, x)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_inplace_without_autograd_gives_natives_exact_values(case, dtype):
    # no tensor requiring grad: the in-place result is native's to the bit, as with autograd
    # (SiLU computed x·σ(x) there, rounded twice, instead of native's silu kernel)
    x = make((64, 33), dtype, scale=4.0)
    ours, native = x.clone(), x.clone()
    case.ours(ours, inplace=True)
    case.native(native, inplace=True)
    assert torch.equal(ours, native)
    assert torch.equal(case.ours(x), native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_relu_passes_zero_where_an_infinite_gradient_meets_an_inactive_unit(dtype):
    # sqrt(relu(x)): d sqrt/dy = inf at y = 0, where native's ReLU backward selects 0 (a
    # finite gradient); torchbp's first-order kernel multiplied by a 0/1 mask: 0 · inf = NaN
    x0 = torch.tensor([-1.0, 0.5, 2.0, -3.0, 0.0], dtype=dtype)
    results = []
    for fn in (TF.relu, torch.nn.functional.relu):
        x = x0.clone().requires_grad_()
        fn(x).sqrt().sum().backward()
        results.append(x.grad)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "silu"])
def test_complex_input_gradient_is_natives(name):
    """Native differentiates sigmoid and tanh of complex input (grad = g · conj(f'(z))); the
    backward formula g · f'(z) silently gave another gradient, without the conjugate (silu's
    too, which gradcheck now passes; native's refuses complex output)."""
    z = torch.complex(make((4, 3), torch.float64, seed=3), make((4, 3), torch.float64, seed=13))
    z.requires_grad_()
    native = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}.get(name)
    ours = getattr(TF, name)
    if name != "silu":  # native's silu refuses to differentiate complex output
        (want,) = torch.autograd.grad(native(z).abs().sum(), z)
        (got,) = torch.autograd.grad(ours(z).abs().sum(), z)
        torch.testing.assert_close(got, want)
    assert gradcheck(ours, (z,))
    assert gradgradcheck(ours, (z,))


@pytest.mark.parametrize(
    "function, slope, native",
    [
        (LeakyReLUFunction, -0.2, torch.nn.functional.leaky_relu_),
        (ELUFunction, -0.5, torch.nn.functional.elu_),
    ],
    ids=["leaky_relu", "elu"],
)
def test_function_in_place_with_a_negative_slope_fails_at_backward_as_native(
    function, slope, native
):
    # The in-place form keeps its output, whose sign no longer tells the branch for a
    # negative slope: the Function applied directly (torchbp.functional refuses it at the
    # call) returned a gradient of 1 at x = -1 (slope -0.2 there) without an error.
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    for apply in (lambda h: function.apply(h, slope, True), lambda h: native(h, slope)):
        y = apply(x * 1)
        with pytest.raises(RuntimeError, match="In-place .* negative slope"):
            y.sum().backward()
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach() * 1, torch.ones(2))
        with pytest.raises(RuntimeError, match="In-place .* negative slope"):
            function.apply(dual, slope, True)


@pytest.mark.parametrize("case", INPLACE, ids=str)
def test_inplace_second_derivative_is_natives(case):
    # the in-place forms differentiate their saved output (ELU: y' = y + alpha), the kink
    # x = 0 included
    x0 = torch.tensor([-1.5, -0.3, 0.0, 0.7, 2.0], dtype=torch.float64)

    def loss(fn):
        def f(x):
            h = x * 1.5
            fn(h, inplace=True)
            return (h**3).sum()

        return f

    ours = torch.autograd.functional.hessian(loss(case.ours), x0)
    native = torch.autograd.functional.hessian(loss(case.native), x0)
    torch.testing.assert_close(ours, native, rtol=1e-12, atol=1e-14)


# The in-place Functions applied directly, with their native in-place twins.
FUNCTIONS_IN_PLACE = {
    "relu": (lambda x: ReLUFunction.apply(x, True), torch.relu_),
    "leaky_relu": (
        lambda x: LeakyReLUFunction.apply(x, 0.2, inplace=True),
        lambda x: torch.nn.functional.leaky_relu_(x, 0.2),
    ),
    "elu": (
        lambda x: ELUFunction.apply(x, 1.0, True),
        lambda x: torch.nn.functional.elu_(x, 1.0),
    ),
}


def _leaf():
    return torch.tensor([[-1.0, 2.0], [0.5, -3.0]], requires_grad=True)


def _made_in_inference_mode():
    with torch.inference_mode():
        return torch.tensor([[-1.0, 2.0], [0.5, -3.0]])


def _view_made_under_no_grad_of_a_leaf():
    leaf = _leaf()
    with torch.no_grad():
        return leaf[1:]


# what autograd (or inference mode) refuses to let an in-place op write
UNWRITABLE = {
    "leaf": lambda: _leaf(),
    "view_of_a_leaf": lambda: _leaf()[1:],
    "view_of_a_view_of_a_leaf": lambda: _leaf()[1:][:, 1:],
    "inference_tensor": _made_in_inference_mode,
    "view_made_under_no_grad": _view_made_under_no_grad_of_a_leaf,
}


def _storage_values(x: torch.Tensor) -> torch.Tensor:
    """A copy of everything ``x``'s storage holds: the whole base of a view."""
    whole = x if x._base is None else x._base
    return whole.detach().clone()


def _refusal(write, x: torch.Tensor) -> RuntimeError:
    with pytest.raises(RuntimeError) as refused:
        write(x)
    return refused.value


@pytest.mark.parametrize("target", UNWRITABLE)
@pytest.mark.parametrize("name", FUNCTIONS_IN_PLACE)
def test_function_apply_refuses_before_writing_with_natives_error(name, target):
    # Function.apply(x, inplace=True) wrote over a leaf that requires grad (or a view of
    # one, or an inference tensor) and only then did autograd raise ('... has been used in
    # an in-place operation'), where native raises first and leaves x alone (inference
    # tensors: native writes, then raises; torchbp refuses first)
    ours, native = FUNCTIONS_IN_PLACE[name]
    x = UNWRITABLE[target]()
    before = _storage_values(x)
    refused = _refusal(ours, x)
    assert torch.equal(_storage_values(x), before)
    natives = _refusal(native, UNWRITABLE[target]())
    assert type(refused) is type(natives)
    if target == "view_made_under_no_grad":
        # native names no_grad or inference mode: no public attribute tells them apart
        assert str(refused).startswith("A view was created in no_grad mode")
        assert str(natives).startswith("A view was created in no_grad mode")
    else:
        assert str(refused) == str(natives)


def test_function_apply_refuses_a_view_made_in_inference_mode():
    base = _leaf() * 1
    with torch.inference_mode():
        view = base[1:]
    before = base.detach().clone()
    with pytest.raises(RuntimeError, match="inference mode"):
        ReLUFunction.apply(view, True)
    assert torch.equal(base.detach(), before)


def _under_no_grad(write, x):
    with torch.no_grad():
        return write(x)


def _under_inference_mode(write, x):
    with torch.inference_mode():
        return write(x)


def _on_an_input_of_torch_func_grad(write, x):
    def loss(x):
        write(x)
        return x.sum()

    return torch.func.grad(loss)(x.detach())


@pytest.mark.parametrize(
    "call",
    [_under_no_grad, _under_inference_mode, _on_an_input_of_torch_func_grad],
    ids=["no_grad", "inference_mode", "torch.func.grad_input"],
)
@pytest.mark.parametrize("name", FUNCTIONS_IN_PLACE)
def test_function_apply_writes_a_leaf_where_native_does(name, call):
    # unrecorded, native writes a leaf that requires grad in place (clamping a Parameter);
    # under torch.func.grad the input is a leaf that requires grad, refused as native
    ours, native = FUNCTIONS_IN_PLACE[name]
    results = []
    for write in (ours, native):
        x = _leaf()
        try:
            out = call(write, x)
        except RuntimeError as error:
            results.append(str(error))
            continue
        assert out is x or call is _on_an_input_of_torch_func_grad
        results.append(x.detach())
    if isinstance(results[1], str):
        assert results[0] == results[1]
    else:
        assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("name", FUNCTIONS_IN_PLACE)
def test_function_apply_in_place_under_torch_compile_is_natives(name):
    # Dynamo breaks the graph at a Function with jvp and then traces its apply: tracing
    # the check's super().apply crashed it (InternalTorchDynamoError)
    ours, native = FUNCTIONS_IN_PLACE[name]
    x0 = torch.tensor([-1.5, -0.2, 0.3, 2.0])
    results = []
    for write in (ours, native):

        def loss(x, write=write):
            h = x * 2
            write(h)
            return (h * h).sum()

        x = x0.clone().requires_grad_()
        torch.compile(loss, backend="eager")(x).backward()
        results.append(x.grad)
    torch.testing.assert_close(results[0], results[1])


class _ScaledReLU(ReLUFunction):
    """A user's subclass whose forward takes one argument more: ``y = s · max(x, 0)``."""

    @staticmethod
    def forward(x, inplace, scale):
        return ReLUFunction.forward(x, inplace).mul_(scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, inplace, ctx.scale = inputs
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(output)

    # dy/dx = s · [y > 0]
    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        return grad_output * (y > 0) * ctx.scale, None, None


def test_subclass_with_another_forward_signature_applies_and_is_checked():
    # apply's override had ReLUFunction's signature (x, inplace): a subclass adding an
    # argument to forward raised TypeError ('takes 3 positional arguments but 4 were given')
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    _ScaledReLU.apply(x * 1, False, 3.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 3.0]))
    _ScaledReLU.apply(x * 1, scale=2.0, inplace=True).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 5.0]))
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        _ScaledReLU.apply(x, scale=3.0, inplace=True)
    torch.testing.assert_close(x.detach(), torch.tensor([-1.0, 2.0]))
