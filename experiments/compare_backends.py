"""torchbp vs torch backend on digits, from the same seed.

Trains ERMClassifier twice per repeat, alternating backends (torchbp, torch, torchbp, torch, ...)
in one process, with the architecture and optimiser of configs/digits.yaml. Writes to
experiments/results/:

- compare_backends.png   overlaid train/val loss and val accuracy curves
- compare_backends.md    final metrics table, max |difference| between the curves, epoch times
- compare_backends.json  every number behind the table

Run from the repository root:

    python experiments/compare_backends.py            # 25 epochs, 3 repeats
    python experiments/compare_backends.py --epochs 5 --repeats 1 --out /tmp/cmp   # quick
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def train_run(
    backend: str = "torchbp",
    activation: str = "relu",
    hidden_sizes: tuple[int, ...] = (256,),
    epochs: int = 25,
    seed: int = 0,
    optimizer=None,
    batch_size: int = 64,
    track_grad: bool = False,
) -> dict:
    """Train on digits; return per-epoch curves, epoch times and final test metrics."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from torchbp.lightning import DigitsDataModule, ERMClassifier

    class Probe(pl.Callback):
        """Epoch wall times and (optionally) the first layer's mean gradient norm per epoch."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.grad: list[float] = []
            self._g: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._t = time.perf_counter()
            self._g = []

        def on_after_backward(self, trainer, pl_module) -> None:
            if track_grad:
                self._g.append(float(pl_module.net[0].weight.grad.norm()))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.times.append(time.perf_counter() - self._t)  # train + validation
            if track_grad:
                self.grad.append(statistics.fmean(self._g))

    pl.seed_everything(seed, workers=True, verbose=False)
    dm = DigitsDataModule(batch_size=batch_size, seed=0)
    model = ERMClassifier(
        input_size=dm.num_features,
        num_classes=dm.num_classes,
        hidden_sizes=list(hidden_sizes),
        activation=activation,
        backend=backend,
        optimizer=optimizer or partial(torch.optim.Adam, lr=0.002),
    )
    probe = Probe()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            deterministic=True,
            logger=CSVLogger(tmp, name="run"),
            callbacks=[probe],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
        trainer.fit(model, datamodule=dm)
        test = trainer.test(model, datamodule=dm, verbose=False)[0]
        with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    curves: dict[str, list[float]] = {}
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        by_epoch = {int(r["epoch"]): float(r[key]) for r in rows if r.get(key)}
        curves[key] = [by_epoch[e] for e in sorted(by_epoch)]
    return {
        "backend": backend,
        "activation": activation,
        "curves": curves,
        "epoch_times": probe.times,
        "grad_norm_layer1": probe.grad,
        "test": {k: float(v) for k, v in test.items()},
    }


def interleaved_epoch_times(rounds: int, seed: int = 0, batch_size: int = 64) -> dict:
    """Plain training epochs (forward, cross-entropy, backward, Adam step; no Lightning),
    alternating torchbp, torch, torchbp, torch, ... so both see the same machine load."""
    from torchbp.lightning import DigitsDataModule, ERMClassifier

    dm = DigitsDataModule(batch_size=batch_size, seed=0)
    batches = list(dm.train_dataloader())
    models, opts = {}, {}
    for backend in ("torchbp", "torch"):
        torch.manual_seed(seed)
        m = ERMClassifier(dm.num_features, dm.num_classes, [256], backend=backend)
        models[backend], opts[backend] = m, torch.optim.Adam(m.parameters(), lr=0.002)
    times: dict[str, list[float]] = {"torchbp": [], "torch": []}
    for r in range(rounds + 1):  # round 0 is warm-up
        for backend in ("torchbp", "torch"):
            m, opt = models[backend], opts[backend]
            t = time.perf_counter()
            for x, y in batches:
                opt.zero_grad(set_to_none=True)
                m.loss(m(x), y).backward()
                opt.step()
            if r > 0:
                times[backend].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [a / b for a, b in zip(times["torchbp"], times["torch"])]
    return {
        "median_s": med,
        "ratio": med["torchbp"] / med["torch"],
        "ratio_median_of_pairs": statistics.median(ratios),
        "rounds": rounds,
    }


def at_least(low: int):
    """An argparse type: an integer ``>= low`` (the report needs that many)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--epochs", type=at_least(2), default=25, help="at least 2: the first is warm-up"
    )
    ap.add_argument("--repeats", type=at_least(1), default=3, help="alternating runs per backend")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=at_least(1), default=1, help="torch.set_num_threads")
    ap.add_argument(
        "--timing-rounds", type=at_least(1), default=30, help="interleaved plain epochs"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    command = " ".join(["python experiments/compare_backends.py", shlex.join(argv)]).strip()
    _quiet()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    timing = interleaved_epoch_times(args.timing_rounds, seed=args.seed)
    print(f"interleaved plain epochs: {timing}")
    runs: dict[str, list[dict]] = {"torchbp": [], "torch": []}
    for r in range(args.repeats):
        for backend in ("torchbp", "torch"):
            res = train_run(backend, epochs=args.epochs, seed=args.seed)
            runs[backend].append(res)
            print(
                f"repeat {r} {backend:8s} test/acc={res['test']['test/acc']:.4f} "
                f"median epoch {statistics.median(res['epoch_times']) * 1e3:.1f} ms"
            )

    a, b = runs["torchbp"][0], runs["torch"][0]
    # every repeat has the same seed: the curves must not change between repeats
    deterministic = all(r["curves"] == runs[k][0]["curves"] for k in runs for r in runs[k])
    max_diff = {
        k: max(abs(x - y) for x, y in zip(a["curves"][k], b["curves"][k])) for k in a["curves"]
    }
    # epoch time: skip each run's first epoch (warm-up), median over epochs and repeats
    med = {k: statistics.median(t for r in runs[k] for t in r["epoch_times"][1:]) for k in runs}
    ratio = med["torchbp"] / med["torch"]

    # -- plot ---------------------------------------------------------------------------
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = range(1, args.epochs + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for res, style, name in ((a, "-", "torchbp"), (b, "--", "torch")):
        axes[0].plot(ep, res["curves"]["train/loss"], style, label=f"train ({name})")
        axes[0].plot(ep, res["curves"]["val/loss"], style, label=f"val ({name})")
        axes[1].plot(ep, res["curves"]["val/acc"], style, label=f"val ({name})")
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="empirical risk")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="validation accuracy", ylim=(0.85, 1.0))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"digits, MLP 64-256-10 ReLU, Adam lr=2e-3, seed {args.seed}: "
        f"max |Δ val/acc| = {max_diff['val/acc']:.1e}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(args.out / "compare_backends.png", dpi=110)

    # -- table --------------------------------------------------------------------------
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# torchbp vs torch backend on digits",
        "",
        f"`{command}` — {stamp}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s).",
        "",
        "| metric | torchbp | torch | abs. difference |",
        "| --- | --- | --- | --- |",
    ]
    for k in ("test/acc", "test/error", "test/f1", "test/loss"):
        x, y = a["test"][k], b["test"][k]
        lines.append(f"| {k} | {x:.4f} | {y:.4f} | {abs(x - y):.1e} |")
    lines += [
        "",
        "| curve (per epoch) | max abs. difference torchbp vs torch |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v:.2e} |" for k, v in max_diff.items()]
    lines += [
        "",
        f"Epoch time, plain training loop (forward + cross-entropy + backward + Adam step over "
        f"the {timing['rounds']} interleaved epochs torchbp, torch, torchbp, ...; no "
        f"Lightning): median torchbp {timing['median_s']['torchbp'] * 1e3:.1f} ms, torch "
        f"{timing['median_s']['torch'] * 1e3:.1f} ms, ratio torchbp/torch = "
        f"**{timing['ratio']:.2f}** (median of per-pair ratios "
        f"{timing['ratio_median_of_pairs']:.2f}).",
        "",
        f"Epoch time inside Lightning (train + validation loop, first epoch skipped, "
        f"{args.repeats} alternating runs per backend; includes Lightning's per-epoch overhead "
        f"and is sensitive to machine load): torchbp {med['torchbp'] * 1e3:.1f} ms, torch "
        f"{med['torch'] * 1e3:.1f} ms, ratio {ratio:.2f}.",
        f"Same seed gives identical curves across repeats: {deterministic}.",
        "",
    ]
    (args.out / "compare_backends.md").write_text("\n".join(lines))
    summary = {
        "command": command,
        "date": stamp,
        "torch": torch.__version__,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "final_test": {"torchbp": a["test"], "torch": b["test"]},
        "max_abs_diff_curves": max_diff,
        "median_epoch_s": med,
        "lightning_epoch_time_ratio_torchbp_over_torch": ratio,
        "plain_epoch_timing": timing,
        "deterministic_across_repeats": deterministic,
        "curves": {"torchbp": a["curves"], "torch": b["curves"]},
    }
    (args.out / "compare_backends.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
