"""Session 18's cross-entropy paths on CUDA: ``cpu_ce.weighted_rows`` (class weights
without label smoothing, 240eb82) and the class-index check's cheap path for an
``ignore_index`` outside ``[0, C)`` (3245026).

``weighted_rows`` is written for the CPU but device-agnostic (torch ops only, as
``plain_rows``): ``ce_forward`` sends any eager float32 / float64 input with class weights
of its dtype to it, CUDA included (not while a CUDA graph is captured, where the values
may not be inspected). On CUDA it must give native's values, NaN pattern included, and
add no host sync to a step; the class-index check is the step's only sync (documented:
it replaces a device-side assert), so the sync check runs with it patched out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchbp
from torchbp import _checks
from torchbp.kernels import cpu_ce

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
C = 7
SPECIAL_WEIGHTS = {
    "positive": None,
    "inf": (float("inf"), float("-inf")),
    "nan": (float("nan"), 2.0),
    "zero-negative": (0.0, -1.5),
}


def _inputs(dtype, special, ignore_index):
    """Logits (12, C) with an inf, a NaN and a -inf row, class-index targets with every
    third one ``ignore_index`` (when given), class weights with ``special`` on classes 1
    and 4; on CUDA."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(12, C, generator=gen, dtype=torch.float64) * 3
    z[1, 2], z[2, 3], z[4] = float("inf"), float("nan"), float("-inf")
    target = torch.randint(C, (12,), generator=gen)
    target[0] = int(z[0].argmax())
    if ignore_index is not None:
        target[::3] = ignore_index
    weight = torch.rand(C, generator=gen, dtype=torch.float64) + 0.1
    if special is not None:
        weight[1], weight[4] = special
    return z.to("cuda", dtype), target.cuda(), weight.to("cuda", dtype)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("ignore_index", [None, -100, 4], ids=["no-ignore", "-100", "class-4"])
@pytest.mark.parametrize("special", SPECIAL_WEIGHTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_weighted_cross_entropy_on_cuda_takes_weighted_rows_and_matches_native(
    monkeypatch, dtype, special, ignore_index, reduction
):
    z, target, weight = _inputs(dtype, SPECIAL_WEIGHTS[special], ignore_index)
    calls = []
    real = cpu_ce.weighted_rows
    monkeypatch.setattr(cpu_ce, "weighted_rows", lambda *a: calls.append(1) or real(*a))
    kwargs = dict(weight=weight, reduction=reduction)
    if ignore_index is not None:
        kwargs["ignore_index"] = ignore_index
    grad_output = torch.rand(12 if reduction == "none" else (), device="cuda", dtype=dtype)
    results = []
    for fn in (torchbp.functional.cross_entropy, F.cross_entropy):
        leaf = z.clone().requires_grad_()
        loss = fn(leaf, target, **kwargs)
        (grad,) = torch.autograd.grad(loss, leaf, grad_output)
        results.append((loss.detach(), grad))
    assert calls == [1], "weighted_rows was not taken on CUDA"
    (loss, grad), (want_loss, want_grad) = results
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(loss, want_loss, equal_nan=True, **tol)
    torch.testing.assert_close(grad, want_grad, equal_nan=True, **tol)


@pytest.mark.parametrize(
    "dtype, weighted",
    [(torch.float32, False), (torch.float32, True), (torch.float64, True), (torch.bfloat16, True)],
    ids=["plain_rows", "weighted_rows", "weighted_rows-f64", "blocked_rows"],
)
@pytest.mark.parametrize("ignore_index", [-100, 4], ids=["padded", "class-4"])
def test_cross_entropy_paths_on_cuda_wait_for_no_host_sync_but_the_class_index_check(
    monkeypatch, dtype, weighted, ignore_index
):
    """Forward and backward of each eager cross-entropy path (mean reduction: the weighted
    denominator included), under ``set_sync_debug_mode('error')``, with the class-index
    check (its documented sync, the only one) patched to answer 'some row may be
    ignored'. The first pass, not checked, warms the libraries up."""
    monkeypatch.setattr(_checks, "check_class_indices", lambda *args: False)
    z, target, weight = _inputs(torch.float32, None, ignore_index)
    z = z.nan_to_num(0.0, 1.0, -1.0).to(dtype)
    kwargs = dict(weight=weight.to(dtype) if weighted else None, ignore_index=ignore_index)
    previous = torch.cuda.get_sync_debug_mode()
    try:
        for checked in ("default", "error"):
            torch.cuda.set_sync_debug_mode(checked)
            leaf = z.clone().requires_grad_()
            torchbp.functional.cross_entropy(leaf, target, **kwargs).backward()
            torch.cuda.set_sync_debug_mode(previous)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    ref = z.clone().requires_grad_()
    F.cross_entropy(ref, target, **kwargs).backward()
    torch.testing.assert_close(leaf.grad, ref.grad)


@pytest.mark.parametrize("ignore_index", [-100, 3], ids=["outside", "class-3"])
def test_the_class_index_check_of_an_in_range_target_syncs_once(ignore_index):
    """The common case (every target in [0, C)) reads both extremes back in one copy:
    each ``int()`` of a device tensor is a host sync of its own (two before)."""
    target = torch.arange(12, device="cuda") % C
    _checks.check_class_indices("cross_entropy", target, C, ignore_index)  # warm-up
    previous = torch.cuda.get_sync_debug_mode()
    try:
        with pytest.warns(UserWarning) as caught:
            torch.cuda.set_sync_debug_mode("warn")
            _checks.check_class_indices("cross_entropy", target, C, ignore_index)
            torch.cuda.set_sync_debug_mode(previous)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
