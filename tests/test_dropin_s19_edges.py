"""Drop-in edges of torchbp.functional against torch.nn.functional.

An unbatched ``(C,)`` input takes a class-index target of shape ``(1,)`` natively (its rule
"For 1D input, 1D target must have size 1"), read as the one index a 0-dim target holds.
Native's forward computes that loss (under ``no_grad`` too: an evaluation loop) and its
backward then fails ("size mismatch"); torchbp's computes the same loss and the gradient
of the 0-dim target's.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import torchbp
import torchbp.functional as BP

_CLASSES = 5

_LOSS_KWARGS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"weight": torch.tensor([1.0, 2.0, 0.5, 3.0, 0.25])},
    {"weight": torch.tensor([1.0, 2.0, 0.5, 3.0, 0.25]), "reduction": "none"},
    {"ignore_index": 2},
]


def _logits() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(_CLASSES, generator=generator, dtype=torch.float64)


def _loss_and_grad(loss_fn, input, *args, **kwargs):
    input = input.detach().requires_grad_()
    loss = loss_fn(input, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), input)
    return loss, grad


def _assert_same_loss_and_grad(ours, native):
    assert ours[0].shape == native[0].shape
    torch.testing.assert_close(ours, native, equal_nan=True)


def _assert_as_native(loss_fn, native_fn, input, target, **kwargs):
    """The loss as native's with the ``(1,)`` target, and with its gradient native's loss
    and gradient with the 0-dim target."""
    ours = _loss_and_grad(loss_fn, input, target, **kwargs)
    with torch.no_grad():
        native = native_fn(input, target, **kwargs)
    assert ours[0].shape == native.shape
    torch.testing.assert_close(ours[0], native, equal_nan=True)
    _assert_same_loss_and_grad(ours, _loss_and_grad(native_fn, input, target[0], **kwargs))


@pytest.mark.parametrize("kwargs", _LOSS_KWARGS)
@pytest.mark.parametrize("index", [0, 2, 4])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8], ids=str)
def test_nll_loss_of_unbatched_input_takes_a_one_element_target(kwargs, index, dtype):
    logp, target = _logits().log_softmax(0), torch.tensor([index], dtype=dtype)
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    _assert_as_native(BP.nll_loss, F.nll_loss, logp, target, **kwargs)


@pytest.mark.parametrize("kwargs", _LOSS_KWARGS)
@pytest.mark.parametrize("index", [0, 2, 4])
def test_cross_entropy_of_unbatched_input_takes_a_one_element_target(kwargs, index):
    logits, target = _logits(), torch.tensor([index])
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    _assert_as_native(BP.cross_entropy, F.cross_entropy, logits, target, **kwargs)


def test_loss_modules_of_unbatched_input_take_a_one_element_target():
    logits, target = _logits(), torch.tensor([3])
    for name in ("NLLLoss", "CrossEntropyLoss"):
        native = getattr(torch.nn, name)(reduction="none")
        ours = torchbp.convert(getattr(torch.nn, name)(reduction="none"))
        assert type(ours) is getattr(torchbp.nn, name)
        _assert_as_native(ours, native, logits, target)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_of_unbatched_input_takes_a_one_element_target(reduction):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, generator=generator, dtype=torch.float64)
    w = torch.randn(_CLASSES, 4, generator=generator, dtype=torch.float64)
    target = torch.tensor([3])
    ours = _loss_and_grad(lambda x: BP.linear_cross_entropy(x, w, target, reduction=reduction), x)
    # the one index as a 0-dim target
    expected = _loss_and_grad(
        lambda x: F.cross_entropy(F.linear(x, w), target[0], reduction=reduction), x
    )
    _assert_same_loss_and_grad(ours, expected)
    native = getattr(F, "linear_cross_entropy", None)  # torch 2.13+
    if native is not None:
        with torch.no_grad():
            torch.testing.assert_close(ours[0], native(x, w, target, reduction=reduction))


@pytest.mark.parametrize("loss", ["nll_loss", "cross_entropy"])
def test_unbatched_input_still_refuses_a_longer_target(loss):
    logits, target = _logits(), torch.tensor([1, 2])
    with pytest.raises(ValueError):
        getattr(F, loss)(logits, target)
    with pytest.raises(ValueError, match="unbatched"):
        getattr(BP, loss)(logits, target)


def test_cross_entropy_of_one_class_reads_a_target_of_its_shape_as_probabilities():
    # (1,) logits and a (1,) target: native reads probabilities and refuses class indices
    logits, target = torch.randn(1), torch.tensor([0])
    with pytest.raises(RuntimeError, match="floating"):
        F.cross_entropy(logits, target)
    with pytest.raises(RuntimeError, match="floating"):
        BP.cross_entropy(logits, target)


@pytest.mark.parametrize("target", ["indices", "probabilities"])
def test_nan_label_smoothing_is_refused_where_native_reads_it_as_zero(target):
    # a documented difference (torchbp.functional's module docstring)
    logits = _logits().reshape(1, _CLASSES)
    target = torch.tensor([2]) if target == "indices" else logits.softmax(1)
    native = F.cross_entropy(logits, target, label_smoothing=math.nan)
    torch.testing.assert_close(native, F.cross_entropy(logits, target))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got nan"):
        BP.cross_entropy(logits, target, label_smoothing=math.nan)


# Forward-mode AD along the class weights. With probability targets the loss is
# differentiable in them (native's formula, -Σ_c w_c t'_c logp_c); with class indices
# native's reverse mode refuses them, as torchbp's does, and its forward mode silently
# drops their tangent: torchbp refuses there too (torch's own custom-Function machinery
# crashed with an INTERNAL ASSERT, and cross_entropy's 'mean' gave the tangent of its
# denominator alone).


def _weight_case(dtype=torch.float64):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, _CLASSES, generator=generator, dtype=dtype)
    probabilities = torch.randn(4, _CLASSES, generator=generator, dtype=dtype).softmax(1)
    weight = torch.rand(_CLASSES, generator=generator, dtype=dtype)
    tangent = torch.randn(_CLASSES, generator=generator, dtype=dtype)
    return logits, probabilities, weight, tangent


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_jvp_along_class_weights_of_probability_targets_is_natives(reduction, smoothing):
    logits, probabilities, weight, tangent = _weight_case()

    def loss(ns):
        return lambda w: ns.cross_entropy(
            logits, probabilities, weight=w, reduction=reduction, label_smoothing=smoothing
        )

    ours = torch.func.jvp(loss(BP), (weight,), (tangent,))
    torch.testing.assert_close(ours, torch.func.jvp(loss(F), (weight,), (tangent,)))
    jacobian = torch.func.jacfwd(loss(BP))(weight)
    torch.testing.assert_close(jacobian, torch.func.jacrev(loss(F))(weight))


def test_jvp_along_logits_and_class_weights_of_probability_targets_is_natives():
    logits, probabilities, weight, tangent = _weight_case()
    logits_tangent = torch.randn_like(logits)

    def loss(ns):
        return lambda z, w: ns.cross_entropy(z, probabilities, weight=w, reduction="none")

    primals, tangents = (logits, weight), (logits_tangent, tangent)
    ours = torch.func.jvp(loss(BP), primals, tangents)
    torch.testing.assert_close(ours, torch.func.jvp(loss(F), primals, tangents))
    batched = torch.func.vmap(lambda t: torch.func.jvp(loss(BP), primals, (logits_tangent, t)))
    many = torch.stack([tangent, -tangent, 2 * tangent])
    expected = torch.func.vmap(lambda t: torch.func.jvp(loss(F), primals, (logits_tangent, t)))
    torch.testing.assert_close(batched(many), expected(many))


def test_dual_class_weights_of_probability_targets_under_forward_ad():
    logits, probabilities, weight, tangent = _weight_case()
    results = []
    for ns in (BP, F):
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(weight, tangent)
            loss = ns.cross_entropy(logits, probabilities, weight=dual, label_smoothing=0.1)
            results.append(tuple(torch.autograd.forward_ad.unpack_dual(loss)))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("loss", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_jvp_along_class_weights_of_class_indices_is_refused(loss, reduction):
    logits, _, weight, tangent = _weight_case()
    target = torch.tensor([0, 1, 4, 2])

    def call(ns):
        return lambda w: getattr(ns, loss)(logits, target, weight=w, reduction=reduction)

    # native: reverse mode refuses, forward mode drops the tangent
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.func.jacrev(call(F))(weight)
    assert torch.func.jvp(call(F), (weight,), (tangent,))[1].eq(0).all()
    match = f"{loss}: class weights are not differentiable with class-index targets"
    with pytest.raises(RuntimeError, match=match):
        torch.func.jvp(call(BP), (weight,), (tangent,))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(weight, tangent)
        with pytest.raises(RuntimeError, match=match):
            call(BP)(dual)


# A Number argument (slope, alpha, beta, threshold): native converts a complex number or
# 0-dim complex tensor whose imaginary part is zero to its real part, and refuses any
# other ("value cannot be converted to type float without overflow", a RuntimeError).

_SCALAR_CALLS = {
    "leaky_relu": lambda ns, x, v: ns.leaky_relu(x, v),
    "elu": lambda ns, x, v: ns.elu(x, v),
    "softplus-beta": lambda ns, x, v: ns.softplus(x, v),
    "softplus-threshold": lambda ns, x, v: ns.softplus(x, 1.0, v),
}


@pytest.mark.parametrize(
    "value", [0.5 + 0j, complex(-0.25, -0.0), torch.tensor(0.5 + 0j)], ids=repr
)
@pytest.mark.parametrize("call", list(_SCALAR_CALLS))
def test_complex_number_argument_with_zero_imaginary_part_is_its_real_part(call, value):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    ours = _SCALAR_CALLS[call](BP, x, value)
    torch.testing.assert_close(ours, _SCALAR_CALLS[call](F, x, value))


@pytest.mark.parametrize("value", [0.5 + 1e-30j, torch.tensor(0.5 + 1j)], ids=repr)
@pytest.mark.parametrize("call", list(_SCALAR_CALLS))
def test_complex_number_argument_with_an_imaginary_part_is_refused(call, value):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        _SCALAR_CALLS[call](F, x, value)
    with pytest.raises(RuntimeError, match="must be a real number"):
        _SCALAR_CALLS[call](BP, x, value)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.tensor([0.5 + 0j]), r"got a tensor of shape \(1,\)"),
        (torch.tensor(0.5 + 0j, requires_grad=True), "a tensor that requires grad"),
    ],
    ids=["shape-(1,)", "requires-grad"],
)
@pytest.mark.parametrize("call", list(_SCALAR_CALLS))
def test_complex_tensor_argument_that_is_no_number_is_refused_for_that(call, value, match):
    # native: "must be Number, not Tensor" (a TypeError) whatever the tensor's dtype; the
    # message names the tensor's shape or its gradient, not its imaginary part (zero)
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    with pytest.raises(TypeError, match="must be Number, not Tensor"):
        _SCALAR_CALLS[call](F, x, value)
    with pytest.raises(TypeError, match=match):
        _SCALAR_CALLS[call](BP, x, value)


@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
def test_label_smoothing_takes_a_complex_tensor_but_not_a_complex_number(loss):
    # native's label_smoothing is a float: a Python complex is a TypeError even with a
    # zero imaginary part; a 0-dim complex tensor converts as a Number does
    x, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])

    def call(ns, smoothing):
        if loss == "cross_entropy":
            return ns.cross_entropy(F.linear(x, w), t, label_smoothing=smoothing)
        return ns.linear_cross_entropy(x, w, t, label_smoothing=smoothing)

    expected = F.cross_entropy(F.linear(x, w), t, label_smoothing=0.1)
    torch.testing.assert_close(call(BP, torch.tensor(0.1 + 0j)), expected)
    if hasattr(F, loss):  # (native linear_cross_entropy: torch 2.13+)
        with pytest.raises(TypeError):
            call(F, 0.1 + 0j)
    with pytest.raises(TypeError, match="label_smoothing must be a real number"):
        call(BP, 0.1 + 0j)


@pytest.mark.parametrize("complex_type", ["complex64", "complex128"])
def test_label_smoothing_takes_a_numpy_complex_scalar_with_zero_imaginary_part(complex_type):
    # native's float argument reads a NumPy scalar through its __float__ (a Python complex
    # has none): a zero imaginary part is its real part; another is refused (native drops
    # it with a ComplexWarning)
    numpy = pytest.importorskip("numpy")
    logits = torch.randn(4, _CLASSES, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([0, 1, 4, 2])
    value = getattr(numpy, complex_type)(0.1)
    ours = BP.cross_entropy(logits, target, label_smoothing=value)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, label_smoothing=0.1))
    with pytest.raises(TypeError, match="label_smoothing must be a real number"):
        BP.cross_entropy(logits, target, label_smoothing=getattr(numpy, complex_type)(0.1 + 1j))


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
def test_make_fx_of_linear_cross_entropy_and_its_gradient(tracing_mode):
    # the chunked Function's backward writes its matmuls with out=, which make_fx refuses
    # ("functions with out=... arguments don't support automatic differentiation"):
    # make_fx records the unfused pair, as torch.export does
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=generator, requires_grad=True)
    w = torch.randn(5, 4, generator=generator, requires_grad=True)
    target = torch.tensor([0, 1, 4, 2, -100, 3])

    def loss_and_grads(x, w, target):
        loss = BP.linear_cross_entropy(x, w, target, label_smoothing=0.1)
        return loss, *torch.autograd.grad(loss, (x, w))

    traced = make_fx(loss_and_grads, tracing_mode=tracing_mode)(x, w, target)
    expected = F.cross_entropy(F.linear(x, w), target, label_smoothing=0.1)
    expected = (expected, *torch.autograd.grad(expected, (x, w)))
    torch.testing.assert_close(traced(x, w, target), expected)


_TRACED_CALLS = {
    "linear": lambda ns, x, t, p, w: ns.linear(x, p, w[:3]),
    "relu-inplace": lambda ns, x, t, p, w: ns.relu(x * 1, inplace=True),
    "gelu": lambda ns, x, t, p, w: ns.gelu(x),
    "silu-inplace": lambda ns, x, t, p, w: ns.silu(x * 1, inplace=True),
    "softplus": lambda ns, x, t, p, w: ns.softplus(x, 2.0, 3.0),
    "log_softmax": lambda ns, x, t, p, w: ns.log_softmax(x, 1),
    "nll_loss": lambda ns, x, t, p, w: ns.nll_loss(x, t, weight=w, ignore_index=1),
    "cross_entropy": lambda ns, x, t, p, w: ns.cross_entropy(x, t, weight=w, label_smoothing=0.1),
    "cross_entropy-probabilities": lambda ns, x, t, p, w: ns.cross_entropy(x, p),
}


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
@pytest.mark.parametrize("call", list(_TRACED_CALLS))
def test_make_fx_of_each_op_and_its_gradient(call, tracing_mode):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, generator=generator, requires_grad=True)
    probabilities = torch.rand(3, 4, generator=generator).softmax(1)
    weight = torch.rand(4, generator=generator)
    target = torch.tensor([0, 1, 3])

    def output_and_grad(ns):
        def run(x, target, probabilities, weight):
            y = _TRACED_CALLS[call](ns, x, target, probabilities, weight)
            return y, torch.autograd.grad(y.sum(), x)[0]

        return run

    args = (x, target, probabilities, weight)
    traced = make_fx(output_and_grad(BP), tracing_mode=tracing_mode)(*args)
    torch.testing.assert_close(traced(*args), output_and_grad(F)(*args))


# Reverse mode along class weights that torch.func wraps below the grad transform (a
# vmap over the weights, or a jvp taking them as a primal): their requires_grad reads
# False there, so the wrapper's routing and refusal did not see them, and the fused
# Function's backward dropped their gradient (0 with probability targets; with class
# indices 'mean' gave the gradient of its denominator alone).


def _reverse_over_wrapped_weights(ns, target, wrap):
    logits, _, weight, tangent = _weight_case()

    def loss(z, w):
        return ns.cross_entropy(z, target, weight=w, label_smoothing=0.1)

    if wrap == "vmap":
        # a loss per weighting: the weights batched by vmap
        def inner(w):
            return torch.func.vmap(lambda w2: loss(logits, w2))(torch.stack([w, 2 * w])).sum()
    else:
        # a directional derivative along the logits, the weights a primal of the jvp
        direction = torch.linspace(-1.0, 1.0, logits.numel(), dtype=logits.dtype)
        direction = direction.reshape(logits.shape)

        def inner(w):
            zero = torch.zeros_like(w)
            return torch.func.jvp(loss, (logits, w), (direction, zero))[1]

    return torch.func.grad(inner)(weight)


@pytest.mark.parametrize("wrap", ["vmap", "jvp"])
def test_gradient_of_class_weights_wrapped_by_torch_func_with_probability_targets(wrap):
    _, probabilities, _, _ = _weight_case()
    ours = _reverse_over_wrapped_weights(BP, probabilities, wrap)
    expected = _reverse_over_wrapped_weights(F, probabilities, wrap)
    assert expected.abs().max() > 0.01  # (a gradient dropped to 0 must fail)
    torch.testing.assert_close(ours, expected)


def test_hessian_of_logits_and_class_weights_by_reverse_over_forward():
    logits, probabilities, weight, _ = _weight_case()

    def loss(ns):
        return lambda z, w: ns.cross_entropy(z, probabilities, weight=w, label_smoothing=0.1)

    def hessian(ns):
        jacobian = torch.func.jacfwd(loss(ns), argnums=(0, 1))
        return torch.func.jacrev(jacobian, argnums=(0, 1))(logits, weight)

    torch.testing.assert_close(hessian(BP), hessian(F))


@pytest.mark.parametrize("wrap", ["vmap", "jvp"])
def test_gradient_of_class_weights_wrapped_by_torch_func_with_class_indices_is_refused(wrap):
    match = "cross_entropy: class weights are not differentiable with class-index targets"
    with pytest.raises(RuntimeError, match=match):
        _reverse_over_wrapped_weights(BP, torch.tensor([0, 1, 4, 2]), wrap)


def test_gradient_of_nll_loss_class_weights_wrapped_by_vmap_is_refused():
    logits, _, weight, _ = _weight_case()
    target = torch.tensor([0, 1, 4, 2])

    def inner(w):
        batched = torch.stack([w, 2 * w])
        return torch.func.vmap(lambda w2: BP.nll_loss(logits, target, weight=w2))(batched).sum()

    match = "nll_loss: class weights are not differentiable with class-index targets"
    with pytest.raises(RuntimeError, match=match):
        torch.func.grad(inner)(weight)


def test_gradient_of_class_weights_batched_by_eager_vmap_with_probability_targets():
    # plain autograd through vmap over weights that require grad (an ensemble of
    # weightings): the batched weights' requires_grad reads False inside vmap
    logits, probabilities, weight, _ = _weight_case()
    grads = []
    for ns in (BP, F):
        weights = torch.stack([weight, 2 * weight + 1]).requires_grad_()
        losses = torch.func.vmap(lambda w, ns=ns: ns.cross_entropy(logits, probabilities, weight=w))
        losses(weights).sum().backward()
        grads.append(weights.grad)
    assert grads[1] is not None and grads[1].abs().max() > 0.01
    torch.testing.assert_close(grads[0], grads[1])


def test_compiled_vmap_over_class_weights_with_probability_targets():
    # (has_storage of a batched tensor while Dynamo traces fails: asked only eagerly)
    logits, probabilities, weight, _ = _weight_case()
    weights = torch.stack([weight, 2 * weight + 1])

    def losses(ns):
        return torch.func.vmap(lambda w: ns.cross_entropy(logits, probabilities, weight=w))

    compiled = torch.compile(losses(BP), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(weights), losses(F)(weights))


# No class (C = 0) with probability targets, label smoothing and class weights that need
# a gradient or carry a tangent: the smoothing term ε/C divided by zero in Python
# (ZeroDivisionError) where native returns its loss (NaN for 'mean', -0 otherwise).


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_no_class_probability_targets_with_differentiated_class_weights(reduction, smoothing):
    logits, probabilities = torch.randn(3, 0), torch.rand(3, 0)
    results = []
    for ns in (BP, F):
        weight = torch.rand(0, requires_grad=True)
        loss = ns.cross_entropy(
            logits, probabilities, weight=weight, reduction=reduction, label_smoothing=smoothing
        )
        results.append((loss, *torch.autograd.grad(loss.sum(), weight, allow_unused=True)))
    torch.testing.assert_close(results[0], results[1], equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_no_class_probability_targets_with_dual_class_weights(reduction, smoothing):
    logits, probabilities = torch.randn(3, 0), torch.rand(3, 0)
    results = []
    for ns in (BP, F):
        with torch.autograd.forward_ad.dual_level():
            weight = torch.autograd.forward_ad.make_dual(torch.rand(0), torch.rand(0))
            loss = ns.cross_entropy(
                logits, probabilities, weight=weight, reduction=reduction, label_smoothing=smoothing
            )
            results.append(tuple(torch.autograd.forward_ad.unpack_dual(loss)))
    if reduction == "mean":
        # the loss is NaN (0 / 0 rows): torchbp's tangent is NaN with it, native's -0
        results = [primal for primal, _ in results]
    torch.testing.assert_close(results[0], results[1], equal_nan=True)
