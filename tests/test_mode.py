"""``torchbp.mode.enable``: a TorchFunctionMode routing functional calls to torchbp."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from tests._support import grads, make

import torchbp
import torchbp.functional as TF
from torchbp.mode import TorchbpMode, enable, routed_functions
from torchbp.ops import OPS

pytestmark = pytest.mark.usefixtures("seed")

# composite F functions (softmin, multi_head_attention_forward) are routed inside only
# where torch has torch.overrides.redispatch_function (2.13+)
needs_redispatch = pytest.mark.skipif(
    not hasattr(torch.overrides, "redispatch_function"),
    reason="this torch lacks torch.overrides.redispatch_function",
)

TARGET = torch.tensor([0, 2, 1, 4])
WEIGHT = make((5, 6), torch.float64, seed=1)


def _nodes(t: torch.Tensor) -> set[str]:
    """Class names of every autograd node behind ``t``."""
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def _torchbp_nodes(t: torch.Tensor) -> set[str]:
    return {n for n in _nodes(t) if n.endswith("FunctionBackward")}


# (spelling, call of a (4, 6) float64 input x, the op that must serve it)
CALLS = [
    ("F.linear", lambda x: F.linear(x, WEIGHT), "linear"),
    ("F.linear(bias)", lambda x: F.linear(x, WEIGHT, bias=WEIGHT[:, 0]), "linear"),
    ("F.relu", lambda x: F.relu(x), "relu"),
    ("F.relu(inplace)", lambda x: F.relu(x * 1, inplace=True), "relu"),
    ("F.leaky_relu", lambda x: F.leaky_relu(x, 0.2), "leaky_relu"),
    ("F.gelu", lambda x: F.gelu(x), "gelu"),
    ("F.gelu(tanh)", lambda x: F.gelu(x, approximate="tanh"), "gelu"),
    ("F.silu", lambda x: F.silu(x), "silu"),
    ("F.elu", lambda x: F.elu(x, alpha=0.5), "elu"),
    ("F.softplus", lambda x: F.softplus(x, beta=2.0), "softplus"),
    ("F.sigmoid", lambda x: F.sigmoid(x), "sigmoid"),
    ("F.tanh", lambda x: F.tanh(x), "tanh"),
    ("F.softmax", lambda x: F.softmax(x, dim=0), "softmax"),
    ("F.log_softmax", lambda x: F.log_softmax(x, -1), "log_softmax"),
    ("F.nll_loss", lambda x: F.nll_loss(x, TARGET), "nll_loss"),
    ("F.cross_entropy", lambda x: F.cross_entropy(x, TARGET, label_smoothing=0.1), "cross_entropy"),
    ("torch.sigmoid", lambda x: torch.sigmoid(x), "sigmoid"),
    ("torch.tanh", lambda x: torch.tanh(x), "tanh"),
    ("torch.relu", lambda x: torch.relu(x), "relu"),
    ("torch.softmax", lambda x: torch.softmax(x, 1), "softmax"),
    ("torch.softmax(dtype)", lambda x: torch.softmax(x, 1, torch.float32), "softmax"),
    ("torch.log_softmax", lambda x: torch.log_softmax(x, dim=0), "log_softmax"),
    ("x.relu()", lambda x: x.relu(), "relu"),
    ("x.sigmoid()", lambda x: x.sigmoid(), "sigmoid"),
    ("x.tanh()", lambda x: x.tanh(), "tanh"),
    ("x.softmax()", lambda x: x.softmax(-1), "softmax"),
    ("x.log_softmax()", lambda x: x.log_softmax(dim=1), "log_softmax"),
    ("x.relu_()", lambda x: (x * 1).relu_(), "relu"),
    ("torch.relu_", lambda x: torch.relu_(x * 1), "relu"),
    ("F.leaky_relu_", lambda x: F.leaky_relu_(x * 1, 0.3), "leaky_relu"),
    ("F.elu_", lambda x: F.elu_(x * 1), "elu"),
    pytest.param(
        "F.softmin (composite)", lambda x: F.softmin(x, 1), "softmax", marks=needs_redispatch
    ),
    pytest.param(
        "F.tanhshrink (composite)", lambda x: F.tanhshrink(x), "tanh", marks=needs_redispatch
    ),
]


@pytest.mark.parametrize(
    "spelling, call, op", CALLS, ids=[getattr(c, "values", c)[0] for c in CALLS]
)
def test_each_spelling_routes_with_native_values(spelling, call, op):
    x = make((4, 6), torch.float64)
    want, want_grads = grads(call, x)
    with enable() as mode:
        got, got_grads = grads(call, x)
        node = call(x.clone().requires_grad_())
    assert dict(mode.counts) == {op: 2} and not mode.native
    assert _torchbp_nodes(node) == {f"{OPS[op].function.__name__}Backward"}
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)


def test_linear_cross_entropy_routes_with_and_without_options():
    x, w = make((4, 6), torch.float64), make((5, 6), torch.float64, seed=1)
    fused = getattr(F, "linear_cross_entropy", None)
    if fused is None:
        pytest.skip("this torch has no linear_cross_entropy")
    want, want_grads = grads(lambda a, b: fused(a, b, TARGET), x, w)
    with enable() as mode:
        got, got_grads = grads(lambda a, b: fused(a, b, TARGET), x, w)
        fused(x, w, TARGET, options=torch.nn.LinearCrossEntropyOptions())
    assert mode.counts == {"linear_cross_entropy": 2}  # options= is torchbp's too now
    assert not mode.native
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)


def test_uncovered_calls_pass_through_untouched():
    x = make((4, 6)).requires_grad_()
    with enable() as mode:
        outs = [
            F.layer_norm(x, (6,)),
            F.hardtanh(x),
            torch.exp(x),
            x @ x.T,
            F.dropout(x, 0.5, training=False),
            F.mse_loss(x, x.detach() + 1),
        ]
    assert not mode.counts and not mode.native
    for out in outs:
        assert not _torchbp_nodes(out)
    torch.testing.assert_close(outs[0], F.layer_norm(x, (6,)))
    torch.testing.assert_close(outs[5], F.mse_loss(x, x.detach() + 1))


@pytest.mark.parametrize(
    "call, key",
    [
        (lambda x: torch.relu(x.long()), "torch.relu: torch.int64 input"),
        (lambda x: F.relu(x.int()), "torch.nn.functional.relu: torch.int32 input"),
        (lambda x: torch.sigmoid(x, out=torch.empty_like(x)), "torch.sigmoid: out= given"),
        (lambda x: torch.tanh(x, out=torch.empty_like(x)), "torch.tanh: out= given"),
        (lambda x: (x * 1).sigmoid_(), "Tensor.sigmoid_: torchbp has no in-place sigmoid"),
        (lambda x: torch.tanh_(x * 1), "torch.tanh_: torchbp has no in-place tanh"),
    ],
    ids=["torch.relu(int)", "F.relu(int)", "sigmoid(out)", "tanh(out)", "sigmoid_", "tanh_"],
)
def test_calls_torchbp_does_not_take_stay_native_and_are_reported(call, key):
    x = make((3, 4))
    want = call(x)
    with enable() as mode:
        got = call(x)
    torch.testing.assert_close(got, want)
    assert not mode.counts and mode.native == {key: 1}


#: strided nested tensors warn that their API is a prototype
_NESTED_PROTOTYPE = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")


@pytest.mark.parametrize(
    "make_input, key",
    [
        (lambda x: x.to_sparse(), "torch.relu: torch.sparse_coo argument"),
        (lambda x: x.to_sparse_csr(), "torch.relu: torch.sparse_csr argument"),
        (lambda x: torch.nested.nested_tensor([x, x[:2]]), "torch.relu: nested tensor argument"),
    ],
    ids=["sparse_coo", "sparse_csr", "nested"],
)
@_NESTED_PROTOTYPE
def test_calls_on_sparse_or_nested_tensors_stay_native_and_are_reported(make_input, key):
    # native runs these layouts; routed, torchbp's functions failed deep inside
    # (aten::clamp_min not on SparseCPU, NestedTensorImpl sizes)
    x = make((3, 4))
    want = torch.relu(make_input(x))
    with enable() as mode:
        got = torch.relu(make_input(x))
    assert got.layout == want.layout and got.is_nested == want.is_nested
    if got.is_nested:
        got, want = torch.cat(got.unbind()), torch.cat(want.unbind())
    torch.testing.assert_close(got.to_dense(), want.to_dense())
    assert not mode.counts and mode.native == {key: 1}


@_NESTED_PROTOTYPE
def test_linear_with_a_sparse_weight_or_nested_input_stays_native():
    x = make((3, 4)).requires_grad_()
    nested = torch.nested.nested_tensor([make((2, 6)), make((3, 6))], requires_grad=True)
    with enable() as mode:
        sparse_weight = F.linear(x, make((5, 4)).to_sparse().requires_grad_())
        nested_out = F.linear(nested, WEIGHT.float())
    assert not mode.counts and mode.native == {
        "torch.nn.functional.linear: torch.sparse_coo argument": 1,
        "torch.nn.functional.linear: nested tensor argument": 1,
    }
    assert sparse_weight.shape == (3, 5) and nested_out.is_nested


class _ConstantLinear(torch.Tensor):
    """A tensor subclass that gives ``F.linear`` its own meaning (as quantized-weight
    subclasses do): every output element is 42; other functions keep torch's."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear:
            x, weight = args[0], args[1]
            return torch.full((*x.shape[:-1], weight.shape[0]), 42.0, dtype=x.dtype)
        return super().__torch_function__(func, types, args, kwargs or {})


class _Plain(torch.Tensor):
    """A tensor subclass with torch's default ``__torch_function__``."""


def test_arguments_with_their_own_torch_function_stay_native_and_are_reported():
    # the mode runs before a subclass's __torch_function__: routing such a call ran
    # torchbp's linear on the subclass, silently replacing the subclass's own F.linear
    x = make((3, 6)).requires_grad_()
    weight = WEIGHT.float().as_subclass(_ConstantLinear).requires_grad_()
    with enable() as mode:
        got = F.linear(x, weight)
        relu = torch.relu(weight)
    torch.testing.assert_close(got, torch.full((3, 5), 42.0))
    assert mode.native == {
        "torch.nn.functional.linear: _ConstantLinear argument has its own __torch_function__": 1,
        "torch.relu: _ConstantLinear argument has its own __torch_function__": 1,
    }
    assert not mode.counts
    torch.testing.assert_close(relu, torch.relu(WEIGHT.float()))
    # a subclass with torch's default __torch_function__ (and nn.Parameter) still routes
    with enable() as mode:
        got = F.gelu(x.as_subclass(_Plain))
        linear = F.linear(x, torch.nn.Parameter(WEIGHT.float()))
    assert type(got) is _Plain and mode.counts == {"gelu": 1, "linear": 1}
    torch.testing.assert_close(got.as_subclass(torch.Tensor), F.gelu(x))
    assert "LinearFunctionBackward" in _nodes(linear)


class _OwnComposites(torch.Tensor):
    """A tensor subclass that gives two Python-level ``torch.nn.functional`` functions
    (``softmin``, which calls a covered softmax, and the uncovered ``hardtanh``) its own
    meaning."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (F.softmin, F.hardtanh):
            return torch.full(args[0].shape, 7.0)
        return super().__torch_function__(func, types, args, kwargs or {})


@needs_redispatch
def test_python_level_functions_reach_a_subclass_with_its_own_torch_function():
    # the mode re-dispatched F's Python-level functions into their bodies before the
    # subclass saw them: its own softmin / hardtanh were silently bypassed, even though
    # hardtanh is not a torchbp op
    x = make((2, 3)).as_subclass(_OwnComposites)
    with enable() as mode:
        softmin, hardtanh = F.softmin(x, -1), F.hardtanh(x)
    torch.testing.assert_close(softmin, torch.full((2, 3), 7.0))
    torch.testing.assert_close(hardtanh, torch.full((2, 3), 7.0))
    assert not mode.counts and not mode.native


@pytest.mark.parametrize(
    "call, op",
    [
        (lambda x: torch.tanh(x, out=None), "tanh"),
        (lambda x: torch.sigmoid(x, out=None), "sigmoid"),
        (lambda x: torch.softmax(x, 1, out=None), "softmax"),
        (lambda x: torch.log_softmax(x, 1, out=None), "log_softmax"),
        (lambda x: F.linear(x, WEIGHT, out=None), "linear"),
        (lambda x: F.gelu(x, out=None), "gelu"),
        (lambda x: F.softplus(x, out=None), "softplus"),
    ],
    ids=["tanh", "sigmoid", "softmax", "log_softmax", "linear", "gelu", "softplus"],
)
def test_out_none_is_the_default_and_routes(call, op):
    # out=None is the default, not an output buffer: such calls stayed native,
    # reported as 'out= given'
    x = make((4, 6), torch.float64).requires_grad_()
    want = call(x)
    with enable() as mode:
        got = call(x)
    torch.testing.assert_close(got, want)
    assert mode.counts == {op: 1} and not mode.native
    assert _torchbp_nodes(got)


def _implicit_dim_warning_origin(call) -> tuple[str, int]:
    """``(file, line)`` the implicit-dim warning of ``call()`` points at."""
    with pytest.warns(UserWarning, match="Implicit dimension choice") as record:
        call()
    (warning,) = [w for w in record if "Implicit dimension" in str(w.message)]
    return warning.filename, warning.lineno


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("stacklevel", [3, 4])
def test_implicit_dim_warning_points_where_natives_does(name, stacklevel):
    # under the mode the warning pointed into torchbp's mode.py (the default filter then
    # shows it once for all call sites, none of them the user's)
    x = make((3, 4)).requires_grad_()
    fn = getattr(F, name)

    def user_code():
        return fn(x, _stacklevel=stacklevel)

    want = _implicit_dim_warning_origin(user_code)
    with enable() as mode:
        got = _implicit_dim_warning_origin(user_code)
    assert mode.counts == {name: 1}
    assert got == want


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("stacklevel", [0, 1, 2])
def test_implicit_dim_warning_inside_the_function_points_where_natives_does(name, stacklevel):
    # a level naming a frame inside F.softmax (its helper, its own line) was raised by the
    # dispatch frames like the caller's: passed on natively (no_grad) it pointed into
    # torchbp/mode.py or torch/overrides.py instead of native's own frame
    x, fn = make((3, 4)), getattr(F, name)

    def user_code():
        with torch.no_grad():
            return fn(x, _stacklevel=stacklevel)

    want = _implicit_dim_warning_origin(user_code)
    with enable():
        got = _implicit_dim_warning_origin(user_code)
    assert got == want


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("stacklevel", [0, 1, 2])
def test_implicit_dim_warning_inside_a_routed_function_points_into_natives(name, stacklevel):
    # routed, native's helper never runs: the nearest frame inside the function called is
    # native's own (the same file as without the mode); it pointed into torchbp/mode.py or
    # torch/overrides.py, frames of the dispatch
    x, fn = make((3, 4)).requires_grad_(), getattr(F, name)
    want, _ = _implicit_dim_warning_origin(lambda: fn(x, _stacklevel=stacklevel))
    with enable() as mode:
        got, _ = _implicit_dim_warning_origin(lambda: fn(x, _stacklevel=stacklevel))
    assert mode.counts == {name: 1}
    assert got == want


@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
def test_implicit_dim_warning_of_a_module_points_where_natives_does(name):
    module, x = getattr(torch.nn, name)(), make((3, 4)).requires_grad_()
    want = _implicit_dim_warning_origin(lambda: module(x))
    with enable():
        got = _implicit_dim_warning_origin(lambda: module(x))
    assert got == want


@needs_redispatch
@pytest.mark.parametrize(
    "call",
    [
        lambda x: F.softmin(x),
        lambda x: F.softmin(x, None, 4),  # _stacklevel passed positionally
        # a level inside F.softmin itself (its helper, its own line) was shifted up with
        # the others, into torch/overrides.py
        lambda x: F.softmin(x, _stacklevel=1),
        lambda x: F.softmin(x, _stacklevel=2),
        lambda x: torch.nn.Softmin()(x),
        lambda x: _under_no_grad(F.softmin, x),
    ],
    ids=[
        "F.softmin",
        "F.softmin-stacklevel-4",
        "F.softmin-stacklevel-1",
        "F.softmin-stacklevel-2",
        "nn.Softmin",
        "no_grad",
    ],
)
def test_implicit_dim_warning_of_a_redispatched_composite_points_where_natives_does(call):
    # F.softmin is re-dispatched with the mode active: its body ran three frames below its
    # caller (torch's dispatch, the mode, redispatch_function), so its warning pointed
    # into torch/overrides.py instead of the caller's line
    x = make((3, 4)).requires_grad_()

    def user_code():
        return call(x)

    want = _implicit_dim_warning_origin(user_code)
    with enable() as mode:
        got = _implicit_dim_warning_origin(user_code)
    assert got == want
    assert mode.counts["softmax"] <= 1  # the -x.softmax() inside, routed with grad on


def _under_no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: TF.softmax(x),  # torchbp's own functional: the mode hands it on
        lambda x: TF.log_softmax(x),
        lambda x: torchbp.nn.Softmax()(x),  # a converted nn.Softmax()
        lambda x: TF.softmin(x),  # an op's extra functional (softmax's softmin)
        lambda x: torchbp.nn.Softmin()(x),  # and its module twin
        lambda x: _under_no_grad(F.softmax, x),  # not routed: nothing recorded
        lambda x: F.log_softmax(x.long(), dtype=torch.float64),  # not routed: int input
    ],
    ids=[
        "TF.softmax",
        "TF.log_softmax",
        "torchbp.nn.Softmax",
        "TF.softmin",
        "torchbp.nn.Softmin",
        "no_grad",
        "int-input",
    ],
)
def test_implicit_dim_warning_of_a_call_handed_on_points_where_it_does_without_the_mode(call):
    # calls the mode does not route ran below its __torch_function__, so their warning
    # pointed into torchbp's mode.py (or functional.py) instead of the caller's line
    x = make((3, 4)).requires_grad_()
    want = _implicit_dim_warning_origin(lambda: call(x))
    with enable():
        got = _implicit_dim_warning_origin(lambda: call(x))
    assert got == want


def test_counts_only_calls_that_returned():
    # a routed call that raised (a bad argument) was counted as routed
    x = make((4, 6), torch.float64).requires_grad_()
    with enable() as mode:
        with pytest.raises(RuntimeError):
            F.linear(x, WEIGHT[:, :5])
        with pytest.raises(IndexError):
            F.cross_entropy(x, torch.tensor([0, 1, 2, 9]))
        with pytest.raises(TypeError):
            torch.relu(x.long(), out=None)  # native (integer input) and raises
        F.relu(x)
    assert mode.counts == {"relu": 1} and not mode.native


def test_routed_table_is_derived_from_the_registry():
    table = routed_functions()
    for op in OPS.values():
        if op.torch_functional is not None:
            assert op.name in table.values()
    for spelling in ("Tensor.relu", "Tensor.sigmoid", "Tensor.tanh", "Tensor.softmax"):
        assert table[spelling] == spelling.split(".")[1]
    assert table["Tensor.sigmoid_"].startswith("native:")


def test_calls_made_by_torchbp_are_not_routed_again():
    """SiLU's forward, cross-entropy's and the softmax wrappers call torch ops that the
    mode covers (sigmoid, softmax, ...): each routed call counts once, nested modes too."""
    x = make((4, 6)).requires_grad_()
    outer_probe = []

    with enable() as outer:
        with enable() as inner:
            F.silu(x)
            F.cross_entropy(x, TARGET)
            F.log_softmax(x, 1)
            with _Recorder(outer_probe):
                F.gelu(x)
    assert inner.counts == {"silu": 1, "cross_entropy": 1, "log_softmax": 1, "gelu": 1}
    assert not outer.counts and not outer.native
    # a recording mode above the routing one sees only the user's call
    assert outer_probe == ["gelu"]


class _Recorder(torch.overrides.TorchFunctionMode):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.log.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_innermost_mode_routes_after_exit_the_outer_one_does():
    x = make((2, 3))
    with enable() as outer:
        F.relu(x)
        with enable() as inner:
            F.relu(x)
            x.tanh()
        x.sigmoid()
    assert inner.counts == {"relu": 1, "tanh": 1}
    assert outer.counts == {"relu": 1, "sigmoid": 1}
    # outside every mode: native again
    assert _nodes(F.relu(x.requires_grad_())) == {"ReluBackward0", "AccumulateGrad"}


def test_decorator_counts_accumulate_and_recursion_works():
    mode = enable()

    @mode
    def deep(x, n):
        """Docstring kept."""
        return x if n == 0 else deep(F.gelu(x), n - 1)

    x = make((2, 3)).requires_grad_()
    out = deep(x, 3)
    deep(x, 1)
    assert mode.counts == {"gelu": 4}
    assert deep.__name__ == "deep" and deep.__doc__ == "Docstring kept."
    assert "GELUFunctionBackward" in _nodes(out)
    assert isinstance(mode, TorchbpMode) and "gelu=4" in repr(mode)


def test_decorated_generator_runs_each_step_under_the_mode_and_only_those():
    # the decorator returned the generator object and left the mode before the body ran:
    # nothing in a decorated generator was routed
    mode = enable()

    @mode
    def activations(x):
        """Yields GELUs."""
        received = yield F.gelu(x)
        yield F.gelu(x * received)
        return "done"

    x = make((2, 3)).requires_grad_()
    steps = activations(x)
    first = next(steps)
    between = F.gelu(x)  # the caller's code between two steps: no mode
    second = steps.send(2.0)
    with pytest.raises(StopIteration) as stop:
        next(steps)
    assert stop.value.value == "done" and activations.__doc__ == "Yields GELUs."
    assert mode.counts == {"gelu": 2}
    assert "GELUFunctionBackward" in _nodes(first) and "GELUFunctionBackward" in _nodes(second)
    assert not _torchbp_nodes(between)
    torch.testing.assert_close(second, F.gelu(x * 2.0))


def test_decorated_generator_gets_thrown_exceptions_and_closes_under_the_mode():
    mode = enable()
    seen = []

    @mode
    def steps(x):
        try:
            yield F.relu(x)
        except KeyError:
            seen.append("thrown")
            yield F.relu(x)
        finally:
            seen.append(type(F.relu(x).grad_fn).__name__)

    x = make((2, 3)).requires_grad_()
    gen = steps(x)
    next(gen)
    gen.throw(KeyError("k"))
    gen.close()
    assert seen == ["thrown", "ReLUFunctionBackward"] and mode.counts == {"relu": 3}


def test_decorated_coroutine_runs_each_step_under_the_mode():
    import asyncio

    mode = enable()
    outside = []

    @mode
    async def forward(x):
        y = F.gelu(x)
        await asyncio.sleep(0)
        return F.relu(y)

    async def other_task(x):
        outside.append(F.gelu(x))  # runs while forward is suspended: no mode

    async def main(x):
        return await asyncio.gather(forward(x), other_task(x))

    x = make((2, 3)).requires_grad_()
    out, _ = asyncio.run(main(x))
    assert mode.counts == {"gelu": 1, "relu": 1}
    assert {"GELUFunctionBackward", "ReLUFunctionBackward"} <= _nodes(out)
    assert not _torchbp_nodes(outside[0])


def test_decorating_an_async_generator_is_refused():
    async def agen(x):
        yield F.gelu(x)

    with pytest.raises(TypeError, match="async generator function 'agen'"):
        enable()(agen)


def test_decorating_a_class_is_refused():
    # the class became a function making instances under the mode: their forward,
    # called later, ran natively
    class Net(torch.nn.Module):
        def forward(self, x):
            return F.gelu(x)

    with pytest.raises(TypeError, match="cannot decorate the class 'Net'.*forward"):
        enable()(Net)


def test_mode_is_per_thread():
    x = make((2, 3)).requires_grad_()
    seen = {}

    def other_thread():
        seen["nodes"] = _nodes(F.relu(x))

    with enable() as mode:
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        here = F.relu(x)
    assert "ReluBackward0" in seen["nodes"]
    assert "ReLUFunctionBackward" in _nodes(here)
    assert mode.counts == {"relu": 1}


def test_an_exception_inside_the_mode_restores_everything():
    """Raised in the body, or by a routed op rejecting its arguments: the mode is off the
    stack afterwards (native again), and the same instance routes when entered again."""
    x = make((3, 5)).requires_grad_()
    mode = enable()
    with pytest.raises(KeyError), mode:
        F.relu(x)
        raise KeyError("the user's")
    assert _nodes(F.relu(x)) == {"ReluBackward0", "AccumulateGrad"}
    with pytest.raises(IndexError), mode:
        F.cross_entropy(x, torch.tensor([0, 1, 9]))  # raised inside torchbp's function
    assert _nodes(F.relu(x)) == {"ReluBackward0", "AccumulateGrad"}
    with mode:
        y = F.softmax(x, -1)
    assert "SoftmaxFunctionBackward" in _nodes(y)
    assert mode.counts == {"relu": 1, "softmax": 1}  # the call that raised is not counted


def test_the_same_mode_entered_inside_itself_counts_each_call_once():
    x = make((2, 3)).requires_grad_()
    mode = enable()
    with mode:
        F.gelu(x)
        with mode:
            F.gelu(x)
        y = F.gelu(x)  # still under the outer entry
    assert mode.counts == {"gelu": 3}
    assert "GELUFunctionBackward" in _nodes(y)
    assert _nodes(F.gelu(x)) == {"GeluBackward0", "AccumulateGrad"}


def test_threads_each_in_their_own_mode_train_the_same_as_native():
    """Two threads running forward and backward at once, each under its own enable():
    each routes only its own calls and gets native's gradients."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 5)
    ).double()
    x, target = make((7, 6), torch.float64), torch.randint(5, (7,))

    def loss_of(model):
        return F.cross_entropy(model(x), target, label_smoothing=0.1)

    want = torch.autograd.grad(loss_of(net), list(net.parameters()))
    results, barrier = {}, threading.Barrier(2)

    def train(name):
        model = copy.deepcopy(net)
        barrier.wait()
        with enable() as mode:
            for _ in range(5):
                loss = loss_of(model)
        results[name] = torch.autograd.grad(loss, list(model.parameters())), mode.counts

    threads = [threading.Thread(target=train, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, counts in results.values():
        torch.testing.assert_close(got, want)
        assert counts == {"linear": 10, "gelu": 5, "cross_entropy": 5}


def test_backward_and_double_backward_run_outside_the_mode():
    x = make((3, 4), torch.float64).requires_grad_()
    with enable() as mode:
        y = torch.tanh(x).sum()
        (gx,) = torch.autograd.grad(y, x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.sum(), x)
    assert mode.counts == {"tanh": 1}  # backward added no routed call
    t = torch.tanh(x.detach())
    torch.testing.assert_close(gx, 1 - t**2)
    torch.testing.assert_close(ggx, -2 * t * (1 - t**2))


def test_torch_func_transforms_under_the_mode():
    """vmap(grad) and jvp of routed calls: torchbp's Functions under torch.func."""
    x, t = make((5, 4), torch.float64), make((5, 4), torch.float64, seed=3)

    def f(v):
        return F.log_softmax(F.gelu(v), -1).sum()

    want = torch.func.vmap(torch.func.grad(f))(x)
    want_tangent = torch.func.jvp(F.silu, (x,), (t,))[1]
    with enable() as mode:
        got = torch.func.vmap(torch.func.grad(f))(x)
        got_tangent = torch.func.jvp(F.silu, (x,), (t,))[1]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_tangent, want_tangent)
    assert mode.counts == {"gelu": 1, "log_softmax": 1, "silu": 1}


def test_autocast_dtypes_as_native():
    x, w = make((4, 6)).requires_grad_(), make((5, 6), seed=1).requires_grad_()

    def calls():
        h = F.linear(x, w)
        return h, F.gelu(h), F.cross_entropy(h, TARGET), h.softmax(-1)

    with torch.autocast("cpu", torch.bfloat16):
        want = calls()
        with enable() as mode:
            got = calls()
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert sum(mode.counts.values()) == 4
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g.float(), w_.float(), atol=2e-2, rtol=2e-2)


@needs_redispatch
def test_multihead_attention_projections_and_weights_softmax_route():
    """``F.multi_head_attention_forward`` reaches the mode as a whole; it is re-dispatched
    with the mode active, so its F.linear and (need_weights=True) F.softmax route."""
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    q = make((2, 3, 8)).requires_grad_()
    want, _ = mha(q, q, q)
    with enable() as mode:
        got, _ = mha(q, q, q)
    torch.testing.assert_close(got, want)
    assert mode.counts == {"linear": 2, "softmax": 1}
    names = _nodes(got)
    assert "LinearFunctionBackward" in names and "SoftmaxFunctionBackward" in names
    assert not names & {"AddmmBackward0", "MmBackward0", "SoftmaxBackward0"}


def test_calls_without_grad_mode_pass_through():
    """Nothing records a backward under no_grad: covered calls stay native, and
    MultiheadAttention (whose fast path an active mode turns off) gives native's result."""
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    q = make((2, 3, 8)).requires_grad_()
    with torch.no_grad():
        want, _ = mha(q, q, q, need_weights=False)
    with torch.no_grad(), enable() as mode:
        got, _ = mha(q, q, q, need_weights=False)
        F.relu(q)
    with torch.inference_mode(), enable() as inference:
        F.gelu(q)
    torch.testing.assert_close(got, want)
    assert not mode.counts and not mode.native and not inference.counts


# native backward nodes of linear, GELU, softmax, log-softmax and NLL
NATIVE_NODES = {
    "AddmmBackward0",
    "MmBackward0",
    "GeluBackward0",
    "SoftmaxBackward0",
    "LogSoftmaxBackward0",
    "NllLossBackward0",
}


def _encoder_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.TransformerEncoderLayer(
            16, 2, dim_feedforward=32, activation="gelu", batch_first=True, dropout=0.0
        ),
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 5, 3),
    ).double()


def _train(model, batches, steps_under):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses, node_names = [], set()
    for x, y in batches:
        with steps_under():
            loss = F.cross_entropy(model(x), y)
        node_names |= _nodes(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, node_names


@needs_redispatch
def test_transformer_encoder_trains_on_torchbp_backward_as_native():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, 16, generator=g, dtype=torch.float64)
    batches = [(x, torch.randint(3, (8,), generator=g))] * 6
    native = _encoder_model()
    routed = copy.deepcopy(native)
    mode = enable()
    want, native_names = _train(native, batches, torch.enable_grad)
    got, routed_names = _train(routed, batches, lambda: mode)
    assert native_names & NATIVE_NODES == {
        "AddmmBackward0",
        "MmBackward0",
        "GeluBackward0",
        "LogSoftmaxBackward0",
        "NllLossBackward0",
    }
    assert not routed_names & NATIVE_NODES
    assert {"LinearFunctionBackward", "GELUFunctionBackward", "CrossEntropyFunctionBackward"} <= (
        routed_names
    )
    # per step: in-projection, out-projection, 2 feed-forward and the head; GELU; the loss
    assert mode.counts == {"linear": 5 * 6, "gelu": 6, "cross_entropy": 6}
    assert want[-1] < want[0]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)


def test_compile_traces_through_the_mode():
    """torch.compile of a function called inside the mode captures torchbp's Functions."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x, w, y):
        return F.cross_entropy(F.gelu(F.linear(x, w)), y)

    x, w = make((4, 6)).requires_grad_(), make((5, 6), seed=1).requires_grad_()
    want, want_grads = grads(lambda a, b: step(a, b, TARGET), x, w)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    with enable() as mode:
        got, got_grads = grads(lambda a, b: compiled(a, b, TARGET), x, w)
        grads(lambda a, b: compiled(a, b, TARGET), x, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)
    assert len(graphs) == 1  # no recompilation on the second call
    # linear, GELU and cross-entropy captured as torchbp Functions, with their backward
    assert graphs[0].code.count("higher_order.autograd_function_apply(") == 3
    assert not mode.counts  # calls inside compiled code are not counted


def test_compile_fullgraph_traces_python_level_functions_the_mode_does_not_route():
    """A Python-level torch.nn.functional function the mode does not route (F.layer_norm,
    F.softmin, ...; nn.LayerNorm, nn.MultiheadAttention) was re-dispatched with
    redispatch_function, which Dynamo cannot trace: torch.compile(fullgraph=True) under
    the mode failed ('Observed exception'). Compiled, such a call runs its body natively
    (as without redispatch_function), and the covered calls around it are captured."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(x, w, y):
        return F.cross_entropy(F.linear(F.softmin(F.layer_norm(x, (6,)), 1), w), y)

    x, w = make((4, 6)).requires_grad_(), make((5, 6), seed=1).requires_grad_()
    want, want_grads = grads(lambda a, b: step(a, b, TARGET), x, w)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    with enable():
        got, got_grads = grads(lambda a, b: compiled(a, b, TARGET), x, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)
    assert len(graphs) == 1
    # linear and cross-entropy captured as torchbp Functions
    assert graphs[0].code.count("higher_order.autograd_function_apply(") == 2


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = (torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3), torch.nn.Softmax(-1))
    return torch.nn.Sequential(*layers).double()


def test_jit_trace_under_the_mode_records_native_calls_that_save_and_run():
    """torch.jit.trace under the mode failed its own sanity check ('Graphs differed across
    invocations'): the trace, made with grad enabled, was routed; torch's check re-traces
    under no_grad, which was not. A trace records the calls as native's (the same graph
    both times, saved with torch.jit.save; it later runs where no mode reaches)."""
    import io

    model, x = _mlp(), make((4, 6), torch.float64).requires_grad_()
    want, want_grads = grads(model, x)
    with enable() as mode:
        traced = torch.jit.trace(model, x)
    assert not mode.counts
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    for program in (traced, torch.jit.load(buffer)):
        got, got_grads = grads(program, x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grads, want_grads)


# -- ERMClassifier (backend torchbp) -----------------------------------------------------


def _fit_steps(model, steps=3):
    pl = pytest.importorskip("pytorch_lightning")
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(steps * 8, 6, generator=g), TARGET.repeat(steps * 2)
    )
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))


def _erm_class():
    pytest.importorskip("pytorch_lightning")
    from torchbp.lightning import ERMClassifier

    class FunctionalERM(ERMClassifier):
        """A subclass whose forward calls torch.nn.functional on the network's weights."""

        def forward(self, x):
            first, last = self.net[0], self.net[-1]
            return F.linear(F.gelu(F.linear(x, first.weight, first.bias)), last.weight, last.bias)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.graph_nodes = _nodes(loss)
            return loss

    return ERMClassifier, FunctionalERM


def test_erm_classifier_routes_the_functional_calls_of_a_subclass():
    _, FunctionalERM = _erm_class()
    model = FunctionalERM(input_size=6, num_classes=5, hidden_sizes=[7])
    _fit_steps(model)
    assert model.routing.counts == {"linear": 2 * 3, "gelu": 3}
    assert {"LinearFunctionBackward", "GELUFunctionBackward"} <= model.graph_nodes
    assert not model.graph_nodes & NATIVE_NODES


def test_erm_classifier_stock_network_runs_without_the_mode():
    """torchbp.nn modules need no routing (the mode would only add its per-call cost);
    a network with a native module gets it; backend torch never does."""
    ERMClassifier, _ = _erm_class()
    stock = ERMClassifier(input_size=6, num_classes=5, hidden_sizes=[7])
    _fit_steps(stock)
    assert isinstance(stock.routing, TorchbpMode) and not stock.routing.counts
    swapped = ERMClassifier(input_size=6, num_classes=5, hidden_sizes=[7])
    swapped.net[1] = torch.nn.Tanh()
    _fit_steps(swapped)
    assert swapped.routing.counts == {"tanh": 3}
    assert ERMClassifier(input_size=6, num_classes=5, backend="torch").routing is None


def test_routes_on_each_device(device):
    """A functional MLP + loss under the mode on every device (CUDA in cuda_checks.sh):
    values and gradients equal native, only torchbp nodes for the covered ops."""
    w1 = make((8, 6), torch.float32, seed=2).to(device)
    w2 = make((5, 8), torch.float32, seed=3).to(device)
    x, target = make((4, 6), torch.float32).to(device), TARGET.to(device)

    def net(x, w1, w2):
        return F.cross_entropy(F.linear(F.gelu(F.linear(x, w1)), w2).softmax(-1), target)

    want, want_grads = grads(net, x, w1, w2)
    with enable() as mode:
        got = net(*(t.detach().requires_grad_() for t in (x, w1, w2)))
        assert {"LinearFunctionBackward", "GELUFunctionBackward"} <= _torchbp_nodes(got)
        got, got_grads = grads(net, x, w1, w2)
    assert mode.counts["linear"] >= 4 and mode.counts["softmax"] >= 2
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)


def test_implicit_dim_softmax_under_the_mode_compiles_with_fullgraph():
    """``F.softmax(x)`` without ``dim`` routed by the mode inside ``torch.compile(fullgraph=
    True)``: the implicit-dim warning (a ``warnings.warn`` Dynamo cannot trace) made the
    compile fail, where native's compiles."""

    def f(x):
        return F.softmax(x, dim=None, _stacklevel=3)

    x = make((3, 4), torch.float64)
    with enable(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, torch.softmax(x, 1))
