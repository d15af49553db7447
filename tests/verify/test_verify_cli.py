"""The torchbp-verify command: exit codes, usage errors, JSON output, failure detection."""

from __future__ import annotations

import json

import pytest
import torch

import torchbp.functional
from torchbp.verify import cases, cli


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_small_run_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    code = cli.main(
        [
            "--op",
            "relu",
            "--op",
            "sigmoid",
            "--dtype",
            "float64",
            "--no-progress",
            "--json",
            str(path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ALL PASSED" in out and "relu (cpu)" in out and "gradcheck" in out
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["counts"]["fail"] == 0
    ops = {r["op"] for r in data["results"]}
    assert ops == {"relu", "sigmoid"}
    assert all(r["device"] == "cpu" and r["dtype"] == "float64" for r in data["results"])
    first = data["results"][0]
    assert {"name", "ok", "checks", "meta", "case"} <= set(first)


def test_low_precision_and_fast_mode(capsys):
    code = cli.main(["--op", "softmax", "--dtype", "bfloat16,float64", "--fast", "--no-progress"])
    assert code == 0, capsys.readouterr().out


def test_a_broken_op_makes_exit_status_1(monkeypatch, capsys):
    monkeypatch.setattr(torchbp.functional, "tanh", lambda x: torch.tanh(x) * 1.01)
    code = cli.main(["--op", "tanh", "--dtype", "float64", "--no-compile", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "reference" in out and "differs from the reference" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--op", "not_an_op"], "unknown op not_an_op; valid ops: linear, sigmoid"),
        (["--device", "tpu"], "unknown device tpu; valid devices: cpu, cuda"),
        (["--dtype", "int8"], "unknown dtype int8; valid dtypes: float64"),
        (["--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_usage_errors_exit_2_with_valid_names(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err.replace("\n", " ")


def test_unknown_flag_exits_2(capsys):
    assert cli.main(["--bogus"]) == 2


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "torchbp-verify" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_usage_error(capsys):
    assert cli.main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "no CUDA GPU is available" in err and "--device cpu" in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run(tmp_path):
    path = tmp_path / "cuda.json"
    code = cli.main(
        [
            "--device",
            "cuda",
            "--op",
            "cross_entropy",
            "--op",
            "linear",
            "--no-progress",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    assert json.loads(path.read_text())["device_names"]["cuda"]


def test_list(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for op in cases.op_names():
        assert op in out


def test_every_public_op_has_cases():
    assert cases.unregistered_ops() == []
    for op in cases.op_names():
        assert cases.cases_for(op), op


def test_case_inputs_are_deterministic():
    for case in cases.CASES[:10]:
        a, b = case.inputs(), case.inputs()
        for x, y in zip(a, b):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
