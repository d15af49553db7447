"""NLL and fused cross-entropy: parity with native over every option, numerics, gradcheck."""

from __future__ import annotations

import contextlib
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tests._hypothesis import PROFILE
from tests._support import DEVICES, TOL, grads, make
from torch.autograd import gradcheck, gradgradcheck

import torchbp.functional as TF
from torchbp.autograd import CrossEntropyFunction

C = 5
# input shape -> class-index target shape
LAYOUTS = {
    "NC": ((6, C), (6,)),
    "C": ((C,), ()),
    "NCd": ((3, C, 4), (3, 4)),
    "NCdd": ((2, C, 2, 3), (2, 2, 3)),
    "empty": ((0, C), (0,)),
}


def class_target(shape, seed=0, ignore=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(C, shape, generator=g)
    if ignore is not None and t.numel() > 1:
        t.view(-1)[::3] = ignore
    return t.to(device)


def prob_target(shape, dtype, seed=0, device="cpu"):
    dim = 0 if len(shape) == 1 else 1
    return torch.softmax(make(shape, torch.float64, seed=seed) * 2, dim).to(dtype).to(device)


CE_CASES = [
    dict(kind=k, weight=w, ignore=i, reduction=r, smoothing=s)
    for k, w, i, r, s in itertools.product(
        ["index", "prob"], [False, True], [None, -100, 1], ["mean", "sum", "none"], [0.0, 0.3]
    )
    if not (k == "prob" and i is not None)
]


def case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CE_CASES, ids=case_id)
def test_cross_entropy_parity(case, layout, dtype, device):
    in_shape, t_shape = LAYOUTS[layout]
    x = make(in_shape, dtype, device, scale=3.0)
    kwargs = dict(reduction=case["reduction"], label_smoothing=case["smoothing"])
    if case["weight"]:
        kwargs["weight"] = make((C,), dtype, device, seed=4).abs() + 0.1
    if case["kind"] == "index":
        target = class_target(t_shape, ignore=case["ignore"], device=device)
        if case["ignore"] is not None:
            kwargs["ignore_index"] = case["ignore"]
        out, (gx,) = grads(lambda z: TF.cross_entropy(z, target, **kwargs), x)
        ref, (rx,) = grads(lambda z: F.cross_entropy(z, target, **kwargs), x)
    else:
        target = prob_target(in_shape, dtype, device=device)
        out, (gx, gt) = grads(lambda z, t: TF.cross_entropy(z, t, **kwargs), x, target)
        ref, (rx, rt) = grads(lambda z, t: F.cross_entropy(z, t, **kwargs), x, target)
        torch.testing.assert_close(gt, rt, **TOL[dtype])
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype], equal_nan=True)
    torch.testing.assert_close(gx, rx, **TOL[dtype], equal_nan=True)


NLL_CASES = list(itertools.product([False, True], [None, -100, 2], ["mean", "sum", "none"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weighted,ignore,reduction", NLL_CASES, ids=str)
def test_nll_loss_parity(weighted, ignore, reduction, layout, dtype, device):
    in_shape, t_shape = LAYOUTS[layout]
    dim = 0 if len(in_shape) == 1 else 1
    logp = torch.log_softmax(make(in_shape, torch.float64, scale=2.0), dim).to(dtype).to(device)
    target = class_target(t_shape, ignore=ignore, device=device)
    kwargs = dict(reduction=reduction)
    if weighted:
        kwargs["weight"] = make((C,), dtype, device, seed=4).abs() + 0.1
    if ignore is not None:
        kwargs["ignore_index"] = ignore
    out, (g,) = grads(lambda z: TF.nll_loss(z, target, **kwargs), logp)
    ref, (r,) = grads(lambda z: F.nll_loss(z, target, **kwargs), logp)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype], equal_nan=True)
    torch.testing.assert_close(g, r, **TOL[dtype], equal_nan=True)


GRADCHECK_CASES = [
    dict(),
    dict(label_smoothing=0.2),
    dict(weight=True, reduction="sum"),
    dict(weight=True, label_smoothing=0.1, ignore=True),
    dict(reduction="none", ignore=True),
    dict(prob=True),
    dict(prob=True, weight=True, label_smoothing=0.3, reduction="none"),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=case_id)
def test_cross_entropy_gradcheck_and_gradgradcheck(case):
    case = dict(case)
    x = make((4, 3), torch.float64).requires_grad_()
    kwargs = {"reduction": case.get("reduction", "mean")}
    if "label_smoothing" in case:
        kwargs["label_smoothing"] = case["label_smoothing"]
    if case.get("weight"):
        kwargs["weight"] = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    if case.get("prob"):
        t = torch.softmax(make((4, 3), torch.float64, seed=3), 1).requires_grad_()
        inputs = (x, t)
        fn = lambda z, p: TF.cross_entropy(z, p, **kwargs)  # noqa: E731
    else:
        target = torch.tensor([0, 2, 1, -100 if case.get("ignore") else 1])
        inputs = (x,)
        fn = lambda z: TF.cross_entropy(z, target, **kwargs)  # noqa: E731
    flags = dict(check_undefined_grad=True, check_batched_grad=True)
    fwd = not case.get("prob")  # forward-mode AD w.r.t. probability targets: not supported
    assert gradcheck(fn, inputs, check_forward_ad=fwd, check_batched_forward_grad=fwd, **flags)
    assert gradgradcheck(fn, inputs, check_fwd_over_rev=fwd, **flags)


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_function_outputs_gradcheck_wrt_a_smoothed_probability_target(weighted):
    # The Function's every output, (ℓ, ∂ℓ/∂z, lse), w.r.t. the logits and a probability
    # target that requires grad. The wrappers expose ℓ alone, so only this reaches the
    # gradient of ∂ℓ/∂z w.r.t. the target, (1-ε) w_k (p_ij - δ_jk) (its (1-ε) untested).
    z = make((4, 3), torch.float64).requires_grad_()
    t = torch.softmax(make((4, 3), torch.float64, seed=3), 1).requires_grad_()
    weight = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64) if weighted else None

    def fn(z, t):
        return CrossEntropyFunction.apply(z, t, weight, None, 0.3, False)

    assert gradcheck(fn, (z, t), check_undefined_grad=True)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_forward_mode_tangent_wrt_a_smoothed_probability_target_is_natives(reduction, weighted):
    # Forward-mode AD along a probability target (gradcheck above runs it only along
    # class-index cases): dℓ = -Σ_c (1-ε) w_c dt_c logp_c, as native's.
    z = make((4, 3), torch.float64)
    t = torch.softmax(make((4, 3), torch.float64, seed=3), 1)
    dt = make((4, 3), torch.float64, seed=4)
    kwargs = dict(label_smoothing=0.3, reduction=reduction)
    if weighted:
        kwargs["weight"] = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    tangents = []
    for fn in (TF.cross_entropy, F.cross_entropy):
        _, tangent = torch.func.jvp(lambda p: fn(z, p, **kwargs), (t,), (dt,))  # noqa: B023
        tangents.append(tangent)
    torch.testing.assert_close(tangents[0], tangents[1])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nll_loss_gradcheck(reduction):
    logp = make((4, 3), torch.float64).requires_grad_()
    target = torch.tensor([0, 2, -100, 1])
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    fn = lambda z: TF.nll_loss(z, target, weight=w, reduction=reduction)  # noqa: E731
    flags = dict(check_undefined_grad=True, check_batched_grad=True)
    assert gradcheck(fn, (logp,), check_forward_ad=True, check_batched_forward_grad=True, **flags)
    assert gradgradcheck(fn, (logp,), **flags)


@pytest.mark.parametrize("op", [TF.cross_entropy, TF.nll_loss], ids=["cross_entropy", "nll"])
def test_all_targets_ignored_mean_is_nan_with_zero_grad(op):
    x = make((4, C), torch.float32).requires_grad_()
    loss = op(x, torch.full((4,), -100))
    ref = F.cross_entropy(x.detach(), torch.full((4,), -100))
    assert torch.isnan(loss) and torch.isnan(ref)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_cross_entropy_fused_matches_own_log_softmax_then_nll():
    x = make((7, 6), torch.float64, scale=5.0)
    t = torch.tensor([0, 5, 3, -100, 2, 1, 1])
    w = torch.rand(6, dtype=torch.float64)
    fused, (gf,) = grads(lambda z: TF.cross_entropy(z, t, weight=w), x)
    composed, (gc,) = grads(lambda z: TF.nll_loss(TF.log_softmax(z, 1), t, weight=w), x)
    torch.testing.assert_close(fused, composed)
    torch.testing.assert_close(gf, gc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_extreme_logits_give_finite_loss_and_grad(dtype):
    # float32: logits of magnitude 1e4; float16: logits spanning [max/2, max] of its finite
    # range (every loss <= max/2 + log C is representable); bfloat16 shares float32's
    # range, where a sum of such losses would overflow the float32 accumulator (native's
    # too), so it gets [top/2, top] with top = 1e36.
    u = torch.rand((8, 10), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if dtype == torch.float32:
        x64 = (u * 2 - 1) * 1e4
    else:
        top = torch.finfo(dtype).max if dtype == torch.float16 else 1e36
        x64 = (0.5 + 0.5 * u) * top
    x = x64.to(dtype)
    t = torch.arange(8) % 10
    out, (g,) = grads(
        lambda z: TF.cross_entropy(z, t), x, grad_output=torch.tensor(1.0, dtype=dtype)
    )
    ref = F.cross_entropy(x.double(), t)
    assert torch.isfinite(out) and torch.isfinite(g).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=0)


def test_nan_and_inf_logits_propagate_as_native():
    x = make((4, C), torch.float32)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    x[3, 1] = -float("inf")
    t = torch.tensor([0, 1, 2, 3])
    for reduction in ["none", "sum"]:
        out, (g,) = grads(lambda z: TF.cross_entropy(z, t, reduction=reduction), x)  # noqa: B023
        ref, (r,) = grads(lambda z: F.cross_entropy(z, t, reduction=reduction), x)  # noqa: B023
        torch.testing.assert_close(out, ref, equal_nan=True)
        torch.testing.assert_close(g, r, equal_nan=True)


@pytest.mark.parametrize("p_true", [0.9, 0.99, 0.999, 0.9999])
def test_confident_bfloat16_gradient_as_accurate_as_native(p_true):
    # Logits whose softmax puts p_true on the target class: dz_y = (p_y - 1) / N is tiny
    # and must not be lost to bfloat16 rounding.
    n, classes = 16, 128
    rest = (1 - p_true) / (classes - 1)
    gap = torch.log(torch.tensor(p_true / rest, dtype=torch.float64))
    noise = make((n, classes), torch.float64, scale=0.01)
    z64 = noise.clone()
    t = torch.arange(n) % classes
    z64[torch.arange(n), t] += gap
    z = z64.to(torch.bfloat16).double()  # the exact values bfloat16 holds
    exact = torch.softmax(z, 1)
    exact[torch.arange(n), t] -= 1
    exact /= n

    def true_class_error(fn):
        x = z.to(torch.bfloat16).requires_grad_()
        fn(x, t).backward()
        got = x.grad.double()[torch.arange(n), t]
        want = exact[torch.arange(n), t]
        return ((got - want).abs() / want.abs()).max().item()

    ours, native = true_class_error(TF.cross_entropy), true_class_error(F.cross_entropy)
    assert ours <= max(native, 2**-8)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_caller_tensors_never_overwritten(kind):
    x = make((5, C), torch.float32).requires_grad_()
    t = class_target((5,)) if kind == "index" else prob_target((5, C), torch.float32)
    g = torch.tensor(2.0)
    before = [x.detach().clone(), t.clone(), g.clone()]
    loss = TF.cross_entropy(x, t, label_smoothing=0.1)
    loss.backward(g, retain_graph=True)
    first = x.grad.clone()
    loss.backward(g)  # a second backward through the same graph gives the same gradient
    torch.testing.assert_close(x.grad, 2 * first)
    for a, b in zip([x.detach(), t, g], before):
        assert torch.equal(a, b)


def test_uint8_target_accepted_like_native():
    x = make((4, C), torch.float64)
    t = torch.tensor([0, 1, 4, 2], dtype=torch.uint8)
    torch.testing.assert_close(TF.cross_entropy(x, t), F.cross_entropy(x, t))


def test_deprecated_size_average_and_reduce():
    x = make((4, C), torch.float64)
    t = class_target((4,))
    for kw in [dict(size_average=False), dict(reduce=False), dict(size_average=True, reduce=True)]:
        with pytest.warns(UserWarning):
            ours = TF.cross_entropy(x, t, **kw)
        with pytest.warns(UserWarning):
            ref = F.cross_entropy(x, t, **kw)
        torch.testing.assert_close(ours, ref)


@pytest.mark.filterwarnings("ignore:size_average and reduce args:UserWarning")
@pytest.mark.parametrize("kw", [dict(size_average=False), dict(reduce=False)], ids=str)
@pytest.mark.parametrize("op", ["cross_entropy", "nll_loss"])
def test_deprecated_size_average_and_reduce_compile_with_fullgraph_as_natives(op, kw):
    """Dynamo cannot trace ``warnings.warn``: the legacy arguments' deprecation warning
    made ``torch.compile(fullgraph=True)`` refuse the call, which native's takes."""
    t = class_target((4,))
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x: getattr(TF, op)(x, t, **kw), fullgraph=True, backend="aot_eager"
    )
    out, (gx,) = grads(compiled, make((4, C), torch.float64))
    ref, (rx,) = grads(lambda x: getattr(F, op)(x, t, **kw), make((4, C), torch.float64))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)


def test_soft_target_dtype_promotion_as_native():
    x = make((3, C), torch.float32)
    t = prob_target((3, C), torch.float64)
    out, ref = TF.cross_entropy(x, t), F.cross_entropy(x, t)
    assert out.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(
    "dtype, weight_dtype",
    [
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float64),
        (torch.float32, torch.bfloat16),  # a narrower weight: the input's dtype
    ],
    ids=str,
)
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_soft_target_class_weight_dtype_promotes_as_native(
    dtype, weight_dtype, weight_grad, reduction
):
    # native's -Σ_c w_c t_c logp_c promotes with the class weights: a float64 weight gives a
    # float64 loss (torchbp's was float32), a float32 one with bfloat16 logits a float32 loss
    x, t = make((6, C), dtype, scale=3.0), prob_target((6, C), dtype)
    w0 = make((C,), weight_dtype, seed=4).abs() + 0.1
    results = []
    for loss in (TF.cross_entropy, F.cross_entropy):
        z, w = x.clone().requires_grad_(), w0.clone().requires_grad_(weight_grad)
        out = loss(z, t, weight=w, reduction=reduction, label_smoothing=0.1)
        out.backward(make(out.shape, out.dtype, seed=7))
        results.append((out.detach(), z.grad, w.grad))
    (ours, g_ours, gw_ours), (ref, g_ref, gw_ref) = results
    assert ours.dtype == ref.dtype == torch.promote_types(dtype, weight_dtype)
    assert g_ours.dtype == dtype
    tol = TOL[dtype]  # native's log-softmax runs in the input's dtype, torchbp's promoted
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(g_ours, g_ref, **tol)
    if weight_grad:
        torch.testing.assert_close(gw_ours, gw_ref, **tol)


def test_large_inputs_use_the_chunked_path_with_identical_results(monkeypatch):
    import torchbp.autograd.losses as losses

    x = make((33, 7), torch.float32, scale=3.0)
    t = class_target((33,), ignore=-100).clamp(max=6)
    # class weights of the logits' dtype (as native requires), exact in bfloat16
    w = (torch.rand(7) + 0.5).bfloat16().float()
    whole, (gw,) = grads(lambda z: TF.cross_entropy(z, t, weight=w, label_smoothing=0.1), x)
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 20)  # 2 rows per block
    for dtype in [torch.float32, torch.bfloat16]:
        kw = dict(label_smoothing=0.1, weight=w.to(dtype))
        chunked, (gc,) = grads(lambda z: TF.cross_entropy(z, t, **kw), x.to(dtype))  # noqa: B023
        torch.testing.assert_close(chunked.float(), whole, **TOL[dtype])
        torch.testing.assert_close(gc.float(), gw, **TOL[dtype])


# Which path ce_forward runs (its docstring's table): (inputs, first function called).
PATHS = [
    (dict(), "plain_rows"),
    (dict(dtype=torch.float64), "plain_rows"),
    (dict(ignore=1), "plain_rows"),
    (dict(weight=True), "weighted_rows"),
    (dict(weight=True, ignore=1, dtype=torch.float64), "weighted_rows"),
    (dict(weight=True, smoothing=0.1), "ce_rows"),
    (dict(weight=True, dtype=torch.bfloat16), "blocked_rows"),
    (dict(smoothing=0.1), "ce_rows"),
    (dict(prob=True), "ce_rows"),
    (dict(dtype=torch.bfloat16), "blocked_rows"),
    (dict(dtype=torch.float16, weight=True, smoothing=0.1), "blocked_rows"),
    (dict(inplace=True), "blocked_rows"),
    (dict(vmap=True), "ce_rows"),
]


@pytest.mark.parametrize(
    "inputs, path", PATHS, ids=lambda v: str(v) if isinstance(v, str) else None
)
def test_forward_path_table(inputs, path, monkeypatch):
    import torchbp.autograd.losses as losses
    from torchbp.kernels import cpu_ce

    monkeypatch.delenv("TORCHBP_TRITON", raising=False)
    calls = []
    names = ["plain_rows", "weighted_rows", "blocked_rows"]
    for module, name in [*((cpu_ce, n) for n in names), (losses, "ce_rows")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    dtype = inputs.get("dtype", torch.float32)
    # inplace=True writes over logits only where their gradient is recorded
    x = make((6, C), dtype, scale=3.0).requires_grad_(bool(inputs.get("inplace")))
    target = (
        prob_target((6, C), dtype)
        if inputs.get("prob")
        else class_target((6,), ignore=inputs.get("ignore"))
    )
    kwargs = dict(
        label_smoothing=inputs.get("smoothing", 0.0), inplace=inputs.get("inplace", False)
    )
    if inputs.get("ignore") is not None:
        kwargs["ignore_index"] = inputs["ignore"]
    if inputs.get("weight"):
        kwargs["weight"] = make((C,), dtype, seed=4).abs() + 0.1
    if inputs.get("vmap"):
        torch.func.vmap(lambda z: TF.cross_entropy(z, target, **kwargs))(x.expand(2, 6, C))
    else:
        TF.cross_entropy(x * 1, target, **kwargs)
    assert calls[0] == path


@pytest.mark.parametrize(
    "target, ignore_index, unmasked",
    [
        ([1, 2, 3], -100, True),
        ([1, 2, 3], 0, True),  # a valid class, but no target uses it
        ([1, 2, 3], 2, False),  # may be (here: is) a target's value: rows must be masked
        ([1, 2, 3], 4, True),
        ([1, -100, 3], -100, False),
        ([], -100, False),
    ],
)
def test_class_index_check_says_when_no_row_is_ignored(target, ignore_index, unmasked):
    from torchbp._checks import check_class_indices

    t = torch.tensor(target, dtype=torch.long)
    assert check_class_indices("op", t, C, ignore_index) is unmasked


def _expected_class_index_check(values, classes, ignore_index):
    """What check_class_indices must do, in Python ints (no dtype wrap-around): the
    first target outside [0, C) that is not ignore_index (or None), and whether some
    target is ignore_index (then the rows need the mask: the check returns False)."""
    bad = [v for v in values if not 0 <= v < classes and v != ignore_index]
    return (bad[0] if bad else None), ignore_index in values


def _assert_class_index_check(values, classes, ignore_index, dtype):
    from torchbp._checks import ClassIndexError, check_class_indices

    target = torch.tensor(values, dtype=dtype)
    first_bad, some_ignored = _expected_class_index_check(values, classes, ignore_index)
    if first_bad is not None:
        with pytest.raises(ClassIndexError, match=rf"^op: target {first_bad} is out of bounds"):
            check_class_indices("op", target, classes, ignore_index)
        return
    unmasked = check_class_indices("op", target, classes, ignore_index)
    if some_ignored:
        assert unmasked is False
    elif unmasked:  # True only where every target is a class index
        assert all(0 <= v < classes for v in values)


@pytest.mark.parametrize(
    "values, classes, ignore_index",
    [
        ([-100, 1, -100], 5, -100),  # padded batch: ignore_index as the minimum
        ([-100, -3, 1], 5, -100),  # another negative target behind ignore_index
        ([-3, -100, 1], 5, -100),  # the first bad one is named, not the minimum
        ([-100, 1, 5], 5, -100),  # ignore_index the minimum, a target too large
        ([-100, -100], 5, -100),  # every row ignored
        ([-100, -100], 0, -100),  # every row ignored, no classes
        ([-100, 0], 0, -100),  # no classes: 0 is out of range
        ([-100, -1], 0, -100),  # no classes, a negative target behind ignore_index
        ([7, 1, 7], 5, 7),  # ignore_index >= C as the maximum
        ([7, 9, 1], 5, 7),  # a larger target behind it
        ([7, 5, 1], 5, 7),  # C itself behind it
        ([7, -1, 1], 5, 7),  # ignore_index the maximum, a negative target
        ([2, 0, 2], 5, 2),  # ignore_index inside [0, C)
        ([2, 6, 2], 5, 2),  # ignore_index inside [0, C), a target too large
        ([-1, 0, 4], 5, -1),
    ],
)
def test_class_index_check_with_ignore_index_at_an_extreme(values, classes, ignore_index):
    _assert_class_index_check(values, classes, ignore_index, torch.long)


@pytest.mark.parametrize(
    "values, ignore_index",
    [([255, 1], 255), ([255, 200, 1], 255), ([255, 1], -1), ([255, 1], 511), ([0, 3], 255)],
)
def test_uint8_class_index_check_with_ignore_index_at_an_extreme(values, ignore_index):
    _assert_class_index_check(values, 5, ignore_index, torch.uint8)


_IGNORE_INDICES = st.sampled_from([-100, -2, -1, 0, 1, 3, 4, 5, 6, 255, 511])


@settings(PROFILE, max_examples=max(PROFILE.max_examples, 300))
@given(
    classes=st.integers(0, 5),
    ignore_index=_IGNORE_INDICES,
    data=st.data(),
    uint8=st.booleans(),
)
def test_class_index_check_matches_its_definition(classes, ignore_index, data, uint8):
    """The check's fast paths (one reduction; one more with ignore_index at an extreme)
    against its definition in Python ints, for every boundary: ignore_index negative, in
    [0, C), at or past C; targets at -1, 0, C-1, C; C = 0; empty and uint8 targets."""
    near = [-100, -2, -1, 0, 1, classes - 1, classes, classes + 1, ignore_index]
    pool = sorted({v for v in near if not uint8 or 0 <= v <= 255}) or [0]
    values = data.draw(st.lists(st.sampled_from(pool), max_size=6))
    _assert_class_index_check(values, classes, ignore_index, torch.uint8 if uint8 else torch.long)


def test_ignore_index_inside_the_target_range_is_still_honoured():
    # ignore_index = 2 is one of the targets: the wrapper must not take the unmasked path.
    z = make((6, C), torch.float64)
    t = torch.tensor([0, 2, 1, 2, 4, 3])
    ours, (g_ours,) = grads(lambda x: TF.cross_entropy(x, t, ignore_index=2), z)
    ref, (g_ref,) = grads(lambda x: F.cross_entropy(x, t, ignore_index=2), z)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    assert g_ours[1].abs().sum() == 0 and g_ours[3].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c for c in CE_CASES if c["smoothing"] == 0.3], ids=case_id)
def test_inplace_gives_the_same_loss_and_gradients(case, dtype, monkeypatch):
    import torchbp.autograd.losses as losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 3 * C)  # several row blocks
    base = make((10, C), dtype, scale=3.0)
    kwargs = dict(reduction=case["reduction"], label_smoothing=case["smoothing"])
    if case["weight"]:
        kwargs["weight"] = make((C,), dtype, seed=4).abs() + 0.1
    if case["kind"] == "index":
        target = class_target((10,), ignore=case["ignore"])
        if case["ignore"] is not None:
            kwargs["ignore_index"] = case["ignore"]
    else:
        target = prob_target((10, C), dtype)
    g = make((10,) if case["reduction"] == "none" else (), dtype, seed=7)
    results = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        logits = leaf * 1  # a non-leaf, as the output of a Linear
        loss = TF.cross_entropy(logits, target, **kwargs, inplace=inplace)
        loss.backward(g)
        results.append((loss.detach(), leaf.grad, logits.detach()))
    (loss0, grad0, logits0), (loss1, grad1, logits1) = results
    torch.testing.assert_close(loss1, loss0, **TOL[dtype])
    torch.testing.assert_close(grad1, grad0, **TOL[dtype])
    assert torch.equal(logits0, base)  # not overwritten by default
    torch.testing.assert_close(logits1, grad1, **TOL[dtype])  # overwritten by the gradient


def test_inplace_writes_into_the_logits_and_autograd_guards_them():
    x = make((6, C), torch.float32).requires_grad_()
    logits = x * 2
    ptr = logits.data_ptr()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = TF.cross_entropy(logits, class_target((6,)), inplace=True)
    assert any(t.data_ptr() == ptr for t in saved)  # the gradient kept is the logits' storage
    loss.backward()
    # an op that saved the logits before they were overwritten cannot silently misuse them
    logits = x * 2
    squared = logits.pow(2).sum()
    TF.cross_entropy(logits, class_target((6,)), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        squared.backward()


@pytest.mark.parametrize(
    "as_view",
    [
        lambda h: h.view(-1, C),  # a language model's (B*T, C) logits
        lambda h: h[:6],
        lambda h: h.t().t(),
    ],
    ids=["view", "slice", "transposed"],
)
def test_inplace_on_logits_that_are_a_view_gives_the_loss_and_gradients(as_view):
    # autograd refuses a multi-output Function that modifies a view in place: inplace=True
    # on such logits crashed with an engine error after writing over them; now it computes
    # the same loss and gradients without the memory saving (the logits are kept)
    target = class_target((6,))
    results = []
    for inplace in (False, True):
        leaf = make((8, C), torch.float32, scale=3.0).requires_grad_()
        logits = as_view(leaf * 1)
        kept = logits.detach().clone()
        loss = TF.cross_entropy(
            logits[:6] if logits.shape[0] > 6 else logits, target, inplace=inplace
        )
        loss.backward()
        results.append((loss.detach(), leaf.grad))
        assert torch.equal(logits.detach(), kept)
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize(
    "context, requires_grad",
    [
        (torch.no_grad, True),
        (torch.inference_mode, False),
        (contextlib.nullcontext, False),  # logits that do not require grad
    ],
    ids=["no_grad", "inference_mode", "no-requires-grad"],
)
def test_inplace_without_a_recorded_gradient_keeps_the_logits(context, requires_grad):
    # nothing needs the gradient: writing it over the logits destroyed them for nothing
    x = make((6, C), torch.float32, scale=3.0).requires_grad_(requires_grad)
    target = class_target((6,))
    with context():
        logits = x * 1
        kept = logits.clone()
        loss = TF.cross_entropy(logits, target, inplace=True)
        ref = F.cross_entropy(kept, target)
    assert torch.equal(logits, kept)
    torch.testing.assert_close(loss, ref)


def test_inplace_with_a_target_requiring_grad_is_accepted_where_nothing_is_recorded():
    # under no_grad the probability target needs no gradient: nothing to refuse
    x, target = make((4, C), torch.float32), prob_target((4, C), torch.float32)
    with torch.no_grad():
        loss = TF.cross_entropy(x, target.clone().requires_grad_(), inplace=True)
    torch.testing.assert_close(loss, F.cross_entropy(x, target))


def test_inplace_on_a_leaf_is_refused_before_writing():
    # the Function wrote the gradient over the leaf's values, then autograd raised
    leaf = make((4, C), torch.float32).requires_grad_()
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad is being used"):
        TF.cross_entropy(leaf, class_target((4,)), inplace=True)
    assert torch.equal(leaf.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_with_class_weights_sharing_the_logits_storage(dtype, smoothing, reduction):
    # class weights that view the logits (a row of logits.detach()) were read after the
    # gradient had been written over them: a silently wrong loss (-28.3 for native's 1.57)
    # and gradient; they are now read as they were when the call was made
    base = make((6, C), dtype, scale=0.2) + 1.0
    target = class_target((6,), ignore=-100)
    kwargs = dict(reduction=reduction, label_smoothing=smoothing)
    g = make((6,) if reduction == "none" else (), dtype, seed=7)
    leaf = base.clone().requires_grad_()
    ref = F.cross_entropy(leaf * 1, target, weight=base[0].clone(), **kwargs)
    ref.backward(g)
    ours_leaf = base.clone().requires_grad_()
    logits = ours_leaf * 1
    weight = logits.detach()[0]
    loss = TF.cross_entropy(logits, target, weight=weight, inplace=True, **kwargs)
    loss.backward(g)
    torch.testing.assert_close(loss, ref.detach(), **TOL[dtype])
    torch.testing.assert_close(ours_leaf.grad, leaf.grad, **TOL[dtype])


def test_inplace_needs_2d_logits_and_no_target_gradient():
    with pytest.raises(ValueError, match="inplace=True needs 2-D"):
        TF.cross_entropy(make((2, C, 3), torch.float32), class_target((2, 3)), inplace=True)
    target = prob_target((4, C), torch.float32).requires_grad_()
    with pytest.raises(ValueError, match="probability target needs a gradient"):
        TF.cross_entropy(make((4, C), torch.float32), target, inplace=True)


@pytest.mark.parametrize("weighted", [False, True])
def test_nll_gradient_is_differentiable_as_natives(weighted):
    # native's nll_loss gradient is attached to the input's graph (its derivative w.r.t.
    # the input is 0): differentiating it again gives zeros, not an error
    logp, target = make((4, C), torch.float64), torch.tensor([0, 3, -100, 1])
    weight = make((C,), torch.float64, seed=3).abs() if weighted else None
    results = []
    for loss in (TF.nll_loss, F.nll_loss):
        x = logp.clone().requires_grad_()
        (gx,) = torch.autograd.grad(loss(x, target, weight), x, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * gx).sum(), x)
        results.append((gx.detach(), ggx))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("name", ["nll_loss", "cross_entropy", "linear_cross_entropy"])
def test_unreduced_loss_may_be_modified_in_place_as_natives(name):
    # e.g. masking per-element losses in place before the sum
    if not hasattr(F, name):
        pytest.skip(f"this torch has no torch.nn.functional.{name}")
    target, mask = torch.tensor([0, 3, 1, 1]), torch.tensor([1.0, 0.0, 2.0, 1.0]).double()
    grads = []
    for ns in (TF, F):
        x = make((4, C), torch.float64).requires_grad_()
        args = (x, make((C, C), torch.float64, seed=2)) if name == "linear_cross_entropy" else (x,)
        rows = getattr(ns, name)(*args, target, reduction="none")
        rows.mul_(mask)
        rows.sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("op", [TF.cross_entropy, TF.nll_loss], ids=["cross_entropy", "nll"])
def test_zero_classes_every_target_ignored_as_native(op, reduction, weighted):
    # (N, 0) input: every target must be ignore_index; native gives 0 rows (mean: nan) and
    # a (N, 0) gradient. nll_loss crashed in gather() with "index 0 is out of bounds".
    native = F.cross_entropy if op is TF.cross_entropy else F.nll_loss
    target, weight = torch.full((3,), -100), torch.ones(0) if weighted else None
    results = []
    for fn in (op, native):
        x = torch.zeros(3, 0, requires_grad=True)
        loss = fn(x, target, weight=weight, reduction=reduction)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0], results[1], equal_nan=True)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_zero_classes_every_target_ignored_with_label_smoothing_as_native(
    reduction, weighted, inplace
):
    # native adds (ε/C) Σ_c (smoothing term) to each row, and ε/C = ε/0 = inf times the
    # empty (masked) sum gives NaN rows; torchbp answered 0
    target, weight = torch.full((3,), -100), torch.ones(0) if weighted else None
    results = []
    for fn, options in ((TF.cross_entropy, {"inplace": inplace}), (F.cross_entropy, {})):
        x = torch.zeros(3, 0, requires_grad=True)
        loss = fn(x * 1, target, weight=weight, reduction=reduction, label_smoothing=0.3, **options)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0], results[1], equal_nan=True)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(0, 0), (0, 0, 0), (2, 0, 0), (0, 0, 3)], ids=str)
def test_zero_classes_and_no_rows_with_label_smoothing_sum_is_natives_nan(shape, weighted):
    # native scales the summed smoothing term by ε/C = ε/0 = inf: with no rows that sum is
    # 0 and 0 · inf is NaN, so 'sum' is NaN even where there is no row; torchbp answered 0
    target, weight = torch.zeros(shape[:1] + shape[2:], dtype=torch.long), None
    if weighted:
        weight = torch.ones(0)
    results = []
    for fn in (TF.cross_entropy, F.cross_entropy):
        x = torch.zeros(shape, requires_grad=True)
        loss = fn(x, target, weight=weight, reduction="sum", label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[0], results[1], equal_nan=True)


def test_linear_cross_entropy_without_classes_or_rows_smoothed_sum_is_natives_nan():
    # (the unfused pair runs for C = 0: the same reduction as cross_entropy)
    x, w, target = torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    loss = TF.linear_cross_entropy(x, w, target, reduction="sum", label_smoothing=0.1)
    assert torch.isnan(loss)


def _loss_and_grad_as_native(logits, target, dtype=torch.float64, **options):
    """(torchbp, native) of ``(loss, ∂loss/∂logits)`` for ``reduction='none'``."""
    results = []
    for fn in (TF.cross_entropy, F.cross_entropy):
        x = logits.to(dtype).requires_grad_()
        loss = fn(x, target, reduction="none", **options)
        results.append((loss.detach(), *torch.autograd.grad(loss.sum(), x)))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_infinite_probability_mass_gives_natives_infinite_loss(smoothing, weighted, dtype):
    # ℓ = -Σ_c w_c t_c logp_c is +inf where t_c = +inf meets logp_c < 0: on the row max
    # (row 0), beside it (row 1: its logit dominates, log Σ e^{z - m} rounds to 0), or
    # on both. torchbp formed ℓ = a·lse' - Σ B (z - m) and got inf · 0 = NaN there.
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 100.0, -1.0], [1.0, 2.0, 3.0]])
    inf = torch.inf
    target = torch.tensor([[0.0, 0.0, inf], [inf, 0.0, 0.0], [inf, 0.0, inf]], dtype=dtype)
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=dtype) if weighted else None
    ours, native = _loss_and_grad_as_native(
        logits, target, dtype, weight=weight, label_smoothing=smoothing
    )
    assert torch.isinf(native[0]).all()  # (what the comparison below relies on)
    torch.testing.assert_close(ours, native, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("position", ["max", "dominated"])
def test_infinite_class_weight_gives_natives_infinite_loss(position, smoothing):
    # w_y = inf: ℓ = -w_y logp_y = +inf, with or without label smoothing (whose
    # Σ_c w_c (lse - z_c) has the infinite class weight in every row); torchbp gave NaN
    # where log Σ e^{z - m} rounds to 0 (a dominating logit) or, with smoothing, where the
    # infinite weight sits on the row max
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 100.0, -1.0]])
    target = torch.tensor([2, 0]) if position == "max" else torch.tensor([1, 0])
    weight = torch.tensor([1.0, 1.0, 1.0])
    weight[2 if position == "max" else 0] = torch.inf
    ours, native = _loss_and_grad_as_native(
        logits, target, torch.float32, weight=weight, label_smoothing=smoothing
    )
    assert torch.isinf(native[0]).any()
    torch.testing.assert_close(ours, native, equal_nan=True)


SPECIAL_WEIGHTS = {  # class weights of (6, 5) logits whose rows 1-3 hold inf / NaN
    "infinite": [1.0, float("inf"), 0.5, float("-inf"), 2.0],
    "nan": [1.0, float("nan"), 0.5, 2.0, 1.5],
    "zero and negative": [0.0, -1.5, 0.5, 2.0, 1.0],
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ignore", [None, -100, 1])
@pytest.mark.parametrize("case", list(SPECIAL_WEIGHTS))
def test_weighted_loss_of_special_weights_and_logits_is_natives(case, ignore, reduction, dtype):
    # the weighted fast path (cpu_ce.weighted_rows): every class weight on a row max, a
    # dominated logit and a confident row (p_y = 1: inf · 0), next to inf / NaN logits and
    # ignored rows, loss and gradient as native's for every reduction
    weight = torch.tensor(SPECIAL_WEIGHTS[case], dtype=dtype)
    logits = make((6, C), torch.float64, scale=3.0)
    logits[0] = torch.tensor([0.0, 200.0, 1.0, -1.0, 0.5])  # confident in class 1
    logits[1, 2], logits[2, 0], logits[3, 4] = torch.inf, torch.nan, -torch.inf
    target = torch.tensor([1, 2, 3, 4, 0, 1])
    options = dict(weight=weight, reduction=reduction)
    if ignore is not None:
        target[::3] = ignore
        options["ignore_index"] = ignore
    results = []
    for fn in (TF.cross_entropy, F.cross_entropy):
        x = logits.to(dtype).requires_grad_()
        loss = fn(x * 1, target, **options)
        results.append((loss.detach(), *torch.autograd.grad(loss.sum(), x)))
    torch.testing.assert_close(*results, equal_nan=True, **TOL[dtype])


def _mean_and_grads_as_native(logits, target, weight, dtype, smoothing, inplace):
    """(torchbp, native) of the smoothed weighted ``'mean'`` and its logits' gradient."""
    results = []
    for fn, options in ((TF.cross_entropy, {"inplace": inplace}), (F.cross_entropy, {})):
        x = logits.to(dtype).requires_grad_()
        loss = fn(x * 1, target, weight=weight.to(dtype), label_smoothing=smoothing, **options)
        results.append((loss.detach(), *torch.autograd.grad(loss, x)))
    return results


ZERO_TOTAL_WEIGHT = {  # (class weights, class-index target of (2, 3) logits)
    "zero class weight": ([1.0, 1.0, 0.0], [2, 2]),
    "one row ignored": ([1.0, 1.0, 0.0], [2, -100]),
    "every row ignored": ([1.0, 1.0, 0.0], [-100, -100]),
    "infinite target weight": ([1.0, 1.0, float("inf")], [2, 0]),
    "infinite other weight": ([float("inf"), 1.0, 1.0], [2, 2]),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.1, 1.0])
@pytest.mark.parametrize("case", list(ZERO_TOTAL_WEIGHT))
def test_smoothed_mean_over_zero_or_infinite_total_weight_is_natives(
    case, smoothing, dtype, inplace
):
    # native's smoothed mean is (1 - ε) Σ w_y nll / W + (ε/C) Σ smooth / W: at W = 0 the
    # first term is 0/0 = NaN (loss and kept rows' gradient); torchbp divided its combined
    # rows by W = 0 and gave ±inf
    weight, target = (torch.tensor(v) for v in ZERO_TOTAL_WEIGHT[case])
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    ours, native = _mean_and_grads_as_native(logits, target, weight, dtype, smoothing, inplace)
    torch.testing.assert_close(ours, native, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("inplace", [False, True])
def test_fully_smoothed_mean_over_negative_weights_summing_to_zero_is_natives_nan(inplace):
    # W = 1 - 1 = 0 with ε = 1: native's (1 - ε) · (Σ w_y nll / 0) is 0 · ±inf = NaN.
    # (With ε < 1 native's loss is ±inf where both terms' signs agree; torchbp's is NaN:
    # see functional._loss_terms._mean_denominator.)
    weight, target = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0, 1])
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    ours, native = _mean_and_grads_as_native(logits, target, weight, torch.float32, 1.0, inplace)
    assert native[0].isnan()
    torch.testing.assert_close(ours, native, equal_nan=True)


@pytest.mark.parametrize("smoothing", [0.1, 1.0])
def test_smoothed_k_dim_mean_over_zero_total_weight_is_natives_nan(smoothing):
    weight, target = torch.tensor([1.0, 0.0, 1.0]), torch.ones(2, 4, dtype=torch.long)
    logits = make((2, 3, 4), torch.float64, seed=1)
    ours, native = _mean_and_grads_as_native(
        logits, target, weight, torch.float64, smoothing, False
    )
    assert native[0].isnan()
    torch.testing.assert_close(ours, native, equal_nan=True)


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("case", list(ZERO_TOTAL_WEIGHT))
def test_linear_cross_entropy_smoothed_mean_over_zero_total_weight_is_natives(case, chunk_size):
    # (the chunked Function scales the gradients it forms in forward by 1 / W)
    weight, target = (torch.tensor(v) for v in ZERO_TOTAL_WEIGHT[case])
    x0, w0 = make((2, 4), torch.float64, seed=2), make((3, 4), torch.float64, seed=3)
    results = []
    for lce in (TF.linear_cross_entropy, None):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        options = {"weight": weight.double(), "label_smoothing": 0.1}
        if lce is None:
            loss = F.cross_entropy(F.linear(x, w), target, **options)
        else:
            loss = lce(x, w, target, chunk_size=chunk_size, **options)
        results.append((loss.detach(), *torch.autograd.grad(loss, (x, w))))
    torch.testing.assert_close(results[0], results[1], equal_nan=True)


def test_infinite_probability_mass_in_linear_cross_entropy_as_native():
    # (the chunked Function's loss rows come from the same ce_rows)
    x, w = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    target = torch.tensor([[0.0, torch.inf], [0.0, torch.inf]])
    loss = TF.linear_cross_entropy(x, w, target, reduction="none")
    native = F.cross_entropy(F.linear(x, w), target, reduction="none")
    torch.testing.assert_close(loss, native)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_probability_target_gradient_of_an_infinite_logit_is_natives(smoothing):
    # A row with a +inf logit has log-probabilities inf - inf = NaN, a NaN loss and NaN
    # gradients in native. When the target needed a gradient, torchbp recomputed them with
    # torch.logsumexp (inf for that row, so logp = [NaN, -inf, ...]) and handed out finite
    # logits gradients and infinite target gradients for that row (and NaN ones, as native,
    # when the target needed none).
    x0 = make((3, C), torch.float64)
    x0[1, 2] = torch.inf
    t0 = torch.softmax(make((3, C), torch.float64, seed=2), 1)
    results = []
    for fn in (TF.cross_entropy, F.cross_entropy):
        x, t = x0.clone().requires_grad_(), t0.clone().requires_grad_()
        loss = fn(x, t, reduction="none", label_smoothing=smoothing)
        results.append((loss, *torch.autograd.grad(loss, (x, t), make((3,), torch.float64))))
    torch.testing.assert_close(results[0], results[1], equal_nan=True)


@pytest.mark.parametrize("shape", [(6, C), (C,), (2, C, 3)], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_probability_target_class_weights_get_their_gradient_as_natives(
    reduction, smoothing, shape
):
    # native's probability-target loss -Σ_c w_c t'_c logp_c is differentiable in the class
    # weights; torchbp refused a weight requiring grad there ("not differentiable")
    x0 = make(shape, torch.float64, scale=2.0)
    t0 = torch.softmax(make(shape, torch.float64, seed=2), -1 if len(shape) == 1 else 1)
    w0 = make((C,), torch.float64, seed=3).abs() + 0.1
    results = []
    for fn in (TF.cross_entropy, F.cross_entropy):
        x, t, w = (v.clone().requires_grad_() for v in (x0, t0, w0))
        loss = fn(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
        g = make(loss.shape, torch.float64, seed=5)
        results.append((loss, *torch.autograd.grad(loss, (x, t, w), g)))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "none"}, {"label_smoothing": 0.2}, {"ignore_index": 1}, {"dtype": "bf16"}],
    ids=str,
)
def test_first_order_gradient_is_a_constant_as_natives(options):
    """torch.autograd.grad without create_graph hands out constants (no grad_fn, not
    requiring grad). The backward that hands over the forward's saved ∂ℓ/∂z buffer gave it
    with that output's grad_fn: it required grad, kept the loss's node alive, and a penalty
    built on it (first-order meta-learning, a gradient norm) silently backpropagated a
    second-order term where native refuses ('does not require grad')."""
    options = dict(options)
    dtype = torch.bfloat16 if options.pop("dtype", None) else torch.float32
    logits = torch.randn(5, 4, dtype=dtype).requires_grad_()
    target = torch.tensor([0, 1, 2, 3, 1])
    for fn in (F.cross_entropy, TF.cross_entropy):
        (g,) = torch.autograd.grad(fn(logits, target, **options).sum(), logits)
        assert not g.requires_grad and g.grad_fn is None, fn
        with pytest.raises(RuntimeError, match="does not require grad"):
            (g * g).sum().backward()


def test_kdim_cross_entropy_exports_with_dynamic_batch_and_spatial_dims():
    """validate_cross_entropy compared the input's and target's shapes element-wise, so
    torch.export with a dynamic spatial dim d guarded d != C and refused the export
    ('not all values of d ... satisfy the generated guard')."""

    class Loss(torch.nn.Module):
        def forward(self, x, y):
            return TF.cross_entropy(x, y)

    batch, d = torch.export.Dim("batch", min=2), torch.export.Dim("d", min=2)
    example = (torch.randn(4, 3, 5), torch.randint(3, (4, 5)))
    exported = torch.export.export(
        Loss(), example, dynamic_shapes=({0: batch, 2: d}, {0: batch, 1: d})
    )
    for rows, size in [(7, 9), (2, 3)]:  # d = 3 = C too
        x, y = torch.randn(rows, 3, size), torch.randint(3, (rows, size))
        torch.testing.assert_close(exported.module()(x, y), F.cross_entropy(x, y))


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("options", [{}, {"reduction": "none"}], ids=str)
def test_jit_trace_serves_ignored_rows_of_later_calls(name, options):
    """The wrappers looked at the example's class indices: with none ignored, the trace
    recorded the unmasked loss (no ignore_index, every row counted), and the traced model
    then failed on a batch with ignored rows, where native's trace works."""

    class Loss(torch.nn.Module):
        def forward(self, x, y):
            return getattr(TF, name)(x, y, **options)

    x = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings
        traced = torch.jit.trace(Loss(), (x, torch.tensor([0, 1, 2, 1])))
    ignored = torch.tensor([0, -100, 2, -100])
    torch.testing.assert_close(traced(x, ignored), getattr(F, name)(x, ignored, **options))


def _full_size_ops(fn, rows, classes):
    """How many aten ops ``fn()`` runs on an input of (rows, classes): its passes."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return sum(
        1
        for event in prof.events()
        if event.name.startswith("aten::") and [rows, classes] in event.input_shapes
    )


INF = torch.inf
_SPLIT_CASES = {
    # probability targets: +inf on the row max, beside a dominating logit, on both, none
    "soft": (
        torch.tensor([[0.0, 0.0, INF], [INF, 0.0, 0.0], [INF, 0.0, INF], [0.2, 0.3, 0.5]]),
        None,
    ),
    "soft-negative": (
        torch.tensor([[0.0, 0.0, -INF], [-INF, 1.0, 0.0], [INF, 0.0, -INF], [0.2, 0.3, 0.5]]),
        None,
    ),
    # class weights with label smoothing: w = inf on the max of rows 0 and 3 (row 1: its
    # logit dominates the row, row 2: both)
    "weighted-smoothed": (torch.tensor([2, 0, 1, 2]), torch.tensor([1.0, 1.0, INF])),
    "weighted-smoothed-dominated": (torch.tensor([2, 0, 1, 2]), torch.tensor([INF, 1.0, 1.0])),
}


@pytest.mark.parametrize("case", list(_SPLIT_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_off_the_cpu_is_split_without_a_pass_and_as_native(case, dtype, monkeypatch):
    # Off the CPU (and under torch.compile / torch.func) ce_rows cannot look at a = Σ B
    # without a sync: it formed the loss term by term for every probability target and
    # weighted, smoothed class index, one more elementwise pass (L - s) and one more
    # (m, C) buffer than the split a·L - Σ B s. The split with a fix-up from row values
    # where a is not finite gives native's infinities without either.
    from torchbp.autograd import cross_entropy as ce

    logits = torch.tensor(
        [[1.0, 2.0, 3.0], [0.0, 100.0, -1.0], [1.0, 2.0, 3.0], [4.0, 4.0, 1.0]], dtype=dtype
    )
    target, weight = _SPLIT_CASES[case]
    if target.is_floating_point():
        target = target.to(dtype)
    weight = None if weight is None else weight.to(dtype)
    smoothing = 0.1 if case != "soft" else 0.0
    native = F.cross_entropy(
        logits, target, weight=weight, reduction="none", label_smoothing=smoothing
    )
    finite_target = target.nan_to_num(0.0, 0.0, 0.0) if target.is_floating_point() else target
    finite_weight = None if weight is None else torch.ones_like(weight)
    on_cpu = _full_size_ops(
        lambda: ce.ce_rows(logits, finite_target, finite_weight, -100, smoothing), 4, 3
    )
    monkeypatch.setattr(ce, "values_inspectable", lambda t: False)
    rows = ce.ce_rows(logits, target, weight, -100, smoothing)
    torch.testing.assert_close(rows.loss, native, equal_nan=True)
    off_cpu = _full_size_ops(lambda: ce.ce_rows(logits, target, weight, -100, smoothing), 4, 3)
    assert off_cpu == on_cpu


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "name,kind", [("cross_entropy", "index"), ("cross_entropy", "prob"), ("nll_loss", "index")]
)
def test_k_dim_gradients_come_back_in_the_inputs_layout(name, kind, memory_format):
    # the class dim is moved last for the Function: each gradient must come back in its
    # input's layout (contiguous ones contiguous, as native's), not as the permuted
    # class-last view (native makes a channels_last one contiguous, or fails for nll_loss)
    shape = (2, C, 3, 4)
    logits = make(shape, torch.float64, seed=0)
    if memory_format == "channels_last":
        logits = logits.contiguous(memory_format=torch.channels_last)
    logits.requires_grad_()
    target = class_target((2, 3, 4)) if kind == "index" else prob_target(shape, torch.float64)
    leaves = [logits, target.requires_grad_()] if kind == "prob" else [logits]
    ours = torch.autograd.grad(getattr(TF, name)(logits, target, reduction="none").sum(), leaves)
    plain = [t.detach().contiguous().requires_grad_() for t in leaves]
    args = plain if kind == "prob" else [plain[0], target]
    native = torch.autograd.grad(getattr(F, name)(*args, reduction="none").sum(), plain)
    for got, want, leaf in zip(ours, native, leaves, strict=True):
        torch.testing.assert_close(got, want)
        assert got.stride() == leaf.stride()


def test_autocast_device_type_reads_a_subclass_device_not_its_storage():
    """The wrappers' autocast query reads a plain tensor's device type from ``is_cpu`` /
    ``is_cuda`` and asks a subclass's ``device`` (a fake tensor, torch.compile's and
    torch.export's, keeps its storage on the meta device): each is ``t.device.type``, and
    a fake CPU tensor meets CPU autocast as a real one does."""
    # FakeTensorMode has no public import path (as tests/test_public_api_only.py uses it)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchbp.functional._autocast import _autocast_dtype, _device_type

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(2))
    for t in (torch.ones(2), torch.ones(2, device="meta"), fake):
        assert _device_type(t) == t.device.type
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast_dtype(fake) is torch.bfloat16
        assert _autocast_dtype(torch.ones(2, device="meta")) is None
    assert _autocast_dtype(fake) is None
