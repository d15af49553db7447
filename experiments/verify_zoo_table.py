"""The bug zoo table: what ``torchbp.verify.check_function`` and plain
``torch.autograd.gradcheck`` (default arguments, float64 copies of the inputs) catch on the
zoo of buggy autograd Functions in ``tests/verify/zoo/``, and whether each correct twin
passes.

Run from the repository root::

    python -m experiments.verify_zoo_table

It prints the table and writes ``experiments/results/verify_zoo.md``. ``tests/`` is not an
installed package: the repository root is put first on ``sys.path`` so that
``tests.verify.zoo`` imports (as pytest does with ``pythonpath = ["."]``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tests.verify.zoo import ZOO, ZooEntry  # noqa: E402

from torchbp.verify import check_function  # noqa: E402

OUT = ROOT / "experiments" / "results" / "verify_zoo.md"

#: The checks added with the zoo (issue 13, and needs_input_grad after it): bugs only they
#: catch are counted apart.
NEW_CHECKS = frozenset(
    {"mutation", "interleave", "vmap_in_dims", "extreme_values", "needs_input_grad"}
)


def _apply(fn):
    is_function = isinstance(fn, type) and issubclass(fn, torch.autograd.Function)
    return fn.apply if is_function else fn


def gradcheck_catches(entry: ZooEntry) -> bool:
    """True if ``torch.autograd.gradcheck`` with default arguments flags the bug (returns
    False or raises), run on float64 copies of the inputs (the differentiated ones as in
    check_function: every floating tensor, or ``grad_inputs``)."""
    inputs = entry.inputs()
    floating = [i for i, a in enumerate(inputs) if torch.is_tensor(a) and a.is_floating_point()]
    grad_idx = entry.kwargs.get("grad_inputs", floating)
    args = [
        a.detach().to(torch.float64) if torch.is_tensor(a) and a.is_floating_point() else a
        for a in inputs
    ]
    diff = [args[i].clone().requires_grad_(True) for i in grad_idx]
    fn = _apply(entry.bug)

    def of_diff(*xs):
        full = list(args)
        for i, x in zip(grad_idx, xs):
            full[i] = x
        return fn(*full)

    try:
        return not torch.autograd.gradcheck(of_diff, tuple(diff), raise_exception=False)
    except Exception:  # noqa: BLE001 - a crash inside gradcheck is a catch too
        return True


def verify(entry: ZooEntry, fn) -> object:
    return check_function(fn, *entry.inputs(), reference=entry.reference, **entry.kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.verify_zoo_table",
        description="The bug zoo table: torchbp.verify vs plain gradcheck on tests/verify/zoo.",
    )
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"the markdown file written (default: {OUT})"
    )
    out = parser.parse_args(argv).out
    rows, caught, twins_ok, gc_caught, diagnosed, only_new = [], 0, 0, 0, 0, 0
    start = time.perf_counter()
    for entry in ZOO:
        bug_report = verify(entry, entry.bug)
        failed = [c.name for c in bug_report.failures]
        twin_report = verify(entry, entry.twin)
        by_gradcheck = gradcheck_catches(entry)
        caught += not bug_report.ok
        diagnosed += bool(set(failed) & entry.expected)
        only_new += bool(failed) and set(failed) <= NEW_CHECKS
        twins_ok += twin_report.ok
        gc_caught += by_gradcheck
        rows.append(
            f"| {entry.name} | {entry.family} | "
            f"{'yes: ' + ', '.join(failed) if failed else 'NO'} | "
            f"{'yes' if by_gradcheck else 'no'} | {'yes' if twin_report.ok else 'NO'} |"
        )
        if twin_report.ok is False:
            print(twin_report, file=sys.stderr)
    n = len(ZOO)
    lines = [
        "# Bug zoo: torchbp.verify vs plain gradcheck",
        "",
        f"{n} realistic buggy autograd Functions (`tests/verify/zoo/`), each beside its correct "
        "twin. torchbp.verify = `check_function(bug, *inputs, reference=native, **kwargs)` with "
        "every default check (the failing checks are listed); gradcheck = "
        "`torch.autograd.gradcheck` with default arguments on float64 copies of the inputs "
        "(a False result or an exception counts as caught).",
        "",
        "| bug | family | caught by torchbp.verify (failing checks) | caught by gradcheck "
        "| twin passes |",
        "|---|---|---|---|---|",
        *rows,
        f"| **total** | | **{caught}/{n}** (expected check among them: {diagnosed}/{n}) "
        f"| **{gc_caught}/{n}** | **{twins_ok}/{n}** |",
        "",
        f"Plain gradcheck misses {n - gc_caught} of the {n} bugs; {only_new} are caught only "
        f"by the checks added with the zoo ({', '.join(sorted(NEW_CHECKS))}).",
        "",
        f"torch {torch.__version__}, {time.perf_counter() - start:.0f} s on this project's "
        "2-core CPU machine. Regenerate with `python -m experiments.verify_zoo_table`.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0 if caught == n and twins_ok == n else 1


if __name__ == "__main__":
    raise SystemExit(main())
