"""The torchbp-verify command: exit codes, usage errors, JSON output, failure detection."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
    # every case by its whole name: rich took "[negative_slope=0.2]" for markup and
    # dropped it, so leaky_relu listed "2d" four times
    for case in cases.CASES:
        assert case.name in out, case.name


def test_every_public_op_has_cases():
    assert cases.unregistered_ops() == []
    for op in cases.op_names():
        assert cases.cases_for(op), op


def test_case_inputs_are_deterministic():
    for case in cases.CASES[:10]:
        a, b = case.inputs(), case.inputs()
        for x, y in zip(a, b):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


# ------------------------------------------------------------------------------------------
# torchbp-verify module:Symbol --inputs SPEC: the user's own Function
# ------------------------------------------------------------------------------------------

CORRECT_FILE = Path(__file__).parent / "correct_functions.py"


def test_target_from_a_file_passes(tmp_path, capsys):
    path = tmp_path / "report.json"
    argv = [f"{CORRECT_FILE}:TextbookTanh", "--inputs", "3,4", "--reference", "torch:tanh"]
    code = cli.main([*argv, "--no-compile", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "TextbookTanh: OK (2 unsupported)" in out and "to add it:" in out
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["meta"]["inputs"][0]["shape"] == [3, 4]


def test_a_target_usage_error_replaces_an_earlier_json_verdict(tmp_path, capsys):
    # before: nothing was written, and the file of an earlier passing run still said
    # "ok": true after a run that checked nothing (exit status 2)
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"ok": True, "checks": []}))
    argv = [f"{CORRECT_FILE}:TextbookTanh", "--inputs", "3,4[1,0]", "--json", str(path)]
    assert cli.main(argv) == 2, capsys.readouterr()
    data = json.loads(path.read_text())
    assert data["ok"] is False and data["checks"] == [], data
    assert "a range is SHAPE[LO,HI]" in data["usage_error"], data


def test_target_with_integer_and_literal_inputs(capsys):
    spec = "4,5;int:4<5;=-100;=0.5"
    code = cli.main([f"{CORRECT_FILE}:PickedLoss", "--inputs", spec, "--no-compile"])
    assert code == 0, capsys.readouterr().out


def test_target_from_a_spec_file(tmp_path, capsys):
    spec = tmp_path / "inputs.txt"
    spec.write_text("# x, target, ignore_index, scale\n4,5\nint:4<5\n\n=-100\n=0.5\n")
    code = cli.main([f"{CORRECT_FILE}:PickedLoss", "--inputs", f"@{spec}", "--no-compile"])
    assert code == 0, capsys.readouterr().out


def test_target_module_import_and_require(capsys):
    # a module:Symbol from an importable module; vmap required but not offered -> exit 1
    argv = ["torch.nn.functional:silu", "--inputs", "3", "--require", "vmap", "--no-compile"]
    assert cli.main(argv) == 0, capsys.readouterr().out
    argv = [f"{CORRECT_FILE}:TextbookTanh", "--inputs", "3", "--require", "vmap,forward_ad"]
    code = cli.main([*argv, "--skip", "compile"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED (2 fail)" in out and "required but unsupported" in out


def test_target_bug_exits_1(tmp_path, capsys):
    module = tmp_path / "buggy_sigmoid.py"
    module.write_text(
        "import torch\n"
        "class BuggySigmoid(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x):\n"
        "        y = torch.sigmoid(x)\n"
        "        ctx.save_for_backward(y)\n"
        "        return y\n"
        "    @staticmethod\n"
        "    def backward(ctx, g):\n"
        "        (y,) = ctx.saved_tensors\n"
        "        return g * y  # forgot (1 - y)\n"
    )
    code = cli.main([f"{module}:BuggySigmoid", "--inputs", "3,4", "--no-compile"])
    out = capsys.readouterr().out
    assert code == 1
    assert "BuggySigmoid: FAILED" in out and "gradcheck [fail]" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["nocolon", "--inputs", "3"], "must look like module:Symbol"),
        (["no_such_module_xyz:f", "--inputs", "3"], "cannot import module 'no_such_module_xyz'"),
        (["torch:no_such_fn", "--inputs", "3"], "has no attribute 'no_such_fn'"),
        (["torch:tanh"], "needs both module:Symbol and --inputs"),
        (["torch:tanh", "--inputs", "3,x"], "a shape is comma-separated sizes"),
        (["torch:tanh", "--inputs", "3;;4"], "empty input"),
        (["torch:tanh", "--inputs", "int:3"], "int:SHAPE<HIGH"),
        (["torch:tanh", "--inputs", "=foo("], "Python literal"),
        (["torch:tanh", "--inputs", "@/no/such/file"], "cannot read the input spec file"),
        (["torch:tanh", "--inputs", "3", "--require", "nope"], "unknown check"),
        (["torch:tanh", "--inputs", "3", "--dtype", "float64,float32"], "one --dtype"),
        (["torch:tanh", "--inputs", "3", "--op", "relu"], "leave it out"),
        # --threads 0 was silently read as 1 for a target (a usage error for the ops)
        (["torch:tanh", "--inputs", "3", "--threads", "0"], "--threads must be at least 1"),
        (["torch:tanh", "--inputs", "3", "--seed", str(2**64)], "seed must be in [-2**63"),
    ],
)
def test_target_usage_errors_exit_2(argv, needle, capsys):
    assert cli.main(argv) == 2
    assert needle in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("import torch\nraise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
        ("def f(:\n", "SyntaxError"),
    ],
)
@pytest.mark.parametrize("as_file", [True, False])
def test_target_module_that_fails_to_import_is_a_usage_error(
    source, needle, as_file, tmp_path, monkeypatch, capsys
):
    # exit 2 with the module's error in one line, not a traceback (exit 1: "a check failed"),
    # and no half-run module left behind in sys.modules
    (tmp_path / "broken_target.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    target = "broken_target.py:f" if as_file else "broken_target:f"
    assert cli.main([target, "--inputs", "3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot import" in err and needle in err, err
    assert "broken_target" not in sys.modules


def test_target_json_is_strict_json_with_a_non_finite_literal(tmp_path, capsys):
    path = tmp_path / "report.json"
    argv = ["torch:clamp", "--inputs", "3;=-1e999", "--no-compile", "--json", str(path)]
    assert cli.main(argv) == 0, capsys.readouterr().out

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["meta"]["inputs"][1] == "-inf"


TWINS_FILE = Path(__file__).parent / "real_world_twins.py"


@pytest.mark.parametrize(
    ("target", "reference", "code"),
    [
        ("CausalScoresAdditiveMask", None, 0),
        ("CausalScoresAdditiveMask", "additive_causal_scores_reference", 0),
        ("CausalScoresUnmaskedGradient", None, 0),
        ("CausalScoresUnmaskedGradient", "causal_scores_reference", 1),
    ],
)
def test_a_constant_infinity_s_derivatives_left_out_show_in_the_table_and_json(
    target, reference, code, tmp_path, capsys
):
    # the masked scores' derivatives (-inf at and near the inputs) are left out of the
    # central-difference checks, which pass "not all compared"; the reference decides them
    path = tmp_path / "report.json"
    argv = [f"{TWINS_FILE}:{target}", "--inputs", "4,3;4,3", "--no-compile"]
    skip = ",".join(c for c in cli.CHECKS if c not in ("forward", "gradcheck", "reference"))
    argv += ["--skip", skip, "--json", str(path)]
    if reference:
        argv += ["--reference", f"{TWINS_FILE}:{reference}"]
    assert cli.main(argv) == code
    out = " ".join(capsys.readouterr().out.split())
    assert "gradcheck [pass, not all compared]: 6 element(s) of output 0" in out, out
    caveat = {c["name"]: c["caveat"] for c in json.loads(path.read_text())["checks"]}
    assert "derivatives were not compared" in caveat["gradcheck"], caveat
    decided = "the reference check decides them" if reference else "give a reference"
    assert decided in caveat["gradcheck"], caveat


def test_skip_leaves_checks_out_of_the_ops_run(tmp_path, capsys):
    # --skip was honoured only for a target: torchbp's ops ran every check anyway
    path = tmp_path / "out.json"
    argv = ["--op", "relu", "--dtype", "float64", "--no-progress", "--no-compile"]
    code = cli.main([*argv, "--skip", "gradcheck,vmap", "--skip", "mutation", "--json", str(path)])
    assert code == 0, capsys.readouterr().out
    ran = {c["name"] for r in json.loads(path.read_text())["results"] for c in r["checks"]}
    assert ran and not ran & {"gradcheck", "vmap", "mutation"}
    assert "forward" in ran and "gradgradcheck" in ran


def test_skip_of_every_check_of_a_dtype_runs_forward_only(tmp_path, capsys):
    path = tmp_path / "out.json"
    argv = ["--op", "relu", "--dtype", "bfloat16", "--no-progress", "--json", str(path)]
    skip = ",".join(c for c in cli.CHECKS if c != "forward")
    assert cli.main([*argv, "--skip", skip]) == 0, capsys.readouterr().out
    ran = {c["name"] for r in json.loads(path.read_text())["results"] for c in r["checks"]}
    assert ran == {"forward"}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--skip", "nope"], "unknown check nope; valid checks: forward, gradcheck"),
        # target-only options were silently ignored without a target
        (["--reference", "torch:tanh"], "--reference applies only to a target"),
        (["--require", "vmap"], "--require applies only to a target"),
        (["--seed", "3"], "--seed applies only to a target"),
    ],
)
def test_ops_run_usage_errors_exit_2(argv, needle, capsys):
    assert cli.main(["--op", "relu", "--no-progress", *argv]) == 2
    assert needle in " ".join(capsys.readouterr().err.split())


def test_float32_module_target_is_told_the_dtype_option(tmp_path, monkeypatch, capsys):
    # check_function's advice 'pass dtype=None' has no command-line spelling: before, the
    # CLI repeated it; now it names --dtype
    (tmp_path / "hunt_model.py").write_text(
        "import torch\nmodel = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "hunt_model", raising=False)
    argv = ["hunt_model.py:model", "--inputs", "2,4", "--no-compile"]
    assert cli.main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--dtype float32" in err and "dtype=None" not in err, err
    assert cli.main([*argv, "--dtype", "float32"]) == 0, capsys.readouterr()


def test_a_module_class_target_is_told_to_name_an_instance(tmp_path, monkeypatch, capsys):
    # before: check_function's advice "pass an instance, e.g. Layer()", which has no
    # command-line spelling
    (tmp_path / "hunt_layer.py").write_text(
        "import torch\nclass Layer(torch.nn.Linear):\n"
        "    def __init__(self):\n        super().__init__(4, 3, dtype=torch.float64)\n"
        "layer = Layer()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "hunt_layer", raising=False)
    argv = ["--inputs", "2,4", "--no-compile", "--no-progress"]
    assert cli.main(["hunt_layer.py:Layer", *argv]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "nn.Module class Layer, which the command line cannot construct" in err, err
    assert "hunt_layer.py:layer" in err and "e.g. Layer()" not in err, err
    assert cli.main(["hunt_layer.py:layer", *argv]) == 0, capsys.readouterr()
    reference = ["--reference", "torch.nn:Linear"]
    assert cli.main(["hunt_layer.py:layer", *argv, *reference]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the reference torch.nn:Linear is the nn.Module class Linear" in err, err
    assert "make an instance in a file" in err and "(file.py:layer)" in err, err


@pytest.mark.parametrize("where", ["missing_folder", "a_folder", "under_a_file"])
def test_json_path_that_cannot_be_written_is_refused_before_any_check(
    tmp_path, capsys, where, monkeypatch
):
    """``--json`` into a folder that does not exist ran every check (13 s for the full run)
    and only then failed, losing the results; it is now a usage error up front."""
    (tmp_path / "file").write_text("")
    path = {
        "missing_folder": tmp_path / "nope" / "out.json",
        "a_folder": tmp_path,
        "under_a_file": tmp_path / "file" / "out.json",
    }[where]
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("checks ran"))
    code = cli.main(["--op", "relu", "--dtype", "float64", "--no-progress", "--json", str(path)])
    assert code == 2
    assert f"torchbp-verify: error: cannot write {path}" in capsys.readouterr().err


@pytest.mark.parametrize("op", ["relu[x]", "relu[/x]"])
def test_usage_error_shows_the_argument_verbatim_on_one_line(op, capsys):
    """Errors were printed as rich markup: ``--op relu[x]`` was reported as "unknown op
    relu" (the bracket text eaten as a style tag), ``relu[/x]`` crashed with rich's
    MarkupError (exit 1, a traceback), and a long message was wrapped at 80 columns."""
    assert cli.main(["--op", op, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"torchbp-verify: error: unknown op {op}; valid ops: linear"), err
    assert err.count("\n") == 1, err


def test_failure_message_with_brackets_is_printed_verbatim(monkeypatch, capsys):
    """A check's message is text, not rich markup: a bracket in it ("[/x]") crashed the
    table printing with MarkupError after every check had run."""

    def broken(x):
        raise RuntimeError("bad [x] value [/x]")

    monkeypatch.setattr(torchbp.functional, "tanh", broken)
    code = cli.main(["--op", "tanh", "--dtype", "float64", "--no-compile", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    assert "RuntimeError: bad [x] value [/x]" in out, out


def test_a_large_module_target_is_checked_by_random_projections_unless_told(tmp_path, capsys):
    # check_function's default for an nn.Module of over 4096 parameter elements; before,
    # the command line always passed fast_mode=False: full Jacobians, minutes for an MLP
    target = tmp_path / "large.py"
    target.write_text("import torch\n\nmodel = torch.nn.Linear(80, 64).double()\n")
    path = tmp_path / "report.json"
    others = [c for c in cli.CHECKS if c not in ("forward", "gradcheck")]
    argv = [f"{target}:model", "--inputs", "2,80", "--skip", ",".join(others)]
    assert cli.main([*argv, "--json", str(path)]) == 0, capsys.readouterr().out
    assert json.loads(path.read_text())["meta"]["fast_mode"] is True


SCALE_BY_CONSTANT = (
    "import torch\n"
    "class ScaleByConstant(torch.autograd.Function):\n"
    "    '''x * s with s a constant: backward gives s no gradient.'''\n"
    "    @staticmethod\n"
    "    def forward(ctx, x, s):\n"
    "        ctx.save_for_backward(s)\n"
    "        return x * s\n"
    "    @staticmethod\n"
    "    def backward(ctx, g):\n"
    "        (s,) = ctx.saved_tensors\n"
    "        return g * s, None\n"
)


def test_grad_inputs_leaves_an_input_out_of_the_target_check(tmp_path, capsys):
    # check_function's grad_inputs had no command-line form: a Function that gives a
    # constant input no gradient could not be checked from the CLI at all
    module = tmp_path / "scale_by_constant.py"
    module.write_text(SCALE_BY_CONSTANT)
    argv = [f"{module}:ScaleByConstant", "--inputs", "3,4;4", "--no-compile"]
    assert cli.main(argv) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "--grad-inputs 0" in out and "grad_inputs=(0,)" not in out
    path = tmp_path / "report.json"
    assert cli.main([*argv, "--grad-inputs", "0", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["meta"]["grad_inputs"] == [0]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("3", "--grad-inputs '3': there is no input 3; --inputs gives 3 input(s), positions 0"),
        ("-4", "there is no input -4"),
        ("0,x", "--grad-inputs '0,x': an input position is an integer"),
        ("0,", "--grad-inputs '0,': give input positions separated by commas"),
        ("", "give input positions separated by commas"),
        ("0,-3", "--grad-inputs '0,-3': input 0 is named twice"),
        ("1", "--grad-inputs '1': input 1 is a torch.int64 tensor, which cannot require"),
        ("2", "input 2 is a Python value, which cannot require gradients"),
    ],
)
def test_bad_grad_inputs_is_a_usage_error_naming_the_flag(spec, needle, capsys):
    argv = [f"{CORRECT_FILE}:PickedLoss", "--inputs", "4,5;int:4<5;=-100", "--no-compile"]
    assert cli.main([*argv, "--grad-inputs", spec]) == 2
    assert needle in " ".join(capsys.readouterr().err.split())


def test_grad_inputs_applies_only_to_a_target(capsys):
    assert cli.main(["--op", "relu", "--no-progress", "--grad-inputs", "0"]) == 2
    assert "--grad-inputs applies only to a target" in " ".join(capsys.readouterr().err.split())


def test_help_describes_grad_inputs(capsys):
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--grad-inputs I,J" in out and "inputs to differentiate" in out


def test_a_float32_input_runs_reference_dtype_from_the_command_line(tmp_path, capsys):
    # before: 'float32:3,4' was a usage error, and --dtype float32 casts to float32 for
    # every check, so no check compared the float32 backward with a float64 reference
    module = tmp_path / "float32_branch.py"
    module.write_text(
        "import torch\n"
        "class HalfGradInFloat32(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x):\n"
        "        ctx.save_for_backward(x)\n"
        "        return x * x\n"
        "    @staticmethod\n"
        "    def backward(ctx, g):\n"
        "        (x,) = ctx.saved_tensors\n"
        "        # d x^2/dx = 2x, but halved in float32\n"
        "        return g * x * (1.0 if x.dtype == torch.float32 else 2.0)\n"
    )
    argv = [f"{module}:HalfGradInFloat32", "--inputs", "float32:3,4", "--no-compile"]
    code = cli.main([*argv, "--reference", "torch:square"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "reference_dtype [fail]: in float32 (the inputs' own dtype)" in out
    assert "gradcheck  " in out and "gradcheck [" not in out  # float64 checks still ran


ROUND_STE = (
    "import torch\n"
    "class RoundSTE(torch.autograd.Function):\n"
    "    @staticmethod\n"
    "    def forward(ctx, x):\n"
    "        return torch.round(x)\n"
    "    @staticmethod\n"
    "    def backward(ctx, g):\n"
    "        return g\n"
    "class Argmax(torch.autograd.Function):\n"
    "    @staticmethod\n"
    "    def forward(ctx, x):\n"
    "        return x.argmax(-1)\n"
    "    @staticmethod\n"
    "    def backward(ctx, g):\n"
    "        return None\n"
)


def test_a_target_report_advises_the_command_line_flags(tmp_path, capsys):
    # before: the CLI printed check_function's Python advice ("skip=['gradcheck']",
    # "pass reference= a function"), which the shell user cannot type
    module = tmp_path / "round_ste.py"
    module.write_text(ROUND_STE)
    assert cli.main([f"{module}:RoundSTE", "--inputs", "4,5", "--no-compile"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "leave it out with --skip gradcheck" in out, out
    assert "pass --reference module:Symbol naming a function" in out, out
    assert "skip=[" not in out and "reference=" not in out, out


def test_a_target_with_only_integer_outputs_is_a_usage_error(tmp_path, capsys):
    # before: a forward failure "fn returned no floating-point tensor (got Tensor)", as
    # though the argmax-like Function were broken; torch's gradcheck passes it silently
    module = tmp_path / "argmax_fn.py"
    module.write_text(ROUND_STE)
    assert cli.main([f"{module}:Argmax", "--inputs", "4,5", "--no-compile"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "fn returned only integer or bool tensors (torch.int64 of shape (4,))" in err, err


TANH_IN_FLOAT32 = (
    "import torch\n"
    "class TanhInFloat32(torch.autograd.Function):\n"
    "    @staticmethod\n"
    "    def forward(ctx, x):\n"
    "        ctx.save_for_backward(x)\n"
    "        return torch.tanh(x.float()).to(x.dtype)\n"
    "    @staticmethod\n"
    "    def backward(ctx, g):\n"
    "        (x,) = ctx.saved_tensors\n"
    "        return g * (1 - torch.tanh(x) ** 2)\n"
)


def test_the_advised_larger_eps_has_a_flag(tmp_path, capsys):
    # before: "pass a larger eps" had no command-line form (check_function's eps, atol,
    # rtol, nondet_tol, parity_atol and parity_rtol had no flags)
    module = tmp_path / "tanh_in_float32.py"
    module.write_text(TANH_IN_FLOAT32)
    argv = [f"{module}:TanhInFloat32", "--inputs", "float32:4,5", "--no-compile"]
    assert cli.main([*argv, "--skip", "reference_dtype"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "or pass a larger --eps" in out, out
    assert cli.main([*argv, "--skip", "reference_dtype", "--eps", "1e-3"]) == 0, capsys.readouterr()


def test_a_tolerance_flag_applies_only_to_a_target(capsys):
    assert cli.main(["--op", "relu", "--no-progress", "--nondet-tol", "1e-9"]) == 2
    assert "--nondet-tol applies only to a target" in capsys.readouterr().err


RELU_RUN = ["--op", "relu", "--dtype", "float64", "--no-compile", "--no-progress"]


def _results_file(path: Path) -> dict:
    """The --json file, parsed (a truncated file fails the test)."""
    return json.loads(path.read_text())


def test_json_holds_every_finished_case_run_while_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """--json was written only at the end, so a run killed at a time limit (the CUDA
    script gives torchbp-verify 60 s) left no verdict at all; the file is now valid after
    every finished case run, complete: false until the last."""
    path = tmp_path / "out.json"
    path.write_text('{"ok": true, "complete": true}')  # a previous run's file
    seen = []

    def check_function(*args, **kwargs):
        data = _results_file(path)
        seen.append((len(data["results"]), data["complete"], data["ok"]))
        return real(*args, **kwargs)

    real = cli.check_function
    monkeypatch.setattr(cli, "check_function", check_function)
    assert cli.main([*RELU_RUN, "--json", str(path)]) == 0, capsys.readouterr().out
    assert seen == [(k, False, False) for k in range(len(seen))] and len(seen) > 1
    text = path.read_text()
    data = json.loads(text)
    assert data["complete"] is True and data["ok"] is True
    assert len(data["results"]) == data["planned_case_runs"] == len(seen)
    assert data["summary"].startswith("ALL PASSED: 1 ops")
    assert text == json.dumps(data, indent=1)  # as json.dump writes it, indent and all
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left


def _main_not_interrupted(argv: list[str]) -> int:
    """cli.main's exit status; a test failure if Ctrl-C escapes it (it would stop pytest)."""
    try:
        return cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped torchbp-verify's main")


def test_ctrl_c_keeps_the_finished_case_runs_and_exits_130(tmp_path, monkeypatch, capsys):
    path = tmp_path / "out.json"
    calls = []

    def check_function(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = cli.check_function
    monkeypatch.setattr(cli, "check_function", check_function)
    assert _main_not_interrupted([*RELU_RUN, "--json", str(path)]) == cli.INTERRUPTED == 130
    out, err = capsys.readouterr()
    data = _results_file(path)
    planned = data["planned_case_runs"]
    assert data["complete"] is False and data["ok"] is False and len(data["results"]) == 1
    assert data["results"][0]["op"] == "relu" and planned > 1
    summary = f"INCOMPLETE (1 of {planned} case runs finished, no check failed so far)"
    assert data["summary"].startswith(summary) and summary in out, out
    assert "relu (cpu)" in out  # the table of what finished
    assert f"torchbp-verify: interrupted after 1 of {planned} case runs" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_ctrl_c_while_checking_a_target_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "check_function", interrupted)
    assert _main_not_interrupted(["torch:tanh", "--inputs", "3", "--no-compile"]) == 130
    assert "torchbp-verify: interrupted" in capsys.readouterr().err


def test_a_failed_rewrite_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    path.write_text('{"results": []}')

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cli.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        cli._write_atomically(str(path), '{"results": [1, 2]}')
    assert path.read_text() == '{"results": []}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.slow
@pytest.mark.parametrize(("signal_name", "exit_code"), [("SIGKILL", -9), ("SIGINT", 130)])
def test_a_run_killed_midway_leaves_valid_json_of_its_finished_cases(
    tmp_path, signal_name, exit_code
):
    """The CUDA script's time limit kills torchbp-verify (SIGTERM, then SIGKILL); Ctrl-C
    is SIGINT. Either way the file holds the case runs that finished."""
    import signal
    import subprocess
    import time

    path = tmp_path / "out.json"
    argv = ["--op", "relu,sigmoid,tanh", "--no-compile", "--no-progress", "--json", str(path)]
    # Ctrl-C's KeyboardInterrupt also where pytest runs in the background (a shell
    # starts background jobs with SIGINT ignored, which Python then leaves ignored)
    cli_with_ctrl_c = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from torchbp.verify.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", cli_with_ctrl_c, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and _results_file(path)["results"]):
            assert proc.poll() is None and time.monotonic() < deadline, "no result written"
            time.sleep(0.02)
        proc.send_signal(getattr(signal, signal_name))
        assert proc.wait(timeout=60) == exit_code
    finally:
        proc.kill()
    data = _results_file(path)
    assert data["complete"] is False and data["ok"] is False
    assert 1 <= len(data["results"]) < data["planned_case_runs"]
    assert all(r["ok"] for r in data["results"]), data["summary"]
