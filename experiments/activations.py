"""Activations on digits: every activation of the op registry (sigmoid, tanh, ReLU, LeakyReLU,
GELU, SiLU, ELU, Softplus), all with torchbp.

A deliberately deep, narrow MLP (4 hidden layers of 64) trained with plain SGD + momentum
makes the lecture's point visible: saturating activations (sigmoid above all) pass back tiny
gradients to the first layer and converge slowly; ReLU-family activations do not. Writes to
experiments/results/:

- activations.png   train loss, val accuracy and first-layer gradient norm per epoch
- activations.md    final test accuracy and epochs to 95% validation accuracy
- activations.json  every number behind the table

Run from the repository root:

    python experiments/activations.py
    python experiments/activations.py --epochs 3 --out /tmp/act   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_backends import RESULTS, _quiet, train_run  # noqa: E402
from torchbp.ops import activations  # noqa: E402

ACTS = [op.name for op in activations()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64, 64])
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    opt = partial(torch.optim.SGD, lr=args.lr, momentum=0.9)
    results = {}
    for act in ACTS:
        res = train_run(
            "torchbp",
            activation=act,
            hidden_sizes=tuple(args.hidden),
            epochs=args.epochs,
            seed=args.seed,
            optimizer=opt,
            track_grad=True,
        )
        va = res["curves"]["val/acc"]
        res["epochs_to_95"] = next((i + 1 for i, v in enumerate(va) if v >= 0.95), None)
        results[act] = res
        print(
            f"{act:10s} test/acc={res['test']['test/acc']:.4f} "
            f"epochs to 95% val acc: {res['epochs_to_95']} "
            f"first-layer grad norm (epoch 1): {res['grad_norm_layer1'][0]:.2e}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = range(1, args.epochs + 1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for act, res in results.items():
        axes[0].plot(ep, res["curves"]["train/loss"], label=act)
        axes[1].plot(ep, res["curves"]["val/acc"], label=act)
        axes[2].plot(ep, res["grad_norm_layer1"], label=act)
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="train loss")
    axes[1].axhline(0.95, color="gray", lw=0.8, ls=":")
    axes[1].set(xlabel="epoch", ylabel="accuracy", title="validation accuracy", ylim=(0, 1))
    axes[2].set(
        xlabel="epoch", ylabel="mean ||dL/dW1||", yscale="log", title="first-layer gradient"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    hs = "-".join(map(str, args.hidden))
    fig.suptitle(
        f"digits, MLP 64-{hs}-10 (torchbp), SGD lr={args.lr} momentum 0.9, seed {args.seed}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(args.out / "activations.png", dpi=110)

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Activations on digits (torchbp backend)",
        "",
        f"`python experiments/activations.py --epochs {args.epochs}` — {stamp}, "
        f"torch {torch.__version__}. MLP 64-{hs}-10, SGD lr={args.lr}, momentum 0.9, "
        f"batch 64, seed {args.seed}.",
        "",
        "| activation | final test acc | epochs to 95% val acc | first-layer grad norm, "
        "epoch 1 (mean) | final train loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for act, res in results.items():
        e95 = res["epochs_to_95"] if res["epochs_to_95"] is not None else f"> {args.epochs}"
        lines.append(
            f"| {act} | {res['test']['test/acc']:.4f} | {e95} | "
            f"{res['grad_norm_layer1'][0]:.2e} | {res['curves']['train/loss'][-1]:.4f} |"
        )
    lines.append("")
    (args.out / "activations.md").write_text("\n".join(lines))
    summary = {
        act: {
            "test": r["test"],
            "epochs_to_95": r["epochs_to_95"],
            "grad_norm_layer1": r["grad_norm_layer1"],
            "curves": r["curves"],
            "median_epoch_s": statistics.median(r["epoch_times"]),
        }
        for act, r in results.items()
    }
    summary["_meta"] = {
        "date": stamp,
        "torch": torch.__version__,
        "args": vars(args) | {"out": str(args.out)},
    }
    (args.out / "activations.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
