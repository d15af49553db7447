"""The performance goals of issue 5 (section 2) and issue 6, checked against a run.

Each target is a ratio ``subject / reference`` (time: ratio of the medians measured in
the same alternating rounds; memory: saved bytes or peak extra bytes) and a limit. A
``soft`` limit is the issue's "at worst" figure: between ``limit`` and ``soft`` the
target is reported as *holds (soft)*, and the report must say why.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchbp.ops import activations

ACTS = [op.name for op in activations()]


@dataclass
class Target:
    issue: int
    case: str
    kind: str  # time | saved | peak | peak_logits
    ref: str | None  # reference impl (None for peak_logits)
    limit: float
    soft: float | None = None
    subject: str = "torchbp"
    text: str = ""


def targets_for(device: str) -> list[Target]:
    T = Target
    if device == "cpu":
        out = [
            T(5, "cross_entropy", "time", "native", 0.5, text="CE fwd+bwd <= 0.5x native"),
            T(5, "cross_entropy", "time", "compile", 1.0, text="CE <= 1.0x torch.compile"),
        ]
        out += [
            T(5, f"act_{a}", "time", "native", 1.0, 1.2, text=f"{a} <= 1.0x native (<= 1.2x)")
            for a in ACTS
        ]
        out += [
            T(5, "linear", "time", "native", 1.02, text="linear <= 1.02x native"),
            T(5, "mlp_step", "time", "native", 1.02, text="MLP SGD step <= 1.02x native"),
        ]
        lce_time = [
            T(6, "linear_cross_entropy", "time", "native", 1.0, text="LCE <= 1.0x naive"),
            T(6, "linear_cross_entropy", "time", "torch_chunked", 1.0, text="LCE <= 1.0x chunked"),
            T(6, "linear_cross_entropy", "peak", "native", 0.1, text="LCE peak <= 0.1x naive"),
            T(6, "linear_cross_entropy", "peak", "torch_chunked", 1.0, text="LCE peak < chunked"),
        ]
        out += lce_time
    else:
        out = []
        for c in ("cross_entropy_bf16", "cross_entropy"):
            out += [
                T(5, c, "time", "liger", 1.0, text=f"{c} <= 1.0x Liger CE"),
                T(5, c, "peak_logits", None, 1.0, text=f"{c} peak <= 1x logits"),
                T(
                    5,
                    c,
                    "peak_logits",
                    None,
                    0.05,
                    subject="torchbp_inplace",
                    text=f"{c} inplace=True peak ~0",
                ),
            ]
        out += [T(5, f"act_{a}", "time", "native", 1.05, text=f"{a} <= 1.05x native") for a in ACTS]
        out += [
            T(5, m, "time", "native", 1.02, text=f"{m} <= 1.02x native")
            for m in ("mlp_step", "mlp_step_tf32", "mlp_step_bf16")
        ]
        out += [
            T(6, "linear_cross_entropy", "time", "compile", 1.0, text="LCE <= torch.compile"),
            T(6, "linear_cross_entropy", "peak", "cce", 1.1, text="LCE peak <= 1.1x CCE"),
        ]
    # memory saved for backward: never more than native, for every op and model
    ops = ["cross_entropy", "linear", "linear_cross_entropy"] + [f"act_{a}" for a in ACTS]
    ops += [f"mlp_saved_{a}" for a in ("relu", "sigmoid", "tanh", "leaky_relu")]
    out += [T(5, c, "saved", "native", 1.0, text=f"{c} saved <= native") for c in ops]
    # The 0.5x goal is about the layers: with the loss included both sides add the same
    # loss bytes (48 B/sample for 10 classes), which puts the ratio at 0.5015, not 0.5.
    out.append(
        T(
            5,
            "mlp_layers_saved_leaky_relu",
            "saved",
            "native",
            0.5,
            text="LeakyReLU MLP layers saved <= 0.5x",
        )
    )
    return out


def _value(t: Target, case: dict) -> float | None:
    impls = case.get("impls", {})
    sub = impls.get(t.subject, {})
    if t.kind == "time":
        r = case.get("ratios", {}).get(t.ref)
        return None if r is None or t.subject != "torchbp" else r["median"]
    if t.kind == "peak_logits":
        p, lb = sub.get("peak_bytes"), case.get("logits_bytes")
        return None if p is None or not lb else p / lb
    key = "saved_bytes" if t.kind == "saved" else "peak_bytes"
    a, b = sub.get(key), impls.get(t.ref, {}).get(key)
    if a is None or b is None:
        return None
    if b == 0:
        return 1.0 if a == 0 else float("inf")
    return a / b


def evaluate(device: str, results: dict[str, dict]) -> list[dict]:
    rows = []
    for t in targets_for(device):
        case = results.get(t.case)
        v = None if case is None else _value(t, case)
        if v is None:
            status = "n/a"
        elif v <= t.limit:
            status = "holds"
        elif t.soft is not None and v <= t.soft:
            status = "holds (soft)"
        else:
            status = "misses"
        rows.append(
            {
                "issue": t.issue,
                "case": t.case,
                "target": t.text,
                "kind": t.kind,
                "subject": t.subject,
                "ref": t.ref,
                "limit": t.limit,
                "soft": t.soft,
                "value": v,
                "status": status,
            }
        )
    return rows
