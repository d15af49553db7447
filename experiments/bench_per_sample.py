"""Per-sample gradients benchmark (issue 14): one SGD step of an MLP 784-1024-1024-10 (ReLU),
batch 256, float32, CPU, with torchbp's ``per_sample_grads`` modes against a plain torchbp
step, and the same step with Opacus, BackPACK and ``torch.func.vmap(grad)``, in one run.

    python -m experiments.bench_per_sample              # ~3 min on a 2-core machine
    python -m experiments.bench_per_sample --quick      # small sizes: smoke test, own file

Peers are optional and skipped when not importable; install them beside torch 2.13 CPU:

    pip install -c .ci/constraints.txt opacus==1.6.0
    pip install --no-deps backpack-for-pytorch==1.7.1 einops unfoldNd packaging

Timing: every case is warmed up, then all cases of a group run in rounds whose order
alternates (A B C, C B A, ...); reported are medians, and the ratio to the plain step of
the same group both as median/median and as the median of per-round ratios. The fast
group (plain, torchbp modes, ghost clipping, BatchL2Grad) gets many rounds, the slow group
(per-sample gradients materialised) few. After each timed step, untimed, the per-sample
buffers it left on the parameters are dropped, so no case holds 2 GB while others run.

Peak memory: each case in a fresh subprocess (glibc's mmap threshold fixed at 64 KiB, so
freed tensors leave the resident set): after two warm-up steps and freeing the gradients
(``.grad`` and whatever a library keeps on the parameters, such as Opacus's
``summed_grad``), the resident set's high-water mark (reset through
``/proc/self/clear_refs``) during one step minus the resident set just before it. It
counts everything the step allocates and touches: gradients, activations, per-sample
buffers, noise.

Writes ``experiments/results/per_sample.{md,json}`` (``per_sample_quick.*`` with --quick,
``per_sample_partial.*`` with --case). A case whose peak-memory subprocess fails gets the
error in its row's peak cell, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import torchbp
from torchbp.per_sample import per_sample_grads

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"

MAX_NORM = 1.0  # C, on each sample's gradient of its own loss
NOISE_MULTIPLIER = 1.0  # σ
LR = 0.01
PER_SAMPLE_ATTRS = ("grad_sample", "grad_batch", "batch_l2", "sum_grad_squared", "grad_variance")


@dataclass
class Config:
    sizes: tuple[int, ...] = (784, 1024, 1024, 10)
    batch: int = 256

    @classmethod
    def make(cls, quick: bool) -> Config:
        return cls((64, 128, 128, 10), 32) if quick else cls()


@dataclass
class Case:
    """One way of taking an SGD step; ``step`` starts by freeing the previous gradients."""

    step: Callable[[], None]
    params: list[nn.Parameter]


# ------------------------------------------------------------------------------ builders


def torchbp_model(cfg: Config) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(cfg.sizes[:-1], cfg.sizes[1:])):
        if i:
            layers.append(torchbp.nn.ReLU())
        layers.append(torchbp.nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def native_model(cfg: Config) -> nn.Sequential:
    """The same MLP (same initial parameters) of plain torch.nn modules, for the peers."""
    return torchbp.convert(torchbp_model(cfg), to="torch")


def batch(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(cfg.batch, cfg.sizes[0], generator=gen)
    return x, torch.randint(cfg.sizes[-1], (cfg.batch,), generator=gen)


def _release(params) -> None:
    """Drop the per-sample buffers a step left on the parameters (any library's)."""
    for p in params:
        for attr in PER_SAMPLE_ATTRS:
            if getattr(p, attr, None) is not None:
                setattr(p, attr, None)


def _free(params, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    _release(params)


def plain(cfg: Config) -> Case:
    model, (x, y) = torchbp_model(cfg), batch(cfg)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    loss_fn = torchbp.nn.CrossEntropyLoss()

    def step():
        _free(params, opt)
        loss_fn(model(x), y).backward()
        opt.step()

    return Case(step, params)


def torchbp_mode(mode: str, noise: bool = False) -> Callable[[Config], Case]:
    def build(cfg: Config) -> Case:
        model, (x, y) = torchbp_model(cfg), batch(cfg)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=LR)
        loss_fn = torchbp.nn.CrossEntropyLoss()  # mean: contributions carry 1/B
        # clipping each contribution at C/B (noise σ·C/B) is DP-SGD's clip at C, noise
        # σC, then division by B, without the division pass
        max_norm = MAX_NORM / cfg.batch if mode == "clip" else None

        def step():
            _free(params, opt)
            with per_sample_grads(model, mode, max_norm) as ps:
                loss_fn(model(x), y).backward()
                if noise:
                    ps.add_noise(NOISE_MULTIPLIER)
            opt.step()

        return Case(step, params)

    return build


def noise_only(cfg: Config) -> Case:
    """Only DP-SGD's Gaussian noise for every parameter, as ``ps.add_noise`` draws it
    (torch's CPU generator, one stream, chunk by chunk: torchbp.per_sample.noise)."""
    from torchbp.per_sample.noise import add_gaussian_noise_

    params = list(torchbp_model(cfg).parameters())
    grads = [torch.zeros_like(p) for p in params]

    def step():
        add_gaussian_noise_(grads, NOISE_MULTIPLIER * MAX_NORM)

    return Case(step, params)


def opacus(mode: str, noise_multiplier: float) -> Callable[[Config], Case]:
    def build(cfg: Config) -> Case:
        from opacus import PrivacyEngine

        model, (x, y) = native_model(cfg), batch(cfg)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=LR)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = PrivacyEngine().make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                criterion=nn.CrossEntropyLoss(),
                noise_multiplier=noise_multiplier,
                max_grad_norm=MAX_NORM,
                poisson_sampling=False,
                grad_sample_mode=mode,
            )
        if mode == "ghost":
            dp_model, dp_opt, criterion, _ = made
        else:
            (dp_model, dp_opt, _), criterion = made, nn.CrossEntropyLoss()

        def step():
            dp_opt.zero_grad(set_to_none=True)
            criterion(dp_model(x), y).backward()
            dp_opt.step()

        return Case(step, params)

    return build


def backpack_case(extension: str) -> Callable[[Config], Case]:
    def build(cfg: Config) -> Case:
        from backpack import backpack, extend, extensions

        model, (x, y) = extend(native_model(cfg)), batch(cfg)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=LR)
        loss_fn = extend(nn.CrossEntropyLoss())
        ext = getattr(extensions, extension)

        def step():
            _free(params, opt)
            loss = loss_fn(model(x), y)
            with backpack(ext()):
                loss.backward()
            opt.step()

        return Case(step, params)

    return build


def vmap_clip(cfg: Config) -> Case:
    """Per-sample gradients by ``torch.func.vmap(grad)``, clipped at C, averaged."""
    from torch.func import functional_call, grad, vmap

    model, (x, y) = native_model(cfg), batch(cfg)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=LR)

    def sample_loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def step():
        _free(params.values(), opt)
        detached = {k: v.detach() for k, v in params.items()}
        grads = per_sample(detached, x, y)
        norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in grads.values()))
        factors = (MAX_NORM / norms).clamp(max=1) / cfg.batch
        for k, p in params.items():
            p.grad = torch.tensordot(factors, grads[k], dims=1)
            p.grad_sample = grads[k]  # freed untimed after the step, as every case's
        opt.step()

    return Case(step, list(params.values()))


# name: (what it is, group, builder)
CASES: dict[str, tuple[str, str, Callable[[Config], Case]]] = {
    "plain": ("plain torchbp SGD step", "both", plain),
    "norms": ("torchbp `mode='norms'`", "fast", torchbp_mode("norms")),
    "clip": ("torchbp `mode='clip'` (no noise)", "fast", torchbp_mode("clip")),
    "clip_noise": (
        "torchbp `mode='clip'` + `ps.add_noise(1.0)`",
        "fast",
        torchbp_mode("clip", noise=True),
    ),
    "noise_only": ("Gaussian noise for all parameters alone (no step)", "fast", noise_only),
    "opacus_ghost": ("Opacus 1.6 ghost clipping, σ=1", "fast", opacus("ghost", 1.0)),
    "opacus_ghost_no_noise": ("Opacus ghost clipping, σ=0", "fast", opacus("ghost", 0.0)),
    "backpack_l2": ("BackPACK `BatchL2Grad` (norms only)", "fast", backpack_case("BatchL2Grad")),
    "grads": ("torchbp `mode='grads'`", "slow", torchbp_mode("grads")),
    "backpack_grad": ("BackPACK `BatchGrad` (materialised)", "slow", backpack_case("BatchGrad")),
    "vmap_clip": ("`torch.func.vmap(grad)` + clip", "slow", vmap_clip),
    "opacus_hooks": ("Opacus hooks (materialised), clip, σ=1", "slow", opacus("hooks", 1.0)),
}
PEERS = {"opacus": "opacus", "backpack": "backpack-for-pytorch"}


def buildable(names: list[str], cfg: Config) -> tuple[dict[str, Case], dict[str, str]]:
    built, skipped = {}, {}
    for name in names:
        try:
            built[name] = CASES[name][2](cfg)
        except ImportError as e:
            skipped[name] = f"not importable: {e}"
    return built, skipped


# ------------------------------------------------------------------------------ timing


def time_group(cases: dict[str, Case], rounds: int, warmup: int) -> dict[str, list[float]]:
    for case in cases.values():
        for _ in range(warmup):
            case.step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            cases[name].step()
            times[name].append(time.perf_counter() - t0)
            _release(cases[name].params)  # untimed: no case holds 2 GB while others run
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, dict]:
    base = times["plain"]
    out = {}
    for name, ts in times.items():
        out[name] = {
            "median_ms": statistics.median(ts) * 1e3,
            "min_ms": min(ts) * 1e3,
            "rounds": len(ts),
            "ratio": statistics.median(ts) / statistics.median(base),
            "paired_ratio": statistics.median(t / b for t, b in zip(ts, base)),
        }
    return out


# ------------------------------------------------------------------------------ memory


def _status_kib(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    if m is None:
        raise RuntimeError(f"{key} not in /proc/self/status")
    return int(m.group(1))


def _drop_gradients(params) -> None:
    """Free every gradient a step left on the parameters: ``.grad`` and any tensor a
    library keeps on them (per-sample buffers; Opacus's clipped sum ``summed_grad``)."""
    for p in params:
        p.grad = None
        for attr, value in list(vars(p).items()):
            if isinstance(value, torch.Tensor):
                setattr(p, attr, None)


def peak_in_this_process(name: str, cfg: Config) -> dict:
    case = CASES[name][2](cfg)
    for _ in range(2):
        case.step()
    _drop_gradients(case.params)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    case.step()
    peak = _status_kib("VmHWM")
    return {"peak_extra_bytes": (peak - base) * 1024, "baseline_rss_bytes": base * 1024}


def peak_subprocess(name: str, quick: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "experiments.bench_per_sample", "--peak-case", name]
    cmd += ["--threads", str(torch.get_num_threads())] + (["--quick"] if quick else [])
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"exit {p.returncode}: {p.stderr.strip()[-300:]}"}


# ------------------------------------------------------------------------------ report


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"
    except AttributeError:  # backpack has no __version__
        from importlib.metadata import version

        return version(PEERS.get(module, module))


def targets(timing: dict, peak: dict) -> list[tuple[str, str, bool | None]]:
    def ratio(name):
        return timing.get(name, {}).get("ratio")

    def fmt(x):
        return "n/a" if x is None else f"{x:.2f}x"

    rows = []
    for name, limit, label in (
        ("clip_noise", 1.25, "clip step with noise ≤ 1.25x plain (goal 1.1x)"),
        ("clip", 1.25, "clip step without noise ≤ 1.25x plain (goal 1.1x)"),
        ("norms", 1.05, "norms ≤ 1.05x plain"),
    ):
        r = ratio(name)
        rows.append((label, fmt(r), None if r is None else r <= limit))
    g, b = timing.get("grads"), timing.get("backpack_grad")
    rows.append(
        (
            "grads faster than BackPACK BatchGrad",
            "n/a" if not (g and b) else f"{g['median_ms']:.0f} vs {b['median_ms']:.0f} ms",
            None if not (g and b) else g["median_ms"] < b["median_ms"],
        )
    )
    pc, pp = peak.get("clip_noise", {}), peak.get("plain", {})
    # (a quick run's plain step can stay within pages already resident: 0 bytes)
    if pc.get("peak_extra_bytes") is not None and pp.get("peak_extra_bytes"):
        r = pc["peak_extra_bytes"] / pp["peak_extra_bytes"]
        rows.append(("clip step peak memory ≤ 1.5x plain", f"{r:.2f}x", r <= 1.5))
    else:
        rows.append(("clip step peak memory ≤ 1.5x plain", "n/a", None))
    return rows


def markdown(meta: dict, timing: dict, peak: dict, skipped: dict) -> str:
    out = ["# torchbp per-sample gradients benchmark (issue 14)", ""]
    out += [f"- {k}: {v}" for k, v in meta.items()]
    out += ["", "One SGD step: free grads, forward, backward, per-sample work, step.", ""]
    out += [
        "| case | what | median ms | min ms | rounds | vs plain (median) "
        "| vs plain (paired) | peak extra MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (what, _, _) in CASES.items():
        if name in skipped:
            out.append(f"| {name} | {what} | skipped: {skipped[name]} | | | | | |")
            continue
        t = timing.get(name)
        if t is None:
            continue
        pk = peak.get(name, {})
        mib = f"{pk['peak_extra_bytes'] / 2**20:.1f}" if "peak_extra_bytes" in pk else "–"
        if "error" in pk:
            mib = f"error: {pk['error']}".replace("|", "/").replace("\n", " ")
        out.append(
            f"| {name} | {what} | {t['median_ms']:.1f} | {t['min_ms']:.1f} | {t['rounds']} "
            f"| {t['ratio']:.2f}x | {t['paired_ratio']:.2f}x | {mib} |"
        )
    out += ["", "Targets (issue 14):", "", "| target | measured | holds |", "| --- | --- | --- |"]
    for label, value, ok in targets(timing, peak):
        out.append(f"| {label} | {value} | {'–' if ok is None else ('yes' if ok else 'no')} |")
    out += [
        "",
        "The plain step's figure is from the fast group; the slow group's ratios use the "
        "plain step timed in that group's own rounds.",
        "",
        "Notes:",
        "",
        "- Noise: `noise_only` is the floor of any DP-SGD step on this CPU. torch's CPU "
        "generator (mt19937) is sequential: about 3.4 ns per Gaussian, and `torch.rand` is "
        "no faster, so the random bits, not the transform, are the cost. `ps.add_noise` draws "
        "them from one generator stream, as Opacus does (`torchbp/per_sample/noise.py`): "
        "generators seeded from it to draw chunks in parallel would have only 2^32 distinct "
        "streams (torch keeps 32 bits of a seed), and over a run two chunks would repeat "
        "their noise. `clip_noise` is `clip` + `noise_only`; with that floor, `clip` + noise "
        "cannot reach 1.25x of a plain step on this 2-core CPU (on a GPU the noise is a "
        "Philox kernel and costs little).",
        "- Clip mode in this benchmark uses `reduction='mean'` with `max_norm = C/B`: the "
        "same update as DP-SGD's sum, clip at C, noise σC, divide by B, without the "
        "division pass.",
        "- Peak extra memory: resident-set high-water mark during one step above the "
        "resident set before it, fresh subprocess per case, gradients freed before the "
        "step (so the plain step's figure is mostly its 7.1 MiB of gradients).",
        "- `grads` and BackPACK `BatchGrad` both write 476 M floats (1.8 GiB) of "
        "per-sample gradients into fresh memory each step, and with 4 KiB pages most of "
        "that time is page faults. torchbp maps its per-sample gradients in 2 MiB "
        "transparent huge pages (`torchbp/per_sample/memory.py`), which halves it. "
        "BackPACK gets the same from torch's `THP_MEM_ALLOC_ENABLE=1`, which puts every "
        "allocation of the process in huge pages: then the two tie (see the README).",
        "- All cases share one process, whose heap has grown to hold them all: no page "
        "faults per step in the fast group. A process that runs one case alone can fault on "
        "glibc's heap trimming, which makes its steps slower by an amount that depends on "
        "the case's allocation pattern, not on its work.",
        "",
    ]
    return "\n".join(out)


def positive(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of rounds or threads)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def results_stem(quick: bool, partial: bool) -> str:
    """File stem of a run's results: ``per_sample`` (the committed figures) only for a
    full run; ``--quick`` writes ``per_sample_quick``, a run of some ``--case`` only
    ``per_sample_partial``, so that neither replaces the full run's files."""
    return "per_sample" + ("_quick" if quick else "_partial" if partial else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    p.add_argument("--rounds", type=positive, default=None, help="rounds of the fast group")
    p.add_argument("--slow-rounds", type=positive, default=None, help="rounds of the slow group")
    p.add_argument("--no-peak", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--case", action="append", choices=list(CASES), help="only these (plain always runs)"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=positive, default=None, help="torch intra-op threads")
    p.add_argument("--render", type=Path, help="only rewrite the .md from this .json")
    p.add_argument("--peak-case", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = Config.make(a.quick)
    if a.render:
        data = json.loads(a.render.read_text())
        text = markdown(data["meta"], data["timing"], data["peak"], data["skipped"])
        a.render.with_suffix(".md").write_text(text)
        return 0
    if a.peak_case:
        print(json.dumps(peak_in_this_process(a.peak_case, cfg)))
        return 0
    rounds = a.rounds or (5 if a.quick else 40)
    slow_rounds = a.slow_rounds or (2 if a.quick else 5)
    meta = {
        "command": "python -m experiments.bench_per_sample" + "".join(f" {x}" for x in argv or []),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} "
        "torch threads",
        "torch": torch.__version__,
        "peers": f"opacus {_version('opacus')}, backpack {_version('backpack')}",
        "model": f"MLP {'-'.join(map(str, cfg.sizes))} ReLU, batch {cfg.batch}, float32",
        "clip": f"C = {MAX_NORM} per sample, noise σ = {NOISE_MULTIPLIER}",
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
    }
    timing: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    chosen = set(a.case or CASES) | {"plain"}
    for group, n in (("fast", rounds), ("slow", slow_rounds)):
        names = [k for k, v in CASES.items() if v[1] in (group, "both") and k in chosen]
        if names == ["plain"] and group == "slow":
            continue
        cases, skip = buildable(names, cfg)
        skipped.update(skip)
        result = summarise(time_group(cases, n, warmup=3 if group == "fast" else 1))
        for name, stats in result.items():
            if name != "plain" or group == "fast":
                timing[name] = stats
        del cases
        gc.collect()
        print(f"{group}: " + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in result.items()))
    meta["load average (1 min) after timing"] = f"{os.getloadavg()[0]:.2f}"
    peak = {}
    if not a.no_peak:
        for name in CASES:
            if name in chosen and name not in skipped:
                peak[name] = peak_subprocess(name, a.quick)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(a.quick, partial=a.case is not None)
    data = {"meta": meta, "timing": timing, "peak": peak, "skipped": skipped}
    (a.out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    text = markdown(meta, timing, peak, skipped)
    (a.out / f"{stem}.md").write_text(text)
    print(text)
    failed = [name for name, pk in peak.items() if "error" in pk]
    for name in failed:
        print(f"ERROR peak memory of {name}: {peak[name]['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
