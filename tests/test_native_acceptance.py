"""Drop-in fidelity: every call native accepts, torchbp accepts with native's result and
gradients; every call native rejects, torchbp rejects with an instance of native's exception
class and a message that names the function, the argument and what is valid.

Each table row is checked against native itself, so a row whose premise stops holding on
some torch version fails instead of passing vacuously.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import torchbp
from torchbp._checks import OptionError
from torchbp.ops import OPS


def _seeded(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _probs(*shape, seed=1):
    return _seeded(*shape, seed=seed).softmax(-1 if len(shape) < 2 else 1)


def _idx(*values):
    return torch.tensor(values)


@dataclass
class Call:
    """``op(*args, **kwargs)`` of a registry op; ``args`` is built afresh for each side, its
    floating-point tensors differentiated except those at the ``constant`` positions (a
    Number given as a 0-dim tensor)."""

    id: str
    op: str
    args: Callable[[], tuple]
    kwargs: dict = field(default_factory=dict)
    constant: tuple[int, ...] = ()

    def run(self, side: str):
        """``(output, differentiable leaf inputs)`` of torchbp's (``side='ours'``) or
        native's op on fresh copies of the arguments."""
        leaves = []

        def fresh(i, a):
            if isinstance(a, torch.Tensor):
                a = a.detach().clone()
                if a.is_floating_point() and i not in self.constant:
                    a.requires_grad_()
                    leaves.append(a)
            return a

        args = [fresh(i, a) for i, a in enumerate(self.args())]
        op = OPS[self.op]
        fn = op.functional if side == "ours" else op.torch_functional
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # softmax's implicit-dim warning
            return fn(*args, **self.kwargs), leaves


# --------------------------------------------------------------------------- accepted calls
X = lambda *s: _seeded(*s)  # noqa: E731 - table shorthand

ACCEPTED = [
    # probability targets: native's formula promotes integer class weights with the logits
    Call(
        "cross_entropy-probs-int64-weight",
        "cross_entropy",
        lambda: (X(4, 3), _probs(4, 3)),
        {"weight": torch.tensor([1, 2, 3])},
    ),
    Call(
        "cross_entropy-probs-bool-weight-none",
        "cross_entropy",
        lambda: (X(4, 3), _probs(4, 3)),
        {"weight": torch.tensor([True, False, True]), "reduction": "none"},
    ),
    # linear: broadcast biases (the gradient is summed back to the bias's shape)
    Call("linear-bias(1,)", "linear", lambda: (X(4, 3), X(5, 3), X(1))),
    Call("linear-bias(1,out)", "linear", lambda: (X(4, 3), X(5, 3), X(1, 5))),
    Call("linear-bias0dim", "linear", lambda: (X(4, 3), X(5, 3), X())),
    Call("linear-bias(N,out)", "linear", lambda: (X(4, 3), X(5, 3), X(4, 5))),
    Call("linear-bias(N,1)", "linear", lambda: (X(4, 3), X(5, 3), X(4, 1))),
    Call("linear-3d-bias(B,1,out)", "linear", lambda: (X(2, 4, 3), X(5, 3), X(2, 1, 5))),
    Call("linear-3d-bias(M,out)", "linear", lambda: (X(2, 4, 3), X(5, 3), X(4, 5))),
    # 1-D weight: output (*,)
    Call("linear-weight1d", "linear", lambda: (X(4, 3), X(3))),
    Call("linear-weight1d-3d", "linear", lambda: (X(2, 4, 3), X(3))),
    Call("linear-weight1d-3d-bias0dim", "linear", lambda: (X(2, 4, 3), X(3), X())),
    Call("linear-weight1d-unbatched", "linear", lambda: (X(3), X(3))),
    Call("linear-weight1d-unbatched-bias0dim", "linear", lambda: (X(3), X(3), X())),
    Call("linear-weight1d-3d-bias(1,1)", "linear", lambda: (X(2, 4, 3), X(3), X(1, 1))),
    Call("linear-weight1d-3d-bias(B,M)", "linear", lambda: (X(2, 4, 3), X(3), X(2, 4))),
    # non-contiguous input: native broadcasts any bias to the (*,) output (its contiguous
    # path refuses a 1-D bias, "mat2 must be a matrix"; torchbp takes it there too)
    *[
        Call(
            f"linear-weight1d-noncontiguous-bias{shape}",
            "linear",
            lambda shape=shape: (X(3, 4, 2).permute(2, 1, 0), X(3), X(*shape)),
        )
        for shape in [(1,), (4,), ()]
    ],
    # unbatched, empty, zero features, dtypes
    Call("linear-unbatched", "linear", lambda: (X(3), X(5, 3), X(5))),
    Call("linear-unbatched-bias(1,out)", "linear", lambda: (X(3), X(5, 3), X(1, 5))),
    Call("linear-empty-batch", "linear", lambda: (X(0, 3), X(5, 3), X(5))),
    Call("linear-in_features0", "linear", lambda: (X(4, 0), X(5, 0), X(5))),
    Call("linear-float64", "linear", lambda: (X(4, 3).double(), X(5, 3).double(), X(5).double())),
    Call("linear-int64", "linear", lambda: (torch.ones(2, 3).long(), torch.ones(4, 3).long())),
    # activations: 0-dim, empty, integer inputs where native computes them, Number forms
    *[Call(f"{n}-0dim", n, lambda: (X(),)) for n in ("sigmoid", "tanh", "relu", "gelu", "silu")],
    *[Call(f"{n}-empty", n, lambda: (X(0, 3),)) for n in ("relu", "leaky_relu", "elu")],
    Call("relu-int64", "relu", lambda: (torch.arange(-2, 3),)),
    Call("sigmoid-int64", "sigmoid", lambda: (torch.arange(-2, 3),)),
    Call("tanh-int64", "tanh", lambda: (torch.arange(-2, 3),)),
    Call("relu-bfloat16", "relu", lambda: (X(5).bfloat16(),)),
    Call("leaky_relu-int-slope", "leaky_relu", lambda: (X(5), 1)),
    Call("leaky_relu-bool-slope", "leaky_relu", lambda: (X(5), True)),
    Call(
        "leaky_relu-0dim-tensor-slope",
        "leaky_relu",
        lambda: (X(5), torch.tensor(0.2)),
        constant=(1,),
    ),
    Call("leaky_relu-numpy-slope", "leaky_relu", lambda: (X(5), np.float32(0.3))),
    Call("elu-int-alpha", "elu", lambda: (X(5), 2)),
    Call("elu-0dim-tensor-alpha", "elu", lambda: (X(5), torch.tensor(0.5)), constant=(1,)),
    Call("softplus-int-beta", "softplus", lambda: (X(5), 2, 10)),
    Call("softplus-0dim-tensor-beta", "softplus", lambda: (X(5), torch.tensor(2.0)), constant=(1,)),
    Call("gelu-tanh", "gelu", lambda: (X(5),), {"approximate": "tanh"}),
    # softmax family: dtype=, 0-dim, dim forms
    *[
        call
        for n in ("softmax", "log_softmax")
        for call in (
            Call(f"{n}-dtype=float64", n, lambda: (X(3, 4),), {"dim": 1, "dtype": torch.float64}),
            Call(
                f"{n}-int64-dtype=float32",
                n,
                lambda: (torch.arange(4),),
                {"dim": 0, "dtype": torch.float32},
            ),
            Call(f"{n}-0dim-dim0", n, lambda: (X(),), {"dim": 0}),
            Call(f"{n}-0dim-dim-1", n, lambda: (X(),), {"dim": -1}),
            Call(f"{n}-dim-tensor", n, lambda: (X(3, 4), torch.tensor(1))),
            Call(f"{n}-dim-numpy", n, lambda: (X(3, 4), np.int64(0))),
            Call(f"{n}-implicit-dim-3d", n, lambda: (X(2, 3, 4),)),
            Call(f"{n}-empty", n, lambda: (X(0, 4),), {"dim": 1}),
            Call(f"{n}-empty-dim", n, lambda: (X(3, 0),), {"dim": 1}),
        )
    ],
    # losses
    Call("nll_loss-unbatched", "nll_loss", lambda: (X(3).log_softmax(0), _idx(1).reshape(()))),
    Call("nll_loss-uint8", "nll_loss", lambda: (X(4, 3), _idx(0, 1, 2, 0).byte())),
    Call("nll_loss-kdim", "nll_loss", lambda: (X(2, 3, 4), torch.zeros(2, 4).long())),
    Call("nll_loss-empty-batch", "nll_loss", lambda: (X(0, 3), torch.zeros(0).long())),
    Call("nll_loss-all-ignored", "nll_loss", lambda: (X(2, 3), _idx(-100, -100))),
    Call(
        "nll_loss-legacy-size_average",
        "nll_loss",
        lambda: (X(4, 3), _idx(0, 1, 2, 0)),
        {"size_average": False},
    ),
    Call("cross_entropy-unbatched", "cross_entropy", lambda: (X(3), _idx(1).reshape(()))),
    Call("cross_entropy-unbatched-probs", "cross_entropy", lambda: (X(3), _probs(3))),
    Call("cross_entropy-uint8", "cross_entropy", lambda: (X(4, 3), _idx(0, 1, 2, 0).byte())),
    Call("cross_entropy-probs-promoted", "cross_entropy", lambda: (X(4, 3).double(), _probs(4, 3))),
    Call(
        "cross_entropy-smoothing-int",
        "cross_entropy",
        lambda: (X(4, 3), _idx(0, 1, 2, 0)),
        {"label_smoothing": 1},
    ),
    Call(
        "cross_entropy-smoothing-0dim-tensor",
        "cross_entropy",
        lambda: (X(4, 3), _idx(0, 1, 2, 0)),
        {"label_smoothing": torch.tensor(0.2)},
    ),
    Call("cross_entropy-empty-batch", "cross_entropy", lambda: (X(0, 3), torch.zeros(0).long())),
    Call("cross_entropy-empty-batch-probs", "cross_entropy", lambda: (X(0, 3), X(0, 3))),
    *[
        Call(
            f"cross_entropy-C0-probs-{r}-eps{e}",
            "cross_entropy",
            lambda: (X(4, 0), X(4, 0)),
            {"reduction": r, "label_smoothing": e},
        )
        for r in ("none", "sum", "mean")
        for e in (0.0, 0.5)
    ],
    Call("cross_entropy-kdim-probs", "cross_entropy", lambda: (X(2, 3, 4), _probs(2, 3, 4))),
    # half-precision dtypes (CPU)
    *[
        call
        for d in (torch.bfloat16, torch.float16)
        for call in (
            Call(f"linear-{d}", "linear", lambda d=d: (X(4, 3).to(d), X(5, 3).to(d), X(5).to(d))),
            Call(f"sigmoid-{d}", "sigmoid", lambda d=d: (X(4, 3).to(d),)),
            Call(f"gelu-{d}", "gelu", lambda d=d: (X(4, 3).to(d),)),
            Call(f"log_softmax-{d}", "log_softmax", lambda d=d: (X(4, 3).to(d),), {"dim": 1}),
            Call(f"nll_loss-{d}", "nll_loss", lambda d=d: (X(4, 3).to(d), _idx(0, 1, 2, 0))),
            Call(
                f"cross_entropy-{d}", "cross_entropy", lambda d=d: (X(4, 3).to(d), _idx(0, 1, 2, 0))
            ),
        )
    ],
]


if getattr(torch.nn.functional, "linear_cross_entropy", None) is not None:  # torch >= 2.13
    _Options = torch.nn.LinearCrossEntropyOptions
    ACCEPTED += [
        Call("lce-unbatched", "linear_cross_entropy", lambda: (X(3), X(5, 3), _idx(2)[0])),
        Call(
            "lce-probs-default-ignore_index",
            "linear_cross_entropy",
            lambda: (X(4, 3), X(5, 3), _probs(4, 5)),
        ),
        Call(
            "lce-ignore_index-None-is--100",
            "linear_cross_entropy",
            lambda: (X(4, 3), X(5, 3), _idx(0, -100, 4, 1)),
            {"ignore_index": None},
        ),
        Call(
            "lce-Kdim-weight",
            "linear_cross_entropy",
            lambda: (X(4, 3), X(5, 2, 3), torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1]])),
        ),
        Call(
            "lce-Kdim-probs-bias-none",
            "linear_cross_entropy",
            lambda: (X(4, 3), X(5, 2, 3), _probs(4, 5, 2)),
            {"linear_bias": _seeded(5, 2, seed=3), "reduction": "none"},
        ),
        Call(
            "lce-options-batch_chunk_size",
            "linear_cross_entropy",
            lambda: (X(7, 3), X(5, 3), _idx(0, 1, 2, 3, 4, 0, 1)),
            {"options": _Options(batch_chunk_size=2)},
        ),
        Call(
            "lce-options-aspect_ratio-none",
            "linear_cross_entropy",
            lambda: (X(7, 3), X(5, 3), _idx(0, 1, 2, 3, 4, 0, 1)),
            {"options": _Options(chunking_method="aspect_ratio:2"), "reduction": "none"},
        ),
        Call(
            "lce-probs-int64-class-weight",  # promoted with the logits, as native
            "linear_cross_entropy",
            lambda: (X(4, 3), X(5, 3), _probs(4, 5)),
            {"weight": torch.tensor([1, 2, 3, 1, 0])},
        ),
        Call(
            # native's chunked path takes class weights of any dtype
            "lce-options-float64-class-weight",
            "linear_cross_entropy",
            lambda: (X(7, 3), X(5, 3), _idx(0, 1, 2, 3, 4, 0, 1)),
            {"options": _Options(batch_chunk_size=2), "weight": _seeded(5, seed=5).double()},
        ),
        Call(
            "lce-options-float64-class-weight-none",
            "linear_cross_entropy",
            lambda: (X(7, 3), X(5, 3), _idx(0, 1, 2, 3, 4, 0, 1)),
            {"options": _Options(), "weight": _seeded(5, seed=5).double(), "reduction": "none"},
        ),
        Call(
            "lce-options-with-smoothing",  # native warns and takes its reference path
            "linear_cross_entropy",
            lambda: (X(4, 3), X(5, 3), _idx(0, 1, 2, 0)),
            {"options": _Options(), "label_smoothing": 0.2},
        ),
    ]


def _grads(out, leaves):
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    if not outs or not leaves:
        return []
    cts = [_seeded(*o.shape, dtype=o.dtype, seed=7) for o in outs]
    return torch.autograd.grad(outs, leaves, cts, allow_unused=True)


@pytest.mark.parametrize("call", ACCEPTED, ids=lambda c: c.id)
def test_accepted_call_matches_native(call):
    native, native_leaves = call.run("native")
    ours, our_leaves = call.run("ours")
    assert ours.shape == native.shape and ours.dtype == native.dtype
    torch.testing.assert_close(ours, native, equal_nan=True)
    for o, n, leaf in zip(_grads(ours, our_leaves), _grads(native, native_leaves), our_leaves):
        if n is None:
            assert o is None or not bool(o.ne(0).any())
            continue
        assert o is not None and o.shape == leaf.shape  # e.g. a broadcast bias's own shape
        torch.testing.assert_close(o, n, equal_nan=True)


# --------------------------------------------------------------------------- rejected calls
@dataclass
class Bad:
    """A call native rejects: torchbp must raise an instance of native's class, with a
    message matching ``message`` (which names the function and the argument)."""

    id: str
    call: Callable[[object], object]  # call(namespace), namespace torchbp's or native's
    message: str


class _Native:
    """Native's functions under torchbp's names (``torch.sigmoid`` / ``torch.tanh`` too)."""

    def __getattr__(self, name):
        return OPS[name].torch_functional


NATIVE, OURS = _Native(), torchbp.functional
x = _seeded(4, 3)
t = _idx(0, 1, 2, 0)

BAD = [
    # options out of range
    Bad("cross_entropy-smoothing-1.5", lambda f: f.cross_entropy(x, t, label_smoothing=1.5),
        r"cross_entropy: label_smoothing must be in \[0, 1\], got 1.5"),
    Bad("cross_entropy-smoothing-str", lambda f: f.cross_entropy(x, t, label_smoothing="a"),
        r"cross_entropy: label_smoothing must be a number, got str"),
    Bad("gelu-bogus", lambda f: f.gelu(x, approximate="bogus"),
        r"gelu: approximate must be 'none' or 'tanh', got 'bogus'"),
    Bad("gelu-None", lambda f: f.gelu(x, approximate=None),
        r"gelu: approximate must be a str"),
    Bad("cross_entropy-ignore_index-probs",
        lambda f: f.cross_entropy(x, _probs(4, 3), ignore_index=1),
        r"cross_entropy: ignore_index \(1\) is not supported for probability targets"),
    Bad("cross_entropy-reduction", lambda f: f.cross_entropy(x, t, reduction="bogus"),
        r"bogus is not a valid value for reduction"),
    Bad("nll_loss-reduction", lambda f: f.nll_loss(x, t, reduction="bogus"),
        r"bogus is not a valid value for reduction"),
    # Number arguments
    Bad("leaky_relu-str", lambda f: f.leaky_relu(x, "a"),
        r"leaky_relu: negative_slope must be a number, got str 'a'"),
    Bad("leaky_relu-None", lambda f: f.leaky_relu(x, None),
        r"leaky_relu: negative_slope must be a number, got NoneType"),
    Bad("leaky_relu-tensor(2,)", lambda f: f.leaky_relu(x, torch.tensor([0.2, 0.3])),
        r"leaky_relu: negative_slope must be a number, got a tensor of shape \(2,\)"),
    Bad("leaky_relu-tensor(1,)", lambda f: f.leaky_relu(x, torch.tensor([0.2])),
        r"leaky_relu: negative_slope must be a number, got a tensor of shape \(1,\)"),
    Bad("leaky_relu-tensor-requires-grad",
        lambda f: f.leaky_relu(x, torch.tensor(0.2, requires_grad=True)),
        r"leaky_relu: negative_slope must be a number; a tensor that requires grad"),
    Bad("elu-str", lambda f: f.elu(x, "a"), r"elu: alpha must be a number, got str"),
    # complex numbers: native cannot convert them ('value cannot be converted to type float
    # without overflow', a RuntimeError); torchbp raised a TypeError, for a complex tensor
    # Python's 'float() argument must be ... not complex', naming nothing
    Bad("elu-complex", lambda f: f.elu(x, 1 + 2j),
        r"elu: alpha must be a real number, got complex \(1\+2j\)"),
    Bad("leaky_relu-complex-tensor", lambda f: f.leaky_relu(x, torch.tensor(0.1 + 1j)),
        r"leaky_relu: negative_slope must be a real number, got a complex tensor"),
    Bad("softplus-complex-tensor", lambda f: f.softplus(x, 1.0, torch.tensor(2 + 1j)),
        r"softplus: threshold must be a real number, got a complex tensor"),
    Bad("cross_entropy-smoothing-complex-tensor",
        lambda f: f.cross_entropy(x, t, label_smoothing=torch.tensor(0.1 + 1j)),
        r"cross_entropy: label_smoothing must be a real number, got a complex tensor"),
    Bad("elu-tensor-requires-grad", lambda f: f.elu(x, torch.tensor(0.2, requires_grad=True)),
        r"elu: alpha must be a number; a tensor that requires grad"),
    Bad("softplus-beta-str", lambda f: f.softplus(x, "a"), r"softplus: beta must be a number"),
    # approximate is keyword-only, as native's (a positional one was taken)
    Bad("gelu-approximate-positional", lambda f: f.gelu(x, "tanh"),
        r"gelu\(\) takes 1 positional argument but 2 were given"),
    Bad("softplus-threshold-str", lambda f: f.softplus(x, 1.0, "a"),
        r"softplus: threshold must be a number"),
    # softmax dims and dtypes
    *[
        bad
        for n in ("softmax", "log_softmax")
        for bad in (
            Bad(f"{n}-dim2", lambda f, n=n: getattr(f, n)(x, dim=2),
                rf"{n}: Dimension out of range \(expected to be in range of \[-2, 1\], "
                r"but got 2\)"),
            Bad(f"{n}-dim-3", lambda f, n=n: getattr(f, n)(x, dim=-3),
                rf"{n}: Dimension out of range \(expected to be in range of \[-2, 1\], "
                r"but got -3\)"),
            Bad(f"{n}-0dim-dim1", lambda f, n=n: getattr(f, n)(torch.tensor(1.0), dim=1),
                rf"{n}: Dimension out of range \(expected to be in range of \[-1, 0\], "
                r"but got 1\)"),
            Bad(f"{n}-dim-str", lambda f, n=n: getattr(f, n)(x, dim="x"),
                rf"{n}: dim must be an int, got str 'x'"),
            Bad(f"{n}-dim-float", lambda f, n=n: getattr(f, n)(x, dim=1.0),
                rf"{n}: dim must be an int, got float"),
            Bad(f"{n}-dim-tuple", lambda f, n=n: getattr(f, n)(x, dim=(0, 1)),
                rf"{n}: dim must be an int, got tuple"),
            Bad(f"{n}-dim-bool", lambda f, n=n: getattr(f, n)(x, dim=True),
                rf"{n}: dim must be an int, got bool"),
            Bad(f"{n}-int64", lambda f, n=n: getattr(f, n)(torch.arange(3), dim=0),
                rf"{n}: input must be a floating-point tensor, got dtype torch.int64"),
            Bad(f"{n}-dtype-int64", lambda f, n=n: getattr(f, n)(x, dim=0, dtype=torch.long),
                rf"{n}: input must be a floating-point tensor, got dtype torch.int64"),
            # a dtype that is not one: Tensor.to read a str as a device ('cpu' passed)
            Bad(f"{n}-dtype-str", lambda f, n=n: getattr(f, n)(x, dim=0, dtype="float32"),
                rf"{n}: dtype must be a torch.dtype or None, got str 'float32'"),
            Bad(f"{n}-dtype-device", lambda f, n=n: getattr(f, n)(x, dim=0, dtype="cpu"),
                rf"{n}: dtype must be a torch.dtype or None, got str 'cpu'"),
            Bad(f"{n}-dtype-tensor",
                lambda f, n=n: getattr(f, n)(x, dim=0, dtype=torch.zeros(1).double()),
                rf"{n}: dtype must be a torch.dtype or None, got Tensor"),
            Bad(f"{n}-dtype-int", lambda f, n=n: getattr(f, n)(x, dim=0, dtype=1),
                rf"{n}: dtype must be a torch.dtype or None, got int 1"),
        )
    ],
    # inputs of the wrong kind
    Bad("relu-bool", lambda f: f.relu(torch.tensor([True, False])), r"relu: boolean inputs"),
    Bad("relu-list", lambda f: f.relu([1.0, 2.0]), r"relu: input must be a Tensor, got list"),
    Bad("linear-list", lambda f: f.linear([1.0, 2.0, 3.0], x),
        r"linear: input must be a Tensor, got list"),
    Bad("cross_entropy-list", lambda f: f.cross_entropy([1.0], t),
        r"cross_entropy: input must be a Tensor"),
    Bad("nll_loss-target-list", lambda f: f.nll_loss(x, [0, 1, 2, 0]),
        r"nll_loss: target must be a Tensor"),
    Bad("softmax-list", lambda f: f.softmax([1.0, 2.0], 0), r"softmax: input must be a Tensor"),
    # a 0-dim bool or complex tensor is no dim (torchbp took tensor(True) as dim 1)
    Bad("softmax-dim-bool-tensor", lambda f: f.softmax(x, torch.tensor(True)),
        r"softmax: dim must be an int, got Tensor"),
    Bad("log_softmax-dim-complex-tensor", lambda f: f.log_softmax(x, torch.tensor(1 + 0j)),
        r"log_softmax: dim must be an int, got Tensor"),
    Bad("cross_entropy-weight-list", lambda f: f.cross_entropy(x, t, weight=[1.0, 1.0, 1.0]),
        r"cross_entropy: weight must be a Tensor, got list"),
    Bad("nll_loss-weight-list", lambda f: f.nll_loss(x, t, weight=[1.0, 1.0, 1.0]),
        r"nll_loss: weight must be a Tensor, got list"),
    Bad("log_softmax-list", lambda f: f.log_softmax([1.0, 2.0], 0),
        r"log_softmax: input must be a Tensor"),
    # linear shapes and dtypes
    Bad("linear-in_features", lambda f: f.linear(x, _seeded(5, 2)),
        r"linear: input's last dim must equal weight's in_features: "
        r"input \(4, 3\), weight \(5, 2\)"),
    Bad("linear-bias-shape", lambda f: f.linear(x, _seeded(5, 3), _seeded(3)),
        r"linear: bias \(3,\) does not broadcast to the output's shape \(4, 5\)"),
    Bad("linear-bias-grows-output", lambda f: f.linear(x, _seeded(5, 3), _seeded(2, 4, 5)),
        r"linear: bias \(2, 4, 5\) does not broadcast"),
    Bad("linear-0dim-input", lambda f: f.linear(torch.tensor(1.0), _seeded(5, 3)),
        r"linear: expected input \(\*, in_features\) with at least 1 dim"),
    Bad("linear-0dim-weight", lambda f: f.linear(x, torch.tensor(1.0)),
        r"linear: expected input .* weight \(\)"),
    Bad("linear-3d-weight", lambda f: f.linear(x, _seeded(5, 3, 1)),
        r"linear: expected input .* weight \(5, 3, 1\)"),
    # a missing dim: native indexes it (IndexError), or checks it (ValueError / RuntimeError)
    *[
        Bad(f"{op}-0dim-input-target{tuple(target.shape)}",
            lambda f, op=op, target=target: getattr(f, op)(torch.tensor(1.0), target),
            rf"{op}: input must have a class dim: \(C,\), \(N, C\) or \(N, C, d1, ...\); "
            "got 0-dim")
        for op in ("cross_entropy", "nll_loss")
        for target in (torch.tensor(0.5), _seeded(3), _idx(0), torch.tensor(0))
    ],
    *[
        Bad(f"{op}-0dim-target-batch{n}",
            lambda f, op=op, n=n: getattr(f, op)(_seeded(n, 3), torch.tensor(0)),
            rf"{op}: Expected input batch_size \({n}\) to match target batch_size "
            r"\(a 0-dim target\)")
        for op in ("cross_entropy", "nll_loss")
        for n in (0, 2)
    ],
    # 1-D weight: what native refuses for every layout of the input
    Bad("linear-weight1d-0dim-input", lambda f: f.linear(torch.tensor(1.0), _seeded(3)),
        r"linear: expected input \(\*, in_features\) with at least 1 dim"),
    Bad("linear-weight1d-in_features", lambda f: f.linear(x, _seeded(2)),
        r"linear: input's last dim must equal weight's in_features"),
    Bad("linear-weight1d-unbatched-bias(1,)",
        lambda f: f.linear(_seeded(3), _seeded(3), _seeded(1)),
        r"linear: bias \(1,\) does not broadcast to the output's shape \(\)"),
    Bad("linear-weight1d-bias-grows-output",
        lambda f: f.linear(_seeded(3, 4, 2).permute(2, 1, 0), _seeded(3), _seeded(2, 1, 1)),
        r"linear: bias \(2, 1, 1\) does not broadcast to the output's shape \(2, 4\)"),
    Bad("linear-mixed-dtypes", lambda f: f.linear(x.double(), _seeded(5, 3)),
        r"linear: expected one dtype for all tensors, "
        r"got input torch.float64, weight torch.float32"),
    # losses: targets, weights, dtypes, shapes
    Bad("cross_entropy-target-oob", lambda f: f.cross_entropy(x, _idx(0, 1, 5, 0)),
        r"cross_entropy: target 5 is out of bounds: class indices must lie in \[0, 3\)"),
    Bad("nll_loss-target-oob", lambda f: f.nll_loss(x, _idx(0, 1, 3, 0)),
        r"nll_loss: target 3 is out of bounds"),
    Bad("cross_entropy-C0-class-index",
        lambda f: f.cross_entropy(_seeded(4, 0), torch.zeros(4).long()),
        r"cross_entropy: target 0 is out of bounds: class indices must lie in \[0, 0\)"),
    Bad("cross_entropy-int32-target", lambda f: f.cross_entropy(x, t.int()),
        r"cross_entropy: expected class-index target of dtype int64 \(Long\) or uint8"),
    # uint8 class indices serve (C,) and (N, C) input only: native's K-dim kernel (the CPU
    # one and the CUDA one alike) reads int64; torchbp took them silently
    *[
        Bad(f"{n}-uint8-target-Kdim-{k}",
            lambda f, n=n, k=k: getattr(f, n)(
                _seeded(2, 3, *[2] * k), torch.zeros(2, *[2] * k, dtype=torch.uint8)),
            rf"{n}: K-dimensional input \(N, C, d1, ...\) needs an int64 \(Long\) "
            r"class-index target, got torch.uint8")
        for n in ("nll_loss", "cross_entropy")
        for k in (1, 3)
    ],
    Bad("nll_loss-float-target", lambda f: f.nll_loss(x, _seeded(4)),
        r"nll_loss: target must hold class indices"),
    Bad("cross_entropy-int64-input", lambda f: f.cross_entropy(torch.ones(4, 3).long(), t),
        r"cross_entropy: input must be a floating-point tensor, got dtype torch.int64"),
    Bad("nll_loss-int64-input", lambda f: f.nll_loss(torch.ones(4, 3).long(), t),
        r"nll_loss: input must be a floating-point tensor, got dtype torch.int64"),
    Bad("cross_entropy-batch-mismatch", lambda f: f.cross_entropy(x, _idx(0, 1, 2)),
        r"cross_entropy: Expected input batch_size \(4\) to match target batch_size \(3\)"),
    Bad("nll_loss-0dim-input", lambda f: f.nll_loss(torch.tensor(1.0), torch.tensor(0)),
        r"nll_loss: input must have a class dim"),
    Bad("cross_entropy-weight-shape", lambda f: f.cross_entropy(x, t, weight=torch.ones(4)),
        r"cross_entropy: weight must have shape \(3,\), one entry per class, got \(4,\)"),
    Bad("cross_entropy-weight-requires-grad",
        lambda f: f.cross_entropy(x, t, weight=torch.ones(3, requires_grad=True)),
        r"cross_entropy: class weights are not differentiable"),
    # ignore_index must be an int: 255.0 was taken as 255, True as class 1 (ignoring its
    # rows), and None or a str crashed inside ("'<=' not supported")
    *[
        Bad(f"{n}-ignore_index-{v!r}",
            lambda f, n=n, v=v: getattr(f, n)(x, t, ignore_index=v),
            rf"{n}: ignore_index must be an int, got {type(v).__name__}")
        for n in ("nll_loss", "cross_entropy")
        for v in (1.0, True, None, "a", torch.tensor(1.0))
    ],
    # class weights of another dtype than the input, with class-index targets
    *[
        Bad(f"{n}-{wd}-weight-{xd}-input",
            lambda f, n=n, xd=xd, wd=wd: getattr(f, n)(
                x.to(xd), t, weight=torch.ones(3, dtype=wd)),
            rf"{n}: class weights must have the loss input's dtype {xd} with class-index "
            rf"targets, got weight of dtype {wd}")
        for n in ("nll_loss", "cross_entropy")
        for xd, wd in [(torch.float32, torch.float64), (torch.float64, torch.float32),
                       (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
    ],
    Bad("cross_entropy-weight-dtype-Kdim",
        lambda f: f.cross_entropy(_seeded(2, 3, 2), t.reshape(2, 2),
                                  weight=torch.ones(3, dtype=torch.float64)),
        r"cross_entropy: class weights must have the loss input's dtype torch.float32"),
    Bad("cross_entropy-weight-dtype-empty",
        lambda f: f.cross_entropy(x[:0], t[:0], weight=torch.ones(3, dtype=torch.float64)),
        r"cross_entropy: class weights must have the loss input's dtype torch.float32"),
]  # fmt: skip

if getattr(torch.nn.functional, "linear_cross_entropy", None) is not None:
    BAD.append(
        Bad(
            "linear_cross_entropy-smoothing-1.5",
            lambda f: f.linear_cross_entropy(x, _seeded(5, 3), t, label_smoothing=1.5),
            r"linear_cross_entropy: label_smoothing must be in \[0, 1\], got 1.5",
        )
    )
    w53 = _seeded(5, 3)
    BAD += [
        Bad("linear_cross_entropy-0dim-input",
            lambda f: f.linear_cross_entropy(torch.tensor(1.0), w53, t),
            r"linear_cross_entropy: expected input with dimensionality 1 or 2"),
        Bad("linear_cross_entropy-1d-weight",
            lambda f: f.linear_cross_entropy(x, _seeded(3), t),
            r"linear_cross_entropy: expected linear_weight with dimensionality at least 2"),
        Bad("linear_cross_entropy-in_features",
            lambda f: f.linear_cross_entropy(x, _seeded(5, 4), t),
            r"linear_cross_entropy: input's last dim must equal linear_weight's last dim"),
        Bad("linear_cross_entropy-bias-shape",
            lambda f: f.linear_cross_entropy(x, w53, t, linear_bias=_seeded(1, 5)),
            r"linear_cross_entropy: linear_bias must have shape \(5,\)"),
        Bad("linear_cross_entropy-Kdim-unbatched",
            lambda f: f.linear_cross_entropy(_seeded(3), _seeded(5, 2, 3), _idx(0, 1)),
            r"linear_cross_entropy: a K-dimensional linear_weight .* needs batched"),
        Bad("linear_cross_entropy-probs-ignore_index--100",
            lambda f: f.linear_cross_entropy(x, w53, _probs(4, 5), ignore_index=-100),
            r"linear_cross_entropy: ignore_index cannot be specified when target contains "
            r"probabilities"),
        Bad("linear_cross_entropy-weight-float64",  # native's reference path (no options)
            lambda f: f.linear_cross_entropy(x, w53, t, weight=torch.ones(5).double()),
            r"linear_cross_entropy: class weights must have the loss input's dtype "
            r"torch.float32 with class-index targets, got weight of dtype torch.float64"),
        Bad("linear_cross_entropy-weight-float32-float64-input",
            lambda f: f.linear_cross_entropy(
                x.double(), w53.double(), t, weight=torch.ones(5), reduction="none"),
            r"linear_cross_entropy: class weights must have the loss input's dtype "
            r"torch.float64"),
        Bad("linear_cross_entropy-weight-float64-options-smoothing",  # native falls back
            lambda f: f.linear_cross_entropy(
                x, w53, t, weight=torch.ones(5).double(), options=_Options(),
                label_smoothing=0.1),
            r"linear_cross_entropy: class weights must have the loss input's dtype"),
        Bad("linear_cross_entropy-weight-float64-Kdim",
            lambda f: f.linear_cross_entropy(
                x, _seeded(5, 2, 3), t.reshape(2, 2).repeat(2, 1),
                weight=torch.ones(5).double()),
            r"cross_entropy: class weights must have the loss input's dtype"),
        Bad("linear_cross_entropy-options-dict",
            lambda f: f.linear_cross_entropy(x, w53, t, options={"batch_chunk_size": 2}),
            r"linear_cross_entropy: options must be a torch.nn.LinearCrossEntropyOptions"),
        Bad("linear_cross_entropy-options-conflict",
            lambda f: f.linear_cross_entropy(
                x, w53, t, options=_Options(batch_chunk_size=3, chunking_method="aspect_ratio")
            ),
            r"linear_cross_entropy: options.batch_chunk_size \(=3\) and "
            r"options.chunking_method \('aspect_ratio'\) give different chunk sizes"),
    ]  # fmt: skip
    BAD += [
        Bad("linear_cross_entropy-ignore_index-1.0",
            lambda f: f.linear_cross_entropy(x, w53, t, ignore_index=1.0),
            r"linear_cross_entropy: ignore_index must be an int, got float"),
        Bad("linear_cross_entropy-ignore_index-True",
            lambda f: f.linear_cross_entropy(x, w53, t, ignore_index=True),
            r"linear_cross_entropy: ignore_index must be an int, got bool"),
        Bad("linear_cross_entropy-ignore_index-str",
            lambda f: f.linear_cross_entropy(x, w53, t, ignore_index="a"),
            r"linear_cross_entropy: ignore_index must be an int, got str"),
        Bad("linear_cross_entropy-weight-list",
            lambda f: f.linear_cross_entropy(x, w53, t, weight=[1.0] * 5),
            r"linear_cross_entropy: weight must be a Tensor, got list"),
        Bad("linear_cross_entropy-linear_bias-list",
            lambda f: f.linear_cross_entropy(x, w53, t, linear_bias=[1.0] * 5),
            r"linear_cross_entropy: linear_bias must be a Tensor, got list"),
    ]  # fmt: skip
    BAD += [
        Bad(f"linear_cross_entropy-0dim-target-batch{n}",
            lambda f, n=n: f.linear_cross_entropy(_seeded(n, 3), w53, torch.tensor(0)),
            rf"linear_cross_entropy: Expected input batch_size \({n}\) to match target "
            r"batch_size \(a 0-dim target\)")
        for n in (0, 2)
    ]  # fmt: skip
    BAD.append(
        Bad(
            "linear_cross_entropy-list",
            lambda f: f.linear_cross_entropy([1.0, 2.0, 3.0], _seeded(5, 3), t),
            r"linear_cross_entropy: input must be a Tensor",
        )
    )


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.id)
def test_rejected_call_raises_natives_class(bad):
    with pytest.raises(Exception) as native:  # noqa: PT011 - the class is what we learn here
        bad.call(NATIVE)
    with pytest.raises(Exception) as ours:  # noqa: PT011
        bad.call(OURS)
    assert isinstance(ours.value, type(native.value)), (
        f"native raises {type(native.value).__name__}, torchbp {type(ours.value).__mro__}"
    )
    assert re.search(bad.message, str(ours.value)), str(ours.value)


def test_gelu_module_with_bogus_approximation_raises_at_call_as_native():
    native, ours = torch.nn.GELU(approximate="bogus"), torchbp.nn.GELU(approximate="bogus")
    with pytest.raises(RuntimeError):
        native(x)
    with pytest.raises(RuntimeError, match="gelu: approximate must be 'none' or 'tanh'"):
        ours(x)


# --------------------------------------------------------------------------- stricter on purpose
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_negative_label_smoothing_is_refused_on_purpose(op):
    """Native accepts a negative ε (it extrapolates away from the uniform target); torchbp
    refuses it (documented in the README), with native's class for out-of-range smoothing."""
    args = (x, t) if op == "cross_entropy" else (x, _seeded(5, 3), t)
    native = OPS[op].torch_functional
    if native is not None:
        native(*args, label_smoothing=-0.1)  # accepted by native
    with pytest.raises(OptionError, match=r"label_smoothing must be in \[0, 1\], got -0.1"):
        OPS[op].functional(*args, label_smoothing=-0.1)


@pytest.mark.skipif(
    getattr(torch.nn.functional, "linear_cross_entropy", None) is None,
    reason="needs torch.nn.functional.linear_cross_entropy (torch >= 2.13)",
)
def test_linear_cross_entropy_takes_leading_batch_dims_beyond_native():
    """torchbp's extension: input ``(*, in)`` with a 2-D weight (native takes 1 or 2 dims);
    the result is the rows' native result."""
    x3, w, t2 = _seeded(2, 3, 4), _seeded(5, 4), torch.tensor([[0, 1, 2], [3, 4, 0]])
    with pytest.raises(RuntimeError, match="dimensionality 1 or 2"):
        torch.nn.functional.linear_cross_entropy(x3, w, t2)
    ours = torchbp.functional.linear_cross_entropy(x3, w, t2, reduction="none")
    rows = torch.nn.functional.linear_cross_entropy(
        x3.reshape(6, 4), w, t2.reshape(6), reduction="none"
    )
    torch.testing.assert_close(ours, rows.reshape(2, 3))


@pytest.mark.parametrize(
    "input_shape, bias_shape",
    [((4, 3), ()), ((4, 3), (1,)), ((4, 3), (4,)), ((2, 4, 3), (4,)), ((2, 4, 3), (1,))],
)
def test_linear_weight1d_bias_broadcasts_to_the_output_beyond_native(input_shape, bias_shape):
    """torchbp's extension: with a 1-D weight ``(in,)``, any bias that broadcasts to the
    ``(*,)`` output without growing it, whatever the input's rank and layout. Native's
    result is ``x @ w + b`` where it takes the bias (a non-contiguous input, or a 0-dim /
    ``(1, 1)`` bias on a contiguous one of 3+ dims); its addmm path (a 2-D input, or a
    1-D bias on a contiguous input) refuses any bias ('mat2 must be a matrix')."""
    x, w, b = X(*input_shape), X(3), X(*bias_shape)
    with pytest.raises(RuntimeError, match="mat2 must be a matrix"):
        torch.nn.functional.linear(x, w, b)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ours = torchbp.functional.linear(*leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = ref_leaves[0] @ ref_leaves[1] + ref_leaves[2]
    assert ours.shape == ref.shape == input_shape[:-1]
    torch.testing.assert_close(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    for o, r in zip(leaves, ref_leaves):
        assert o.grad.shape == o.shape
        torch.testing.assert_close(o.grad, r.grad)


@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(0, 3, 0), (2, 3, 0), (0, 3, 2)])
def test_uint8_target_of_empty_kdim_input_refused_up_front(op, reduction, shape):
    """K-dimensional input needs int64 class indices, empty or not. Native's forward skips
    its dtype check on an empty K-dim input with 'mean' / 'sum' (NaN / 0) and its backward
    then raises ('expected scalar type Long but found Byte'); torchbp refuses at the call,
    with native's class, as native's forward refuses every other uint8 K-dim call."""
    target = torch.zeros(shape[:1] + shape[2:], dtype=torch.uint8)
    native_input = torch.zeros(shape, requires_grad=True)
    native_loss = getattr(torch.nn.functional, op)(native_input, target, reduction=reduction)
    with pytest.raises(RuntimeError, match="expected scalar type Long but found Byte"):
        native_loss.backward()
    ours = getattr(torchbp.functional, op)
    with pytest.raises(RuntimeError, match=rf"{op}: K-dimensional input .* needs an int64"):
        ours(torch.zeros(shape, requires_grad=True), target, reduction=reduction)
