"""The cost of ``torchbp.enable()`` (issue 12): per call it routes, per call it passes
through, and on an MLP training step against the same model after ``torchbp.convert``.

    python -m experiments.bench_mode            # ~1 min on a 2-core machine
    python -m experiments.bench_mode --quick    # small sizes and few rounds: smoke test

Per call (microbenchmark, tensors of 64 elements so that the call's own work is small):

* routed: ``F.relu(x)`` / ``x.relu()`` under the mode against ``torchbp.functional.relu(x)``
  called directly (the same Function runs in both), ``x`` requiring grad;
* passed through: a builtin (``torch.add``), a tensor attribute (``x.shape``) and a
  Python-level ``torch.nn.functional`` function (``F.hardtanh``, which the mode
  re-dispatches with itself active), each with and without the mode.

Each variant is timed over 2000 calls per round (200 with ``--quick``); rounds alternate
the order of the variants (A B C, C B A, ...); reported are medians over rounds, per call.

Training step (zero_grad, forward, cross-entropy, backward, SGD step with momentum) of a
ReLU MLP, fp32, CPU, from the same initial weights:

* ``enable``: the model written with functional calls (``F.linear``, ``F.relu``,
  ``F.cross_entropy``), the whole step inside ``with torchbp.enable()``;
* ``enable_forward``: the same, only forward and loss inside the mode (where the graph
  is built: backward and the optimizer gain nothing from it);
* ``direct``: the same functional model calling ``torchbp.functional`` itself, no mode
  (the very computation of ``enable``: ``enable / direct`` is the mode's own cost);
* ``convert``: ``nn.Sequential`` of ``nn.Linear`` / ``nn.ReLU`` and ``nn.CrossEntropyLoss``
  after ``torchbp.convert``, no mode;
* ``native``: the same ``nn`` model unconverted (for reference).

Rounds alternate the order of the five; reported are per-variant medians and the
enable/convert ratio both as median/median and as the median of per-round ratios.

One intra-op thread by default (``--threads``): on a shared 2-core machine more threads
make the small steps' times swing by several times.

Writes ``experiments/results/mode.{md,json}`` (``mode_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchbp
import torchbp.functional as TF
from torchbp.mode import enable

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- timing
def interleaved(variants: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds of one call of each variant per round, the order alternating by round."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median_us(values: list[float], per: int = 1) -> float:
    return statistics.median(values) / per * 1e6


# --------------------------------------------------------------------------- per call
def per_call(calls: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median microseconds per call of each microbenchmark variant."""
    x = torch.randn(8, 8, requires_grad=True)
    mode = enable()

    def repeat(fn: Callable[[], object], under_mode: bool) -> Callable[[], None]:
        def run() -> None:
            if under_mode:
                with mode:
                    for _ in range(calls):
                        fn()
            else:
                for _ in range(calls):
                    fn()

        return run

    groups = {
        "routed F.relu": (lambda: TF.relu(x), lambda: F.relu(x)),
        "routed x.relu()": (lambda: TF.relu(x), lambda: x.relu()),
        "passed through torch.add": (lambda: torch.add(x, x), lambda: torch.add(x, x)),
        "passed through x.shape": (lambda: x.shape, lambda: x.shape),
        "passed through F.hardtanh (Python-level)": (lambda: F.hardtanh(x), lambda: F.hardtanh(x)),
    }
    out = {}
    for name, (without, under) in groups.items():
        for fn in (without, under):  # warm up
            fn()
        times = interleaved(
            {"without": repeat(without, False), "under": repeat(under, True)}, rounds
        )
        a, b = median_us(times["without"], calls), median_us(times["under"], calls)
        out[name] = {"without_us": a, "under_mode_us": b, "overhead_us": b - a}
    return out


# --------------------------------------------------------------------------- MLP step
def mlp_step(sizes: list[int], batch: int, rounds: int, warmup: int) -> dict:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    native = nn.Sequential(*layers[:-1])
    converted = torchbp.convert(nn.Sequential(*layers[:-1]), inplace=False)
    functional_params = [p.detach().clone().requires_grad_() for p in native.parameters()]
    x = torch.randn(batch, sizes[0])
    y = torch.randint(sizes[-1], (batch,))
    native_loss, converted_loss = nn.CrossEntropyLoss(), torchbp.convert(nn.CrossEntropyLoss())

    def functional_forward(inp: torch.Tensor, ns=F) -> torch.Tensor:
        weights = functional_params if ns is F else direct_params
        for i in range(0, len(weights), 2):
            inp = ns.linear(inp, weights[i], weights[i + 1])
            if i + 2 < len(weights):
                inp = ns.relu(inp)
        return inp

    direct_params = [p.detach().clone().requires_grad_() for p in native.parameters()]

    mode = enable()

    def stepper(params, forward, loss_fn, under_mode: str = "") -> Callable[[], None]:
        """One SGD step; ``under_mode``: ``"step"`` (all of it) or ``"forward"`` (forward
        and loss, where the graph is built) under the mode, ``""`` without it."""
        opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        context = mode if under_mode == "forward" else contextlib.nullcontext()

        def step() -> None:
            opt.zero_grad()
            with context:
                loss = loss_fn(forward(x), y)
            loss.backward()
            opt.step()

        def step_under_mode() -> None:
            with mode:
                step()

        return step_under_mode if under_mode == "step" else step

    variants = {
        "enable": stepper(functional_params, functional_forward, F.cross_entropy, "step"),
        "enable_forward": stepper(
            [p.detach().clone().requires_grad_() for p in functional_params],
            functional_forward,
            F.cross_entropy,
            "forward",
        ),
        "direct": stepper(direct_params, lambda inp: functional_forward(inp, TF), TF.cross_entropy),
        "convert": stepper(list(converted.parameters()), converted, converted_loss),
        "native": stepper(list(native.parameters()), native, native_loss),
    }
    for _ in range(warmup):
        for step in variants.values():
            step()
    routed_per_step = dict(mode.counts)
    for key in routed_per_step:
        routed_per_step[key] //= 2 * warmup  # two variants run under the mode
    times = interleaved(variants, rounds)
    med = {name: median_us(t) / 1e3 for name, t in times.items()}
    paired = [a / b for a, b in zip(times["enable"], times["convert"])]
    return {
        "sizes": sizes,
        "batch": batch,
        "rounds": rounds,
        "median_ms": med,
        "enable_over_convert": med["enable"] / med["convert"],
        "enable_over_convert_paired_median": statistics.median(paired),
        "enable_over_direct": med["enable"] / med["direct"],
        "enable_forward_over_convert": med["enable_forward"] / med["convert"],
        "enable_forward_over_direct": med["enable_forward"] / med["direct"],
        "convert_over_native": med["convert"] / med["native"],
        "routed_per_step": routed_per_step,
    }


# --------------------------------------------------------------------------- report
def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread(s)), Python {platform.python_version()}"
    )


def markdown(data: dict) -> str:
    lines = [
        "# The cost of `torchbp.enable()`",
        "",
        f"`{data['command']}` — {data['date']}",
        "",
        f"Machine: {data['machine']}. The machine was shared with other jobs (2 cores), so "
        "single figures are noisy; every comparison is interleaved in one process.",
        "",
        "## Per call",
        "",
        f"Median µs per call over {data['per_call_rounds']} interleaved rounds of "
        f"{data['calls']} calls (tensors of 64 elements).",
        "",
        "| call | without the mode | under `enable()` | cost of the mode |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in data["per_call"].items():
        base = "`torchbp.functional.relu`" if name.startswith("routed") else "native"
        lines.append(
            f"| {name} | {row['without_us']:.2f} ({base}) | {row['under_mode_us']:.2f} "
            f"| {row['overhead_us']:+.2f} |"
        )
    lines += [
        "",
        "## MLP training step",
        "",
        "zero_grad + forward + cross-entropy + backward + SGD (momentum) step, fp32, CPU; "
        "median ms per step. "
        "`enable`: functional model (`F.linear`, `F.relu`, `F.cross_entropy`), the whole "
        "step under `with torchbp.enable()`; `enable fwd`: only forward and loss under it; "
        "`direct`: the same model calling `torchbp.functional` "
        "itself (the same computation without the mode); `convert`: the `nn` model after "
        "`torchbp.convert`; `native`: the `nn` model as it is. Ratios: median/median, and "
        "the median of per-round ratios in brackets.",
        "",
        "| MLP | batch | rounds | enable | enable fwd | direct | convert | native "
        "| enable / convert | enable / direct | enable fwd / convert | enable fwd / direct "
        "| routed per step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in data["mlp"]:
        med = row["median_ms"]
        routed = ", ".join(f"{k} {v}" for k, v in row["routed_per_step"].items())
        lines.append(
            f"| {'-'.join(map(str, row['sizes']))} ReLU | {row['batch']} | {row['rounds']} "
            f"| {med['enable']:.2f} | {med['enable_forward']:.2f} | {med['direct']:.2f} "
            f"| {med['convert']:.2f} | {med['native']:.2f} "
            f"| **{row['enable_over_convert']:.3f}** "
            f"({row['enable_over_convert_paired_median']:.3f}) "
            f"| {row['enable_over_direct']:.3f} | {row['enable_forward_over_convert']:.3f} "
            f"| {row['enable_forward_over_direct']:.3f} | {routed} |"
        )
    lines += [
        "",
        "Reading: the mode's cost is per call, not per element. A routed call pays torch's "
        "mode dispatch, the argument check and the count on top of the same torchbp "
        "Function; a passed-through call pays the dispatch only (a Python-level "
        "`torch.nn.functional` function twice, as it is re-dispatched with the mode active). "
        "A training step makes a few dozen torch calls under the mode (forward, "
        "`backward()`, the optimizer's in-place updates, attribute reads), so the "
        "cost is fixed per step: within noise for the large MLP, visible for a step "
        "under a millisecond, and smallest with only forward and loss under the mode "
        "(`enable fwd`, as `ERMClassifier` does).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1: steadier)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        calls, call_rounds = 200, 5
        cases = [([32, 64, 10], 16, 5, 2)]
    else:
        calls, call_rounds = 2000, 41
        cases = [([784, 1024, 1024, 10], 256, 101, 5), ([64, 256, 10], 64, 201, 20)]
    command = "python -m experiments.bench_mode " + " ".join(sys.argv[1:] if argv is None else argv)
    data = {
        "command": command.strip(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_line(),
        "calls": calls,
        "per_call_rounds": call_rounds,
        "per_call": per_call(calls, call_rounds),
        "mlp": [mlp_step(sizes, batch, rounds, warmup) for sizes, batch, rounds, warmup in cases],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "mode_quick" if args.quick else "mode"
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
