"""The benchmark command.

    python -m experiments.bench [--device cpu|cuda] [--quick] [--case NAME ...] [--out DIR]
    python experiments/bench/run.py ...          # same thing, as a script

Writes ``<out>/bench_<device>[_quick|_partial].{md,json,png}`` (default out:
``experiments/results``); results are rewritten after every case, so an interrupted run
still leaves every case it finished (its report lists the cases not run).
``--list`` prints the cases. A case or a system that
raises does not stop the run: it is listed under *Errors* at the top of the report, and
the command exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `experiments` importable
    _root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [str(_root), str(_root / "src")]

import torch  # noqa: E402
from experiments.bench import cases as C  # noqa: E402
from experiments.bench import harness as H  # noqa: E402
from experiments.bench import report as R  # noqa: E402
from experiments.bench import targets as T  # noqa: E402


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=H.REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=H.REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"{sha}{' (dirty)' if dirty else ''}" if sha else None
    except OSError:
        return None


def meta(args, argv: list[str]) -> dict:
    m = {
        "device": args.device,
        "quick": args.quick,
        "command": "python -m experiments.bench " + shlex.join(argv),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} / {platform.platform()}",
        "cpu": f"{_cpu_model()}, {os.cpu_count()} logical cores",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__
        + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""),
        "torchbp": C.torchbp_version() or "not importable",
        "git": _git(),
        "peers": None,
        "device_name": None,
    }
    if args.device == "cuda":
        m["device_name"] = torch.cuda.get_device_name()
        m["peers"] = ", ".join(f"{k} {v or 'missing'}" for k, v in C.peer_versions().items())
    return m


def positive(text: str) -> int:
    """An argparse type: an integer >= 1 (a count of timed rounds)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    p.add_argument("--case", action="append", default=None, help="repeatable; see --list")
    p.add_argument("--out", type=Path, default=H.REPO / "experiments" / "results")
    p.add_argument("--name", default=None, help="file stem (default bench_<device>[_quick])")
    p.add_argument(
        "--compile",
        choices=["auto", "all", "none"],
        default="auto",
        help="torch.compile(native) references: auto = only where a target names one "
        "(CPU: cross_entropy; CUDA: linear_cross_entropy)",
    )
    p.add_argument("--budget", type=float, default=None, help="timing seconds per case")
    p.add_argument("--min-rounds", type=positive, default=None, help="at least 1")
    p.add_argument("--max-rounds", type=positive, default=None, help="at least 1")
    p.add_argument("--no-peak", action="store_true", help="skip peak-memory measurements")
    p.add_argument("--no-peers", action="store_true", help="skip Liger-Kernel / CCE")
    p.add_argument("--list", action="store_true")
    a = p.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    cuda = a.device == "cuda"
    if a.budget is None:
        a.budget = (2.0 if cuda else 1.0) if a.quick else (4.0 if cuda else 20.0)
    if a.min_rounds is None:
        a.min_rounds = 5 if cuda or a.quick else 5
    if a.max_rounds is None:
        a.max_rounds = 25 if a.quick else (50 if cuda else 40)
    return a


def run_case(name: str, args, opts: C.Options, log) -> dict:
    t0 = time.perf_counter()
    case = C.build(name, opts)
    log(f"[{name}] {case.desc}: {', '.join(case.impls)}")
    res: dict = {
        "desc": case.desc,
        "group": case.group,
        "timed": case.timed,
        "batch": case.batch,
        "logits_bytes": case.logits_bytes,
        "notes": list(case.notes),
        "impls": {k: ({"note": v.note} if v.note else {}) for k, v in case.impls.items()},
    }
    if case.timed:
        cuda = args.device == "cuda"
        times, info = H.time_case(
            case,
            args.device,
            warmup=3 if cuda else 2,
            budget_s=args.budget,
            min_rounds=args.min_rounds if not _slow(case) else max(3, args.min_rounds - 2),
            max_rounds=args.max_rounds,
            log=log,
        )
        for k, inf in info.items():
            res["impls"][k].update(inf)
        for k, ts in times.items():
            res["impls"][k].update(H.summarize(ts))
            res["impls"][k]["times_ms"] = [round(t * 1e3, 4) for t in ts]
        res["ratios"] = H.ratios(times)
        for k, r in res["ratios"].items():
            log(f"    torchbp/{k}: median {r['median']:.3f}  min {r['min']:.3f}")
        for k in times:
            log(f"    {k}: median {res['impls'][k]['median_ms']:.3f} ms")
    for k, impl in case.impls.items():
        if impl.compiled or res["impls"][k].get("error"):
            continue  # hooks and compiled graphs do not mix; nothing to count for errors
        try:
            res["impls"][k]["saved_bytes"] = H.saved_bytes(case, impl)
        except Exception as e:  # noqa: BLE001
            res["impls"][k]["saved_error"] = f"{type(e).__name__}: {e}"
    if args.device == "cuda" and not args.no_peak:
        for k, impl in case.impls.items():
            if res["impls"][k].get("error"):
                continue
            try:
                res["impls"][k]["peak_bytes"] = H.cuda_peak_bytes(case, impl)
            except Exception as e:  # noqa: BLE001
                res["impls"][k]["peak_error"] = f"{type(e).__name__}: {e}"
    peak_impls = [k for k in case.impls if not res["impls"][k].get("error")]
    want_rss = args.device == "cpu" and case.peak_rss and not args.no_peak
    del case
    _free()
    if want_rss:
        for k in peak_impls:
            r = H.rss_peak_subprocess(name, k, quick=args.quick, compile_mode=args.compile)
            if "error" in r:
                res["impls"][k]["peak_error"] = r["error"]
                log(f"    peak {k}: ERROR {r['error']}")
            else:
                res["impls"][k]["peak_bytes"] = r["peak_extra_bytes"]
                log(f"    peak {k}: {r['peak_extra_bytes'] / 2**20:.1f} MiB")
    res["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return res


_ERROR_KEYS = {"error": "", "saved_error": " (saved bytes)", "peak_error": " (peak memory)"}


def errors(name: str, res: dict) -> list[str]:
    """One line per failure in case ``name``'s results: the case itself, or a system's
    timing, saved-bytes or peak-memory measurement."""
    out = [f"{name}: {note}" for note in res.get("notes", []) if note.startswith("case failed")]
    for impl, fig in res.get("impls", {}).items():
        out += [f"{name} / {impl}{what}: {fig[k]}" for k, what in _ERROR_KEYS.items() if fig.get(k)]
    return out


def _slow(case: C.Case) -> bool:
    return case.name == "linear_cross_entropy"


def _free() -> None:
    gc.collect()
    torch.compiler.reset()  # drop the compiled graphs of the case just measured
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_all(stem: Path, data: dict) -> bool:
    """Write ``<stem>.{json,md,png}`` together, so that the three always show the same
    cases (a figure left by an older run is removed where none can be drawn)."""
    R.write_json(Path(f"{stem}.json"), data)
    R.write_markdown(Path(f"{stem}.md"), data)
    png = Path(f"{stem}.png")
    if R.write_png(png, data):
        return True
    png.unlink(missing_ok=True)
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    names = args.case or C.default_cases(args.device)
    if args.list:
        print("\n".join(C.BUILDERS))
        return 0
    stem = args.name or (
        f"bench_{args.device}" + ("_quick" if args.quick else "_partial" if args.case else "")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    opts = C.Options(
        device=args.device, quick=args.quick, compile=args.compile, peers=not args.no_peers
    )

    def log(msg: str) -> None:
        print(msg, flush=True)

    data = {"meta": meta(args, argv), "errors": [], "not_run": list(names), "cases": {}}
    data["targets"] = []
    log(f"torch {torch.__version__}, torchbp {data['meta']['torchbp']}, device {args.device}")
    t0 = time.perf_counter()
    for name in names:
        try:
            data["cases"][name] = run_case(name, args, opts, log)
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
            import traceback

            traceback.print_exc()
            data["cases"][name] = {
                "desc": "",
                "impls": {},
                "notes": [f"case failed: {type(e).__name__}: {e}"],
            }
        _free()
        data["not_run"].remove(name)
        data["errors"] = [line for n, res in data["cases"].items() for line in errors(n, res)]
        data["meta"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        data["targets"] = T.evaluate(args.device, data["cases"])
        png = write_all(args.out / stem, data)
    log(f"wrote {args.out / stem}.{{md,json{',png' if png else ''}}}")
    for t in data["targets"]:
        if t["value"] is not None:
            log(f"  [{t['status']:>12}] {t['target']}: {t['value']:.3f} (limit {t['limit']})")
    for line in data["errors"]:
        log(f"  ERROR {line}")
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
