"""Peak extra RSS of one implementation of one case, in a fresh process (CPU).

Usage (run by the harness, one subprocess per case and implementation)::

    python -m experiments.bench.peak --case cross_entropy --impl native [--quick]

Prints one JSON line: ``{"peak_extra_bytes": ..., "baseline_rss_bytes": ...}``.

The implementation is called once untimed, then measured on its second call (the same
for a compiled one and an eager one); the harness runs this module with glibc's mmap
threshold fixed at 64 KiB, so what the first call freed has left the resident set.
"""

from __future__ import annotations

import argparse
import json

from experiments.bench import cases, harness


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--case", required=True)
    p.add_argument("--impl", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile", default="auto", choices=["auto", "all", "none"])
    a = p.parse_args(argv)
    opts = cases.Options(device="cpu", quick=a.quick, compile=a.compile, peers=False)
    case = cases.build(a.case, opts)
    if a.impl not in case.impls:
        print(json.dumps({"error": f"no impl {a.impl!r} in {a.case}"}))
        return 1
    impl = case.impls[a.impl]
    # Every system is measured on its second call: the first one's one-time costs (a
    # compile, a lazily made thread pool or workspace) are not one call's memory.
    harness.call_once(case, impl, "cpu")
    extra, base = harness.rss_peak_extra(case, impl)
    print(json.dumps({"peak_extra_bytes": extra, "baseline_rss_bytes": base}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
