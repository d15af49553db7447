"""``torchbp.convert``: swap supported torch.nn modules for torchbp twins, and back."""

from __future__ import annotations

import copy
import copyreg
import dataclasses
import inspect
import pickle
import sys

import pytest
import torch
from tests._support import build_module
from torch import nn

import torchbp
from torchbp import nn as bpnn
from torchbp.ops import OPS, module_twins

pytestmark = pytest.mark.usefixtures("seed")

# every supported torch.nn class and its twin
PAIRS = list(module_twins().items())
#: the native modules of the ops' extra_modules (``Softmin``, ``Softmax2d``)
EXTRA_NATIVE = {native for op in OPS.values() for _, native in op.extra_modules}


def _build(cls: type[nn.Module]) -> nn.Module:
    """An instance of a supported torch.nn class: ``build_module``'s for an op's own
    module, with a non-default ``dim`` where an extra module takes one (``Softmin``)."""
    if cls not in EXTRA_NATIVE:
        return build_module(cls)
    return cls(dim=1) if "dim" in inspect.signature(cls).parameters else cls()


class Block(nn.Module):
    """A user module holding supported modules in attributes, a list and a dict."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.acts = nn.ModuleList([nn.GELU(), nn.Tanh()])
        self.heads = nn.ModuleDict({"out": nn.Linear(6, 3), "norm": nn.LayerNorm(3)})
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, y):
        h = self.acts[1](self.acts[0](self.fc(x)))
        return self.loss(self.heads["norm"](self.heads["out"](h)), y)


class MyLinear(nn.Linear):
    """A user subclass (may override forward): convert must leave it alone."""

    def forward(self, input):
        return super().forward(input) * 2


def _model():
    return nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.1)),
        Block(),
    )


def _types(module):
    return [type(m) for m in module.modules()]


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model[1](model[0](x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("torch_cls, bp_cls", PAIRS, ids=lambda cls: cls.__name__)
def test_each_supported_module_round_trips(torch_cls, bp_cls):
    m = _build(torch_cls)
    params = list(m.parameters())
    state = {k: v.clone() for k, v in m.state_dict().items()}
    out = torchbp.convert(m)
    assert out is m and type(m) is bp_cls
    assert list(m.parameters()) == params and all(a is b for a, b in zip(m.parameters(), params))
    back = torchbp.convert(m, to="torch")
    assert back is m and type(m) is torch_cls
    assert m.state_dict().keys() == state.keys()
    assert repr(m) == repr(_build(torch_cls))


def test_recursive_in_containers_and_custom_modules():
    model = _model()
    before = _types(model)
    params = list(model.parameters())
    out = torchbp.convert(model)
    assert out is model
    assert type(model[0][0]) is bpnn.Linear and type(model[0][1]) is bpnn.LeakyReLU
    block = model[1]
    assert type(block) is Block  # the custom module itself stays
    assert type(block.fc) is bpnn.Linear
    assert [type(a) for a in block.acts] == [bpnn.GELU, bpnn.Tanh]
    assert type(block.heads["out"]) is bpnn.Linear
    assert type(block.heads["norm"]) is nn.LayerNorm  # unsupported: left alone
    assert type(block.loss) is bpnn.CrossEntropyLoss
    assert block.loss.label_smoothing == 0.1
    # the same Parameter objects, in the same order
    after = list(model.parameters())
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params))
    # and back: exactly the original classes
    torchbp.convert(model, to="torch")
    assert _types(model) == before


def test_converted_model_matches_original():
    model = _model()
    reference = _model()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 4), torch.randint(3, (5,))
    want = _loss_and_grads(reference, x, y)
    torchbp.convert(model)
    got = _loss_and_grads(model, x, y)
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)


def test_top_level_module_itself_is_converted():
    m = nn.Linear(3, 2)
    assert type(torchbp.convert(m)) is bpnn.Linear
    assert type(torchbp.convert(m, to="torch")) is nn.Linear


def test_user_subclass_and_unsupported_left_alone():
    model = nn.Sequential(MyLinear(3, 3), nn.ReLU(), nn.Dropout(0.0), nn.Conv1d(1, 1, 1))
    torchbp.convert(model)
    assert type(model[0]) is MyLinear
    assert type(model[1]) is bpnn.ReLU
    assert type(model[2]) is nn.Dropout and type(model[3]) is nn.Conv1d
    x = torch.randn(2, 3)
    torch.testing.assert_close(
        model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias) * 2
    )


def test_torchbp_subclass_left_alone_by_to_torch():
    class MyBPLinear(bpnn.Linear):
        pass

    model = nn.Sequential(MyBPLinear(3, 3), bpnn.Tanh())
    torchbp.convert(model, to="torch")
    assert type(model[0]) is MyBPLinear
    assert type(model[1]) is nn.Tanh


def test_to_torch_on_plain_model_is_a_no_op():
    model = _model()
    before = _types(model)
    torchbp.convert(model, to="torch")
    assert _types(model) == before


def test_idempotent():
    model = _model()
    torchbp.convert(model)
    types = _types(model)
    torchbp.convert(model)
    assert _types(model) == types


def test_inplace_false_leaves_original_untouched():
    model = _model()
    before = _types(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = torchbp.convert(model, inplace=False)
    assert converted is not model
    assert _types(model) == before  # original unchanged
    assert type(converted[0][0]) is bpnn.Linear
    assert type(converted[1].heads["out"]) is bpnn.Linear
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
        torch.testing.assert_close(converted.state_dict()[k], v, rtol=0, atol=0)
    # a copy: its parameters are new objects, so training it leaves the original alone
    assert all(a is not b for a, b in zip(converted.parameters(), model.parameters()))
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(1.0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_hooks_and_training_flag_kept():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model.eval()
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(type(m)))
    torchbp.convert(model)
    model(torch.randn(1, 3))
    assert calls == [bpnn.Linear]
    assert not model.training and not model[0].training


@pytest.mark.parametrize("to", ["TORCH", "nn", "", None, "torchbp "])
def test_bad_to_raises(to):
    model = _model()
    before = _types(model)
    with pytest.raises(ValueError, match="to"):
        torchbp.convert(model, to=to)
    assert _types(model) == before


def test_non_module_raises():
    with pytest.raises(TypeError):
        torchbp.convert(torch.randn(3))


# -- subclasses of supported modules, and the report ---------------------------------------


class PlainGELU(nn.GELU):
    """A user subclass that keeps nn.GELU's forward and adds a method."""

    def describe(self):
        return f"gelu({self.approximate})"


class MyLinearChild(MyLinear):
    """Inherits an overridden forward: stays native too."""


def _node_names(t):
    seen, names, stack = set(), set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def test_subclass_without_forward_override_is_converted_and_keeps_its_identity():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    proj, act = NonDynamicallyQuantizableLinear(4, 3), PlainGELU(approximate="tanh")
    model = nn.Sequential(proj, act)
    reference = nn.Sequential(nn.Linear(4, 3), nn.GELU(approximate="tanh"))
    reference.load_state_dict(model.state_dict())
    params, text, keys = list(model.parameters()), repr(model), model.state_dict().keys()
    torchbp.convert(model)
    assert isinstance(proj, NonDynamicallyQuantizableLinear) and isinstance(proj, bpnn.Linear)
    assert isinstance(act, PlainGELU) and isinstance(act, bpnn.GELU)
    assert type(proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert act.describe() == "gelu(tanh)"
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert repr(model) == text and model.state_dict().keys() == keys
    x = torch.randn(5, 4, requires_grad=True)
    out = model(x)
    assert {"LinearFunctionBackward", "GELUFunctionBackward"} <= _node_names(out)
    want, want_grads = _loss_and_grads_of(reference, x)
    got, got_grads = _loss_and_grads_of(model, x)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    # one combined class per user class, reused
    other = torchbp.convert(PlainGELU())
    assert type(other) is type(act)
    # and back to exactly the original classes
    torchbp.convert(model, to="torch")
    assert type(proj) is NonDynamicallyQuantizableLinear and type(act) is PlainGELU


def _loss_and_grads_of(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    loss = model(x).square().sum()
    loss.backward()
    return loss.detach(), [x.grad, *(p.grad for p in model.parameters())]


def test_converted_subclass_pickles_and_deep_copies():
    import pickle

    model = torchbp.convert(nn.Sequential(PlainGELU(), nn.MultiheadAttention(4, 2)))
    converted = type(model[0])
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(copied[0]) is converted and type(copied[1].out_proj) is type(model[1].out_proj)
        torch.testing.assert_close(copied[1].out_proj.weight, model[1].out_proj.weight)
        assert copied[0].describe() == "gelu(none)"


class ReducingLinear(nn.Linear):
    """A user subclass that says how it pickles (its constructor's arguments and state)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.sizes = (in_features, out_features)

    def __reduce__(self):
        return (_rebuild_reducing_linear, (self.sizes, self.state_dict()))


def _rebuild_reducing_linear(sizes, state):
    module = ReducingLinear(*sizes)
    module.load_state_dict(state)
    return module


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_converted_subclass_with_its_own_reduction_pickles_and_deep_copies(how):
    import pickle

    # the user's __reduce__ was bypassed (its callable and arguments dropped): the copy
    # was an empty shell ('ReducingLinear' object has no attribute '_backward_hooks' on
    # its first call)
    module = torchbp.convert(ReducingLinear(4, 3))
    copied = pickle.loads(pickle.dumps(module)) if how == "pickle" else copy.deepcopy(module)
    assert type(copied) is type(module)
    assert copied.weight is not module.weight
    torch.testing.assert_close(copied.state_dict(), module.state_dict())
    x = torch.randn(2, 4, requires_grad=True)
    out = copied(x)
    assert "LinearFunctionBackward" in _node_names(out)
    torch.testing.assert_close(out, module(x))


def _pickled_copy(module: nn.Module) -> nn.Module:
    """``module`` through pickle, checked to come back as its own (combined) class with its
    state."""
    import pickle

    copied = pickle.loads(pickle.dumps(module))
    assert type(copied) is type(module)
    torch.testing.assert_close(copied.state_dict(), module.state_dict())
    return copied


class ClassmethodReducingLinear(nn.Linear):
    """A user subclass whose reduction names its class inside its callable and arguments
    (a classmethod bound to ``type(self)``, the class nested in a tuple)."""

    def __reduce__(self):
        sizes = (self.in_features, self.out_features)
        return (type(self).rebuild, ((type(self), sizes), self.state_dict()))

    @classmethod
    def rebuild(cls, made, state):
        assert made[0] is cls
        module = cls(*made[1])
        module.load_state_dict(state)
        return module


def test_converted_subclass_whose_reduction_names_its_class_inside_pickles():

    # only the callable itself and the top-level arguments were replaced: a classmethod of
    # the combined class (or the class in a nested tuple) failed with "Can't pickle
    # <class 'torchbp.convert.ClassmethodReducingLinear'>: attribute lookup ... failed"
    module = torchbp.convert(ClassmethodReducingLinear(4, 3))
    copied = _pickled_copy(module)
    assert "LinearFunctionBackward" in _node_names(copied(torch.randn(2, 4)))


class CyclicReducingLinear(nn.Linear):
    """A user subclass whose reduction passes a list holding itself (and the class) and
    the same tuple twice."""

    def __reduce__(self):
        loop = [type(self)]
        loop.append(loop)
        shared = (type(self), 1)
        return (_rebuild_cyclic, (loop, shared, [shared], self.state_dict()))


def _rebuild_cyclic(loop, shared, holder, state):
    assert loop[1] is loop and holder[0] is shared
    module = loop[0](3, 2)
    module.load_state_dict(state)
    return module


def test_converted_subclass_whose_reduction_holds_a_cycle_pickles():

    # the renaming walked the self-holding list forever (RecursionError), and renamed the
    # shared tuple into two copies
    module = torchbp.convert(CyclicReducingLinear(3, 2))
    _pickled_copy(module)


class SetReducingLinear(nn.Linear):
    """A user subclass whose reduction names its class in a frozenset and an OrderedDict."""

    def __reduce__(self):
        from collections import OrderedDict

        kinds = OrderedDict(kind=type(self))
        return (_rebuild_from_kinds, (frozenset([type(self)]), kinds, self.state_dict()))


def _rebuild_from_kinds(classes, kinds, state):
    (cls,) = classes
    assert kinds["kind"] is cls
    module = cls(3, 2)
    module.load_state_dict(state)
    return module


def test_converted_subclass_whose_reduction_names_its_class_in_a_set_pickles():

    # only tuples, lists and plain dicts were searched: the class in a frozenset or an
    # OrderedDict failed with "Can't pickle <class 'torchbp.convert.SetReducingLinear'>"
    module = torchbp.convert(SetReducingLinear(3, 2))
    _pickled_copy(module)


class SharingReducingLinear(nn.Linear):
    """A user subclass whose reduction passes the same list (naming its class) as an
    argument and in its state."""

    def __reduce__(self):
        kinds = [type(self)]
        return (_rebuild_sharing, (kinds, self.state_dict()), {"kinds": kinds})


def _rebuild_sharing(kinds, state):
    module = kinds[0](3, 2)
    module.load_state_dict(state)
    module.made_from = kinds
    return module


def test_converted_subclass_whose_reduction_shares_a_list_across_parts_pickles_it_once():

    # the callable, the arguments and the state were renamed apart: the list they share
    # came back as two lists
    module = torchbp.convert(SharingReducingLinear(3, 2))
    copied = _pickled_copy(module)
    assert copied.kinds is copied.made_from


class KindKeepingLinear(nn.Linear):
    """A user subclass without a reduction of its own."""


def test_converted_module_whose_state_holds_its_class_pickles():

    # an attribute holding type(module) (the combined class) is in the reduction's state,
    # which was not searched: "Can't pickle <class 'torchbp.convert.KindKeepingLinear'>"
    module = torchbp.convert(KindKeepingLinear(3, 2))
    module.kind = type(module)
    module.kinds = {"all": [type(module)]}
    copied = _pickled_copy(module)
    assert copied.kind is type(copied) and copied.kinds == {"all": [type(copied)]}
    assert copied.weight is not module.weight
    torch.testing.assert_close(copied.weight, module.weight)
    assert module.kind is type(module)  # the module itself is left as it was


class Outer:
    class NestedLinear(nn.Linear):
        """A user subclass nested in a class (a qualname with a dot)."""


@dataclasses.dataclass
class _Holder:
    kind: type


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("user_class", [KindKeepingLinear, Outer.NestedLinear])
def test_combined_class_pickles_by_name_inside_any_object(user_class, protocol):
    # the combined class was made at run time under a name pickle could not find: only
    # the module's own reduction was searched for it, and a dataclass holding it failed with
    # "Can't pickle <class 'torchbp.convert.KindKeepingLinear'>: attribute lookup ... failed"
    converted = type(torchbp.convert(user_class(3, 2)))
    assert pickle.loads(pickle.dumps(converted, protocol)) is converted
    assert pickle.loads(pickle.dumps(_Holder(converted), protocol)).kind is converted
    assert converted.__name__ == user_class.__name__  # repr(module) is unchanged


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy])
def test_copy_of_a_converted_module_keeps_an_attribute_holding_its_class(how):
    # copies went through the reduction that replaced the combined class by the user
    # class: copy.copy(module).kind was KindKeepingLinear, no longer module.kind (a copy of
    # a torch module keeps such an attribute: a class is copied as itself)
    module = torchbp.convert(KindKeepingLinear(3, 2))
    module.kind = type(module)
    assert how(module).kind is module.kind


def test_combined_class_of_a_local_class_refuses_to_pickle_as_the_class_does():
    class LocalLinear(nn.Linear):
        pass

    module = torchbp.convert(LocalLinear(3, 2))
    # the class itself failed with "attribute lookup LocalLinear on torchbp.convert failed"
    for target in (module, type(module), LocalLinear):
        with pytest.raises(AttributeError, match="Can't pickle local object .*LocalLinear"):
            pickle.dumps(target)


class _OldPickle:
    """Reduces as converted modules of earlier releases did."""

    def __init__(self, *reduction):
        self.reduction = reduction

    def __reduce__(self):
        return self.reduction


def test_pickles_of_earlier_releases_still_load():
    from torchbp import convert as _  # noqa: F401  (the function shadows the module)

    module_of_convert = sys.modules["torchbp.convert"]
    state = PlainGELU(approximate="tanh").__dict__
    converted = type(torchbp.convert(PlainGELU()))
    made = (copyreg.__newobj__, (PlainGELU,))
    for old in (
        (module_of_convert._new_combined, (PlainGELU, bpnn.GELU), state),
        (module_of_convert._rebuilt_combined, (*made, PlainGELU, bpnn.GELU), state),
    ):
        loaded = pickle.loads(pickle.dumps(_OldPickle(*old)))
        assert type(loaded) is converted and loaded.describe() == "gelu(tanh)"


@pytest.mark.parametrize("how", ["pickle", "copy"])
def test_parametrized_converted_subclass_refuses_to_pickle_as_torch_does(how):
    import pickle

    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
    from torch.nn.utils import parametrize

    # torch refuses to pickle a parametrized module with a RuntimeError saying to use
    # state_dict(); a converted subclass raised IndexError('tuple index out of range')
    # instead (its reduction took torch's parametrized class for the combined class)
    module = torchbp.convert(NonDynamicallyQuantizableLinear(3, 2))
    parametrize.register_parametrization(module, "weight", nn.Identity())
    with pytest.raises(RuntimeError, match="state_dict"):
        pickle.dumps(module) if how == "pickle" else copy.copy(module)


def test_subclass_overriding_forward_stays_even_when_inherited():
    model = nn.Sequential(MyLinear(2, 2), MyLinearChild(2, 2))
    _, report = torchbp.convert(model, report=True)
    assert [type(m) for m in model] == [MyLinear, MyLinearChild]
    assert report.converted == []
    assert report.kept == [
        ("0", "MyLinear", "overrides forward of Linear"),
        ("1", "MyLinearChild", "overrides forward of Linear"),
    ]


def test_module_whose_forward_is_set_on_the_instance_stays_and_is_reported():
    # a forward set on the instance (accelerate's hooks, a user's wrapper around the
    # bound native forward) shadows the class's: the switched class was reported
    # converted while the module still ran torch's forward
    fc = nn.Linear(3, 2)
    native_forward = fc.forward
    fc.forward = lambda x: native_forward(x) * 2
    model = nn.Sequential(fc, nn.ReLU())
    _, report = torchbp.convert(model, report=True)
    assert type(fc) is nn.Linear
    assert report.converted == [("1", "ReLU", "torchbp.nn.ReLU")]
    assert report.kept == [("0", "Linear", "forward set on the instance")]
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x), torch.relu(native_forward(x) * 2))
    # one converted before its forward was set still converts back
    converted = torchbp.convert(nn.Linear(3, 2))
    converted.forward = converted.forward
    assert type(torchbp.convert(converted, to="torch")) is nn.Linear


class _Registered(nn.Linear):
    """A base that registers each subclass by name and refuses a second one of the same
    name (a plugin registry): the class convert makes for a subclass is refused."""

    names: set[str] = set()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__name__ in _Registered.names:
            raise ValueError(f"{cls.__name__} is already registered")
        _Registered.names.add(cls.__name__)


class _RegisteredHead(_Registered):
    pass


def test_subclass_whose_class_hook_refuses_the_combined_class_stays_and_the_rest_converts():
    # convert failed in the middle with the hook's ValueError: the modules before it
    # converted, those after it not, and no report
    model = nn.Sequential(nn.Linear(3, 3), _RegisteredHead(3, 2), nn.ReLU())
    _, report = torchbp.convert(model, report=True)
    assert [type(m) for m in model] == [bpnn.Linear, _RegisteredHead, bpnn.ReLU]
    [(path, name, reason)] = report.kept
    assert (path, name) == ("1", "_RegisteredHead")
    assert "cannot combine with torchbp.nn.Linear" in reason
    assert "_RegisteredHead is already registered" in reason


class _QualifiedRegistered(nn.Linear):
    """The same, keyed by the qualified name: the class convert combines has its own (it
    lives in torchbp.convert), but torch's parametrized class rebuilt on it has torch's."""

    names: set[str] = set()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in _QualifiedRegistered.names:
            raise ValueError(f"{name} is already registered")
        _QualifiedRegistered.names.add(name)


class _QualifiedHead(_QualifiedRegistered):
    pass


def test_parametrized_module_whose_class_hook_refuses_the_rebuilt_class_stays():
    # torch's parametrized class is rebuilt on the converted class: a class hook refusing
    # it stopped convert in the middle (uncaught), the modules after it left native
    from torch.nn.utils import parametrizations

    head = parametrizations.weight_norm(_QualifiedHead(3, 2))
    parametrized = type(head)
    model = nn.Sequential(head, nn.ReLU())
    _, report = torchbp.convert(model, report=True)
    assert type(head) is parametrized and type(model[1]) is bpnn.ReLU
    reasons = {path: reason for path, _, reason in report.kept}
    assert "Parametrized_QualifiedHead is already registered" in reasons["0"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_modules_stay_reported_as_compiled_not_as_lacking_an_op():
    # a scripted or traced nn.Linear was reported kept for 'no torchbp op', which names the
    # wrong cause (Linear has one): its code is compiled TorchScript, which no class
    # switch reaches
    x = torch.randn(2, 3)
    model = nn.Sequential(torch.jit.script(nn.Linear(3, 3)), torch.jit.trace(nn.Linear(3, 2), x))
    _, report = torchbp.convert(model, report=True)
    assert [path for path, _, _ in report.kept] == ["0", "1"]
    scripted, traced = (reason for _, _, reason in report.kept)
    assert "TorchScript" in scripted and "TorchScript" in traced
    # the way out for each: a traced model is traced again after convert; a scripted one
    # cannot be (torch.jit.script refuses torchbp's modules): torch.compile or trace it
    assert "before torch.jit.trace" in traced
    assert "torch.compile" in scripted and "torch.jit.trace" in scripted
    assert "before torch.jit.script" not in scripted
    with pytest.raises(NotImplementedError):  # what that advice led to
        torch.jit.script(torchbp.convert(nn.Linear(3, 3)))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_torchbp_model_converted_to_torch_is_reported_kept_not_silently_passed():
    # convert(to="torch") of a traced converted model reported 'converted 0, kept 0' while
    # its compiled code still ran torchbp's Functions (ReLUFunctionBackward in the graph)
    x = torch.randn(2, 3)
    traced = torch.jit.trace(torchbp.convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU())), x)
    plain = torch.jit.trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), x)
    model = nn.Sequential(traced, plain)
    _, report = torchbp.convert(model, to="torch", report=True)
    assert [(path, name) for path, name, _ in report.kept] == [
        ("0.0", "TracedModule"),
        ("0.1", "TracedModule"),
    ]
    reasons = [reason for _, _, reason in report.kept]
    assert "LinearFunction" in reasons[0] and "ReLUFunction" in reasons[1]
    for reason in reasons:
        assert "TorchScript" in reason and "before torch.jit.trace" in reason


def test_fx_traced_torchbp_model_converted_to_torch_is_reported_kept_not_silently_passed():
    # as the traced TorchScript model above: convert(to="torch") of a torch.fx GraphModule
    # traced after convert reported 'converted 0, kept 0' while its graph still called
    # torchbp's linear and relu (a LinearFunctionBackward in the output's graph)
    converted = torchbp.convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    model = nn.Sequential(
        torch.fx.symbolic_trace(converted),
        torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU())),
    )
    _, report = torchbp.convert(model, to="torch", report=True)
    assert [(path, name) for path, name, _ in report.kept] == [("0", "Sequential")]
    reason = report.kept[0][2]
    assert "torch.fx GraphModule" in reason and "linear, relu" in reason
    assert "before torch.fx.symbolic_trace" in reason  # (the native trace: not listed)


class _ConstantLinearWeight(torch.Tensor):
    """A weight subclass that gives ``F.linear`` its own meaning (as quantized weights do):
    every output element is 42."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            return torch.full((*args[0].shape[:-1], args[1].shape[0]), 42.0)
        return super().__torch_function__(func, types, args, kwargs or {})


class _PlainWeight(torch.Tensor):
    """A weight subclass with torch's default ``__torch_function__``."""


def test_module_with_a_parameter_of_its_own_torch_function_stays_and_is_reported():
    # the twin calls torchbp.functional.linear, which the weight's __torch_function__ does
    # not know: the converted layer silently computed a plain matmul instead of the
    # weight's own F.linear
    special, plain = nn.Linear(3, 2), nn.Linear(3, 2)
    special.weight = nn.Parameter(special.weight.detach().as_subclass(_ConstantLinearWeight))
    plain.weight = nn.Parameter(plain.weight.detach().as_subclass(_PlainWeight))
    model = nn.Sequential(special, plain)
    _, report = torchbp.convert(model, report=True)
    assert type(special) is nn.Linear and type(plain) is bpnn.Linear
    assert report.kept == [
        ("0", "Linear", "weight is a _ConstantLinearWeight with its own __torch_function__")
    ]
    torch.testing.assert_close(special(torch.randn(4, 3)), torch.full((4, 2), 42.0))


def test_report_lists_converted_and_kept_modules_with_reasons(caplog):
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Flatten(),
        nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
        MyLinear(8, 8),
        nn.ReLU(),
    )
    with caplog.at_level("INFO", logger="torchbp.convert"):
        out, report = torchbp.convert(model, report=True)
    assert out is model and report.to == "torchbp"
    assert report.converted == [
        ("2.0", "Linear", "torchbp.nn.Linear"),
        ("4", "ReLU", "torchbp.nn.ReLU"),
    ]
    # the inner Sequential is a plain container: not listed
    assert report.kept == [
        ("0", "Conv2d", "no torchbp op"),
        ("1", "Flatten", "no torchbp op"),
        ("2.1", "LayerNorm", "no torchbp op"),
        ("3", "MyLinear", "overrides forward of Linear"),
    ]
    summary = str(report)
    assert "converted 2: Linear x1, ReLU x1" in summary
    assert "MyLinear x1 (overrides forward of Linear)" in summary
    assert summary in caplog.text
    # again: everything supported is already torchbp
    _, again = torchbp.convert(model, report=True)
    assert again.converted == []
    assert ("2.0", "Linear", "already torchbp") in again.kept


def test_report_of_to_torch_names_torchbp_subclasses_it_keeps():
    class MyBPTanh(bpnn.Tanh):
        pass

    model = nn.Sequential(MyBPTanh(), bpnn.Linear(2, 2), nn.LayerNorm(2))
    _, report = torchbp.convert(model, to="torch", report=True)
    assert report.converted == [("1", "Linear", "torch.nn.modules.linear.Linear")]
    # native modules are not listed when converting back
    assert report.kept == [("0", "MyBPTanh", "a user subclass of torchbp.nn.Tanh")]


def test_transformer_encoder_layer_reach():
    """What convert reaches in a TransformerEncoderLayer: its Linear modules (the attention
    output projection included); the attention itself calls F.linear on its weights, which
    torchbp.enable() routes, not convert."""
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation="gelu")
    _, report = torchbp.convert(layer, report=True)
    assert sorted(path for path, _, _ in report.converted) == [
        "linear1",
        "linear2",
        "self_attn.out_proj",
    ]
    kept = {path: reason for path, _, reason in report.kept}
    assert kept["norm1"] == "no torchbp op"
    # the calls only torchbp.enable() reaches are named: the activation function (the
    # layer itself is a plain container) and the attention's functional projections
    assert kept[""] == (
        "holds torch.nn.functional.gelu (.activation), which no module swap reaches: "
        "torchbp.enable() routes its calls"
    )
    if hasattr(torch.overrides, "redispatch_function"):  # enable() reaches into its body
        assert kept["self_attn"].startswith(
            "no module twin; its forward calls "
            "torch.nn.functional.multi_head_attention_forward: torchbp.enable() routes "
        )
    else:
        assert kept["self_attn"] == "no torchbp op"


def test_report_names_the_functions_held_or_called_that_only_enable_reaches():
    """A TransformerEncoderLayer's default activation (F.relu) stayed native after convert
    and the report said nothing of it (the layer, a plain container, was not listed): a
    user read 'converted: Linear x3' as the whole layer. Such modules are now listed with
    the function and a pointer to torchbp.enable(), which does route it."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.act, self.gate = torch.nn.functional.silu, torch.sigmoid

        def forward(self, x):
            return self.act(self.proj(x)) * self.gate(x)

    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    model = nn.ModuleDict({"layer": layer, "block": Block()})
    _, report = torchbp.convert(model, report=True)
    kept = {path: reason for path, _, reason in report.kept}
    assert kept["layer"] == (
        "holds torch.nn.functional.relu (.activation), which no module swap reaches: "
        "torchbp.enable() routes its calls"
    )
    assert kept["block"].startswith(
        "holds torch.nn.functional.silu (.act), torch.sigmoid (.gate), which"
    )
    assert "" not in kept  # a plain container holding no function stays unlisted
    assert "TransformerEncoderLayer x1 (holds torch.nn.functional.relu" in str(report)
    # and the pointer is right: under enable() those calls are torchbp's
    x = torch.randn(2, 3, 8)
    with torchbp.enable() as mode:
        layer(x)
        model["block"](torch.randn(2, 4))
    assert mode.counts["relu"] == 1 and mode.counts["silu"] == 1
    assert mode.counts["sigmoid"] == 1


def test_convert_swaps_native_linear_cross_entropy_loss():
    native_cls = getattr(torch.nn, "LinearCrossEntropyLoss", None)
    if native_cls is None:
        pytest.skip("this torch has no nn.LinearCrossEntropyLoss")
    torch.manual_seed(0)
    loss = native_cls(8, 5, bias=True, label_smoothing=0.1)
    x, y = torch.randn(6, 8, requires_grad=True), torch.randint(5, (6,))
    want = loss(x, y)
    want_grads = torch.autograd.grad(want, (x, loss.linear.weight, loss.linear.bias))
    converted = torchbp.convert(loss)
    assert type(converted) is torchbp.nn.LinearCrossEntropyLoss and converted is loss
    got = converted(x, y)
    got_grads = torch.autograd.grad(got, (x, loss.linear.weight, loss.linear.bias))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)
    assert type(torchbp.convert(loss, to="torch")) is native_cls


# -- parametrized modules (torch.nn.utils.parametrize: weight_norm, orthogonal, ...) -------


def test_parametrized_module_converts_and_its_parametrizations_can_be_removed():
    from torch.nn.utils import parametrizations, parametrize

    layer = parametrizations.weight_norm(nn.Linear(3, 4))
    reference = parametrizations.weight_norm(nn.Linear(3, 4))
    reference.load_state_dict(layer.state_dict())
    params = list(layer.parameters())
    torchbp.convert(layer)
    # torch's parametrized class now sits on top of the twin, as on a converted module
    assert parametrize.type_before_parametrizations(layer) is bpnn.Linear
    assert all(a is b for a, b in zip(layer.parameters(), params))
    x = torch.randn(2, 3)
    assert "LinearFunctionBackward" in _node_names(layer(x.requires_grad_()))
    torch.testing.assert_close(layer(x), reference(x))
    # removing the parametrization leaves the converted module (it used to crash)
    parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is bpnn.Linear
    torch.testing.assert_close(layer(x), reference(x))


def test_module_parametrized_after_convert_converts_back():
    from torch.nn.utils import parametrizations, parametrize

    layer = torchbp.convert(nn.Linear(3, 4))
    parametrizations.weight_norm(layer)
    _, report = torchbp.convert(layer, to="torch", report=True)
    assert parametrize.type_before_parametrizations(layer) is nn.Linear
    assert not isinstance(layer, bpnn.Linear) and report.kept == []
    parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is nn.Linear


def test_lazy_module_stays_converted_once_initialised():
    # LazyLinear becomes its cls_to_become (nn.Linear) on its first forward: the converted
    # one became native nn.Linear there, silently running native from the second call on
    model = torchbp.convert(nn.Sequential(nn.LazyLinear(4)))
    x = torch.randn(2, 3, requires_grad=True)
    model(x)
    assert type(model[0]) is bpnn.Linear
    assert "LinearFunctionBackward" in _node_names(model(x))
    torchbp.convert(model, to="torch")
    assert type(model[0]) is nn.Linear
    # converted back before its first forward, it initialises to native nn.Linear
    lazy = torchbp.convert(torchbp.convert(nn.LazyLinear(4)), to="torch")
    lazy(x)
    assert type(lazy) is nn.Linear


# --------------------------------------------------------------------------- TorchScript
def _mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("twin", [bpnn.Linear(4, 3), bpnn.ReLU(), bpnn.CrossEntropyLoss()])
def test_torch_jit_script_names_torchbp_and_the_alternatives(twin):
    """torch.jit.script of a converted model failed deep in TorchScript's frontend ('try
    blocks aren't supported' in _checks.py); it now says why and what works instead."""
    model = nn.Sequential(nn.Linear(4, 4), twin) if not isinstance(twin, nn.Linear) else twin
    with pytest.raises(NotImplementedError) as err:
        torch.jit.script(model)
    message = str(err.value)
    assert f"torchbp.nn.{type(twin).__name__}" in message
    for alternative in ("torch.compile", "torch.jit.trace", "convert(model, to='torch')"):
        assert alternative in message


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torch_jit_script_alternatives_work():
    """What the error above advises: a trace runs torchbp's backward; converted back, the
    model scripts."""
    native = _mlp()
    ours = torchbp.convert(copy.deepcopy(native))
    with pytest.raises(NotImplementedError, match="torchbp.nn.Linear"):
        torch.jit.script(ours)
    traced = torch.jit.trace(ours, torch.randn(5, 4))
    x = torch.randn(5, 4, requires_grad=True)
    out = traced(x)
    assert type(out.grad_fn).__name__ == "LinearFunctionBackward"
    torch.testing.assert_close(out, native(x))
    (got,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(native(x).sum(), x)
    torch.testing.assert_close(got, want)
    scripted = torch.jit.script(torchbp.convert(ours, inplace=False, to="torch"))
    torch.testing.assert_close(scripted(x), native(x))


def test_torch_jit_script_of_a_combined_class_names_torchbp():
    mha = torchbp.convert(nn.MultiheadAttention(4, 2))
    with pytest.raises(NotImplementedError, match="torchbp.nn.Linear"):
        torch.jit.script(mha)


def test_report_names_adaptive_log_softmax_calls_that_only_enable_reaches():
    """nn.AdaptiveLogSoftmaxWithLoss, a container of Linears (which convert swaps) with no
    parameter of its own, calls F.log_softmax in its forward: the report said only
    'converted: Linear x3', as if the whole module now ran torchbp."""
    torch.manual_seed(0)
    adaptive = nn.AdaptiveLogSoftmaxWithLoss(8, 10, cutoffs=[4], div_value=2.0)
    _, report = torchbp.convert(adaptive, report=True)
    kept = {path: reason for path, _, reason in report.kept}
    assert kept[""] == (
        "no module twin; its forward calls torch.nn.functional.log_softmax: torchbp.enable() "
        "routes those calls"
    )
    with torchbp.enable() as mode:
        adaptive(torch.randn(6, 8, requires_grad=True), torch.randint(10, (6,)))
    assert mode.counts["log_softmax"] >= 1


@pytest.mark.parametrize(
    "native", [nn.Softmin(dim=1), nn.Softmin(dim=-1), nn.Softmax2d()], ids=repr
)
def test_converted_softmax_twins_run_torchbps_softmax(native):
    """``Softmin`` and ``Softmax2d`` converted: native's values and gradients, from
    torchbp's softmax Function; back with ``to="torch"``."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    converted = torchbp.convert(copy.deepcopy(native))
    got = converted(x)
    assert type(got.grad_fn).__name__ == "SoftmaxFunctionBackward"
    want = native(x)
    cotangent = torch.randn_like(want)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        torch.autograd.grad(got, x, cotangent), torch.autograd.grad(want, x, cotangent)
    )
    assert type(torchbp.convert(converted, to="torch")) is type(native)
