"""Timing and memory measurement.

Timing: every implementation is warmed up (the first call of a compiled one is its
compile time, reported separately), then all are called in rounds whose order alternates
(A B C, C B A, A B C, ...) so that slow drifts of a shared machine hit each system
alike. CPU uses ``time.perf_counter``; CUDA uses CUDA events around each call.

Memory:
- saved for backward: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor a
  Function saves; count each storage once, skipping parameters and a model's input batch
  (a single op's inputs count: inside a model they are the previous layer's output).
- peak extra, CUDA: ``max_memory_allocated`` during one call minus what was allocated
  before it (gradients produced by the call count, as in the anchors).
- peak extra, CPU: in a fresh subprocess (:mod:`experiments.bench.peak`), after one
  untimed call of the same implementation, the resident set's high-water mark during one
  call minus the resident set just before it (the high-water mark is reset through
  ``/proc/self/clear_refs``; glibc's mmap threshold is fixed at 64 KiB, so that freed
  tensors leave the resident set instead of waiting in the heap for the measured call).
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from experiments.bench.cases import Case, Impl

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------ timing


def call_once(case: Case, impl: Impl, device: str) -> float:
    """Seconds for one forward+backward; the reset and ``pre`` hooks are not timed."""
    case.reset()
    if impl.pre is not None:
        impl.pre()
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        impl.fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    impl.fn()
    return time.perf_counter() - t0


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(ts: list[float]) -> dict:
    med = statistics.median(ts)
    return {
        "median_ms": med * 1e3,
        "min_ms": min(ts) * 1e3,
        "max_ms": max(ts) * 1e3,
        "iqr_pct": 100 * (_quantile(ts, 0.75) - _quantile(ts, 0.25)) / med if med else 0.0,
        "n": len(ts),
    }


def time_case(
    case: Case,
    device: str,
    *,
    warmup: int,
    budget_s: float,
    min_rounds: int,
    max_rounds: int,
    log=print,
) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Warm up, then time all implementations in alternating rounds.

    Returns (times per impl in seconds, per-impl info: compile_s / error).
    """
    info: dict[str, dict] = {n: {} for n in case.impls}
    last: dict[str, float] = {}
    for name, impl in case.impls.items():
        try:
            for i in range(warmup + (1 if impl.compiled else 0)):
                t = call_once(case, impl, device)
                if i == 0 and impl.compiled:
                    info[name]["compile_s"] = t
                last[name] = t
                if not impl.compiled and t > 2.0:
                    break  # one warm-up is enough for calls that take seconds
        except Exception as e:  # noqa: BLE001 - report and go on
            info[name]["error"] = f"{type(e).__name__}: {e}"
            log(f"    {name}: ERROR {info[name]['error']}")
            traceback.print_exc(limit=3)
    names = [n for n in case.impls if "error" not in info[n]]
    round_s = sum(last[n] for n in names) or 1e-9
    rounds = int(max(min_rounds, min(max_rounds, budget_s / round_s)))
    times: dict[str, list[float]] = {n: [] for n in names}
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                if n not in times:
                    continue
                try:
                    times[n].append(call_once(case, case.impls[n], device))
                except Exception as e:  # noqa: BLE001
                    info[n]["error"] = f"{type(e).__name__}: {e}"
                    log(f"    {n}: ERROR {info[n]['error']}")
                    del times[n]
    finally:
        case.reset()
        if gc_was:
            gc.enable()
    return times, info


def ratios(times: dict[str, list[float]], primary: str = "torchbp") -> dict[str, dict]:
    """torchbp / reference, for every reference timed in the same rounds."""
    out: dict[str, dict] = {}
    if primary not in times:
        return out
    a = times[primary]
    for ref, b in times.items():
        if ref == primary:
            continue
        paired = [x / y for x, y in zip(a, b)]
        out[ref] = {
            "median": statistics.median(a) / statistics.median(b),
            "min": min(a) / min(b),
            "paired_median": statistics.median(paired),
            "paired_q25": _quantile(paired, 0.25),
            "paired_q75": _quantile(paired, 0.75),
        }
    return out


# ------------------------------------------------------------------------------ memory


def saved_bytes(case: Case, impl: Impl) -> int:
    """Bytes of distinct storages saved for backward during one call.

    ``case.exclude`` (parameters, a model's input batch) is not counted.
    """
    skip = {t.untyped_storage().data_ptr() for t in case.exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except Exception:  # noqa: BLE001 - e.g. tensor subclasses without storage
            return t
        if ptr not in skip and ptr not in seen:
            seen[ptr] = nbytes
        return t

    case.reset()
    if impl.pre is not None:
        impl.pre()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        impl.fn()
    case.reset()
    return sum(seen.values())


def cuda_peak_bytes(case: Case, impl: Impl) -> int:
    case.reset()
    if impl.pre is not None:
        impl.pre()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    impl.fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    case.reset()
    return peak


# CPU: /proc/self/status high-water mark, reset through clear_refs (Linux >= 4.0)


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
    if not m:
        raise RuntimeError(f"{key} not in /proc/self/status")
    return int(m.group(1))


def reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def rss_peak_extra(case: Case, impl: Impl) -> tuple[int, int]:
    """(peak RSS above the RSS before one call, that RSS), in bytes; use a fresh process."""
    case.reset()
    if impl.pre is not None:
        impl.pre()
    gc.collect()
    reset_rss_peak()
    base = _status_kib("VmRSS")
    impl.fn()
    peak = _status_kib("VmHWM")
    case.reset()
    return (peak - base) * 1024, base * 1024


# glibc adapts its mmap threshold up to 32 MiB to the sizes freed; fixed, every block of
# 64 KiB or more is unmapped when freed (as in experiments/bench_per_sample.py)
MMAP_THRESHOLD_BYTES = 64 * 1024


def rss_peak_subprocess(
    case_name: str, impl_name: str, *, quick: bool, compile_mode: str, timeout: float = 900
) -> dict:
    """Run :mod:`experiments.bench.peak` in a fresh interpreter; returns its JSON or an error."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    cmd = [sys.executable, "-m", "experiments.bench.peak", "--case", case_name]
    cmd += ["--impl", impl_name, "--compile", compile_mode] + (["--quick"] if quick else [])
    try:
        p = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": f"exit {p.returncode}: {p.stderr.strip()[-300:]}"}
