"""User-side code for the static type check of torchbp's public API (tests/test_typing.py).

Never run: mypy reads it as a user's code would be read, with ``--strict``, so a public
name that lost its annotation (an implicit ``Any`` return, a ``Tensor = None`` default, a
``-> Tensor`` that returns a tuple) fails the check. ``assert_type`` pins the types a user
relies on. Everything here follows README.md and docs/*.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import assert_type

import torchbp
import torchbp.functional as TF
from torchbp.autograd import GELUFunction, LinearFunction, SigmoidFunction
from torchbp.convert import ConvertReport
from torchbp.lightning import DigitsDataModule, ERMClassifier, SyntheticDataModule, build_mlp
from torchbp.lightning.cli import TorchbpCLI
from torchbp.lightning.cli import main as train_main
from torchbp.lightning.privacy import Privacy
from torchbp.mode import TorchbpMode, routed_functions
from torchbp.per_sample import MODES, PerSampleGrads
from torchbp.verify import (
    CHECK_DESCRIPTIONS,
    CHECKS,
    FAIL,
    PASS,
    SKIP,
    UNSUPPORTED,
    CheckResult,
    Report,
    assert_function,
    check_function,
    tolerances,
)
from torchbp.verify.cli import main as verify_main

Tensor = torch.Tensor


def functional_calls(x: Tensor, w: Tensor, b: Tensor, y: Tensor, cw: Tensor) -> list[Tensor]:
    """Every function of torchbp.functional with its keyword arguments."""
    return [
        assert_type(TF.linear(x, w), Tensor),
        assert_type(TF.linear(x, w, b), Tensor),
        assert_type(TF.linear(x, w, bias=None), Tensor),
        assert_type(TF.sigmoid(x), Tensor),
        assert_type(TF.tanh(x), Tensor),
        assert_type(TF.relu(x, inplace=False), Tensor),
        assert_type(TF.relu_(x.clone()), Tensor),
        assert_type(TF.leaky_relu(x, 0.2, inplace=False), Tensor),
        assert_type(TF.leaky_relu(x, negative_slope=0.1), Tensor),
        assert_type(TF.leaky_relu_(x.clone(), 0.1), Tensor),
        assert_type(TF.gelu(x, approximate="tanh"), Tensor),
        assert_type(TF.gelu(x), Tensor),
        assert_type(TF.silu(x, inplace=False), Tensor),
        assert_type(TF.elu(x, alpha=1.0, inplace=False), Tensor),
        assert_type(TF.elu_(x.clone(), 0.5), Tensor),
        assert_type(TF.softplus(x, beta=2.0, threshold=10.0), Tensor),
        assert_type(TF.softmax(x, dim=-1, dtype=torch.float64), Tensor),
        assert_type(TF.softmax(x, -1), Tensor),
        assert_type(TF.softmin(x, dim=1), Tensor),
        assert_type(TF.log_softmax(x, dim=1, dtype=None), Tensor),
        assert_type(TF.nll_loss(x, y, weight=None, ignore_index=-100, reduction="sum"), Tensor),
        assert_type(TF.nll_loss(x, y, weight=cw, reduction="none"), Tensor),
        assert_type(TF.cross_entropy(x, y), Tensor),
        assert_type(
            TF.cross_entropy(
                x, y, weight=cw, ignore_index=0, reduction="mean", label_smoothing=0.1, inplace=True
            ),
            Tensor,
        ),
        assert_type(
            TF.cross_entropy(x, y.float().softmax(-1), weight=None, reduce=None, size_average=None),
            Tensor,
        ),
        assert_type(TF.linear_cross_entropy(x, w, y), Tensor),
        assert_type(
            TF.linear_cross_entropy(
                x,
                w,
                y,
                linear_bias=b,
                weight=cw,
                reduction="sum",
                ignore_index=-100,
                label_smoothing=0.0,
                chunk_size=1024,
            ),
            Tensor,
        ),
        assert_type(
            TF.linear_cross_entropy(x, w, y, linear_bias=None, weight=None, ignore_index=None),
            Tensor,
        ),
    ]


def nn_modules() -> torch.nn.Module:
    """Every torchbp.nn module: construction, forward, .to, state_dict."""
    linear = torchbp.nn.Linear(20, 10, bias=True, device="cpu", dtype=torch.float32)
    assert_type(linear.to(torch.float64), torchbp.nn.Linear)
    weight: Tensor = linear.weight
    del weight
    state: dict[str, Any] = linear.state_dict()
    linear.load_state_dict(state)
    x = torch.randn(4, 20)
    out: Tensor = linear(x)
    out = assert_type(linear.forward(x), Tensor)
    assert_type(torchbp.nn.GELU().forward(x), Tensor)
    activations: list[torch.nn.Module] = [
        torchbp.nn.Sigmoid(),
        torchbp.nn.Tanh(),
        torchbp.nn.ReLU(inplace=False),
        torchbp.nn.LeakyReLU(0.1, inplace=False),
        torchbp.nn.GELU(approximate="tanh"),
        torchbp.nn.SiLU(inplace=False),
        torchbp.nn.ELU(alpha=1.0, inplace=False),
        torchbp.nn.Softplus(beta=1.0, threshold=20.0),
        torchbp.nn.Softmax(dim=-1),
        torchbp.nn.Softmin(dim=-1),
        torchbp.nn.Softmax2d(),
        torchbp.nn.LogSoftmax(dim=1),
    ]
    y = torch.randint(10, (4,))
    losses: list[Tensor] = [
        torchbp.nn.NLLLoss(weight=None, ignore_index=-100, reduction="mean")(out, y),
        torchbp.nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1)(out, y),
        torchbp.nn.CrossEntropyLoss(weight=torch.ones(10)).forward(out, y),
    ]
    head = torchbp.nn.LinearCrossEntropyLoss(20, 10, bias=False, reduction="sum")
    losses.append(head(x, y))
    losses.append(assert_type(head.forward(x, y), Tensor))
    assert_type(head.to(torch.float64), torchbp.nn.LinearCrossEntropyLoss)
    assert_type(head.extra_repr(), str)
    del losses
    return torch.nn.Sequential(linear, *activations)


def converting(model: torch.nn.Module) -> tuple[torch.nn.Module, ConvertReport]:
    """torchbp.convert with and without its report, and both directions."""
    converted = torchbp.convert(model)
    assert_type(converted, torch.nn.Module)
    back = torchbp.convert(converted, inplace=False, to="torch")
    assert_type(back, torch.nn.Module)
    pair = torchbp.convert(model, report=True)
    assert_type(pair, tuple[torch.nn.Module, ConvertReport])
    # converting to torchbp keeps the model's class (docs/per_sample.md indexes the result)
    mlp = torchbp.convert(torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU()))
    assert_type(mlp, torch.nn.Sequential)
    first: torch.nn.Module = mlp[0]
    head, _ = torchbp.convert(torch.nn.Linear(4, 2), inplace=False, report=True)
    assert_type(head, torch.nn.Linear)
    direction: str = "torch"
    assert_type(torchbp.convert(head, to=direction), torch.nn.Module)
    del first
    module, report = pair
    flag = len(module.state_dict()) > 0
    either = torchbp.convert(model, report=flag)
    assert_type(either, torch.nn.Module | tuple[torch.nn.Module, ConvertReport])
    summary: str = report.summary()
    rows: list[tuple[str, str, str]] = report.converted + report.kept
    del summary, rows
    return module, report


def enabling(x: Tensor) -> Tensor:
    """torchbp.enable as a context manager and as a decorator."""
    with torchbp.enable() as mode:
        assert_type(mode, TorchbpMode)
        y = torch.nn.functional.gelu(x)
    counts: dict[str, int] = dict(mode.counts)
    native: dict[str, int] = dict(mode.native)
    table: dict[str, str] = routed_functions()
    del counts, native, table

    @torchbp.enable()
    def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(logits, target)

    return loss_fn(y, torch.zeros(len(y), dtype=torch.long))


def registry() -> list[str]:
    """torchbp.ops: the op registry as README shows it."""
    op = torchbp.ops.OPS["gelu"]
    function: type[torch.autograd.Function] = op.function
    functions: list[type[torch.autograd.Function]] = [SigmoidFunction, GELUFunction, LinearFunction]
    del function, functions
    twins: dict[type[torch.nn.Module], type[torch.nn.Module]] = torchbp.ops.module_twins()
    del twins
    return [op.saves, op.function.__name__] + [a.name for a in torchbp.ops.activations()]


def verifying() -> Report:
    """torchbp.verify: the report, its checks and attributes."""
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    report = check_function(TF.silu, z, reference=torch.nn.functional.silu)
    assert_type(report, Report)
    report = check_function(torchbp.autograd.SigmoidFunction, z, reference=torch.sigmoid)
    ok: bool = report.ok
    failures: list[CheckResult] = report.failures
    unsupported: list[CheckResult] = report.unsupported
    counts: dict[str, int] = report.counts()
    names: list[str] = report.names()
    result: CheckResult = report["gradcheck"]
    status: str = result.status
    flags: list[bool] = [result.passed, result.failed, result.unsupported, result.skipped]
    err: float | None = result.max_abs_err
    as_dict: dict[str, Any] = report.to_dict()
    statuses: list[str] = [PASS, FAIL, SKIP, UNSUPPORTED]
    atol, rtol = tolerances(torch.float32)
    bounds: tuple[float, float] = (atol, rtol)
    every: list[str] = [*CHECKS, *CHECK_DESCRIPTIONS]
    del ok, failures, unsupported, counts, names, status, flags, err, as_dict, statuses
    del bounds, every
    for check in report:
        assert_type(check, CheckResult)
    exit_code: int = verify_main(["sigmoid", "--checks", "gradcheck"])
    del exit_code
    return assert_function(torch.sigmoid, z, reference=torch.sigmoid, require=["vmap"])


def per_sample(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """per_sample_grads in its three modes, its results and add_noise."""
    modes: tuple[str, ...] = tuple(MODES)
    del modes
    with torchbp.per_sample_grads(model, mode="grads", statistics=True) as ps:
        assert_type(ps, PerSampleGrads)
        torchbp.nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
    norms: Tensor = ps.norms
    batch: int = ps.batch_size
    params: list[torch.nn.Parameter] = ps.parameters
    del batch, params
    generator = torch.Generator().manual_seed(0)
    with torchbp.per_sample_grads(model, "clip", max_norm=1.0) as clip:
        TF.cross_entropy(model(x), y, reduction="sum").backward()
        clip.add_noise(1.1, generator=generator)
    factors: Tensor = clip.clip_factors
    with torchbp.per_sample_grads(model, mode="clip", max_norm=torch.tensor(1.0)):
        pass
    return norms * factors


def lightning() -> None:
    """The Lightning names a user imports: the module, a DataModule, the CLI."""
    classifier = ERMClassifier(
        input_size=8,
        num_classes=3,
        hidden_sizes=[16],
        activation="gelu",
        backend="torchbp",
        class_weight=None,
        label_smoothing=0.0,
        fused_head=True,
        privacy=Privacy(max_grad_norm=1.0, noise_multiplier=1.0),
    )
    # a name outside the Literal is a type error (the ignore is unused if the check is lost)
    ERMClassifier(activation="swish")  # type: ignore[arg-type]
    mlp: torch.nn.Sequential = build_mlp(8, 3, [16], activation="relu", backend="torch")
    data = SyntheticDataModule(n_features=8, n_classes=3)
    digits = DigitsDataModule(batch_size=32, seed=0)
    del classifier, mlp, data, digits
    entry: Callable[..., None] = train_main
    cli: type[TorchbpCLI] = TorchbpCLI
    del entry, cli


def returns_inside_the_contexts(model: torch.nn.Module, x: Tensor) -> Tensor:
    """Neither context swallows an exception, so a return inside ends every path."""
    with torchbp.enable():
        with torchbp.per_sample_grads(model):
            return x
