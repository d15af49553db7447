"""Where ``per_sample_grads(mode="norms")``'s time over a plain step goes (issue 14).

One process, alternating rounds, MLP 784-1024-1024-10 (ReLU), batch 256, float32:

- ``plain``: a plain torchbp SGD step;
- ``norms``: the same step inside ``per_sample_grads(model, "norms")``;
- ``bare_deferred``: a bare recorder that only files each Linear's ``(a, g)`` and forms
  ``dW``, ``db`` and the norms after the backward, none of the context's checks or hooks
  (the floor of the deferred design);

then the cost of the context itself: building it, and entering and leaving it with no
work inside. Run from the repository root::

    python -m experiments.norms_overhead [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import torchbp
from torchbp.autograd.linear import per_sample_recording
from torchbp.per_sample import per_sample_grads
from torchbp.per_sample.formulas import layer_norms

SIZES = (784, 1024, 1024, 10)
BATCH = 256


def mlp() -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(SIZES, SIZES[1:])):
        layers.append(torchbp.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(torchbp.nn.ReLU())
    return torch.nn.Sequential(*layers)


class _Filed:
    __slots__ = ("traces",)

    def __init__(self, traces: list) -> None:
        self.traces = traces

    def on_backward(self, a: torch.Tensor, g: torch.Tensor) -> bool:
        self.traces.append((a, g))
        return False  # the Linear backward skips dW and db


class _BareRecorder:
    def __init__(self) -> None:
        self.traces: list = []

    def on_forward(self, x, weight, bias):
        return _Filed(self.traces)


def cases(x, y):
    loss_fn = torchbp.nn.CrossEntropyLoss()

    def make(kind):
        model = mlp()
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.01)
        linears = [m for m in model if isinstance(m, torchbp.nn.Linear)]

        def step():
            opt.zero_grad(set_to_none=True)
            if kind == "plain":
                loss_fn(model(x), y).backward()
            elif kind == "norms":
                with per_sample_grads(model, "norms") as ps:
                    loss_fn(model(x), y).backward()
                _ = ps.norms
            else:
                recorder = _BareRecorder()
                per_sample_recording.recorder = recorder
                try:
                    loss_fn(model(x), y).backward()
                finally:
                    per_sample_recording.recorder = None
                squared = 0
                for layer, (a, g) in zip(reversed(linears), recorder.traces):
                    a3, g3 = a.reshape(BATCH, 1, -1), g.reshape(BATCH, 1, -1)
                    squared = squared + layer_norms(a3, g3, weight=True, bias=True).square()
                    layer.weight.grad = g.t() @ a
                    layer.bias.grad = g.sum(0)
                squared.sqrt()
            opt.step()

        return step

    return {kind: make(kind) for kind in ("plain", "norms", "bare_deferred")}


def median_us(fn, repeats: int = 2000) -> float:
    for _ in range(100):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.norms_overhead")
    parser.add_argument("--rounds", type=int, default=200, help="alternating rounds (>= 1)")
    rounds = parser.parse_args(argv).rounds
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, SIZES[0]), torch.randint(SIZES[-1], (BATCH,))
    steps = cases(x, y)
    for step in steps.values():
        for _ in range(10):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for r in range(rounds):
        for kind in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            steps[kind]()
            times[kind].append(time.perf_counter() - t0)
    base = times["plain"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
    for kind, ts in times.items():
        paired = statistics.median(t / b for t, b in zip(ts, base))
        print(
            f"{kind:14s} median {statistics.median(ts) * 1e3:6.2f} ms  "
            f"vs plain {statistics.median(ts) / statistics.median(base):.3f}  paired {paired:.3f}"
        )
    model = mlp()

    def build():
        per_sample_grads(model, "norms")

    def enter_exit():
        with per_sample_grads(model, "norms"):
            pass

    print(
        f"context: build {median_us(build):.0f} us, build + enter + exit "
        f"{median_us(enter_exit):.0f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
