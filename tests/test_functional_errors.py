"""Bad input gets a clear error that names the problem (and never a silent wrong answer)."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchbp.functional as TF
from torchbp._checks import ClassIndexError, DeviceError, DTypeError, ShapeError


def test_error_classes_are_also_runtime_errors():
    # Code written against native's RuntimeErrors keeps catching ours.
    for cls in (ShapeError, DTypeError, DeviceError, ClassIndexError):
        assert issubclass(cls, RuntimeError)


# --------------------------------------------------------------------------- linear
@pytest.mark.parametrize(
    "x_shape,w_shape,b_shape,match",
    [
        ((4, 3), (5, 2), None, r"input \(4, 3\), weight \(5, 2\)"),
        ((), (5, 3), None, r"at least 1 dim .* input \(\), weight \(5, 3\)"),
        ((4, 3), (5, 3, 1), None, r"weight \(out_features, in_features\) .* \(5, 3, 1\)"),
        ((4, 3), (5,), None, r"in_features = 5"),
        ((4, 3), (5, 3), (4,), r"bias \(4,\) does not broadcast to the output's shape \(4, 5\)"),
        ((4, 3), (5, 3), (2, 1, 5), r"bias \(2, 1, 5\) does not broadcast"),
    ],
)
def test_linear_shape_errors(x_shape, w_shape, b_shape, match):
    b = None if b_shape is None else torch.randn(b_shape)
    with pytest.raises(ShapeError, match=match):
        TF.linear(torch.randn(x_shape), torch.randn(w_shape), b)


def test_linear_dtype_mismatch_names_both():
    with pytest.raises(DTypeError, match="input torch.float64, weight torch.float32"):
        TF.linear(torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3))
    with pytest.raises(DTypeError, match="bias torch.float16"):
        TF.linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(4).half())


def test_linear_device_mismatch_names_both():
    w = torch.empty(4, 3, device="meta")
    with pytest.raises(DeviceError, match="input on cpu, weight on meta"):
        TF.linear(torch.randn(2, 3), w)


def test_linear_bias_on_another_device_is_named():
    # input and weight share a device, the bias does not: not the one-device fast path
    b = torch.empty(4, device="meta")
    with pytest.raises(DeviceError, match="input on cpu, weight on cpu, bias on meta"):
        TF.linear(torch.randn(2, 3), torch.randn(4, 3), b)


# --------------------------------------------------------------------------- losses
LOSSES = [TF.cross_entropy, TF.nll_loss]
IDS = ["cross_entropy", "nll_loss"]


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@pytest.mark.parametrize("bad", [5, 17, -1, -101])
def test_class_index_out_of_range_names_value_and_classes(loss, bad):
    target = torch.tensor([0, bad, 1])
    with pytest.raises(ClassIndexError, match=rf"target {bad} is out of bounds.*\[0, 5\)"):
        loss(torch.randn(3, 5), target)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@pytest.mark.parametrize("ignore_index", [-1, 511])
def test_uint8_class_index_out_of_range_is_not_taken_for_a_wrapped_ignore_index(loss, ignore_index):
    """A uint8 target 255 with ignore_index -1 (or 511): the check compared them in uint8,
    where the ignore_index wraps to 255, and let the 255 through to the gather ('index 255
    is out of bounds for dimension 1', a device-side assert on CUDA); native raises
    IndexError('Target 255 is out of bounds.')."""
    target = torch.tensor([0, 255, 1], dtype=torch.uint8)
    with pytest.raises(IndexError, match=r"target 255 is out of bounds.*\[0, 5\)"):
        loss(torch.randn(3, 5), target, ignore_index=ignore_index)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_class_index_check_covers_k_dim_and_custom_ignore_index(loss):
    target = torch.zeros(2, 3, dtype=torch.long)
    target[1, 2] = 9
    with pytest.raises(ClassIndexError, match="target 9"):
        loss(torch.randn(2, 4, 3), target)
    target[1, 2] = 7  # allowed: it is the ignore_index
    loss(torch.randn(2, 4, 3), target, ignore_index=7)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.bool])
def test_integer_target_dtype(loss, dtype):
    with pytest.raises(DTypeError, match=f"got {dtype}"):
        loss(torch.randn(3, 5), torch.tensor([0, 1, 1]).to(dtype))


def test_float_target_for_nll_loss():
    with pytest.raises(DTypeError, match="class indices .* use cross_entropy"):
        TF.nll_loss(torch.randn(3, 5), torch.rand(3, 5))


def test_long_probability_target_for_cross_entropy():
    with pytest.raises(DTypeError, match="probabilities and must be floating point"):
        TF.cross_entropy(torch.randn(3, 5), torch.ones(3, 5, dtype=torch.long))


def test_float_target_of_wrong_shape():
    with pytest.raises(ShapeError, match=r"floating-point target must have the input's shape"):
        TF.cross_entropy(torch.randn(3, 5), torch.rand(3))


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@pytest.mark.parametrize(
    "x_shape,t_shape,match",
    [
        ((4, 5), (3,), r"input batch_size \(4\) to match target batch_size \(3\)"),
        ((4, 5, 2), (4, 3), r"must have shape \(4, 2\)"),
        ((4, 5), (4, 1), r"must have shape \(4,\)"),
        ((5,), (1, 1), r"must have shape \(\)"),
    ],
)
def test_target_shape_mismatch(loss, x_shape, t_shape, match):
    with pytest.raises(ShapeError, match=match):
        loss(torch.randn(x_shape), torch.zeros(t_shape, dtype=torch.long))


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
@pytest.mark.parametrize("w_shape", [(4,), (5, 1), ()])
def test_weight_shape(loss, w_shape):
    with pytest.raises(ShapeError, match=r"weight must have shape \(5,\)"):
        loss(torch.randn(3, 5), torch.tensor([0, 1, 2]), weight=torch.ones(w_shape))


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_weight_requiring_grad(loss):
    with pytest.raises(RuntimeError, match="not differentiable"):
        loss(torch.randn(3, 5), torch.tensor([0, 1, 2]), weight=torch.ones(5, requires_grad=True))


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("loss", [*LOSSES, TF.linear_cross_entropy], ids=[*IDS, "lce"])
def test_weight_requiring_grad_accepted_where_nothing_is_recorded(loss, no_grad):
    # native refuses such a weight only when autograd would record the call: under
    # no_grad (an evaluation loop) it computes the loss; torchbp refused it there too
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    args = (x, torch.eye(5), t) if loss is TF.linear_cross_entropy else (x, t)
    weight = torch.rand(5, generator=torch.Generator().manual_seed(0))
    want = loss(*args, weight=weight)
    with no_grad():
        got = loss(*args, weight=weight.clone().requires_grad_())
    torch.testing.assert_close(got, want)


def _class_index_loss(name):
    """``loss(x, weight)`` of (4, 3) input ``x`` by torchbp's or native's function ``name``
    (linear_cross_entropy with an identity linear_weight: its logits are ``x``)."""
    t = torch.tensor([0, 1, 2, 0])
    if name == "linear_cross_entropy":
        return lambda f, x, w: f.linear_cross_entropy(x, torch.eye(3, dtype=x.dtype), t, weight=w)
    return lambda f, x, w: getattr(f, name)(x, t, weight=w)


@pytest.mark.parametrize(
    "x_dtype, w_dtype, accepted",
    [
        # autocast runs the loss in float32 and casts a half weight (not a float64 one)
        (torch.bfloat16, torch.bfloat16, True),
        (torch.float32, torch.float16, True),
        (torch.bfloat16, torch.float64, False),
        (torch.float64, torch.float32, False),
    ],
    ids=str,
)
@pytest.mark.parametrize("name", ["nll_loss", "cross_entropy", "linear_cross_entropy"])
def test_class_weight_dtype_under_autocast_as_native(name, x_dtype, w_dtype, accepted):
    if not hasattr(torch.nn.functional, name):
        pytest.skip(f"this torch has no torch.nn.functional.{name} (torch < 2.13)")
    loss = _class_index_loss(name)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(x_dtype)
    w = torch.rand(3, generator=torch.Generator().manual_seed(1)).to(w_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if not accepted:
            with pytest.raises(RuntimeError):
                loss(torch.nn.functional, x, w)
            with pytest.raises(DTypeError, match=f"{name}: class weights must have the loss"):
                loss(TF, x, w)
            return
        want, got = loss(torch.nn.functional, x, w), loss(TF, x, w)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_unknown_reduction(loss):
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        loss(torch.randn(3, 5), torch.tensor([0, 1, 2]), reduction="avg")


@pytest.mark.parametrize("smoothing", [-0.1, 1.5])
def test_label_smoothing_range(smoothing):
    # native raises RuntimeError above 1 (and accepts a negative value: torchbp refuses it)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be in \[0, 1\]"):
        TF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), label_smoothing=smoothing)


@pytest.mark.parametrize(
    ("input", "target", "error", "match"),
    [
        # native: log_softmax refuses the integer logits before the smoothing check
        (torch.ones(3, 5, dtype=torch.long), torch.rand(3, 5), DTypeError, "floating-point"),
        # native: the target's dtype, then ignore_index, come first too
        (torch.randn(3, 5), torch.ones(3, 5, dtype=torch.long), DTypeError, "probabilities"),
    ],
)
def test_probability_target_checks_come_before_label_smoothing(input, target, error, match):
    with pytest.raises(error, match=match):
        TF.cross_entropy(input, target, label_smoothing=1.5)


def test_probability_target_ignore_index_comes_before_label_smoothing():
    with pytest.raises(RuntimeError, match=r"ignore_index \(1\) is not supported"):
        TF.cross_entropy(torch.randn(3, 5), torch.rand(3, 5), ignore_index=1, label_smoothing=1.5)


def test_ignore_index_with_probabilities():
    with pytest.raises(RuntimeError, match=r"ignore_index \(1\) is not supported for probability"):
        TF.cross_entropy(torch.randn(3, 5), torch.rand(3, 5), ignore_index=1)


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_zero_dim_input(loss):
    with pytest.raises(ShapeError, match="must have a class dim"):
        loss(torch.tensor(1.0), torch.tensor(0))


@pytest.mark.parametrize("loss", LOSSES, ids=IDS)
def test_integer_input(loss):
    with pytest.raises(DTypeError, match="input must be a floating-point tensor"):
        loss(torch.ones(3, 5, dtype=torch.long), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------- activations etc.
def test_gelu_unknown_approximation():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        TF.gelu(torch.randn(3), approximate="fast")


@pytest.mark.parametrize(
    "call",
    [lambda h: TF.leaky_relu(h, -0.2, inplace=True), lambda h: TF.elu(h, -0.5, inplace=True)],
    ids=["leaky_relu", "elu"],
)
def test_inplace_negative_slope_under_autograd(call):
    # native raises RuntimeError at backward; torchbp refuses at once, naming the argument
    h = torch.randn(3, requires_grad=True) * 1
    with pytest.raises(RuntimeError, match=r"=-0\.[25]: a negative slope cannot be differentiated"):
        call(h)
    with pytest.raises(ValueError):
        call(h)
    with torch.no_grad():  # nothing to differentiate: allowed, as native
        call(h.detach().clone())


@pytest.mark.parametrize(
    "op", [TF.softmax, TF.softmin, TF.log_softmax], ids=["softmax", "softmin", "log_softmax"]
)
def test_softmax_dim_out_of_range(op):
    with pytest.raises(IndexError, match="out of range"):
        op(torch.randn(3, 4), dim=2)
    with pytest.raises(IndexError, match="out of range"):
        op(torch.tensor(1.0), dim=1)


@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
@pytest.mark.parametrize("name", ["nll_loss", "cross_entropy"])
def test_legacy_size_average_reduce_as_native(name, size_average, reduce):
    """The deprecated size_average / reduce give native's reduction and its deprecation
    warning (torchbp's own rule, not torch's private torch.nn._reduction helper)."""
    torch.manual_seed(0)
    z, y = torch.randn(4, 3).log_softmax(1), torch.tensor([0, 2, 1, 0])
    kwargs = {"size_average": size_average, "reduce": reduce}
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        got = getattr(TF, name)(z, y, **kwargs)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        want = getattr(torch.nn.functional, name)(z, y, **kwargs)
    torch.testing.assert_close(got, want)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]


# --------------------------------------------------------------------------- layouts
F = torch.nn.functional
_TARGET = torch.tensor([0, 1, 2, 0])
_LAYOUTS = {
    "coo": torch.Tensor.to_sparse,
    "csr": torch.Tensor.to_sparse_csr,
    "nested": lambda d: torch.nested.nested_tensor([d[:2], d[2:]]),  # strided layout
    "jagged": lambda d: torch.nested.nested_tensor([d[:2], d[2:]], layout=torch.jagged),
}
# (torchbp's function, its native namesake), each taking the one non-dense tensor
_LAYOUT_CALLS = {
    "relu": (TF.relu, F.relu),
    "relu_inplace": (lambda x: TF.relu(x, inplace=True), lambda x: F.relu(x, inplace=True)),
    "tanh": (TF.tanh, torch.tanh),
    "softmax": (lambda x: TF.softmax(x, -1), lambda x: F.softmax(x, -1)),
    "softmin": (lambda x: TF.softmin(x, -1), lambda x: F.softmin(x, -1)),
    "log_softmax": (lambda x: TF.log_softmax(x, -1), lambda x: F.log_softmax(x, -1)),
    "linear": (lambda x: TF.linear(x, _W), lambda x: F.linear(x, _W)),
    "nll_loss": (lambda x: TF.nll_loss(x, _TARGET), lambda x: F.nll_loss(x, _TARGET)),
    "cross_entropy": (
        lambda x: TF.cross_entropy(x, _TARGET),
        lambda x: F.cross_entropy(x, _TARGET),
    ),
}
_W = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
# each pair failed inside torchbp (clamp_min, amax, gather, 'NestedTensorImpl doesn't
# support sizes', a shape error in tanh's backward...) where native gave a result or its
# own error
_LAYOUT_CASES = [
    ("relu", "coo"),
    ("relu", "csr"),
    ("relu", "nested"),
    ("relu_inplace", "coo"),
    ("tanh", "coo"),
    ("softmax", "coo"),
    ("softmax", "csr"),
    ("softmax", "nested"),
    ("softmin", "coo"),
    ("softmin", "csr"),
    ("softmin", "nested"),
    ("log_softmax", "coo"),
    ("log_softmax", "nested"),
    ("linear", "nested"),
    ("linear", "jagged"),  # its backward failed ('NestedIntNode' has no attribute 'int_')
    ("nll_loss", "coo"),
    ("cross_entropy", "coo"),
    ("cross_entropy", "csr"),
]


def _dense_values(t):
    if t is None:
        return None
    if t.is_nested:
        return torch.cat([part.reshape(-1) for part in t.unbind()])
    return t.to_dense() if t.layout != torch.strided else t


def _outcome(fn, layout):
    """``fn``'s result and the input's gradient on a sparse / nested input, or its error."""
    dense = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = _LAYOUTS[layout](dense.relu())
    x.requires_grad_(layout != "nested")  # (native's strided nested backward is partial)
    try:
        y = fn(x * 1 if x.requires_grad else x)  # (a non-leaf: relu_inplace may write)
        if x.requires_grad:
            _dense_values(y).sum().backward()
    except Exception as e:  # noqa: BLE001 -- the error itself is compared
        return type(e), str(e).splitlines()[0]
    return _dense_values(y), _dense_values(x.grad), (y.layout, y.is_nested)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name,layout", _LAYOUT_CASES, ids=[f"{n}-{k}" for n, k in _LAYOUT_CASES])
def test_sparse_and_strided_nested_inputs_behave_as_native(name, layout):
    # torchbp's Functions take dense tensors: a sparse or strided nested one runs native's
    # op, with its result and gradient, or its own error where it has none
    ours, native = (_outcome(fn, layout) for fn in _LAYOUT_CALLS[name])
    if isinstance(native[0], type):
        assert ours == native
    else:
        torch.testing.assert_close(ours[:2], native[:2])
        assert ours[2] == native[2]  # layout, nested


# A batch-size mismatch is native's ValueError even where another argument is also wrong:
# native checks it first (nll_loss_nd), before any dtype or class-weight check.
BATCH_MISMATCH_TOO = {
    "integer nll_loss input": ("nll_loss", torch.zeros(4, 4, dtype=torch.int64), {}),
    "float nll_loss target": ("nll_loss", torch.randn(4, 4), {"target": torch.zeros(3)}),
    "integer class weights": (
        "cross_entropy",
        torch.randn(4, 3),
        {"weight": torch.ones(3, dtype=torch.int64)},
    ),
    "class weights requiring grad": (
        "cross_entropy",
        torch.randn(4, 3, requires_grad=True),
        {"weight": torch.ones(3, requires_grad=True)},
    ),
}


@pytest.mark.parametrize("case", sorted(BATCH_MISMATCH_TOO))
def test_batch_size_mismatch_is_a_value_error_first_as_native(case):
    name, x, options = BATCH_MISMATCH_TOO[case]
    options = dict(options)
    target = options.pop("target", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch_size"):
        getattr(torch.nn.functional, name)(x, target, **options)
    with pytest.raises(
        ValueError, match=r"input batch_size \(4\) to match target batch_size \(3\)"
    ):
        getattr(TF, name)(x, target, **options)


# The same for an unbatched (C,) input: native checks that its 1-D target has one element
# ("For 1D input, 1D target must have size 1") before any dtype or class weight.
UNBATCHED_MISMATCH_TOO = {
    "integer nll_loss input": ("nll_loss", torch.zeros(3, dtype=torch.int64), {}),
    "integer cross_entropy class weights": (
        "cross_entropy",
        torch.randn(3),
        {"weight": torch.ones(3, dtype=torch.int64)},
    ),
}


@pytest.mark.parametrize("case", sorted(UNBATCHED_MISMATCH_TOO))
def test_unbatched_target_size_mismatch_is_a_value_error_first_as_native(case):
    name, x, options = UNBATCHED_MISMATCH_TOO[case]
    target = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="1D target must have size 1"):
        getattr(torch.nn.functional, name)(x, target, **options)
    with pytest.raises(ValueError, match=r"unbatched input \(3,\) takes one class index"):
        getattr(TF, name)(x, target, **options)


@pytest.mark.skipif(
    not hasattr(torch.nn.functional, "linear_cross_entropy"), reason="native's needs torch 2.13"
)
@pytest.mark.parametrize("rows", [None, 6])
def test_linear_cross_entropy_target_size_mismatch_is_a_value_error_first_as_native(rows):
    x = torch.randn(3) if rows is None else torch.randn(rows, 3)
    target = torch.zeros(4, dtype=torch.int64)
    int_weight = torch.ones(5, dtype=torch.int64)
    message = "1D target must have size 1" if rows is None else "batch_size"
    with pytest.raises(ValueError, match=message):
        torch.nn.functional.linear_cross_entropy(x, torch.randn(5, 3), target, weight=int_weight)
    message = "takes one class index" if rows is None else r"batch_size \(6\).*\(4\)"
    with pytest.raises(ValueError, match=message):
        TF.linear_cross_entropy(x, torch.randn(5, 3), target, weight=int_weight)


@pytest.mark.parametrize("name", ["softmax", "softmin", "log_softmax"])
def test_softmax_bad_dtype_argument_is_reported_before_a_bad_dim_as_native(name):
    """Native parses ``dtype`` before it looks at ``dim``: with both wrong it raises the
    dtype's TypeError, where torchbp raised the dim's IndexError."""
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="dtype"):
        getattr(torch.nn.functional, name)(x, 2, dtype="float32")
    with pytest.raises(TypeError, match="dtype"):
        getattr(TF, name)(x, 2, dtype="float32")


@pytest.mark.parametrize(
    ("input", "target", "weight"),
    [
        (torch.ones(3, 5, dtype=torch.long), torch.tensor([0, 1, 2]), None),  # integer logits
        (torch.randn(3, 5), torch.tensor([0.0, 1.0, 2.0]), None),  # floating class indices
        (torch.randn(3, 5), torch.tensor([0, 1]), None),  # batch sizes differ
        (torch.randn(3, 5), torch.tensor([0, 1, 2]), torch.ones(4)),  # one weight too many
    ],
    ids=["integer-input", "floating-indices", "batch-size", "weight-size"],
)
def test_class_index_label_smoothing_range_comes_before_the_other_checks(input, target, weight):
    # native checks label_smoothing first with class indices (after them only with
    # probability targets)
    with pytest.raises(RuntimeError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        TF.cross_entropy(input, target, weight=weight, label_smoothing=1.5)


@pytest.mark.parametrize(
    ("input", "target", "ignore_index"),
    [
        (torch.ones(3, 5, dtype=torch.long), torch.rand(3, 5), -100),  # integer logits
        (torch.randn(3, 5), torch.ones(3, 5, dtype=torch.long), -100),  # integer probabilities
        (torch.randn(3, 5), torch.rand(3, 5), 1),  # ignore_index with probabilities
    ],
    ids=["integer-input", "integer-target", "ignore_index"],
)
@pytest.mark.parametrize("smoothing", ["0.1", None])
def test_probability_target_label_smoothing_not_a_number_is_a_type_error_first(
    input, target, ignore_index, smoothing
):
    # native's argument parser refuses a label_smoothing that is no float before any check
    # of the values, probability targets too (only the range comes after them)
    with pytest.raises(TypeError, match="label_smoothing must be a number"):
        TF.cross_entropy(input, target, ignore_index=ignore_index, label_smoothing=smoothing)


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 2**64], ids=str)
@pytest.mark.parametrize("name", ["nll_loss", "cross_entropy", "linear_cross_entropy"])
def test_ignore_index_outside_int64_is_natives_value_error(name, ignore_index):
    # native's argument parser refuses it ("Overflow when unpacking long long"); it must
    # not be accepted, nor fail deep inside (linear_cross_entropy's mask comparison did)
    x, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    args = (x, torch.randn(5, 4), target) if name == "linear_cross_entropy" else (x, target)
    if hasattr(F, name):  # (native's linear_cross_entropy needs torch 2.13)
        with pytest.raises(ValueError):
            getattr(F, name)(*args, ignore_index=ignore_index)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        getattr(TF, name)(*args, ignore_index=ignore_index)
    getattr(TF, name)(*args, ignore_index=2**63 - 1 if ignore_index > 0 else -(2**63))  # fits


@pytest.mark.parametrize(
    "x, dtype",
    [
        (torch.tensor([[True, False]]), None),  # native's negation refuses a bool tensor
        (torch.tensor([[True, False]]), torch.float32),  # (before the cast)
        (torch.tensor([[1, 2]]), None),  # integer input: softmax's NotImplementedError
        (torch.tensor([[1, 2]]), torch.float64),  # negated, then cast
        (torch.tensor([[1, 2]], dtype=torch.uint8), torch.float64),  # -1 wraps to 255
    ],
    ids=["bool", "bool-dtype", "long", "long-dtype", "uint8-dtype"],
)
def test_softmin_negates_before_the_cast_as_native(x, dtype):
    """native's softmin is ``(-input).softmax(dim, dtype=dtype)``: the negation in the
    input's own dtype (and its refusal of a bool tensor) comes first."""
    outcomes = []
    for fn in (TF.softmin, F.softmin):
        try:
            outcomes.append(fn(x, 1, dtype=dtype))
        except Exception as e:  # noqa: BLE001 -- the error class is compared
            outcomes.append(type(e))
    ours, native = outcomes
    if isinstance(native, type):
        assert isinstance(ours, type) and issubclass(ours, native), (ours, native)
    else:
        torch.testing.assert_close(ours, native)


def test_softmin_refuses_a_non_tensor_by_name():
    with pytest.raises(TypeError, match="softmin"):
        TF.softmin([1.0, 2.0], 0)
