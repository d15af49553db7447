"""The op registry (:mod:`torchbp.ops`) against what the package exports.

``torchbp.functional``, ``torchbp.nn`` and ``torchbp.autograd`` export exactly the
registry's ops, each module subclasses its torch.nn twin, every activation has a derivative
formula that takes what its functional does, and :func:`torchbp.convert` swaps exactly
:func:`~torchbp.ops.module_twins`.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from tests._support import UNARY, Variant, build_module, call_id, variants

import torchbp
import torchbp.autograd
import torchbp.functional
import torchbp.nn
from torchbp.ops import OPS, activations, module_twins, of_kind

IDS = {"ids": lambda op: op.name}
#: (torchbp module, native module) of every op (the fused loss aside: torch's takes
#: other arguments), extra_modules included
MODULE_PAIRS = [
    pair
    for op in OPS.values()
    if op.kind != "fused_loss"
    for pair in op.module_pairs()
    if None not in pair
]
#: the modules (both twins) of the ops' extra_modules (``Softmin``, ...): no argument needed
EXTRA_MODULES = {cls for op in OPS.values() for pair in op.extra_modules for cls in pair}


def test_kinds_are_known():
    kinds = ("linear", "activation", "softmax", "loss", "fused_loss")
    assert of_kind(*kinds) == list(OPS.values())


def _modules(op):
    """The op's torchbp.nn modules: ``module`` and those of ``extra_modules``."""
    return [ours for ours, _ in op.module_pairs() if ours is not None]


@pytest.mark.parametrize(
    "namespace, objects_of",
    [
        (torchbp.functional, lambda op: op.functionals()),
        (torchbp.nn, _modules),
        (torchbp.autograd, lambda op: [op.function]),
    ],
    ids=["functional", "nn", "autograd"],
)
def test_all_matches_the_registry(namespace, objects_of):
    """Every registry op's objects are exported under their names, and every export is
    one."""
    exported = {}
    for op in OPS.values():
        for obj in objects_of(op):
            assert getattr(namespace, obj.__name__) is obj, obj.__name__
            exported[obj.__name__] = obj
    assert sorted(namespace.__all__) == sorted(exported)
    assert len(set(namespace.__all__)) == len(namespace.__all__)


@pytest.mark.parametrize("op", OPS.values(), **IDS)
def test_functional_is_named_after_the_op(op):
    assert op.functional.__name__ == op.name
    if op.torch_functional is not None:
        assert op.torch_functional.__name__ == op.name


@pytest.mark.parametrize("op", OPS.values(), **IDS)
def test_in_place_wrapper_exactly_where_torch_nn_functional_has_one(op):
    """``torchbp.functional`` has ``<name>_`` exactly where ``torch.nn.functional`` does
    (``relu_``, ``leaky_relu_``, ``elu_``), so ``import torchbp.functional as F`` keeps
    them; the registry names it."""
    native = getattr(torch.nn.functional, op.name + "_", None)
    assert (op.in_place is None) == (native is None)
    if op.in_place is not None:
        assert op.in_place.__name__ == op.name + "_"


@pytest.mark.parametrize(
    "ours, native",
    [pair for op in OPS.values() for pair in op.extra_functionals],
    ids=lambda fn: fn.__name__,
)
def test_extra_functional_is_named_and_called_as_its_torch_twin(ours, native):
    """``softmin`` and the like: native's name and parameters (names, order, defaults)."""
    assert ours.__name__ == native.__name__
    assert inspect.signature(ours).parameters.keys() == inspect.signature(native).parameters.keys()
    for name, param in inspect.signature(native).parameters.items():
        assert inspect.signature(ours).parameters[name].default == param.default, name


@pytest.mark.parametrize("ours, native", MODULE_PAIRS, ids=lambda cls: cls.__name__)
def test_module_subclasses_its_torch_twin(ours, native):
    assert issubclass(ours, native)
    assert ours.__name__ == native.__name__


@pytest.mark.parametrize("op", activations(), **IDS)
def test_activation_has_a_formula_that_takes_the_functional_arguments(op):
    """``formula(g, saved, *args)``: ``args`` are the functional's keyword parameters after
    the input (``inplace`` aside), as the tests derive them (``Variant.args``)."""
    assert callable(op.formula)
    params = list(inspect.signature(op.formula).parameters)
    assert len(params) == 2 + len(Variant(op).args), params
    assert op.kink is None or isinstance(op.kink, float)


@pytest.mark.parametrize("op", OPS.values(), **IDS)
def test_variants_are_keywords_of_the_functional_and_module(op):
    assert op.variants and all(isinstance(kw, dict) for kw in op.variants)
    functional = inspect.signature(op.functional).parameters
    module = inspect.signature(op.module).parameters if op.module else functional
    for kwargs in op.variants:
        assert set(kwargs) <= set(functional) & set(module), kwargs


@pytest.mark.parametrize("variant", UNARY, ids=str)
def test_variant_saves_output_or_input(variant):
    assert variant.saves in ("output", "input")


def test_variants_ids_are_unique():
    ids = [str(v) for v in variants(*{op.kind for op in OPS.values()})]
    assert len(set(ids)) == len(ids)


def test_unary_matrix_calls_every_out_of_place_functional_and_its_native_twin():
    """``UNARY``, which the cross-cutting tests (autocast, memory, transforms, checkpoint,
    CUDA graphs) iterate, calls every out-of-place functional of the activation and
    softmax ops, extra ones included (``softmin``), each with every ``op.variants``
    entry, and each variant's native call is the functional's twin."""
    ops = of_kind("activation", "softmax")
    want = [
        call_id(f.__name__, kwargs)
        for op in ops
        for f in op.functionals()
        if f is not op.in_place
        for kwargs in op.variants
    ]
    assert sorted(map(str, UNARY)) == sorted(want)
    natives = {ours: native for op in ops for ours, native in op.extra_functionals}
    natives.update({op.functional: op.torch_functional for op in ops})
    for v in UNARY:
        x = torch.randn(3, 4, dtype=torch.float64)
        ours = getattr(torchbp.functional, v.name)
        torch.testing.assert_close(v.ours(x), ours(x, **v.kwargs), rtol=0, atol=0)
        torch.testing.assert_close(v.native(x), natives[ours](x, **v.kwargs), rtol=0, atol=0)


def _neighbours() -> list[type[torch.nn.Module]]:
    """The torch.nn modules of the kinds torchbp covers (activations, losses, linear)."""
    modules = (torch.nn.modules.activation, torch.nn.modules.loss, torch.nn.modules.linear)
    return [
        cls
        for module in modules
        for cls in vars(module).values()
        if isinstance(cls, type)
        and issubclass(cls, torch.nn.Module)
        and cls.__module__ == module.__name__
    ]


def _instances(classes) -> list[torch.nn.Module]:
    """One instance of each class that builds without arguments, and of every registry
    module class (built by ``build_module``; those of extra_modules take no argument)."""
    registry = {cls for op in OPS.values() for pair in op.module_pairs() for cls in pair}
    registry.discard(None)
    built = [cls() if cls in EXTRA_MODULES else build_module(cls) for cls in registry]
    for cls in classes:
        if cls in registry:
            continue
        try:
            built.append(cls())
        except TypeError:  # needs arguments
            pass
    return built


@pytest.mark.filterwarnings("ignore:`NLLLoss2d` has been deprecated")
def test_convert_swaps_exactly_the_module_twins():
    """Every torch.nn module near torchbp's ops (and every registry module) is swapped for
    its twin if it is a key of ``module_twins()``; a subclass keeping its base's forward is
    combined with the twin; anything else is left alone; back with ``to="torch"``."""
    twins = module_twins()
    assert twins  # the exact types: no subclass of a twin is a key
    instances = _instances(_neighbours())
    assert set(twins) <= {type(m) for m in instances}
    originals = [type(m) for m in instances]
    for m in instances:
        before = type(m)
        after = type(torchbp.convert(m))
        base = next((b for b in before.__mro__ if b in twins), None)
        if before in twins:
            assert after is twins[before], before
        elif base is not None and before.forward is base.forward:
            # a subclass that keeps its base's forward (NLLLoss2d): combined with the twin
            assert issubclass(after, before) and issubclass(after, twins[base]), before
        else:
            assert after is before, before
    back = {v: k for k, v in twins.items()}
    for m, original in zip(instances, originals):
        before = type(m)
        assert type(torchbp.convert(m, to="torch")) is back.get(before, original), before
