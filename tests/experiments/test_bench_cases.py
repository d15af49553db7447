"""``experiments/bench/cases.py``: each system does what its row claims to measure."""

import pytest
import torch
from experiments.bench import cases, harness, targets


def test_inplace_cross_entropy_peak_shows_the_logits_sized_buffer_it_saves():
    # cross_entropy(..., inplace=True) saves one logits-sized allocation: the case must not
    # put one back (a leaf whose gradient is as large as the logits)
    opts = cases.Options(device="cpu", quick=True, compile="none", peers=False)
    logits_bytes = cases.build("cross_entropy", opts).logits_bytes
    kwargs = {"quick": True, "compile_mode": "none"}
    plain = harness.rss_peak_subprocess("cross_entropy", "torchbp", **kwargs)
    inplace = harness.rss_peak_subprocess("cross_entropy", "torchbp_inplace", **kwargs)
    assert plain["peak_extra_bytes"] >= 0.75 * logits_bytes  # the gradient itself
    assert inplace["peak_extra_bytes"] < 0.25 * logits_bytes


def test_tf32_mlp_step_runs_its_backward_with_tf32_too(monkeypatch):
    # allow_tf32 is a global flag read when a matmul runs: set around forward only, the
    # backward's matmuls (two thirds of the step's) ran in full fp32
    seen: list[bool] = []
    make_mlp = cases._mlp

    def mlp_reporting_the_flag_in_backward(sizes, act):
        model = make_mlp(sizes, act)
        model[0].weight.register_hook(lambda g: seen.append(torch.backends.cuda.matmul.allow_tf32))
        return model

    monkeypatch.setattr(cases, "_mlp", mlp_reporting_the_flag_in_backward)
    opts = cases.Options(device="cpu", quick=True, compile="none", peers=False)
    case = cases.build_mlp_step(opts, "tf32")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        case.impls["native"].fn()
        assert seen == [True]
        assert torch.backends.cuda.matmul.allow_tf32 is False  # restored after the step
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_a_triton_activation_row_only_for_the_activations_the_kernel_computes():
    # ELU and softplus keep the torch ops under TORCHBP_TRITON=1: a "Triton backward
    # kernel" row for them timed the torch path under the kernel's name
    pytest.importorskip("triton")
    computed = {op for op in cases._ACTIVATIONS if cases.triton_backward_kernel_computes(op)}
    assert {"relu", "sigmoid", "tanh", "gelu", "silu", "leaky_relu"} <= computed
    assert not computed & {"elu", "softplus"}


def test_auto_compiles_a_reference_exactly_where_a_target_names_one():
    # each torch.compile costs tens of seconds of the GPU run's bench budget: CUDA's
    # cross-entropy cases compiled F.cross_entropy, which no CUDA target compares with
    # (their targets are Liger and the logits' size), and cut the cases after them
    assert cases.compile_reference_wanted("cross_entropy", "cpu")
    assert cases.compile_reference_wanted("linear_cross_entropy", "cuda")
    for name in ("cross_entropy", "cross_entropy_bf16", "mlp_step", "act_relu", "linear"):
        assert not cases.compile_reference_wanted(name, "cuda"), name
    opts = cases.Options(device="cpu", quick=True, compile="auto", peers=False)
    for name in ("cross_entropy", "act_relu", "linear", "linear_cross_entropy"):
        built = "compile" in cases.build(name, opts).impls
        assert built == cases.compile_reference_wanted(name, "cpu"), name


def test_leaky_relu_mlp_layers_keep_half_of_natives_saved_bytes():
    # the issue-5 target: torchbp's LeakyReLU keeps its output, which the next Linear keeps
    # anyway, where native's keeps its input; the 0.5x target reads the default row
    opts = cases.Options(device="cpu", quick=True, compile="none", peers=False)
    case = cases.build("mlp_layers_saved_leaky_relu", opts)
    saved = {name: harness.saved_bytes(case, impl) for name, impl in case.impls.items()}
    assert saved["torchbp"] == saved["native"] // 2
    results = {case.name: {"impls": {k: {"saved_bytes": v} for k, v in saved.items()}}}
    rows = [r for r in targets.evaluate("cpu", results) if r["case"] == case.name]
    assert {(r["subject"], r["limit"], r["status"]) for r in rows} == {("torchbp", 0.5, "holds")}
