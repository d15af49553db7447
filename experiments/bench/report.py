"""Write a run's results: ``bench_<device>.json`` (every figure, raw times included),
``bench_<device>.md`` (tables) and ``bench_<device>.png`` (ratios torchbp / reference)."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if abs(n) >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _ratio_cell(r: dict | None) -> str:
    if r is None:
        return "–"
    return f"**{r['median']:.2f}** / {r['min']:.2f} [{r['paired_q25']:.2f}–{r['paired_q75']:.2f}]"


def _mem_ratio(a: int | None, b: int | None) -> str:
    if a is None or b is None:
        return "–"
    if b == 0:
        return "0 / 0" if a == 0 else f"{_fmt_bytes(a)} / 0"
    return f"{a / b:.2f}x ({_fmt_bytes(a)} / {_fmt_bytes(b)})"


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def write_markdown(path: Path, data: dict) -> None:
    m = data["meta"]
    L: list[str] = []
    L.append(f"# torchbp benchmarks: {m['device']}{' (quick shapes)' if m['quick'] else ''}")
    L.append("")
    L.append("Regenerate with:")
    L.append("")
    L.append("```")
    L.append(m["command"])
    L.append("```")
    L.append("")
    for k in (
        "date",
        "machine",
        "device_name",
        "cpu",
        "threads",
        "python",
        "torch",
        "torchbp",
        "git",
        "peers",
        "elapsed_s",
    ):
        if m.get(k) is not None:
            L.append(f"- {k}: {m[k]}")
    L.append("")
    L.append(
        "Forward+backward per call; warm-up, then all systems timed in alternating rounds "
        "(A B C, C B A, ...) in this one process. **Ratio = torchbp / reference**: "
        "**median of torchbp / median of ref** / min / min [interquartile range of the "
        "per-round paired ratios]. Below 1 means torchbp is faster. Compile time is "
        "excluded from the timings and listed separately. *Saved*: bytes saved for backward "
        "(saved_tensors_hooks, each storage once; parameters and a model's input batch "
        "excluded, a single op's inputs counted). *Peak*: "
        + (
            "CUDA max_memory_allocated during one call above what was allocated before it."
            if m["device"] == "cuda"
            else "peak RSS of a fresh subprocess during one call (its second: the first, "
            "untimed, pays one-time costs) above its RSS just before (resident high-water "
            "mark reset via /proc/self/clear_refs; glibc's mmap threshold fixed at 64 KiB, "
            "so freed tensors leave the resident set)."
        )
        + " Gradients the call produces count in the peak."
    )
    L.append("")

    if data.get("not_run"):
        L.append("## Incomplete run")
        L.append("")
        L.append(
            "The run stopped before these cases (the first one was running): "
            + ", ".join(data["not_run"])
            + ". Their targets are n/a."
        )
        L.append("")

    if data.get("errors"):
        L.append("## Errors")
        L.append("")
        L.append(
            "This run is incomplete: what these raised is missing from the tables below, "
            "and every target that needs it is n/a."
        )
        L.append("")
        L += [f"- {line}" for line in data["errors"]]
        L.append("")

    tg = data.get("targets", [])
    if tg:
        L.append("## Targets (issue 5 section 2, issue 6)")
        L.append("")
        L.append("| issue | target | measured | limit | status |")
        L.append("| --- | --- | --- | --- | --- |")
        for t in tg:
            v = "–" if t["value"] is None else f"{t['value']:.3f}"
            lim = f"{t['limit']}" + (f" (at worst {t['soft']})" if t["soft"] else "")
            st = t["status"] if t["status"] != "misses" else "**misses**"
            L.append(f"| {t['issue']} | {t['target']} | {v} | {lim} | {st} |")
        L.append("")

    cases = data["cases"]
    L.append("## Summary (ratios torchbp / reference)")
    L.append("")
    L.append(
        "| case | shape | torchbp ms | vs native | vs compile | vs others "
        "| saved torchbp / native | peak torchbp / native |"
    )
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, c in cases.items():
        if not c.get("timed", True):
            continue
        im, ra = c["impls"], c.get("ratios", {})
        others = [f"{k}: {_ratio_cell(v)}" for k, v in ra.items() if k not in ("native", "compile")]
        bp = im.get("torchbp", {})
        nat = im.get("native", {})
        L.append(
            f"| {name} | {c['desc']} | {_fmt_ms(bp.get('median_ms'))} "
            f"| {_ratio_cell(ra.get('native'))} | {_ratio_cell(ra.get('compile'))} "
            f"| {'<br>'.join(others) or '–'} "
            f"| {_mem_ratio(bp.get('saved_bytes'), nat.get('saved_bytes'))} "
            f"| {_mem_ratio(bp.get('peak_bytes'), nat.get('peak_bytes'))} |"
        )
    L.append("")

    mem = {k: v for k, v in cases.items() if not v.get("timed", True)}
    if mem:
        L.append("## Saved for backward per sample (model + cross-entropy)")
        L.append("")
        L.append("| case | shape | native B/sample | torchbp B/sample | ratio |")
        L.append("| --- | --- | --- | --- | --- |")
        for name, c in mem.items():
            b = c.get("batch") or 1
            n = c["impls"].get("native", {}).get("saved_bytes")
            t = c["impls"].get("torchbp", {}).get("saved_bytes")
            r = "–" if n is None or t is None or n == 0 else f"{t / n:.2f}"
            L.append(
                f"| {name} | {c['desc']} | {'–' if n is None else f'{n / b:.0f}'} "
                f"| {'–' if t is None else f'{t / b:.0f}'} | {r} |"
            )
        L.append("")

    L.append("## Every figure, per case")
    for name, c in cases.items():
        L.append("")
        L.append(f"### {name}: {c['desc']}")
        L.append("")
        for note in c.get("notes", []):
            L.append(f"- note: {note}")
        if c.get("notes"):
            L.append("")
        L.append(
            "| system | median ms | min ms | spread (IQR) | n | torchbp / this "
            "| compile s | saved | peak extra | note |"
        )
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        ra = c.get("ratios", {})
        for k, v in c["impls"].items():
            spread = f"{v['iqr_pct']:.1f}%" if "iqr_pct" in v else "–"
            cs = f"{v['compile_s']:.1f}" if v.get("compile_s") is not None else "–"
            note = v.get("note", "")
            if v.get("error"):
                note = f"ERROR: {v['error']}"
            if v.get("peak_error"):
                note += f" (peak: {v['peak_error']})"
            L.append(
                f"| {k} | {_fmt_ms(v.get('median_ms'))} | {_fmt_ms(v.get('min_ms'))} | {spread} "
                f"| {v.get('n', '–')} | {_ratio_cell(ra.get(k))} | {cs} "
                f"| {_fmt_bytes(v.get('saved_bytes'))} | {_fmt_bytes(v.get('peak_bytes'))} "
                f"| {note.replace('|', '/')} |"
            )
    L.append("")
    path.write_text("\n".join(L))


def write_png(path: Path, data: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    labels: list[str] = []
    series: dict[str, list[float]] = {}
    timed = {k: v for k, v in data["cases"].items() if v.get("ratios")}
    refs = {r for c in timed.values() for r in c["ratios"]}
    refs = sorted(refs, key=lambda r: (r != "native", r))
    for name, c in timed.items():
        labels.append(name)
        for r in refs:
            series.setdefault(r, []).append(c["ratios"].get(r, {}).get("median", float("nan")))
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.5))
    width = 0.8 / max(1, len(refs))
    for i, r in enumerate(refs):
        xs = [j + (i - (len(refs) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, series[r], width, label=f"torchbp / {r}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("time ratio (median), lower is better")
    m = data["meta"]
    where = m.get("device_name") or f"{m.get('cpu', '')}, {m.get('threads')} threads"
    ax.set_title(f"torchbp fwd+bwd vs references, {m['device']}: {where}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
