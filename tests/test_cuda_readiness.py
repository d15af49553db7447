"""CUDA-only behaviour that can be checked without a GPU.

On CUDA, autograd runs each node's backward on the engine's worker thread for that
device, not on the thread that called ``loss.backward()``; on CPU the calling thread runs
it. Anything a Function looks up per thread while a backward runs (a forward recomputed
by activation checkpointing, for one) therefore sees the device thread's state there.
The CPU variants below run the backward on another thread to reproduce that; the CUDA
variants (``pytest -m cuda``, run by ``scripts/cuda_checks.sh``) run it as it comes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests._support import CUDA, UNARY, run_on_another_thread
from torch.utils.checkpoint import checkpoint

import torchbp
from torchbp._checks import ClassIndexError
from torchbp.per_sample import per_sample_grads

DT = torch.float64


def _mlp(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torchbp.nn.Linear(5, 7), torchbp.nn.Tanh(), torchbp.nn.Linear(7, 4)
    ).to(device, DT)


def _backward_as_on_the_device(loss: torch.Tensor) -> None:
    """``loss.backward()`` on a thread other than the caller's when the graph is on CPU,
    as the autograd engine does for CUDA graphs (which it runs on a device thread)."""
    if loss.is_cuda:
        loss.backward()
        return
    run_on_another_thread(loss.backward)


def _grad_samples(model, x, target, *, reentrant: bool, device_thread: bool):
    with per_sample_grads(model, mode="grads") as ps:
        out = checkpoint(model, x, use_reentrant=reentrant)
        loss = torchbp.functional.cross_entropy(out, target)
        if device_thread:
            _backward_as_on_the_device(loss)
        else:
            loss.backward()
        norms = ps.norms
    return norms, {name: p.grad_sample for name, p in model.named_parameters()}


def test_reentrant_checkpoint_per_sample_grads_with_the_backward_on_a_device_thread(device):
    """The documented case (a reentrant segment that starts the model) must give the same
    per-sample gradients whichever thread runs the backward."""
    model = _mlp(device)
    x = torch.randn(6, 5, dtype=DT, device=device, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 0, 1], device=device)
    want_norms, want = _grad_samples(model, x, target, reentrant=True, device_thread=False)
    model.zero_grad(set_to_none=True)
    got_norms, got = _grad_samples(model, x, target, reentrant=True, device_thread=True)
    torch.testing.assert_close(got_norms, want_norms)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


@CUDA
@pytest.mark.cuda
def test_cuda_graph_capture_of_a_training_step():
    """A CUDA graph captures a torchbp forward + backward (ReLU MLP, cross-entropy) and its
    replay on new data gives eager's loss and gradients: while a stream is capturing, the
    value checks and fast paths that sync with the host step aside (a host sync is illegal
    during capture)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torchbp.nn.Linear(16, 32), torchbp.nn.ReLU(), torchbp.nn.Linear(32, 5)
    ).cuda()
    x = torch.randn(8, 16, device="cuda")
    y = torch.randint(5, (8,), device="cuda")

    def step():
        loss = torchbp.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's docs do
        for _ in range(3):
            model.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = step()
    x.copy_(torch.randn(8, 16, device="cuda"))
    y.copy_(torch.randint(5, (8,), device="cuda"))
    model.zero_grad(set_to_none=False)
    graph.replay()
    got = [static_loss.clone()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=False)
    want = [step()] + [p.grad for p in model.parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", UNARY, ids=str)
def test_cuda_graph_capture_of_each_activation_and_softmax(variant, dtype):
    """Each op's forward + backward captured in a CUDA graph alone replays to eager's
    output and gradient on new data (eager may take a fast backward path that capture
    steps aside from: equal within the dtype's tolerance)."""
    x = torch.randn(64, 33, device="cuda").to(dtype).requires_grad_()
    g = torch.randn(64, 33, device="cuda").to(dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch's docs do
        for _ in range(3):
            variant.ours(x).backward(g)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    x.grad = None  # the gradient is allocated in the graph's pool, rewritten by each replay
    with torch.cuda.graph(graph):
        static_out = variant.ours(x)
        static_out.backward(g)
    static_grad = x.grad
    with torch.no_grad():
        x.copy_(torch.randn(64, 33, device="cuda").to(dtype))
        g.copy_(torch.randn(64, 33, device="cuda").to(dtype))
    graph.replay()
    got_out, got_grad = static_out.clone(), static_grad.clone()
    x.grad = None
    want_out = variant.ours(x)
    want_out.backward(g)
    torch.testing.assert_close(got_out, want_out)
    torch.testing.assert_close(got_grad, x.grad)


_LINEAR_INPUTS = {
    "3d": (4, 8, 512),
    "4d": (2, 2, 8, 512),
    "1d": (512,),
    "2d": (32, 512),
}


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", [*_LINEAR_INPUTS, "transposed"])
def test_cuda_linear_with_bias_is_bitwise_natives(dtype, layout):
    """linear's one-addmm path (the rows of a contiguous input, resize_ to its shape) and
    its matmul + add path (a transposed input) give native F.linear's bits on CUDA too."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = _LINEAR_INPUTS.get(layout, (8, 4, 512))
    x = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    if layout == "transposed":
        x = x.transpose(0, 1)
    w = (torch.randn(48, 512, device="cuda", generator=gen) / 32).to(dtype)
    for b_shape in ((48,), (1,), (1, 48)):
        b = torch.randn(b_shape, device="cuda", generator=gen).to(dtype)
        if x.dim() == 1 and b.dim() == 2:
            continue
        out = torchbp.functional.linear(x, w, b)
        assert torch.equal(out, F.linear(x, w, b)), (layout, b_shape)
        assert not out._is_view()


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op, kwargs", [("relu", {}), ("leaky_relu", {"negative_slope": 0.1})])
def test_cuda_relu_of_subnormals_is_natives(monkeypatch, triton, dtype, op, kwargs):
    """ReLU / LeakyReLU of subnormal half inputs on CUDA: the forward and the gradient equal
    native's bit for bit (a kernel flushing subnormals to zero would call a tiny positive
    input inactive)."""
    if triton:
        monkeypatch.setenv("TORCHBP_TRITON", "1")
    tiny = torch.finfo(dtype).smallest_normal
    values = [tiny / 2, tiny / 64, -tiny / 2, -tiny / 64, 0.0, -0.0, tiny, -tiny, 1.0, -1.0]
    x = torch.tensor(values * 200, dtype=dtype, device="cuda")
    g = torch.rand(x.shape, device="cuda").to(dtype) + 0.5
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = getattr(torchbp.functional, op)(xa, **kwargs)
    ref = getattr(F, op)(xb, **kwargs)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(out, ref)
    assert torch.equal(xa.grad, xb.grad)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])
def test_cuda_class_index_out_of_range_is_a_clear_error_and_the_device_stays_usable(
    monkeypatch, triton
):
    """On CUDA an out-of-range class index is torchbp's ClassIndexError (a host-side check),
    not a device-side assert, which would leave every later CUDA call failing. (Hence
    this file's last CUDA test, and cuda_checks.sh runs this file last in its step.)"""
    if triton:
        monkeypatch.setenv("TORCHBP_TRITON", "1")
    logits = torch.randn(4, 5, device="cuda", requires_grad=True)
    bad = torch.tensor([0, 1, 7, 2], device="cuda")
    with pytest.raises(ClassIndexError, match=r"target 7 is out of bounds.*\[0, 5\)"):
        torchbp.functional.cross_entropy(logits, bad)
    with pytest.raises(ClassIndexError, match="target -3 is out of bounds"):
        torchbp.functional.nll_loss(logits.log_softmax(1), bad - 3)
    good = torch.tensor([0, 1, 4, 2], device="cuda")
    loss = torchbp.functional.cross_entropy(logits, good)
    loss.backward()
    torch.cuda.synchronize()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits, good)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits.grad, ref_logits.grad)


# --------------------------------------------------------------------------- cuda_checks.sh
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cuda_checks.sh"


def _report_rows(report: str) -> dict[str, str]:
    """The step table of a cuda_report.md: step name -> its exit column."""
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| ")]
    return {r[1].strip(): r[2].strip() for r in rows[1:] if not r[1].strip().startswith("---")}


@pytest.mark.slow
def test_cuda_checks_ends_and_reports_when_every_python_call_hangs(tmp_path):
    """A wedged GPU hangs whatever touches it (the environment facts' ``torch.cuda``
    calls, ``nvidia-smi``, a step's kernel): the script must still end within its
    T_TOTAL and write the report, every step timed out or skipped. (The environment
    facts and the plugin probes ran without a limit: the script never ended.)"""
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 600\n")
    hang.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PY=str(hang), OUT=str(out), T_TOTAL="18", REPORT_RESERVE="3")
    env.update(T_ENV="1", T_PYTEST_CHANGED="5")
    with open(tmp_path / "stdout", "w") as log:  # (not a pipe: nothing left holds it open)
        done = subprocess.run(
            ["bash", str(SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=90
        )
    assert done.returncode == 0
    report = (out / "cuda_report.md").read_text()
    rows = _report_rows(report)
    assert list(rows)[-1] == "bench_cuda" and "pytest_changed" in rows, report
    for name, status in rows.items():
        assert status in ("**124** (timeout)", "**skipped**", "-"), (name, report)
    assert "environment facts: exit 124" in report


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_cuda_checks_runs_nothing_unbounded_when_no_time_is_left(tmp_path):
    """With no time left under T_TOTAL, the preparations (wheels, environment facts,
    nvidia-smi) ran under ``timeout 0``, which means no limit at all: the environment
    facts' python was reported 'hung' without ever being killed and was left running
    (on a GPU, beside every later step), and nvidia-smi got a negative limit ('timeout:
    invalid option'). A preparation with no time left is now skipped, as a step is."""
    pids = tmp_path / "pids"
    hang = tmp_path / "hang"
    hang.write_text(f'#!/bin/sh\necho $$ >>"{pids}"\nexec sleep 600\n')
    hang.chmod(0o755)
    out = tmp_path / "out"
    # T_TOTAL - REPORT_RESERVE - KILL_GRACE - 1 = 0 s: nothing has any time
    env = dict(os.environ, PY=str(hang), OUT=str(out), T_TOTAL="16", REPORT_RESERVE="10")
    try:
        with open(tmp_path / "stdout", "w") as log:
            done = subprocess.run(
                ["bash", str(SCRIPT)], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=90
            )
        started = [int(p) for p in pids.read_text().split()] if pids.exists() else []
        assert not [p for p in started if _alive(p)], "a command was left running"
    finally:
        for pid in [int(p) for p in pids.read_text().split()] if pids.exists() else []:
            if _alive(pid):
                os.kill(pid, 9)
    assert done.returncode == 0
    report = (out / "cuda_report.md").read_text()
    assert "environment facts: skipped" in report, report
    assert "invalid" not in (out / "cuda_checks.log").read_text()
    for name, status in _report_rows(report).items():
        assert status in ("**skipped**", "-"), (name, report)


@pytest.mark.slow
def test_cuda_checks_bounded_gives_a_killed_command_its_second_after_sigkill(tmp_path):
    """bounded waits LIMIT_S + KILL_GRACE + 1 s before calling a command hung, the 1 s
    for a process to end after SIGKILL (a CUDA context takes a moment to tear down). Its
    deadline was taken in whole seconds, so that second shrank to what was left of the
    one it started in: a command killed at its limit and ending 0.6 s after SIGKILL,
    started late in a second, was reported 'hung' (left behind) instead of 137."""
    import time

    bounded = re.search(r"^bounded\(\) \{\n.*?^\}\n", SCRIPT.read_text(), re.S | re.M)
    assert bounded is not None
    stubs = tmp_path / "bin"
    stubs.mkdir()
    timeout = stubs / "timeout"  # killed at the limit, ends 0.6 s after its SIGKILL
    timeout.write_text("#!/bin/sh\ngrace=${1#--kill-after=}\nsleep $(($2 + grace)).6\nexit 137\n")
    timeout.chmod(0o755)
    program = f"KILL_GRACE=5\nT_TOTAL=100\n{bounded.group(0)}bounded 1 {tmp_path}/out true\n"
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}")
    while not 0.7 <= time.time() % 1 < 0.75:  # start late in a second
        time.sleep(0.01)
    done = subprocess.run(["bash", "-c", program], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "137", done


def test_the_class_index_check_runs_after_every_other_cuda_test_of_its_step():
    """A device-side assert is sticky: should the class-index check meet one, every later
    CUDA call of that pytest process fails. cuda_checks.sh's pytest_changed step runs this
    file last (test_per_sample and tests/verify ran after it, in one process), the check
    is this file's last CUDA test, and no plugin reorders the tests (pytest-randomly,
    where installed, shuffled the check before the others)."""
    changed = re.search(r"^CHANGED=\((.*?)\)$", SCRIPT.read_text(), re.M | re.S)
    assert changed is not None
    assert changed.group(1).split()[-1] == "tests/" + Path(__file__).name
    pytest_line = re.search(r"^PYTEST=\((.*?)\)", SCRIPT.read_text(), re.M | re.S)
    assert pytest_line is not None and "-p no:randomly" in pytest_line.group(1)
    cuda_tests = [
        name
        for name, fn in globals().items()
        if name.startswith("test_")
        and any(mark.name == "cuda" for mark in getattr(fn, "pytestmark", []))
    ]
    assert cuda_tests[-1] == (
        "test_cuda_class_index_out_of_range_is_a_clear_error_and_the_device_stays_usable"
    )


def test_pytest_changed_runs_each_sessions_cuda_test_files():
    """Each session's own CUDA test files (``tests/test_cuda_s<N>_*.py``) run in the
    pytest_changed step, before this file: pytest_cuda leaves out only the files of
    CHANGED, so a file missing there would run later, or not at all if time runs out."""
    changed = re.search(r"^CHANGED=\((.*?)\)$", SCRIPT.read_text(), re.M | re.S)
    assert changed is not None
    listed = changed.group(1).split()
    sessions = sorted(
        p.relative_to(SCRIPT.parents[1]).as_posix()
        for p in Path(__file__).parent.glob("test_cuda_s[0-9]*_*.py")
    )
    assert sessions, "no session CUDA test files found"
    for path in sessions:
        assert path in listed, f"{path} is not in cuda_checks.sh's CHANGED"
        assert listed.index(path) < listed.index("tests/" + Path(__file__).name)


def test_cuda_checks_pytest_runs_the_tests_of_a_step_that_has_a_broken_module(tmp_path):
    """pytest (without pytest-xdist, as in pytest_changed) stops at a collection error
    before running any test: one module that fails to import cancelled its whole step,
    every CUDA test of it unrun on the one GPU run."""
    pytest_line = re.search(r"^PYTEST=\(.*?\)", SCRIPT.read_text(), re.M | re.S)
    assert pytest_line is not None
    (tmp_path / "test_broken.py").write_text("import a_module_that_does_not_exist\n")
    (tmp_path / "test_fine.py").write_text(
        "import pytest\n\n\n@pytest.mark.cuda\ndef test_ran():\n    pass\n"
    )
    program = f'read -r -a PY <<<"$PY"\n{pytest_line.group(0)}\n"${{PYTEST[@]}}" "$1"\n'
    env = dict(os.environ, PY=sys.executable)
    done = subprocess.run(
        ["bash", "-c", program, "bash", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "test_fine.py::test_ran PASSED" in done.stdout, done.stdout[-3000:]
