"""``torchbp-train`` end to end: run folder, reproducibility, resume, interrupts, bad configs,
DDP on CPU, checkpoint portability between backends, every shipped config. The CLI's parts
(bundled configs, messages, run logger) are tested on their own in test_cli_parts.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning import Trainer
from tests.lightning.lightning_helpers import (
    CONFIGS,
    REPO,
    cli_command,
    epoch_series,
    read_metrics,
    run_cli,
    subprocess_env,
)

from torchbp.lightning import ERMClassifier
from torchbp.lightning.checkpoint_files import INTERRUPTED_SUFFIX

DIGITS = str(CONFIGS / "digits.yaml")


def fit_digits(run_dir: Path, *extra: str):
    return run_cli("fit", "--config", DIGITS, f"--run_dir={run_dir}", *extra)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 2-epoch digits run shared by several tests."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("short")
    fit_digits(root, "--trainer.max_epochs=2")
    return root / "digits" / "version_0"


def test_fit_writes_run_folder_and_tests_best_checkpoint(short_run, capsys):
    assert (short_run / "config.yaml").is_file()
    cfg = yaml.safe_load((short_run / "config.yaml").read_text())
    assert cfg["seed_everything"] == 0 and cfg["model"]["backend"] == "torchbp"
    hp = yaml.safe_load((short_run / "hparams.yaml").read_text())
    assert hp["input_size"] == 64 and hp["num_classes"] == 10  # linked from the DataModule
    ckpts = sorted(p.name for p in (short_run / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(n.startswith("epoch") for n in ckpts)
    rows = read_metrics(short_run / "metrics.csv")
    for key in ("train/loss", "val/loss", "val/acc", "val/error", "val/f1"):
        assert len(epoch_series(rows, key)) == 2, key
    test = [r for r in rows if "test/acc" in r]
    assert len(test) == 1
    assert test[0]["test/error"] == pytest.approx(1 - test[0]["test/acc"], abs=1e-6)
    assert test[0]["test/acc"] > 0.85


def test_same_seed_gives_identical_metrics(tmp_path):
    for name in ("a", "b"):
        fit_digits(tmp_path, "--trainer.max_epochs=3", f"--run_name={name}")
    a = read_metrics(tmp_path / "a/version_0/metrics.csv")
    b = read_metrics(tmp_path / "b/version_0/metrics.csv")
    assert a == b and len(a) > 0


def test_resume_from_last_matches_uninterrupted(tmp_path):
    fit_digits(tmp_path, "--trainer.max_epochs=4", "--run_name=full")
    fit_digits(tmp_path, "--trainer.max_epochs=2", "--run_name=resumed")
    fit_digits(tmp_path, "--trainer.max_epochs=4", "--run_name=resumed", "--ckpt_path=last")
    assert not (tmp_path / "resumed/version_1").exists()  # resumed in the same run folder
    full = read_metrics(tmp_path / "full/version_0/metrics.csv")
    res = read_metrics(tmp_path / "resumed/version_0/metrics.csv")
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert epoch_series(full, key) == epoch_series(res, key), key
    final = lambda rows: [r for r in rows if "test/acc" in r][-1]  # noqa: E731
    assert final(full) == final(res)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.activation=swish"], "swish"),
        (["--model.hidden_sizes=[64, -3]"], "hidden_sizes must be positive integers"),
        (["--model.optimizer.init_args.lr=-0.5"], "invalid optimizer arguments"),
        (["--model.optimizer.init_args.betas=[1.5, 0.9]"], "invalid optimizer arguments"),
        (["--model.optimizer.init_args.momentum=0.9"], "momentum"),  # Adam has no momentum
        (["--data.init_args.val_fraction=1.5"], "val_fraction must be in (0, 1)"),
        # a ValueError traceback from Lightning's seed_everything (numpy's seed range)
        (["--seed_everything=-1"], "seed_everything must be true, false or an int in"),
        (["--seed_everything=4294967296"], "[0, 4294967295], got 4294967296"),
        # Lightning's Trainer takes these; the fit failed with a ZeroDivisionError traceback
        (["--trainer.accumulate_grad_batches=0"], "accumulate_grad_batches must be an int >= 1"),
        (["--trainer.check_val_every_n_epoch=0"], "check_val_every_n_epoch must be an int >= 1"),
        (["--trainer.val_check_interval=0"], "val_check_interval must be an int >= 1"),
        # a fraction of no batch: Lightning validated after every batch without a word
        (["--trainer.val_check_interval=0.0"], "fraction of the epoch in (0, 1], got 0.0"),
        # Lightning stopped at the maximum without a word
        (["--trainer.min_epochs=3", "--trainer.max_epochs=2"], "min_epochs=3 is above"),
        (["--trainer.min_steps=9", "--trainer.max_steps=4"], "min_steps=9 is above"),
        # Lightning clips only above 0: a negative value trained unclipped, NaN gave NaN grads
        (["--trainer.gradient_clip_val=-1.0"], "gradient_clip_val must be >= 0"),
        (["--trainer.gradient_clip_val=.nan"], "gradient_clip_val must be >= 0"),
    ],
)
def test_invalid_config_is_a_cli_error_before_training(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        fit_digits(tmp_path, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))


@pytest.mark.parametrize("name", ["../escaped", "nested/name", "/abs/name", "..", "."])
def test_a_run_name_that_is_a_path_is_a_cli_error(tmp_path, capsys, name):
    """``--run_name ../escaped`` wrote the run outside ``--run_dir``; ``nested/name`` ran in
    runs/nested/name but its config.yaml saved run_name ``name``, so running that config
    again went to runs/name."""
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        run_cli("fit", f"--run_dir={runs}", f"--run_name={name}", "--trainer.max_epochs=1")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: invalid configuration: run_name must be one folder name" in err, err
    assert repr(name) in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("config.yaml"))


def test_parse_error_starts_with_its_cause(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--model.hidden_sizes", "oops", f"--run_dir={tmp_path}")
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("error: model.hidden_sizes: ") and "oops" in lines[0], lines
    assert len(lines) <= 3 and not any(line.startswith("usage:") for line in lines), lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_accelerator_without_gpu_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fit_digits(tmp_path, "--trainer.accelerator=cuda")
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "CUDAAccelerator" in errors[0], err
    assert errors[0].startswith("error: invalid configuration: ") and "Traceback" not in err
    assert err.strip().splitlines()[-1] == errors[0]


def test_missing_data_file_is_a_data_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(
            "fit",
            "--data=torchbp.lightning.data.TabularFileDataModule",
            f"--data.path={tmp_path / 'nope.csv'}",
            f"--run_dir={tmp_path}",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: data problem: data file not found: {tmp_path / 'nope.csv'}\n" in err, err
    assert "invalid configuration" not in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))


def test_missing_label_column_is_a_cli_error(tmp_path, capsys):
    csv = tmp_path / "data.csv"
    csv.write_text("a,b,cls\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(60)))
    with pytest.raises(SystemExit) as e:
        run_cli(
            "fit",
            "--data=torchbp.lightning.data.TabularFileDataModule",
            f"--data.path={csv}",
            "--data.label_column=label",
            f"--run_dir={tmp_path}",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: data problem: label column 'label' not found" in err and "a, b, cls" in err
    # and the same file trains with the right column
    run_cli(
        "fit",
        "--data=torchbp.lightning.data.TabularFileDataModule",
        f"--data.path={csv}",
        "--data.label_column=cls",
        "--trainer.max_epochs=1",
        f"--run_dir={tmp_path}",
        "--run_name=tab",
    )
    assert (tmp_path / "tab/version_0/checkpoints/last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_fit_leaves_loadable_checkpoint(tmp_path, sig):
    cmd = cli_command(
        "fit",
        "--config",
        DIGITS,
        f"--run_dir={tmp_path}",
        "--trainer.max_epochs=100000",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    )
    # A child inherits an ignored SIGINT (as in a test run started in the background with
    # nohup), and Python then installs no Ctrl-C handler: let the child see SIGINT as a
    # terminal would deliver it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    ckpt_dir = tmp_path / "digits/version_0/checkpoints"
    deadline = time.time() + 120
    try:
        while not (ckpt_dir / "last.ckpt").is_file():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        time.sleep(0.5)  # now mid-training
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Ctrl-C exits with 1; Lightning treats SIGTERM as a graceful stop (SystemExit)
    if sig == signal.SIGINT:
        assert proc.returncode != 0, out
    assert "Received SIGTERM" in out or "KeyboardInterrupt" in out, out
    assert "test metrics" not in out  # no test after an interrupted fit
    ckpts = list(ckpt_dir.glob("*.ckpt"))
    assert ckpts
    for p in ckpts:
        ck = torch.load(p, map_location="cpu", weights_only=False)
        assert "state_dict" in ck and "epoch" in ck
    model = ERMClassifier.load_from_checkpoint(ckpt_dir / "last.ckpt", weights_only=False)
    assert model(torch.randn(3, 64)).shape == (3, 10)


def test_torchbp_checkpoint_loads_into_torch_backend(short_run):
    import torchbp.nn

    ckpt = short_run / "checkpoints/last.ckpt"
    a = ERMClassifier.load_from_checkpoint(ckpt, weights_only=False).eval()
    b = ERMClassifier.load_from_checkpoint(ckpt, backend="torch", weights_only=False).eval()
    assert type(a.net[0]) is torchbp.nn.Linear and type(b.net[0]) is torch.nn.Linear
    from torchbp.lightning import DigitsDataModule

    x, _ = DigitsDataModule().splits["test"].tensors
    with torch.no_grad():
        pa, pb = a(x), b(x)
    torch.testing.assert_close(pa, pb)
    assert torch.equal(pa.argmax(1), pb.argmax(1))


def test_test_and_predict_subcommands(short_run, tmp_path):
    ckpt = str(short_run / "checkpoints/last.ckpt")
    cli = run_cli("test", "--config", DIGITS, f"--run_dir={tmp_path}", f"--ckpt_path={ckpt}")
    assert cli.trainer.callback_metrics["test/acc"] > 0.85
    cli = run_cli("predict", "--config", DIGITS, f"--run_dir={tmp_path}", f"--ckpt_path={ckpt}")
    assert cli.trainer.predict_loop.predictions is not None


@pytest.mark.parametrize(
    "config", sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.name != "ddp_cpu.yaml")
)
def test_every_config_runs(tmp_path, config):
    run_cli(
        "fit",
        "--config",
        config,  # a bundled config, by name
        f"--run_dir={tmp_path}",
        "--trainer.fast_dev_run=2",
        "--trainer.accelerator=cpu",
    )


def test_ddp_config_parses(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", str(CONFIGS / "ddp_cpu.yaml"), "--print_config")
    assert e.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["devices"] == 2
    assert cfg["trainer"]["strategy"]["init_args"]["process_group_backend"] == "gloo"


def test_predict_under_ddp_is_a_cli_error_before_it_starts(tmp_path, capsys):
    """``predict --config ddp_cpu`` launched two processes, predicted every row, then wrote
    no predictions.csv (each process holds a shard), leaving a run folder without them."""
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        run_cli("predict", "--config", "ddp_cpu", f"--run_dir={runs}")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: invalid configuration: predict writes predictions.csv from one process" in err
    assert not runs.exists()


def test_poisson_sampling_under_ddp_is_a_cli_error_before_it_starts(tmp_path, capsys):
    """``fit --config ddp_cpu --data.init_args.poisson_sampling=true`` launched two
    processes, each failing in Lightning's sampler injection (a traceback, a run folder
    left); the Poisson draws are not sharded by rank."""
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        run_cli(
            "fit",
            "--config",
            "ddp_cpu",
            "--data.init_args.poisson_sampling=true",
            f"--run_dir={runs}",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: invalid data configuration: poisson_sampling: true draws every" in err
    assert not runs.exists()


# DDP on CPU: EpochSeededSampler gives rank r the samples order[r::2] of the single-process
# order, so with the same global batch (2 x 32 vs 1 x 64) both runs see the same batches and
# DDP's averaged gradient equals the single-process mean-loss gradient: the curves agree up to
# float32 summation order.
DDP_TOL = 1e-4  # max |difference| of per-epoch train/loss, val/loss; val/acc must be equal


@pytest.mark.slow
def test_ddp_cpu_two_processes_matches_single_process(tmp_path):
    common = [
        "--trainer.max_epochs=3",
        # 1797 rows -> 1168 train / 270 val / 359 test: even splits, so no sampler padding
        "--data.init_args.val_fraction=0.1503",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--run_dir={tmp_path}",
    ]
    cmd = cli_command("fit", "--config", str(CONFIGS / "ddp_cpu.yaml"), "--run_name=ddp", *common)
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_cli(
        "fit",
        "--config",
        str(CONFIGS / "ddp_cpu.yaml"),
        "--run_name=single",
        "--trainer.devices=1",
        "--trainer.strategy=auto",
        "--data.init_args.batch_size=64",
        *common[:3],
        f"--run_dir={tmp_path}",
    )
    ddp = read_metrics(tmp_path / "ddp/version_0/metrics.csv")
    one = read_metrics(tmp_path / "single/version_0/metrics.csv")
    for key in ("train/loss", "val/loss"):
        a, b = epoch_series(ddp, key), epoch_series(one, key)
        assert len(a) == len(b) == 3
        diff = max(abs(x - y) for x, y in zip(a, b))
        print(f"DDP vs single process, max |diff| of per-epoch {key}: {diff:.2e}")
        assert diff < DDP_TOL, (key, a, b, diff)
    assert epoch_series(ddp, "val/acc") == epoch_series(one, "val/acc")


@pytest.mark.slow
def test_main_job_reaches_97_percent(tmp_path):
    """The README's main job, unchanged: test accuracy >= 0.97."""
    fit_digits(tmp_path)
    rows = read_metrics(tmp_path / "digits/version_0/metrics.csv")
    test = [r for r in rows if "test/acc" in r][-1]
    assert test["test/acc"] >= 0.97, test


@pytest.mark.skipif(
    not (REPO / "configs").is_symlink(),
    reason="no configs/ link here (an sdist cannot hold one): the README's configs/ is the "
    "repository's",
)
def test_readme_command_uses_the_bundled_configs():
    """``torchbp-train fit --config configs/digits.yaml`` (the README) reads the bundled file:
    the repository's configs/ links to the package's, so there is one copy."""
    assert (REPO / "configs").resolve() == CONFIGS.resolve()
    assert (REPO / "configs/digits.yaml").read_text() == (CONFIGS / "digits.yaml").read_text()


def test_fit_without_config_from_another_folder_runs_the_main_job(tmp_path):
    """A bare ``torchbp-train fit`` (here shortened to 2 epochs) in a folder with no configs
    trains and tests the bundled digits model, and prints no warning a user cannot act on."""
    cmd = cli_command(
        "fit",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    )
    out = subprocess.run(
        cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "test metrics" in out.stdout
    run = tmp_path / "runs/digits/version_0"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["class_path"] == "torchbp.lightning.data.DigitsDataModule"
    assert cfg["model"]["hidden_sizes"] == [256] and cfg["trainer"]["max_epochs"] == 2
    assert [r for r in read_metrics(run / "metrics.csv") if "test/acc" in r][-1]["test/acc"] > 0.9
    shown = out.stdout + out.stderr
    for noise in ("LeafSpec", "litlogger"):
        assert noise not in shown, shown


def test_bf16_mixed_precision_trains(tmp_path):
    """The CUDA command uses ``--trainer.precision bf16-mixed``; CPU autocast exercises the same
    code path (low-precision Linear, float32 loss and metrics)."""
    cli = fit_digits(
        tmp_path, "--trainer.precision=bf16-mixed", "--trainer.max_epochs=2", "--run_name=bf16"
    )
    assert cli.trainer.precision == "bf16-mixed"
    rows = read_metrics(tmp_path / "bf16/version_0/metrics.csv")
    losses = epoch_series(rows, "train/loss")
    assert len(losses) == 2 and losses[1] < losses[0]
    assert [r for r in rows if "test/acc" in r][-1]["test/acc"] > 0.8


def _copy_of_run(short_run: Path, run_dir: Path) -> Path:
    """A copy of the shared 2-epoch run as ``run_dir/digits/version_0`` (left as it was)."""
    import shutil

    run = run_dir / "digits/version_0"
    shutil.copytree(short_run, run)
    return run


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_evaluating_the_last_checkpoint_leaves_its_run_folder_as_it_was(
    short_run, tmp_path, subcommand
):
    """``test --ckpt_path last`` loads the latest run's last.ckpt and, like an explicit path,
    logs into a new run folder; before, it logged into the fit's folder and its config.yaml
    (max_epochs 2) was overwritten by the test's (max_epochs 20)."""
    run = _copy_of_run(short_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    cli = run_cli(subcommand, "--config", DIGITS, f"--run_dir={tmp_path}", "--ckpt_path=last")
    assert cli.config_init[subcommand]["ckpt_path"] == str(run / "checkpoints/last.ckpt")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert Path(cli.trainer.log_dir).resolve() == (tmp_path / "digits/version_1").resolve()
    if subcommand == "test":
        assert cli.trainer.callback_metrics["test/acc"] > 0.85  # the trained weights


def test_last_ckpt_holds_the_final_epoch_when_the_best_is_earlier(tmp_path):
    """Lightning 2.6 writes last.ckpt only at a step where it also saves a best checkpoint:
    last.ckpt held the best epoch's state, a resumed fit trained the later epochs again and
    --ckpt_path last evaluated the best weights. val/loss falls every epoch, so under mode
    max the best stays epoch 0 while last.ckpt must follow every epoch."""
    fit_digits(
        tmp_path,
        "--trainer.max_epochs=3",
        "--checkpoint.monitor=val/loss",
        "--checkpoint.mode=max",
    )
    folder = tmp_path / "digits/version_0/checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2 and last["global_step"] == 3 * 19
    best = [p for p in folder.iterdir() if p.name.startswith("epoch000")]
    assert len(best) == 1  # the best checkpoint itself is untouched


def test_last_ckpt_follows_save_weights_only_every_epoch(tmp_path):
    """--checkpoint.save_weights_only true: the last.ckpt of an epoch without a new best was
    saved in full (optimizer state, loops, callbacks), that of an epoch with one (Lightning's
    save) with the weights only; it now holds the weights only, every epoch, as Lightning's."""
    fit_digits(
        tmp_path,
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--checkpoint.save_weights_only=true",
        "--checkpoint.monitor=val/loss",
        "--checkpoint.mode=max",  # val/loss falls: the best stays epoch 0
    )
    last = torch.load(tmp_path / "digits/version_0/checkpoints/last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    assert "optimizer_states" not in last and "state_dict" in last


def test_linked_last_ckpt_follows_every_epoch_without_overwriting_the_best(tmp_path):
    """--checkpoint.save_last link: last.ckpt stayed a link to the best checkpoint after the
    best epoch, so --ckpt_path last resumed from the best epoch (training the later epochs
    again) and evaluated the best weights, as save_last true did before RunCheckpoint saved
    it every epoch. It now holds the latest epoch too (a file until Lightning links it to a
    new checkpoint), and the best checkpoint the link pointed to is left as it was."""
    fit_digits(
        tmp_path,
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=3",
        "--checkpoint.save_last=link",
        "--checkpoint.monitor=val/loss",
        "--checkpoint.mode=max",  # val/loss falls: the best stays epoch 0
    )
    folder = tmp_path / "digits/version_0/checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2 and last["global_step"] == 9
    (best,) = [p for p in folder.iterdir() if p.name.startswith("epoch000")]
    assert torch.load(best, weights_only=False)["global_step"] == 3


def counting_checkpoint_saves(monkeypatch) -> list[tuple[int, str]]:
    """The (global step, file name) of every checkpoint the trainer saves from now on."""
    saved = []
    save = Trainer.save_checkpoint

    def counting_save(trainer, filepath, *args, **kwargs):
        saved.append((trainer.global_step, Path(filepath).name))
        return save(trainer, filepath, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save_checkpoint", counting_save)
    return saved


def test_an_improving_epoch_writes_last_ckpt_once(tmp_path, monkeypatch):
    """last.ckpt of an epoch whose validation ended it was saved at that validation's end and
    again by Lightning at the train epoch's end, beside the new best: two writes of the same
    state each improving epoch. It is now saved once per epoch, after Lightning's own save."""
    saved = counting_checkpoint_saves(monkeypatch)
    fit_digits(tmp_path, "--trainer.max_epochs=2", "--trainer.limit_train_batches=3")
    lasts = [step for step, name in saved if name == "last.ckpt"]
    assert lasts == [3, 6], saved


@pytest.mark.parametrize("option", ["--checkpoint.save_top_k=0", "--checkpoint.every_n_epochs=3"])
def test_the_end_of_a_fit_writes_last_ckpt_again_only_if_it_changed(tmp_path, monkeypatch, option):
    """When Lightning saved no checkpoint of its own during the fit (--checkpoint.save_top_k 0,
    or no epoch a multiple of every_n_epochs), it wrote last.ckpt once more at the end of
    training (on_train_end), over the one just saved at the end of the last epoch, at the
    same step. It is now written once per epoch, and a resume from it trains on."""
    saved = counting_checkpoint_saves(monkeypatch)
    common = ("--trainer.limit_train_batches=3", option)
    fit_digits(tmp_path, "--trainer.max_epochs=2", *common)
    lasts = [step for step, name in saved if name == "last.ckpt"]
    assert lasts == [3, 6], saved
    resumed = fit_digits(tmp_path, "--trainer.max_epochs=3", "--ckpt_path=last", *common)
    assert resumed.trainer.global_step == 9  # one more epoch, none trained again


@pytest.mark.parametrize("form", ["--ckpt_path=last", "--ckpt_path last"])
def test_ckpt_path_before_a_runs_config_yaml_still_holds(short_run, tmp_path, form):
    """The run's config.yaml holds ``ckpt_path: null``; given after ``--ckpt_path last`` it
    replaced it (jsonargparse applies arguments in order) and test evaluated an untrained
    model (chance accuracy, after a note that no checkpoint was given)."""
    run = _copy_of_run(short_run, tmp_path)
    config = str(run / "config.yaml")
    cli = run_cli("test", *form.split(), "--config", config, f"--run_dir={tmp_path}")
    assert cli.config_init["test"]["ckpt_path"] == str(run / "checkpoints/last.ckpt")
    assert cli.trainer.callback_metrics["test/acc"] > 0.85  # the trained weights


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_evaluating_a_checkpoint_gives_no_dirpath_warning(short_run, tmp_path, subcommand):
    """``test --ckpt_path last`` after a fit printed Lightning's "The dirpath has changed from
    .../version_0/checkpoints to .../version_1/checkpoints" warning: the evaluating trainer
    carried the CLI's ModelCheckpoint, pointed at its own (new) run folder, and Lightning
    restored the fit's checkpoint state into it. The callback is now the evaluated run's
    (its folder, its best checkpoint), and saves nothing."""
    import warnings

    _copy_of_run(short_run, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(subcommand, "--config", DIGITS, f"--run_dir={tmp_path}", "--ckpt_path=last")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "dirpath" in m or "callbacks" in m], messages
    (best,) = (tmp_path / "digits/version_0/checkpoints").glob("epoch*.ckpt")
    assert Path(cli.trainer.checkpoint_callback.best_model_path).name == best.name
    assert not (tmp_path / "digits/version_1/checkpoints").exists()


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_evaluating_last_without_a_checkpoint_is_an_error(tmp_path, capsys, subcommand):
    """Before, ``test --ckpt_path last`` with no run said "starting from scratch" and reported
    the metrics of an untrained model as if they were a run's."""
    with pytest.raises(SystemExit) as e:
        run_cli(subcommand, "--config", DIGITS, f"--run_dir={tmp_path}", "--ckpt_path=last")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --ckpt_path last: no last.ckpt under {tmp_path / 'digits'}" in err, err
    assert not list(tmp_path.rglob("*"))


def test_fit_without_logger_keeps_config_and_checkpoints_in_the_run_folder(workdir):
    """``--trainer.logger=false`` turns off the metric loggers only; before, the resolved
    config was written over ``./config.yaml`` (here the user's own config file) and the
    checkpoints went to ``./checkpoints``, shared by every such run."""
    mine = workdir / "config.yaml"
    mine.write_text("# my config\ntrainer:\n  max_epochs: 1\n  limit_train_batches: 2\n")
    before = mine.read_text()
    cli = run_cli(
        "fit", "--config", DIGITS, "--config", str(mine), "--trainer.logger=false", "--run_dir=r"
    )
    assert mine.read_text() == before
    run = workdir / "r/config/version_0"
    assert Path(cli.trainer.log_dir).resolve() == run.resolve()
    assert (run / "config.yaml").is_file() and (run / "checkpoints/last.ckpt").is_file()
    assert sorted(p.name for p in workdir.iterdir()) == ["config.yaml", "r"]


def test_data_problem_found_by_the_split_is_a_cli_error_before_training(tmp_path, capsys):
    """A problem that shows only when the data is split and standardised (here a value beyond
    float32's range) was a traceback from inside ``trainer.fit``, after the run folder was
    made."""
    csv = tmp_path / "data.csv"
    csv.write_text(
        "a,b,y\n" + "".join(f"{-1e39 if i == 5 else i},{i % 7},{i % 2}\n" for i in range(60))
    )
    with pytest.raises(SystemExit) as e:
        run_cli(
            "fit",
            "--data=torchbp.lightning.data.TabularFileDataModule",
            f"--data.path={csv}",
            "--data.label_column=y",
            "--data.standardize=false",
            f"--run_dir={tmp_path}",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: data problem: value -1e+39 in column 'a' at row 6" in err, err
    assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["data.csv"]  # no run folder was made


@pytest.mark.parametrize(
    "args, mode",
    [
        ([], "max"),  # val/acc
        (["--checkpoint.monitor=val/loss"], "min"),
        (["--checkpoint.monitor=val/error"], "min"),
        (["--checkpoint.monitor=val/f1"], "max"),
        (["--checkpoint.monitor=val/loss", "--checkpoint.mode=max"], "max"),  # as asked
        (["--checkpoint.monitor=val/acc", "--checkpoint.mode=min"], "min"),
        (["--checkpoint.monitor=step"], "max"),  # the latest
        (["--checkpoint.monitor=epoch"], "max"),
    ],
)
def test_checkpoint_mode_follows_the_monitored_metric(tmp_path, args, mode):
    """Before, the mode stayed max (set for val/acc) when only the monitor was changed, so
    with --checkpoint.monitor val/loss the "best" checkpoint, which fit ends by testing, was
    the one with the highest validation loss."""
    cli = run_cli(
        "fit", "--config", DIGITS, f"--run_dir={tmp_path}", "--trainer.fast_dev_run=1", *args
    )
    assert cli.trainer.checkpoint_callback.mode == mode
    assert cli.config.fit.checkpoint.mode == mode  # and so in the saved config.yaml


def test_checkpoint_monitoring_the_step_keeps_the_latest(tmp_path):
    """--checkpoint.monitor step (or epoch), which Lightning offers to keep the latest
    checkpoints, took mode auto's min: the "best" was the first epoch's checkpoint, kept
    for good, and fit ended by testing the first epoch's weights."""
    cli = fit_digits(
        tmp_path,
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--checkpoint.monitor=step",
    )
    best = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert best["global_step"] == cli.trainer.global_step == 6
    # named by epoch and step, as without a monitor (it was 'epoch001-step6.0000.ckpt')
    assert Path(cli.trainer.checkpoint_callback.best_model_path).name == "epoch001-step6.ckpt"


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_torch_num_threads_below_one_is_a_cli_error(tmp_path, capsys, threads):
    """-2 was torch's RuntimeError in a traceback; 0 was ignored (torch's choice) silently."""
    with pytest.raises(SystemExit) as e:
        run_cli("fit", f"--torch_num_threads={threads}", f"--run_dir={tmp_path}")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: invalid configuration: torch_num_threads must be >= 1, got {threads}" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_missing_checkpoint_file_is_a_cli_error_before_training(tmp_path, capsys, subcommand):
    """Before, Lightning's FileNotFoundError came as a traceback once the run had started,
    leaving a run folder (config.yaml, TensorBoard events) behind."""
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(SystemExit) as e:
        run_cli(subcommand, f"--ckpt_path={missing}", f"--run_dir={tmp_path / 'runs'}")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --ckpt_path: checkpoint file not found: {missing}" in err, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_fast_dev_run_leaves_no_checkpoint_for_ckpt_path_last(short_run, tmp_path):
    """``fit --trainer.fast_dev_run`` (a one-batch smoke test) wrote a last.ckpt of its one
    step (Lightning's save_last at the end of training ignores fast_dev_run), so a following
    ``test --ckpt_path last`` evaluated the smoke test's weights instead of the trained run's,
    and ``fit --ckpt_path last`` resumed from them."""
    run = _copy_of_run(short_run, tmp_path)
    fit_digits(tmp_path, "--trainer.fast_dev_run=1")
    assert not list((tmp_path / "digits/version_1").rglob("*.ckpt"))
    cli = run_cli("test", "--config", DIGITS, f"--run_dir={tmp_path}", "--ckpt_path=last")
    assert cli.config_init.test.ckpt_path == str(run / "checkpoints/last.ckpt")


def test_a_predict_that_writes_nothing_leaves_no_run_folder(tmp_path):
    """``predict --trainer.fast_dev_run`` (logging suppressed: no config.yaml, no
    predictions.csv) left its new run folder behind, empty, while fit, validate and test
    remove theirs: the next run of the name took the version after it."""
    run_cli(
        "predict",
        "--config",
        str(CONFIGS / "iris.yaml"),
        f"--run_dir={tmp_path}",
        "--trainer.fast_dev_run=1",
    )
    assert not list(tmp_path.iterdir())


def _read_predictions(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_predict_writes_the_predictions_into_its_run_folder(short_run, tmp_path, capsys):
    """``torchbp-train predict`` computed the class probabilities and dropped them: nothing
    was written or printed, so the subcommand had no output at all."""
    ckpt = str(short_run / "checkpoints/last.ckpt")
    cli = run_cli("predict", "--config", DIGITS, f"--run_dir={tmp_path}", f"--ckpt_path={ckpt}")
    path = Path(cli.trainer.log_dir) / "predictions.csv"
    assert f"predictions: {path.resolve()}" in capsys.readouterr().out
    columns, rows = _read_predictions(path)
    assert columns == ["prediction", *(f"prob_{k}" for k in range(10))]
    x, y = cli.datamodule.splits["test"].tensors
    assert len(rows) == len(y)
    probs = torch.tensor([[float(r[f"prob_{k}"]) for k in range(10)] for r in rows])
    predicted = torch.tensor([int(r["prediction"]) for r in rows])
    torch.testing.assert_close(probs.sum(1), torch.ones(len(y)), atol=1e-5, rtol=0)
    assert torch.equal(predicted, probs.argmax(1))
    with torch.no_grad():
        expected = cli.model(x).softmax(1)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)  # in the split's order


def test_predict_names_the_classes_of_a_csv(tmp_path):
    """With string labels the predictions are the labels of the file, not their indices."""
    csv = tmp_path / "pets.csv"
    csv.write_text(
        "w,h,kind\n"
        + "".join(f"{i % 5 + 3 * (i % 2)},{i % 3},{('cat', 'dog')[i % 2]}\n" for i in range(40))
    )
    data = ["--data=torchbp.lightning.data.TabularFileDataModule", f"--data.path={csv}"]
    data += ["--data.label_column=kind", "--data.batch_size=8", f"--run_dir={tmp_path}"]
    run_cli("fit", *data, "--trainer.max_epochs=1", "--model.hidden_sizes=[4]")
    cli = run_cli("predict", *data, "--model.hidden_sizes=[4]", "--ckpt_path=last")
    columns, rows = _read_predictions(Path(cli.trainer.log_dir) / "predictions.csv")
    assert columns == ["prediction", "prob_cat", "prob_dog"]
    assert len(rows) == len(cli.datamodule.splits["test"])
    for r in rows:
        best = max(("cat", "dog"), key=lambda k: float(r[f"prob_{k}"]))
        assert r["prediction"] == best


def test_predict_path_predicts_the_rows_of_a_new_file(tmp_path):
    """``predict --data.predict_path new.csv``: predictions.csv has one row per row of the new
    file (without a label column), in its order, named by the training file's labels."""
    csv = tmp_path / "pets.csv"
    csv.write_text(
        "w,h,kind\n"
        + "".join(f"{i % 5 + 3 * (i % 2)},{i % 3},{('cat', 'dog')[i % 2]}\n" for i in range(40))
    )
    new = tmp_path / "new.csv"
    new.write_text("h,w\n0,1\n2,7\n1,3\n0,0\n2,4\n")
    data = ["--data=torchbp.lightning.data.TabularFileDataModule", f"--data.path={csv}"]
    data += ["--data.label_column=kind", "--data.batch_size=2", f"--run_dir={tmp_path}"]
    run_cli("fit", *data, "--trainer.max_epochs=1", "--model.hidden_sizes=[4]")
    cli = run_cli(
        "predict",
        *data,
        f"--data.predict_path={new}",
        "--model.hidden_sizes=[4]",
        "--ckpt_path=last",
    )
    columns, rows = _read_predictions(Path(cli.trainer.log_dir) / "predictions.csv")
    assert columns == ["prediction", "prob_cat", "prob_dog"] and len(rows) == 5
    (x,) = cli.datamodule.predict_dataloader().dataset.tensors
    with torch.no_grad():
        expected = cli.model(x).softmax(1)
    probs = torch.tensor([[float(r["prob_cat"]), float(r["prob_dog"])] for r in rows])
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "new_rows, message",
    [
        (None, "predict_path: file not found"),
        ("w\n1\n", "missing: ['h']"),
        ("h,w\n1,nan\n", "non-finite value nan in column 'w'"),
    ],
)
def test_an_unusable_predict_path_is_a_cli_error_before_the_run_folder(
    tmp_path, capsys, new_rows, message
):
    """A missing ``predict_path``, or one without a training column, was a DataError
    traceback from predict_dataloader, once predict had written its run folder's config.yaml
    and hparams.yaml; it is a one-line data error before anything is written."""
    csv = tmp_path / "pets.csv"
    csv.write_text("w,h,kind\n" + "".join(f"{i % 5},{i % 3},{i % 2}\n" for i in range(40)))
    new = tmp_path / "new.csv"
    if new_rows is not None:
        new.write_text(new_rows)
    runs = tmp_path / "runs"
    data = ["--data=torchbp.lightning.data.TabularFileDataModule", f"--data.path={csv}"]
    data += ["--data.label_column=kind", f"--run_dir={runs}", "--model.hidden_sizes=[4]"]
    run_cli("fit", *data, "--trainer.max_epochs=1")
    with pytest.raises(SystemExit) as e:
        run_cli("predict", *data, f"--data.predict_path={new}", "--ckpt_path=last")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: data problem: predict_path" in err and message in err, err
    assert sorted(p.name for p in (runs / "pets").iterdir()) == ["version_0"]


@pytest.mark.parametrize("subcommand", ["test", "validate", "predict"])
def test_evaluating_best_loads_the_latest_runs_best_checkpoint(
    short_run, tmp_path, capsys, subcommand
):
    """``test --ckpt_path best`` in a new process was Lightning's ValueError ("ModelCheckpoint
    is not configured to save the best model") in a traceback: "best" meant the best of a fit
    in the same process. It is now the best checkpoint of the latest run, found as ``last``
    is, and its run folder is left as it was. The new run folder it logs into is named (a
    test or validate said nothing of where its metrics.csv went, as predict and fit do)."""
    run = _copy_of_run(short_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    (best,) = (run / "checkpoints").glob("epoch*.ckpt")
    capsys.readouterr()
    cli = run_cli(subcommand, "--config", DIGITS, f"--run_dir={tmp_path}", "--ckpt_path=best")
    assert cli.config_init[subcommand]["ckpt_path"] == str(best)
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    logged = (tmp_path / "digits/version_1").resolve()
    assert Path(cli.trainer.log_dir).resolve() == logged
    said = capsys.readouterr().out
    shown = f"predictions: {logged / 'predictions.csv'}" if subcommand == "predict" else ""
    assert (shown or f"run folder: {logged}") in said.splitlines(), said


def test_evaluating_a_checkpoint_of_other_checkpoint_options_asks_for_no_callback(tmp_path):
    """A run fitted with --checkpoint.monitor val/f1, then tested with the config's
    default options: Lightning warned "callbacks used to create the checkpoint need to be
    provided ... RunCheckpoint{'monitor': 'val/f1', ...}", a warning about a callback that
    saves nothing when evaluating. The evaluating callback takes that run's state."""
    iris = ("--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}")
    short = ("--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")
    run_cli("fit", *iris, *short, "--trainer.max_epochs=1", "--checkpoint.monitor=val/f1")
    (best,) = (tmp_path / "iris/version_0/checkpoints").glob("epoch*.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli("test", *iris, "--ckpt_path=best")
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "callbacks used to create the checkpoint" in m], said
    assert cli.config_init["test"]["ckpt_path"] == str(best)
    assert "test/acc" in cli.trainer.callback_metrics


def test_evaluating_best_without_a_run_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("test", "--config", DIGITS, f"--run_dir={tmp_path}", "--ckpt_path=best")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --ckpt_path best: no best checkpoint under {tmp_path / 'digits'}" in err, err
    assert "Traceback" not in err and not list(tmp_path.rglob("*"))


def test_fit_from_best_is_an_error_before_training(short_run, tmp_path, capsys):
    """``fit --ckpt_path best`` was Lightning's ValueError in a traceback after the run folder
    was made; a fit resumes from ``last`` (or a checkpoint file)."""
    _copy_of_run(short_run, tmp_path)
    with pytest.raises(SystemExit) as e:
        fit_digits(tmp_path, "--ckpt_path=best")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path best: fit resumes from last or a checkpoint file" in err, err
    assert not (tmp_path / "digits/version_1").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.privacy.delta=0.01"], "privacy.delta=0.01 is not below 1/N"),
        (["--data.init_args.poisson_sampling=false"], "set data.poisson_sampling: true"),
        (["--trainer.accumulate_grad_batches=2"], "accumulate_grad_batches=2"),
        (["--data.init_args.standardize=true"], "set data.standardize: false"),
        (["--trainer.precision=bf16-mixed"], "privacy (DP-SGD) needs trainer.precision"),
        (["--checkpoint.monitor=train/loss"], "privacy (DP-SGD): RunCheckpoint monitors"),
        (
            ["--model.privacy.target_epsilon=1e-4", "--model.privacy.delta=1e-9"],
            "privacy.target_epsilon=0.0001 cannot be reached",
        ),
    ],
)
def test_dp_settings_training_refuses_are_a_cli_error_before_training(
    tmp_path, capsys, args, message
):
    """DP-SGD settings that training refuses at its start (a delta >= 1/N, no Poisson
    sampling, gradient accumulation, standardisation on the training rows, reduced precision,
    a checkpoint monitor on the private batches' metrics, an unreachable target_epsilon)
    came as a ValueError in a traceback from inside trainer.fit, after the run folder was
    made."""
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", str(CONFIGS / "digits_dp.yaml"), f"--run_dir={tmp_path}", *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: invalid configuration: " in err and message in err, err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_privacy_override_error_starts_with_its_cause(tmp_path, capsys):
    """``--model.privacy.noise_multiplier 1`` on digits_dp (which gives target_epsilon) was
    reported as "error: invalid configuration: Does not validate against any of the Union
    subtypes" followed by jsonargparse's listing, the cause on the fourth line."""
    with pytest.raises(SystemExit) as e:
        run_cli(
            "fit",
            "--config",
            str(CONFIGS / "digits_dp.yaml"),
            "--model.privacy.noise_multiplier=1.0",
            f"--run_dir={tmp_path}",
        )
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(
        "error: invalid configuration: privacy: give exactly one of noise_multiplier and "
        "target_epsilon, got noise_multiplier=1.0, target_epsilon=3.0"
    ), lines
    assert "target_epsilon null" in lines[0]
    assert len(lines) == 1 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_checkpoint_of_another_model_is_a_cli_error_before_anything_is_written(
    short_run, tmp_path, capsys, subcommand
):
    """``fit --ckpt_path last --model.hidden_sizes [32]`` on a run trained with [256] failed in
    Lightning's load_state_dict with a size-mismatch traceback, after the resumed run's
    config.yaml had been overwritten by the new configuration (which its checkpoints do not
    match) and a TensorBoard file added; test/validate/predict also came as a traceback."""
    run = _copy_of_run(short_run, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        run_cli(
            subcommand,
            "--config",
            DIGITS,
            f"--run_dir={tmp_path}",
            "--ckpt_path=last",
            "--model.hidden_sizes=[32]",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path: " in err and "does not fit the configured model" in err, err
    assert "net.0.weight: (256, 64) in the checkpoint, (32, 64) in the model" in err, err
    assert f"(--config {run.resolve() / 'config.yaml'} runs the model it was trained" in err
    assert "Traceback" not in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["version_0"]


def test_resuming_past_max_epochs_is_a_cli_error_before_anything_is_written(tmp_path, capsys):
    """``fit --ckpt_path last --trainer.max_epochs 1`` of a 3-epoch run was Lightning's
    MisconfigurationException traceback once the run had started, after it had written
    max_epochs: 1 into the resumed run's config.yaml."""
    common = ["--config", "iris", f"--run_dir={tmp_path}"]
    run_cli("fit", *common, "--trainer.max_epochs=3")
    run = tmp_path / "iris/version_0"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        run_cli("fit", *common, "--trainer.max_epochs=1", "--ckpt_path=last")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "was saved at epoch 2, past trainer.max_epochs=1: there is nothing to resume" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("subcommand", "option", "message"),
    [
        (
            "fit",
            "--trainer.limit_train_batches=0.01",
            "trainer.limit_train_batches=0.01 keeps none of the 7 train batches",
        ),
        ("fit", "--trainer.limit_val_batches=0.1", "give at least 0.5, or a number of batches"),
        ("fit", "--trainer.limit_test_batches=0.1", "keeps none of the 2 test batches"),
        ("test", "--trainer.limit_test_batches=0.1", "keeps none of the 2 test batches"),
        (
            "fit",
            "--trainer.val_check_interval=8",
            "trainer.val_check_interval=8 (batches) is above the 7 training batches of an epoch",
        ),
    ],
    ids=["train", "val", "fits_test", "test", "val_check_interval"],
)
def test_batch_counts_lightning_refuses_are_a_cli_error_before_anything_is_written(
    tmp_path, capsys, subcommand, option, message
):
    """A fraction limit_*_batches that keeps none of a loader's batches (iris: 7 train, 2
    val and 2 test batches), or a val_check_interval above an epoch's batches, was
    Lightning's MisconfigurationException or ValueError traceback once the run had started
    (the test that ends a fit: after the whole fit), its run folder written."""
    with pytest.raises(SystemExit) as e:
        run_cli(subcommand, "--config", "iris", f"--run_dir={tmp_path}", option)
    assert e.value.code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error.startswith("error: invalid configuration: ") and message in error
    assert not list(tmp_path.rglob("version_*"))


def test_resuming_with_another_optimizer_is_a_cli_error_before_anything_is_written(
    short_run, tmp_path, capsys
):
    """``fit --ckpt_path last --model.optimizer torch.optim.SGD`` on an Adam run loaded Adam's
    state into SGD and failed at the first step with KeyError: 'momentum' in a traceback,
    after overwriting the run's config.yaml and saving an exception checkpoint as last.ckpt
    (named val_acc0.0000)."""
    run = _copy_of_run(short_run, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        fit_digits(
            tmp_path,
            "--ckpt_path=last",
            "--model.optimizer=torch.optim.SGD",
            "--model.optimizer.lr=0.05",
            "--trainer.max_epochs=3",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path: " in err and "optimizer state does not fit SGD" in err, err
    assert "momentum" in err and "Traceback" not in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_evaluating_best_never_takes_a_checkpoint_the_run_did_not_record_as_best(
    short_run, tmp_path, capsys
):
    """A run interrupted before its first validation has a last.ckpt that records no best
    and an exception checkpoint beside it: ``--ckpt_path best`` must not take that one."""
    run = _copy_of_run(short_run, tmp_path)
    (best,) = (run / "checkpoints").glob("epoch*.ckpt")
    best.rename(run / "checkpoints/epoch000-val_acc0.0000.ckpt")  # not the recorded best
    with pytest.raises(SystemExit) as e:
        run_cli("test", "--config", DIGITS, f"--run_dir={tmp_path}", "--ckpt_path=best")
    assert e.value.code == 2
    assert "error: --ckpt_path best: no best checkpoint under" in capsys.readouterr().err


def test_fit_with_checkpointing_disabled_writes_no_checkpoint(tmp_path, capsys):
    """``--trainer.enable_checkpointing false`` (Lightning's switch) was refused: "Trainer was
    configured with enable_checkpointing=False but found ModelCheckpoint in callbacks list",
    the CLI's own checkpoint callback, so no run could go without checkpoints."""
    cli = fit_digits(
        tmp_path,
        "--trainer.enable_checkpointing=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
    )
    assert not list(tmp_path.rglob("*.ckpt"))
    assert (tmp_path / "digits/version_0/metrics.csv").is_file()
    assert "test metrics (final weights)" in capsys.readouterr().out
    assert cli.trainer.callback_metrics["test/acc"] > 0


@pytest.mark.parametrize(
    "args, named",
    [
        (["--data.init_args.seed=5"], "data.seed=5 (the checkpoint's run: 0)"),
        (["--data.init_args.standardize=false"], "data.standardize=False (the checkpoint's"),
    ],
)
def test_evaluating_a_checkpoint_on_another_split_is_a_cli_error(tmp_path, capsys, args, named):
    """A run trained with one data split, then tested with another seed (``test --ckpt_path
    last`` without the fit's ``--data.seed``) silently tested on rows it had trained on (a
    test accuracy that was not one); without standardisation, on features scaled unlike the
    training ones."""
    fit_digits(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2")
    with pytest.raises(SystemExit) as e:
        run_cli("test", "--config", DIGITS, f"--run_dir={tmp_path}", "--ckpt_path=last", *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path: " in err and named in err, err
    assert "Traceback" not in err
    cli = run_cli("test", "--config", DIGITS, f"--run_dir={tmp_path}", "--ckpt_path=last")
    assert cli.trainer.callback_metrics["test/acc"] > 0  # the run's own split: fine


def test_a_run_never_writes_its_config_over_an_existing_file(workdir, capsys):
    """With ``--trainer.logger=false --trainer.default_root_dir=.`` the resolved config went to
    ./config.yaml with overwrite on: the user's own config file of that name was replaced
    (the CLI turns Lightning's overwrite guard off, for resumed runs)."""
    mine = workdir / "config.yaml"
    mine.write_text("# my config\ntrainer:\n  max_epochs: 1\n  limit_train_batches: 2\n")
    before = mine.read_text()
    with pytest.raises(SystemExit) as e:
        run_cli(
            "fit",
            "--config",
            DIGITS,
            "--config",
            str(mine),
            "--trainer.logger=false",
            "--trainer.default_root_dir=.",
            "--run_dir=r",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {mine} exists" in err and "default_root_dir" in err, err
    assert mine.read_text() == before
    assert sorted(p.name for p in workdir.iterdir()) == ["config.yaml"]


def test_plateau_scheduler_without_validation_is_a_cli_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fit_digits(
            tmp_path,
            "--model.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
            "--trainer.limit_val_batches=0",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: invalid configuration: lr_scheduler ReduceLROnPlateau" in err, err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("option", ["--run_dir", "--checkpoint.dirpath"])
def test_a_run_folder_that_cannot_be_created_is_a_cli_error_before_training(
    tmp_path, capsys, option
):
    """A run folder under a file (or in a read-only folder, as from a read-only working
    directory) was a NotADirectoryError / PermissionError traceback from deep inside
    Lightning's logger once the run had started; it is now one error line naming the folder."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", "iris", f"--run_dir={tmp_path}", f"{option}={blocker / 'x'}")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: invalid configuration: cannot write the run's files into {blocker / 'x'}" in err
    assert f"{blocker} is not a folder" in err, err
    assert "Traceback" not in err


def test_a_runs_saved_config_names_its_run(tmp_path):
    """The run folder's config.yaml kept ``run_name: null``, so running it again (``test
    --config runs/digits/version_0/config.yaml --ckpt_path last``, as the README points at
    it) named the run after the file, ``config``: it found no run under runs/config. The
    saved config now names the run it was saved for."""
    fit_digits(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2")
    run = tmp_path / "digits/version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["run_name"] == "digits"
    cli = run_cli("test", "--config", str(run / "config.yaml"), "--ckpt_path=last")
    assert cli.config_init["test"]["ckpt_path"] == str(run / "checkpoints/last.ckpt")
    assert Path(cli.trainer.log_dir).resolve() == (tmp_path / "digits/version_1").resolve()


def test_evaluating_a_checkpoint_on_data_of_other_classes_names_the_classes(tmp_path, capsys):
    """A model of cat/dog/fox tested on a file of cat and dog only was refused as a model that
    "does not fit the configured model: net.0.weight: (3, 2) in the checkpoint, (2, 2) ...":
    the data's classes, the cause, are now named first."""

    def table(name, kinds):
        path = tmp_path / name
        rows = [f"{i % 5 + 3 * (i % 3)},{i % 3},{kinds[i % len(kinds)]}\n" for i in range(60)]
        path.write_text("w,h,kind\n" + "".join(rows))
        return ["--data=torchbp.lightning.data.TabularFileDataModule", f"--data.path={path}"]

    common = ["--data.label_column=kind", "--model.hidden_sizes=[]", f"--run_dir={tmp_path}"]
    common.append("--run_name=pets")  # one run name for both files (each names its own runs)
    run_cli("fit", *table("three.csv", ["cat", "dog", "fox"]), *common, "--trainer.max_epochs=1")
    with pytest.raises(SystemExit) as e:
        run_cli("test", *table("two.csv", ["cat", "dog"]), *common, "--ckpt_path=last")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "trained on the classes ['cat', 'dog', 'fox']" in err, err
    assert "['cat', 'dog']" in err and "Traceback" not in err


def test_a_checkpoint_monitor_the_model_never_logs_is_a_cli_error_before_training(tmp_path, capsys):
    """``--checkpoint.monitor val/accuracy`` (for val/acc) trained a whole epoch, then stopped
    with Lightning's MisconfigurationException in a traceback, leaving a run folder behind."""
    with pytest.raises(SystemExit) as e:
        run_cli(
            "fit", "--config", "iris", f"--run_dir={tmp_path}", "--checkpoint.monitor=val/accuracy"
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: invalid configuration: checkpoint.monitor 'val/accuracy'" in err, err
    assert "val/acc" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*"))


def _pets_csv(tmp_path: Path) -> Path:
    csv = tmp_path / "pets.csv"
    csv.write_text(
        "w,h,kind\n"
        + "".join(f"{i % 5 + 3 * (i % 2)},{i % 3},{('cat', 'dog')[i % 2]}\n" for i in range(40))
    )
    return csv


def test_own_data_without_a_config_is_a_run_of_its_own(tmp_path):
    """``fit --data ... --data.path pets.csv`` (no --config) ran under the default config's
    name, runs/digits/, and became the latest digits run (a later ``test --ckpt_path last`` of
    the digits then met a checkpoint of another shape); it is now runs/pets/. With an explicit
    --config the run keeps that config's name."""
    data = [
        "--data=torchbp.lightning.data.TabularFileDataModule",
        f"--data.path={_pets_csv(tmp_path)}",
    ]
    data += ["--data.label_column=kind", "--data.batch_size=8", f"--run_dir={tmp_path}"]
    run_cli("fit", *data, "--trainer.max_epochs=1", "--model.hidden_sizes=[4]")
    assert (tmp_path / "pets/version_0/checkpoints/last.ckpt").is_file()
    assert not (tmp_path / "digits").exists()
    run_cli("fit", "--config", DIGITS, *data, "--trainer.max_epochs=1", "--model.hidden_sizes=[4]")
    assert (tmp_path / "digits/version_0/checkpoints/last.ckpt").is_file()


def test_best_checkpoint_file_names_the_monitored_value(tmp_path):
    """With --checkpoint.monitor val/loss the best checkpoint (by loss) was still named
    ``...-val_acc0.8996.ckpt``, by a value it was not chosen on."""
    run = fit_digits(tmp_path, "--trainer.max_epochs=1", "--checkpoint.monitor=val/loss")
    names = [p.name for p in Path(run.trainer.log_dir, "checkpoints").glob("epoch*.ckpt")]
    assert len(names) == 1 and names[0].startswith("epoch000-val_loss"), names


def test_checkpoint_file_without_a_monitor_names_its_epoch_and_step(tmp_path):
    """With --checkpoint.monitor null (keep the latest epoch's checkpoint) the default file
    name was "{epoch}-{step}" without the metric names (auto_insert_metric_name is off):
    ``0-7.ckpt``, a name that says nothing, where Lightning writes ``epoch=0-step=7.ckpt``."""
    iris = str(CONFIGS / "iris.yaml")
    run = run_cli(
        "fit",
        "--config",
        iris,
        f"--run_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--checkpoint.monitor=null",
    )
    names = sorted(p.name for p in Path(run.trainer.log_dir, "checkpoints").glob("*.ckpt"))
    assert names == ["epoch000-step7.ckpt", "last.ckpt"]


def test_evaluating_without_a_checkpoint_says_the_model_is_untrained(tmp_path, capsys):
    """``torchbp-train test`` without --ckpt_path tests a freshly initialised model (as
    Lightning does), which printed chance-level metrics with no word on why."""
    run_cli("test", "--config", DIGITS, f"--run_dir={tmp_path}", "--trainer.limit_test_batches=1")
    assert "no --ckpt_path: test evaluates a freshly initialised, untrained model" in (
        capsys.readouterr().err
    )


def test_a_single_trainer_callback_is_kept(tmp_path):
    """``trainer.callbacks`` may be one callback instead of a list (Lightning's Trainer takes
    either, and LightningCLI wraps it): the CLI stopped with "invalid configuration:
    'EarlyStopping' object is not iterable"."""
    config = tmp_path / "early_stopping.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    class_path: pytorch_lightning.callbacks.EarlyStopping\n"
        "    init_args:\n"
        "      monitor: val/loss\n"
    )
    cli = fit_digits(tmp_path, "--config", str(config), "--trainer.fast_dev_run=1")
    (early,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping"]
    assert early.monitor == "val/loss"


def _second_checkpoint_config(tmp_path: Path) -> Path:
    """A config that adds a ModelCheckpoint of its own, without a folder."""
    config = tmp_path / "two_checkpoints.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: pytorch_lightning.callbacks.ModelCheckpoint\n"
        "      init_args:\n"
        "        monitor: val/loss\n"
        "        filename: best-loss\n"
    )
    return config


def test_a_configured_model_checkpoint_saves_into_the_run_folder(tmp_path):
    """A ModelCheckpoint of trainer.callbacks without a dirpath saved into
    ``<run>/version_0/<run>/version_0/checkpoints`` (Lightning joins the logger's save_dir, which
    is the run folder, with its name and version); as beside Lightning's own loggers, it now
    saves into the run's ``checkpoints`` folder, beside the CLI's checkpoints."""
    config = _second_checkpoint_config(tmp_path)
    fit_digits(
        tmp_path,
        "--config",
        str(config),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
    )
    saved = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.ckpt"))
    folder = "two_checkpoints/version_0/checkpoints"
    assert f"{folder}/best-loss.ckpt" in saved and f"{folder}/last.ckpt" in saved, saved
    assert all(p.startswith(folder) for p in saved), saved


def test_checkpointing_disabled_also_silences_a_configured_model_checkpoint(tmp_path):
    """``--trainer.enable_checkpointing false`` kept the CLI's checkpoint callback from saving,
    but a ModelCheckpoint of trainer.callbacks still saved its checkpoints."""
    config = _second_checkpoint_config(tmp_path)
    fit_digits(
        tmp_path,
        "--config",
        str(config),
        "--trainer.enable_checkpointing=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
    )
    assert not list(tmp_path.rglob("*.ckpt"))


def test_fit_and_best_take_the_runs_own_checkpoint_beside_a_configured_one(tmp_path, capsys):
    """With a ModelCheckpoint of trainer.callbacks on val/loss (first in the trainer's list),
    the test after ``fit`` and ``test --ckpt_path best`` took that one's best, not the best
    of the run's own checkpoint callback (``--checkpoint.*``, val/acc)."""
    from torchbp.lightning.run_checkpoint import RunCheckpoint

    config = _second_checkpoint_config(tmp_path)
    args = ["--config", DIGITS, "--config", str(config), f"--run_dir={tmp_path}"]
    cli = run_cli("fit", *args, "--trainer.max_epochs=2", "--trainer.limit_train_batches=2")
    (own,) = [c for c in cli.trainer.callbacks if isinstance(c, RunCheckpoint)]
    assert own.best_model_path and "best-loss" not in own.best_model_path
    assert f"test metrics ({own.best_model_path})" in capsys.readouterr().out
    cli = run_cli("test", *args, "--ckpt_path=best", "--trainer.limit_test_batches=1")
    assert cli.trainer.ckpt_path == own.best_model_path


def _refused_fit_beside_a_second_checkpoint(tmp_path: Path, capsys, option: str) -> str:
    """The error of ``fit`` of iris with ``option`` and a ModelCheckpoint of trainer.callbacks
    (first in the trainer's list), which must come before any run folder is made."""
    config = _second_checkpoint_config(tmp_path)
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", "iris", "--config", str(config), f"--run_dir={runs}", option)
    assert e.value.code == 2 and not runs.exists()
    return capsys.readouterr().err


def test_every_model_checkpoints_monitor_is_checked_before_training(tmp_path, capsys):
    """Only the first ModelCheckpoint's monitor was checked: with one in trainer.callbacks
    (first in the trainer's list), a misspelt ``--checkpoint.monitor`` went unnoticed until
    Lightning's traceback after the first epoch."""
    err = _refused_fit_beside_a_second_checkpoint(
        tmp_path, capsys, "--checkpoint.monitor=val/accuracy"
    )
    assert "error: invalid configuration: checkpoint.monitor 'val/accuracy'" in err, err


def test_a_configured_model_checkpoints_folder_is_checked_before_training(tmp_path, capsys):
    """Only the trainer's first ModelCheckpoint's folder was checked: beside one of
    trainer.callbacks (first in the trainer's list), a --checkpoint.dirpath under a file
    failed with a traceback once the first epoch had been trained."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    err = _refused_fit_beside_a_second_checkpoint(
        tmp_path, capsys, f"--checkpoint.dirpath={blocker / 'x'}"
    )
    assert f"cannot write the run's files into {blocker / 'x'}: {blocker} is not a folder" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_run_dir_no_folder_can_be_made_in_is_a_cli_error(tmp_path, capsys):
    """For root, access() says /proc is writable, but no folder can be made there: the run
    failed with a FileNotFoundError traceback once it had started."""
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", "iris", "--run_dir=/proc/torchbp_runs")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: invalid configuration: cannot write the run's files into /proc/" in err, err


@pytest.mark.parametrize("ckpt_path", ["registry", "registry:digits:v1", "REGISTRY:digits"])
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_registry_checkpoint_without_litmodels_is_a_cli_error_naming_it(
    tmp_path, capsys, monkeypatch, subcommand, ckpt_path
):
    """Lightning's model-registry syntax needs litmodels; without it "registry:digits:v1" was
    reported as a missing checkpoint file, and "registry" failed with a FileNotFoundError
    traceback once the run had started (its run folder written)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "litmodels" else find_spec(name, *a),
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_cli(subcommand, f"--ckpt_path={ckpt_path}", f"--run_dir={tmp_path / 'runs'}")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --ckpt_path {ckpt_path}: Lightning's model registry" in err, err
    assert "litmodels" in err and "not found" not in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_runs_started_together_take_run_folders_of_their_own(tmp_path, monkeypatch):
    """Two runs started at the same moment (a sweep) both took the next version_<n> by
    listing the folders: the later one to write its config stopped with "config.yaml exists"
    (an error telling the user to choose another folder), or both wrote into one folder.
    Here the second run starts and finishes while the first is between choosing its folder
    and instantiating its classes; each now ends in a folder of its own."""
    from torchbp.lightning.cli import TorchbpCLI

    iris = ["--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}"]
    iris += ["--trainer.max_epochs=1", "--run_name=sweep"]
    instantiate = TorchbpCLI.instantiate_classes
    started: list[str] = []

    def second_run_starts_meanwhile(self):
        if not started:
            started.append("second")
            run_cli("fit", *iris, "--model.hidden_sizes=[4]")
        instantiate(self)

    monkeypatch.setattr(TorchbpCLI, "instantiate_classes", second_run_starts_meanwhile)
    run_cli("fit", *iris, "--model.hidden_sizes=[8]")
    sizes = {
        folder.name: yaml.safe_load((folder / "config.yaml").read_text())["model"]["hidden_sizes"]
        for folder in (tmp_path / "sweep").iterdir()
    }
    assert sizes == {"version_0": [8], "version_1": [4]}
    for folder in (tmp_path / "sweep").iterdir():
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        assert len([r for r in read_metrics(folder / "metrics.csv") if "test/acc" in r]) == 1


@pytest.mark.parametrize("monitor", ["val/accuracy", "epoch"])
def test_an_early_stopping_monitor_the_model_never_logs_is_a_cli_error_before_training(
    tmp_path, capsys, monitor
):
    """Only the ModelCheckpoints' monitors were checked: a misspelt EarlyStopping monitor
    trained a whole epoch and then failed with Lightning's RuntimeError traceback ("Early
    stopping conditioned on metric ... which is not available"), a run folder written.
    ``epoch``, which a ModelCheckpoint may monitor, is no metric EarlyStopping finds."""
    with pytest.raises(SystemExit) as e:
        run_cli(
            "fit",
            "--config",
            str(CONFIGS / "iris.yaml"),
            f"--run_dir={tmp_path}",
            "--trainer.callbacks+=EarlyStopping",
            f"--trainer.callbacks.monitor={monitor}",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: invalid configuration: an EarlyStopping's monitor '{monitor}'" in err, err
    assert "val/acc" in err and "Traceback" not in err and not list(tmp_path.iterdir())


def test_a_non_strict_early_stopping_may_monitor_a_metric_the_model_never_logs(tmp_path):
    """EarlyStopping(strict=False) is Lightning's way to say that its monitor may be missing
    (a metric a callback logs, or train/epsilon in a config shared with non-private runs):
    Lightning trains on and never stops for it. The CLI's monitor check refused it."""
    cli = run_cli(
        "fit",
        "--config",
        str(CONFIGS / "iris.yaml"),
        f"--run_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.callbacks+=EarlyStopping",
        "--trainer.callbacks.monitor=train/epsilon",
        "--trainer.callbacks.strict=false",
    )
    assert cli.trainer.current_epoch == 1 and "test/acc" in cli.trainer.callback_metrics


def _cut_short(path: Path) -> None:
    """Leave the first 3000 bytes of the file at ``path``: a save cut short by a crash."""
    path.write_bytes(path.read_bytes()[:3000])


@pytest.mark.parametrize("subcommand", ["test", "fit"])
def test_a_checkpoint_file_cut_short_is_a_cli_error_before_anything_is_written(
    short_run, tmp_path, capsys, subcommand
):
    """A checkpoint file cut short (a crash or a full disk while it was saved) failed with
    torch's "PytorchStreamReader failed reading zip archive" traceback from inside
    LightningCLI, which reads the hyperparameters of a --ckpt_path file."""
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((short_run / "checkpoints/last.ckpt").read_bytes())
    _cut_short(broken)
    with pytest.raises(SystemExit) as e:
        run_cli(subcommand, "--config", DIGITS, f"--run_dir={tmp_path}", f"--ckpt_path={broken}")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --ckpt_path: {broken} is not a readable checkpoint" in err, err
    assert "Traceback" not in err and not (tmp_path / "digits").exists()


def test_resuming_from_a_last_checkpoint_cut_short_leaves_the_run_as_it_was(
    short_run, tmp_path, capsys
):
    """``fit --ckpt_path last`` with a last.ckpt cut short (the run was killed while saving
    it) wrote the new config.yaml over the run's (its other max_epochs) and a TensorBoard
    file, then failed in Lightning's load with a traceback."""
    run = _copy_of_run(short_run, tmp_path)
    _cut_short(run / "checkpoints/last.ckpt")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        fit_digits(tmp_path, "--ckpt_path=last", "--trainer.max_epochs=3")
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = run / "checkpoints/last.ckpt"
    assert f"error: --ckpt_path: {last} is not a readable checkpoint" in err, err
    assert "Traceback" not in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


DIGITS_DP = str(CONFIGS / "digits_dp.yaml")


def _one_epoch_run(run_dir: Path, config: str, capsys, *overrides: str) -> Path:
    """A 1-epoch run of ``config`` (with ``overrides``) under ``run_dir/<its name>``, as it
    left its folder."""
    run_cli("fit", "--config", config, f"--run_dir={run_dir}", "--trainer.max_epochs=1", *overrides)
    capsys.readouterr()
    return run_dir / Path(config).stem / "version_0"


@pytest.mark.parametrize(
    "trained, resumed, message",
    [
        (DIGITS_DP, DIGITS, "trained with DP-SGD"),
        (DIGITS, DIGITS_DP, "trained without DP-SGD on this data"),
    ],
    ids=["private-then-not", "not-then-private"],
)
def test_resuming_across_privacy_settings_is_a_cli_error_before_anything_is_written(
    tmp_path, capsys, trained, resumed, message
):
    """``fit --ckpt_path last`` of a digits_dp run with the digits config went on training
    without privacy, silently: the run (ε logged for its first epoch) ended with a model no ε
    holds for. The other way, a digits run resumed with digits_dp logged ε = 3 for weights
    that had trained on the same data without noise. Both are refused before the run's files
    change. (Both sides unstandardised: DP-SGD refuses standardisation, and a resume across
    data splits is refused for that.)"""
    raw = "--data.init_args.standardize=false"
    run = _one_epoch_run(tmp_path, trained, capsys, raw)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        run_cli(
            "fit",
            "--config",
            resumed,
            f"--run_name={run.parent.name}",
            f"--run_dir={tmp_path}",
            "--ckpt_path=last",
            "--trainer.max_epochs=2",
            raw,
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path: " in err and message in err, err
    assert "Traceback" not in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_interrupt_never_overwrites_the_best_checkpoint(tmp_path):
    """Ctrl-C after a mid-epoch validation saved its checkpoint under the best checkpoints'
    name (epoch and metric): that of the best checkpoint of the same validation, whose
    weights it replaced with later ones, while last.ckpt still recorded the file as the best
    (``--ckpt_path best`` then evaluated the interrupted weights). The exception checkpoint
    now has a name of its own."""
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_cli(
            "fit",
            "--config",
            str(CONFIGS / "iris.yaml"),
            f"--run_dir={tmp_path}",
            "--trainer.max_epochs=3",
            "--trainer.val_check_interval=0.5",
            "--data.init_args.batch_size=8",
            "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAt",
            "--trainer.callbacks.step=9",
        )
    folder = tmp_path / "iris/version_0/checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 9
    (recorded,) = [
        s["best_model_path"] for s in last["callbacks"].values() if s.get("best_model_path")
    ]
    best = torch.load(recorded, weights_only=True)
    assert best["global_step"] < 9  # the weights of the best validation, not the interrupt's
    interrupted = [p.name for p in folder.glob("*interrupted*.ckpt")]
    assert len(interrupted) == 1, sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    ("stop", "workers"), [("--trainer.max_steps=6", 0), ("interrupt", 0), ("interrupt", 2)]
)
def test_synthetic_fit_resumed_mid_epoch_continues_the_epochs_batches(tmp_path, stop, workers):
    """A synthetic fit resumed within an epoch (from last.ckpt of a validation within it,
    or of Ctrl-C) started that epoch's batches over, in epoch 0's order: it trained the
    first batches twice and never the rest. It continues as the uninterrupted fit, with
    workers too (whose copies of the batches started in epoch 0's order before)."""
    from tests.lightning.lightning_helpers import RecordBatches

    common = [
        "--config=synthetic_large",
        f"--run_dir={tmp_path}",
        f"--data.init_args.num_workers={workers}",
        "--data.init_args.n_samples=64",
        "--data.init_args.n_val=16",
        "--data.init_args.n_test=16",
        "--data.init_args.batch_size=16",
        "--model.hidden_sizes=[4]",
        "--trainer.val_check_interval=0.5",
        "--trainer.max_epochs=3",
    ]
    record = "--trainer.callbacks+=tests.lightning.lightning_helpers.RecordBatches"
    if stop == "interrupt":  # Ctrl-C after epoch 1's second batch (step 6)
        with pytest.raises(SystemExit):
            interrupt = "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAt"
            run_cli("fit", *common, "--run_name=resumed", interrupt, "--trainer.callbacks.step=6")
    else:
        run_cli("fit", *common, "--run_name=resumed", stop)
    resumed = run_cli("fit", *common, "--run_name=resumed", "--ckpt_path=last", record)
    whole = run_cli("fit", *common, "--run_name=whole", record)
    (resumed_batches,) = [
        c.batches for c in resumed.trainer.callbacks if isinstance(c, RecordBatches)
    ]
    (whole_batches,) = [c.batches for c in whole.trainer.callbacks if isinstance(c, RecordBatches)]
    assert resumed_batches[0][:2] == (1, 2)
    assert resumed_batches == whole_batches[6:]


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_hpc_checkpoint_that_is_not_there_is_a_cli_error_before_anything_is_written(
    tmp_path, capsys, subcommand
):
    """``--ckpt_path hpc`` (Lightning's SLURM checkpoint, hpc_ckpt_<n>.ckpt in
    trainer.default_root_dir) with none there was Lightning's ValueError in a traceback once
    the run had started, its run folder written."""
    with pytest.raises(SystemExit) as e:
        run_cli(subcommand, "--config", DIGITS, f"--run_dir={tmp_path}", "--ckpt_path=hpc")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path hpc: no hpc_ckpt_<n>.ckpt in " in err, err
    assert "--trainer.default_root_dir" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("subcommand", ["fit", "test"])
@pytest.mark.parametrize("given", ["last", "path"])
def test_checkpoint_of_another_activation_is_refused_however_it_is_named(
    short_run, tmp_path, capsys, subcommand, given
):
    """A checkpoint trained with relu and ``--model.activation tanh``: with ``--ckpt_path last``
    the run evaluated (or trained on) the relu weights through tanh, reporting the metrics of
    a model nobody trained; with the checkpoint's path LightningCLI replaced the configured
    model by the checkpoint's hyperparameters and dropped the option without a word. Both
    are now refused alike, naming the option, before anything is written."""
    run = _copy_of_run(short_run, tmp_path)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    ckpt = "last" if given == "last" else str(run / "checkpoints/last.ckpt")
    with pytest.raises(SystemExit) as e:
        run_cli(
            subcommand,
            "--config",
            DIGITS,
            f"--run_dir={tmp_path}",
            f"--ckpt_path={ckpt}",
            "--model.activation=tanh",
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path: " in err and "does not fit the configured model" in err, err
    assert "model.activation: 'relu' in the checkpoint, 'tanh' configured" in err, err
    assert "Traceback" not in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["version_0"]


_WEIGHTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


@pytest.mark.parametrize(
    "saved",
    [
        tuple(_WEIGHTS),  # ERMClassifier(class_weight=(0.1, ...)) from Python
        torch.tensor(_WEIGHTS),  # ERMClassifier(class_weight=torch.tensor(...))
        torch.tensor(_WEIGHTS).tolist(),  # float32 values: 0.10000000149011612, ...
    ],
    ids=["tuple", "tensor", "float32-list"],
)
def test_a_checkpoints_class_weight_of_another_type_is_the_same_model(
    short_run, tmp_path, capsys, saved
):
    """A checkpoint saved from Python holds its hyperparameters as given: class weights as a
    tuple, a tensor or float32 values. Evaluated with the same weights configured (a list of
    decimals), all three were refused as another model (a tuple, a tensor is never equal
    to a list; 0.10000000149011612 != 0.1). The model holds its class weights as a float32
    buffer: equal there, they are the same model."""
    run = _copy_of_run(short_run, tmp_path)
    ckpt = run / "checkpoints/last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["class_weight"] = saved
    checkpoint["state_dict"]["class_weight"] = torch.tensor(_WEIGHTS)
    torch.save(checkpoint, ckpt)
    weights = f"--model.class_weight=[{', '.join(map(str, _WEIGHTS))}]"
    cli = run_cli(
        "test", "--config", DIGITS, f"--run_dir={tmp_path}", f"--ckpt_path={ckpt}", weights
    )
    assert cli.model.hparams.class_weight == _WEIGHTS
    assert "test/acc" in cli.trainer.callback_metrics
    # other weights are still another model
    other = f"--model.class_weight=[{', '.join(['1.0'] * 10)}]"
    with pytest.raises(SystemExit):
        run_cli("test", "--config", DIGITS, f"--run_dir={tmp_path}", f"--ckpt_path={ckpt}", other)
    assert "model.class_weight: " in capsys.readouterr().err


@pytest.mark.parametrize("given", ["last", "path"])
def test_an_explicit_checkpoint_path_keeps_the_configured_backend(short_run, tmp_path, given):
    """``test --ckpt_path <file> --model.backend torch`` evaluated torchbp's backend: LightningCLI
    replaced the configured model by the checkpoint's hyperparameters (``--ckpt_path last``
    kept the option). The backend, like compile, is how the same model runs, not which model:
    both ways of naming the checkpoint now run the configured one."""
    run = _copy_of_run(short_run, tmp_path)
    ckpt = "last" if given == "last" else str(run / "checkpoints/last.ckpt")
    args = ["--config", DIGITS, f"--run_dir={tmp_path}", f"--ckpt_path={ckpt}"]
    cli = run_cli("test", *args, "--model.backend=torch")
    assert cli.model.hparams.backend == "torch"
    assert type(cli.model.net[0]) is torch.nn.Linear  # stock torch.nn, not torchbp's subclass
    saved = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert saved["model"]["backend"] == "torch"


def test_ddp_workers_take_the_run_folder_rank_zero_made(tmp_path, monkeypatch):
    """Under DDP rank 0 makes ``version_N`` before Lightning launches the workers, which run
    the same command line again: they saw that folder and took ``version_N+1`` for their
    default_root_dir, checkpoint folder and loggers (Lightning broadcasts rank 0's only for
    its own logs and checkpoints). Rank 0 now hands its run folder to the processes it
    launches, in their environment."""
    from torchbp.lightning.run_folders import RUN_FOLDER_ENV, new_run_version

    for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID", RUN_FOLDER_ENV):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "ddp"
    (root / "version_0").mkdir(parents=True)  # an earlier run
    assert new_run_version(root)[0] == 1
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]
    monkeypatch.setenv("LOCAL_RANK", "1")  # a launched worker, with rank 0's environment
    assert new_run_version(root)[0] == 1
    # a worker of another run (another root) computes its own
    assert new_run_version(tmp_path / "other")[0] == 0
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]


def test_only_folders_count_as_run_versions(tmp_path, monkeypatch):
    """A file named ``version_7`` beside the run folders counted as a run: the next run
    took ``version_8``, where Lightning's own loggers count folders only (``version_1``); a
    file in the way of the next version is stepped over."""
    from torchbp.lightning.run_folders import RUN_FOLDER_ENV, new_run_version, run_versions

    for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID", RUN_FOLDER_ENV):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "runs"
    (root / "version_0").mkdir(parents=True)
    (root / "version_7").write_text("a file\n")
    assert run_versions(root) == [0]
    assert new_run_version(root)[0] == 1
    (root / "version_2").write_text("a file\n")
    assert new_run_version(root)[0] == 3


def _slurm_job(monkeypatch, job_id: str, restarts: int) -> None:
    """The environment SLURM gives a batch job (not through srun: Lightning's own SLURM
    handling stays off), ``restarts`` times requeued."""
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", job_id)
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))


def test_a_requeued_slurm_job_resumes_its_own_run_folder(tmp_path, monkeypatch, capsys):
    """On SLURM's auto-requeue Lightning saves ``hpc_ckpt_<n>.ckpt`` into
    trainer.default_root_dir, the run folder, and the requeued job runs the same command line
    again: it got a new run folder, found no hpc checkpoint there (``--ckpt_path hpc`` was an
    error; without it the job started again from scratch). It now continues in the run
    folder whose hpc checkpoint its own job saved; another job, requeued too, does not take
    that run."""
    _slurm_job(monkeypatch, "4242", 0)
    fit_digits(tmp_path, "--trainer.max_epochs=1", "--model.hidden_sizes=[16]")
    run = tmp_path / "digits/version_0"
    # what Lightning's requeue signal handler saves before the job is requeued
    shutil.copy(run / "checkpoints/last.ckpt", run / "hpc_ckpt_1.ckpt")

    _slurm_job(monkeypatch, "4243", 1)  # another job's requeue: a run of its own
    cli = fit_digits(tmp_path, "--trainer.max_epochs=1", "--model.hidden_sizes=[16]")
    assert Path(cli.trainer.default_root_dir) == tmp_path / "digits/version_1"
    assert cli.trainer.global_step == cli.trainer.num_training_batches  # from scratch

    _slurm_job(monkeypatch, "4242", 1)
    for ckpt in ([], ["--ckpt_path=hpc"]):
        cli = fit_digits(tmp_path, "--trainer.max_epochs=2", "--model.hidden_sizes=[16]", *ckpt)
        assert Path(cli.trainer.default_root_dir) == run
        assert cli.trainer.current_epoch == 2
        assert cli.trainer.global_step == 2 * cli.trainer.num_training_batches  # resumed
        assert "resumes" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["version_0", "version_1"]


def test_a_requeued_slurm_job_with_a_default_root_dir_logs_into_its_own_run_folder(
    tmp_path, monkeypatch
):
    """With ``--trainer.default_root_dir`` Lightning found the hpc checkpoint there, but the
    requeued job logged into a new run folder and checkpointed into another folder than the
    one its checkpoint callback's state recorded ("The dirpath has changed": the best score
    was dropped, so the first validation after the requeue became the best, however worse).
    It now continues in the run folder its job's hpc checkpoint recorded."""
    common = ["--model.hidden_sizes=[16]", f"--trainer.default_root_dir={tmp_path / 'hpc'}"]
    _slurm_job(monkeypatch, "77", 0)
    fit_digits(tmp_path, "--trainer.max_epochs=1", *common)
    run = tmp_path / "digits/version_0"
    (tmp_path / "hpc").mkdir(exist_ok=True)
    shutil.copy(run / "checkpoints/last.ckpt", tmp_path / "hpc/hpc_ckpt_1.ckpt")
    _slurm_job(monkeypatch, "77", 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The dirpath has changed")
        cli = fit_digits(tmp_path, "--trainer.max_epochs=2", *common)
    assert Path(cli.trainer.log_dir) == run
    assert cli.trainer.global_step == 2 * cli.trainer.num_training_batches  # resumed
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == ["version_0"]


def test_ckpt_path_last_finds_last_ckpt_in_a_configured_checkpoint_folder(tmp_path, capsys):
    """With --checkpoint.dirpath, last.ckpt is saved there, as Lightning's ckpt_path="last"
    finds it; torchbp-train looked only in the run folders: fit --ckpt_path last said "no
    last.ckpt ... starting from scratch" and trained anew, test --ckpt_path last refused."""
    iris = str(CONFIGS / "iris.yaml")
    common = ("--config", iris, f"--run_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path}/ck")
    run_cli("fit", *common, "--trainer.max_epochs=1")
    last = tmp_path / "ck" / "last.ckpt"
    assert last.is_file()
    resumed = run_cli("fit", *common, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert "starting from scratch" not in capsys.readouterr().err
    assert resumed.config_init["fit"]["ckpt_path"] == str(last)
    assert resumed.trainer.current_epoch == 2 and resumed.trainer.global_step == 2 * 7
    tested = run_cli("test", *common, "--ckpt_path=last")
    newest = max((tmp_path / "ck").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert tested.config_init["test"]["ckpt_path"] == str(newest)


@pytest.mark.parametrize("top_k", ["0", "1"])
def test_a_new_run_into_a_checkpoint_folder_keeps_the_last_ckpt_there(tmp_path, top_k):
    """A second run into the same --checkpoint.dirpath saved its last.ckpt over the first
    run's whenever Lightning itself saved no checkpoint at that epoch (every epoch with
    save_top_k 0, any epoch without a new best otherwise): the first run's latest weights were
    lost, and the second run's own last-v1.ckpt, which Lightning had named as its version
    counter does, stayed behind at an older step. Each run now keeps its own last checkpoint."""
    iris = str(CONFIGS / "iris.yaml")
    common = ("--config", iris, f"--run_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path}/ck")
    common += (f"--checkpoint.save_top_k={top_k}", "--checkpoint.monitor=val/loss")
    common += ("--checkpoint.mode=max",)  # val/loss falls: Lightning saves a best once
    run_cli("fit", *common, "--trainer.max_epochs=1")
    first = (tmp_path / "ck" / "last.ckpt").read_bytes()
    run_cli("fit", *common, "--trainer.max_epochs=2")
    assert (tmp_path / "ck" / "last.ckpt").read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "ck").glob("last*")) == ["last-v1.ckpt", "last.ckpt"]
    own = torch.load(tmp_path / "ck" / "last-v1.ckpt", weights_only=False)
    assert own["global_step"] == 2 * 7


def test_ckpt_path_last_finds_the_newest_last_checkpoint_of_a_moved_run(tmp_path):
    """A run resumed after its folder moved saves last-v1.ckpt beside last.ckpt (Lightning
    numbers it: the checkpoint records the old folder); --ckpt_path last took last.ckpt, the
    state before the resume, where Lightning's "last" takes the newest last*.ckpt."""
    common = ("--config", str(CONFIGS / "iris.yaml"), "--checkpoint.monitor=val/loss")
    run_cli("fit", *common, f"--run_dir={tmp_path}/a", "--trainer.max_epochs=1")
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = (*common, f"--run_dir={tmp_path}/b")
    run_cli("fit", *moved, "--trainer.max_epochs=2", "--ckpt_path=last")
    folder = tmp_path / "b/iris/version_0/checkpoints"
    assert (folder / "last-v1.ckpt").is_file()
    tested = run_cli("test", *moved, "--ckpt_path=last")
    assert tested.config_init["test"]["ckpt_path"] == str(folder / "last-v1.ckpt")


def test_ckpt_path_best_finds_the_best_checkpoint_in_a_configured_checkpoint_folder(tmp_path):
    """--ckpt_path best looked only in the run folders' checkpoints/: with
    --checkpoint.dirpath it refused ("no best checkpoint") though the folder held it."""
    iris = str(CONFIGS / "iris.yaml")
    common = ("--config", iris, f"--run_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path}/ck")
    fitted = run_cli("fit", *common, "--trainer.max_epochs=2")
    best = fitted.trainer.checkpoint_callback.best_model_path
    tested = run_cli("test", *common, "--ckpt_path=best")
    assert Path(tested.config_init["test"]["ckpt_path"]).resolve() == Path(best).resolve()


def test_ckpt_path_last_and_best_expand_a_home_relative_checkpoint_folder(
    tmp_path, monkeypatch, capsys
):
    """Lightning's ModelCheckpoint expands '~' in dirpath (a config file's
    'dirpath: ~/ck', which no shell expands) and saves there; --ckpt_path last looked in a
    literal './~/ck' folder: fit said 'starting from scratch' and trained anew, test
    --ckpt_path last / best refused."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    iris = str(CONFIGS / "iris.yaml")
    common = ("--config", iris, f"--run_dir={tmp_path}/runs", "--checkpoint.dirpath=~/ck")
    fitted = run_cli("fit", *common, "--trainer.max_epochs=1")
    last = tmp_path / "ck" / "last.ckpt"
    assert last.is_file()
    resumed = run_cli("fit", *common, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert "starting from scratch" not in capsys.readouterr().err
    assert Path(resumed.config_init["fit"]["ckpt_path"]) == last
    assert resumed.trainer.current_epoch == 2
    tested = run_cli("test", *common, "--ckpt_path=best")
    best = fitted.trainer.checkpoint_callback.best_model_path
    assert Path(tested.config_init["test"]["ckpt_path"]).resolve() == Path(best).resolve()


def test_ckpt_path_best_with_an_empty_checkpoint_folder_names_that_folder(tmp_path, capsys):
    """With --checkpoint.dirpath holding no checkpoint, --ckpt_path best said "no best
    checkpoint under <run_dir>/<run_name> ... (check --run_dir and --run_name ...)", a folder
    it had not looked in; it now names the configured folder it looked in."""
    folder = tmp_path / "ck"
    iris = str(CONFIGS / "iris.yaml")
    with pytest.raises(SystemExit):
        run_cli(
            "test",
            "--config",
            iris,
            f"--run_dir={tmp_path}",
            f"--checkpoint.dirpath={folder}",
            "--ckpt_path=best",
        )
    err = capsys.readouterr().err
    assert f"error: --ckpt_path best: no best checkpoint in {folder} (checkpoint.dirpath)" in err
    assert "--run_dir" not in err


def test_resuming_from_a_weights_only_checkpoint_is_a_cli_error_before_anything_is_written(
    tmp_path, capsys
):
    """``fit --ckpt_path last`` on a run saved with --checkpoint.save_weights_only true failed
    in Lightning's restore with a KeyError traceback, once the run had started: its exception
    checkpoint and a last-v1.ckpt (the newest, so the next ``--ckpt_path last`` took the
    failed resume's state) were written into the run folder. It is now an error up front."""
    fit_digits(
        tmp_path,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--checkpoint.save_weights_only=true",
    )
    capsys.readouterr()
    run = tmp_path / "digits/version_0"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        fit_digits(tmp_path, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path: " in err and "weights only" in err, err
    assert "Traceback" not in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("option", ["--trainer.max_epochs=0", "--trainer.limit_train_batches=0"])
def test_a_fit_that_trains_nothing_says_its_test_is_of_the_initial_weights(
    tmp_path, capsys, option
):
    """A fit of no training step (max_epochs: 0) saves no checkpoint and tests the model
    as initialised: it printed "test metrics (final weights)", as if it had trained."""
    fit_digits(tmp_path, option)
    captured = capsys.readouterr()
    setting = option.removeprefix("--")
    assert f"note: fit took no training step ({setting})" in captured.err
    assert "test metrics (initial weights, untrained)" in captured.out
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_fit_without_test_batches_still_names_its_run_folder(tmp_path, capsys):
    """With --trainer.limit_test_batches 0 the test that ends a fit returns no metrics,
    and the fit ended without a word of where its run folder is."""
    iris = ("--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}")
    short = ("--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1")
    run_cli("fit", *iris, *short, "--trainer.max_epochs=1", "--trainer.limit_test_batches=0")
    out = capsys.readouterr().out
    assert f"run folder: {tmp_path / 'iris/version_0'}" in out.splitlines(), out
    assert "test metrics" not in out


def test_a_predict_of_no_batch_says_it_wrote_no_predictions(tmp_path, capsys):
    """predict with --trainer.limit_predict_batches 0 wrote no predictions.csv and said
    nothing: the run seemed to have succeeded."""
    iris = ("--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}")
    run_cli("fit", *iris, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1")
    capsys.readouterr()
    run_cli("predict", *iris, "--ckpt_path=last", "--trainer.limit_predict_batches=0")
    err = capsys.readouterr().err
    assert "note: predict ran no batch (trainer.limit_predict_batches=0): no predictions" in err
    assert not list(tmp_path.rglob("predictions.csv"))


def test_seed_everything_true_draws_a_seed_per_run_its_config_records(tmp_path, monkeypatch):
    """``--seed_everything true`` (a random seed, LightningCLI's help says) seeded 0, as
    Lightning's seed_everything does without a seed: every such run was the default run.
    A later run in the same process (a notebook's second fit) took the seed an earlier one
    left in PL_GLOBAL_SEED (for the DDP workers Lightning launches), the default 0 too; a
    seed the process was started with is still taken, as a launched worker takes rank 0's."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # a fresh process's environment
    one_batch = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1"]
    one_batch += ["--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    seeds = []
    for run, (seed, started_with) in enumerate(
        [(0, None), (True, None), (True, None), (True, "12345")]
    ):
        if started_with:  # as Lightning's launcher passes rank 0's seed to a worker
            monkeypatch.setenv("PL_GLOBAL_SEED", started_with)
        fit_digits(tmp_path, f"--seed_everything={str(seed).lower()}", *one_batch)
        config = yaml.safe_load((tmp_path / f"digits/version_{run}/config.yaml").read_text())
        seeds.append(config["seed_everything"])
        assert os.environ["PL_GLOBAL_SEED"] == str(seeds[-1])  # the seed the run used
    assert seeds[0] == 0 and seeds[3] == 12345
    assert len({0, seeds[1], seeds[2]}) == 3  # two draws in [0, 2**32 - 1]


@pytest.mark.parametrize(
    ("monitor", "mode", "wanted"), [("val/acc", None, "max"), ("val/loss", "max", "min")]
)
@pytest.mark.parametrize(
    ("callback", "kind", "harm"),
    [
        ("EarlyStopping", "an EarlyStopping", "stop the fit while it improves"),
        ("ModelCheckpoint", "a ModelCheckpoint", "keep its worst checkpoints as the best"),
    ],
)
def test_a_callback_against_its_metrics_direction_is_a_cli_error_before_training(
    tmp_path, capsys, monitor, mode, wanted, callback, kind, harm
):
    """An EarlyStopping or a ModelCheckpoint of trainer.callbacks on val/acc takes
    Lightning's default mode, min: iris's fit of 20 epochs stopped after 3, while its
    accuracy rose (0.86, 0.86, 1.0), and was tested as if trained; the checkpoint kept the
    lowest accuracy's checkpoints as the best, silently."""
    args = [f"--trainer.callbacks.mode={mode}"] if mode else []
    with pytest.raises(SystemExit) as e:
        run_cli(
            "fit",
            "--config",
            str(CONFIGS / "iris.yaml"),
            f"--run_dir={tmp_path}",
            f"--trainer.callbacks+={callback}",
            f"--trainer.callbacks.monitor={monitor}",
            *args,
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: invalid configuration: {kind} monitors '{monitor}'" in err, err
    assert f"it would {harm}" in err, err
    assert f"give it mode: {wanted}" in err and f"callbacks+={callback}" in err, err
    assert not list(tmp_path.iterdir())


def test_an_early_stopping_mode_refusal_says_how_to_fix_it_in_a_config_file(tmp_path, capsys):
    """The refusal advised only --trainer.callbacks.mode=max, which sets the last callback
    of the list: for an EarlyStopping of a config file followed by another callback, that
    flag set the other one's mode, and the same refusal came back."""
    config = tmp_path / "early_stopping.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: pytorch_lightning.callbacks.EarlyStopping\n"
        "      init_args: {monitor: val/f1}\n"
        "    - class_path: pytorch_lightning.callbacks.ModelCheckpoint\n"
        "      init_args: {save_top_k: 0}\n"
    )
    common = ["fit", "--config", str(CONFIGS / "iris.yaml"), "--config", str(config)]
    for flag in ([], ["--trainer.callbacks.mode=max"]):  # the flag: the monitor's mode
        with pytest.raises(SystemExit) as e:
            run_cli(*common, f"--run_dir={tmp_path / 'runs'}", *flag)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "an EarlyStopping monitors 'val/f1' with mode 'min'" in err, err
    assert "in a config file, init_args: {mode: max}" in err, err
    assert "right after its --trainer.callbacks+=EarlyStopping" in err, err


def test_the_checkpoint_saved_on_ctrl_c_before_any_validation_is_named_by_its_step(tmp_path):
    """Ctrl-C in the first epoch, before a validation logged val/acc: Lightning wrote the
    missing metric as 0, epoch000-val_acc0.0000-interrupted.ckpt, as if the weights scored
    0 accuracy. It is named by epoch and step; after a validation, by the monitor again."""
    common = ["fit", "--config", str(CONFIGS / "iris.yaml"), "--trainer.max_epochs=2"]
    interrupt = "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAt"
    for step in (3, 10):  # epoch 0's batches are steps 1-7
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            run_cli(
                *common,
                f"--run_dir={tmp_path / str(step)}",
                interrupt,
                f"--trainer.callbacks.step={step}",
            )
        (path,) = (tmp_path / f"{step}/iris/version_0/checkpoints").glob("*-interrupted.ckpt")
        named = "epoch000-step3" if step == 3 else "epoch001-val_acc"
        assert path.name.startswith(named), path.name


def test_the_checkpoint_saved_on_ctrl_c_is_said_in_one_tidy_line(tmp_path, caplog):
    """Lightning said "An KeyboardInterrupt was raised with message:             , saved
    checkpoint to ..." (a line continuation inside its f-string, and Ctrl-C's empty
    message)."""
    import logging

    with caplog.at_level(logging.INFO), pytest.raises((SystemExit, KeyboardInterrupt)):
        run_cli(
            "fit",
            "--config",
            str(CONFIGS / "iris.yaml"),
            f"--run_dir={tmp_path}",
            "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAt",
            "--trainer.callbacks.step=2",
        )
    (saved,) = [r.getMessage() for r in caplog.records if "saved a checkpoint" in r.getMessage()]
    (path,) = (tmp_path / "iris/version_0/checkpoints").glob("*-interrupted.ckpt")
    assert saved == f"KeyboardInterrupt: saved a checkpoint to {path}", saved


@pytest.mark.parametrize(
    "interrupt",
    [
        "InterruptInValidation",
        "InterruptAfterValidation",
        "InterruptAtEpochEnd",
        "InterruptInSave",
        "InterruptAt",
    ],
)
def test_a_fit_resumed_from_a_checkpoint_saved_during_validation_warns_that_it_is_not_redone(
    tmp_path, interrupt
):
    """Ctrl-C in the end-of-epoch validation, then ``fit --ckpt_path last``: Lightning's
    saved loop counters made the resumed fit skip that validation silently (metrics.csv had
    no val/* of the epoch, its weights were no best candidate). The checkpoint records the
    unfinished validation, and the resumed fit warns, naming the interrupted checkpoint to
    validate; one saved in training, or at a finished validation, records none. Ctrl-C
    after the validation's metrics were logged, before the checkpoint callback considered
    its weights, was not recorded: the resumed fit skipped it without a warning; nor was
    Ctrl-C at the epoch's end before (InterruptAtEpochEnd) or in (InterruptInSave) the
    checkpoint callback's save, where Lightning considers the epoch's last validation."""
    from torchbp.lightning.run_checkpoint import UNFINISHED_VALIDATION_KEY

    common = [
        "fit",
        "--config",
        str(CONFIGS / "iris.yaml"),
        f"--run_dir={tmp_path}",
        "--trainer.max_epochs=2",
    ]
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_cli(*common, f"--trainer.callbacks+=tests.lightning.lightning_helpers.{interrupt}")
    folder = tmp_path / "iris/version_0/checkpoints"
    (interrupted,) = folder.glob("*-interrupted.ckpt")
    unfinished = torch.load(folder / "last.ckpt", weights_only=True).get(UNFINISHED_VALIDATION_KEY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(*common, "--run_name=iris", "--ckpt_path=last")
    said = [str(w.message) for w in caught if "saved during the validation" in str(w.message)]
    if interrupt == "InterruptAt":  # Ctrl-C in training: the validations all finished
        assert unfinished is None and not said, said
        return
    assert unfinished == {"epoch": 0, "step": 7, "checkpoint": interrupted.name}, unfinished
    assert len(said) == 1, said
    assert "validation of epoch 0 (step 7), which did not finish" in said[0], said
    assert f"validate --ckpt_path {interrupted} evaluates them" in said[0], said
    best = [p for p in folder.glob("epoch001-*.ckpt") if p != interrupted]
    assert best and UNFINISHED_VALIDATION_KEY not in torch.load(best[0], weights_only=True)


def test_a_fit_resumed_from_slurms_requeue_checkpoint_saved_during_validation_names_it(
    tmp_path,
):
    """SLURM's requeue signal within a validation: Lightning's handler saves
    hpc_ckpt_<n>.ckpt, which records the unfinished validation but no -interrupted.ckpt.
    The resumed fit's warning said "validate them (torchbp-train validate --ckpt_path)
    before this fit replaces the checkpoint": no path to give, and the fit replaces no hpc
    checkpoint. It names the checkpoint resumed from, which holds those weights."""
    common = ["fit", "--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}"]
    common += ["--trainer.max_epochs=2", "--checkpoint.save_on_exception=false"]
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_cli(
            *common, "--trainer.callbacks+=tests.lightning.lightning_helpers.RequeueInValidation"
        )
    hpc = tmp_path / "iris/version_0/hpc_ckpt_1.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(*common, "--run_name=iris", f"--ckpt_path={hpc}")
    said = [str(w.message) for w in caught if "saved during the validation" in str(w.message)]
    assert len(said) == 1, said
    assert f"torchbp-train validate --ckpt_path {hpc} evaluates them" in said[0], said


@pytest.mark.parametrize(
    "data",
    [
        ["--config=iris", "--data.init_args.batch_size=8"],
        [
            "--config=synthetic_large",
            "--data.init_args.n_samples=128",
            "--data.init_args.n_val=16",
            "--data.init_args.n_test=16",
            "--data.init_args.batch_size=16",
        ],
    ],
    ids=["array", "synthetic"],
)
def test_an_overfitting_fit_resumed_mid_epoch_continues_the_epochs_batches(tmp_path, data):
    """With --trainer.overfit_batches the train loader's sampler is sequential (Lightning
    replaces any other), and started every epoch over: a fit resumed within an epoch trained
    its first batches again and its last ones never (with a warning that the loader cannot
    continue). It trains the uninterrupted fit's batches."""
    from tests.lightning.lightning_helpers import RecordBatches

    def batches(cli):
        (recorder,) = [c for c in cli.trainer.callbacks if isinstance(c, RecordBatches)]
        return recorder.batches

    common = [
        "fit",
        *data,
        f"--run_dir={tmp_path}",
        "--trainer.max_epochs=2",
        "--trainer.overfit_batches=4",
        "--trainer.callbacks+=tests.lightning.lightning_helpers.RecordBatches",
    ]
    uninterrupted = batches(run_cli(*common, "--run_name=whole"))
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_cli(
            *common,
            "--run_name=cut",
            "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAt",
            "--trainer.callbacks.step=2",
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = batches(run_cli(*common, "--run_name=cut", "--ckpt_path=last"))
    assert resumed == uninterrupted[2:], (resumed, uninterrupted)
    assert not [w for w in caught if "cannot continue the epoch" in str(w.message)]


def test_last_ckpt_follows_the_epochs_when_another_checkpoint_callback_saves_first(tmp_path):
    """Another ModelCheckpoint of trainer.callbacks (Lightning runs it before the run's
    own) saved its best at the end of epoch 0: the run's checkpoint callback took that save
    for its own and skipped last.ckpt at that step, so a fit killed in epoch 1 (no checkpoint
    on the exception) left no last.ckpt to resume from, only the other callback's best."""
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_cli(
            "fit",
            "--config",
            str(CONFIGS / "iris.yaml"),
            f"--run_dir={tmp_path}",
            "--trainer.max_epochs=2",
            "--checkpoint.save_top_k=0",
            "--checkpoint.save_on_exception=false",
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.monitor=val/loss",
            "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAt",
            "--trainer.callbacks.step=10",  # epoch 0's batches are steps 1-7
        )
    last = tmp_path / "iris/version_0/checkpoints/last.ckpt"
    assert last.exists(), sorted(p.name for p in last.parent.iterdir())
    assert torch.load(last, weights_only=True)["global_step"] == 7


def test_a_fit_resumed_from_another_runs_checkpoint_keeps_that_runs_better_best(tmp_path, capsys):
    """fit --ckpt_path of another run's checkpoint saves into a new run folder: Lightning
    warned "The dirpath has changed" and dropped the best score that run recorded, so the
    first validation of the resumed fit became the best however worse, and the fit's test
    (and a later test --ckpt_path best) evaluated it. That run's best stays a candidate."""
    iris = ("--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}")
    run_cli("fit", *iris, "--trainer.max_epochs=1")
    old = tmp_path / "iris/version_0/checkpoints"
    (best,) = old.glob("epoch*.ckpt")
    checkpoint = torch.load(old / "last.ckpt", weights_only=False)
    (state,) = [s for k, s in checkpoint["callbacks"].items() if k.startswith("RunCheckpoint")]
    assert state["best_model_path"] == str(best)
    unbeatable = torch.tensor(2.0)  # an accuracy no validation of the resumed fit reaches
    state.update(best_model_score=unbeatable, kth_value=unbeatable)
    state["best_k_models"] = {str(best): unbeatable}
    resume_from = tmp_path / "resume_from.ckpt"
    torch.save(checkpoint, resume_from)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli("fit", *iris, "--trainer.max_epochs=2", f"--ckpt_path={resume_from}")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "dirpath has changed" in m], messages
    assert [m for m in messages if f"{best} (val/acc=2.0000), stays this fit's best" in m]
    assert cli.trainer.log_dir.endswith("version_1")
    assert cli.config_init["fit"]["checkpoint"].best_model_path == str(best)
    assert f"test metrics ({best})" in capsys.readouterr().out
    tested = run_cli("test", *iris, "--ckpt_path=best")
    assert tested.config_init["test"]["ckpt_path"] == str(best)


def test_a_fit_resumed_from_another_runs_checkpoint_keeps_its_own_save_top_k(tmp_path):
    """A fit resumed from another run's checkpoint with a smaller save_top_k (3, then 1)
    took all three of that run's best as its own: Lightning's count of them stayed above
    k, so it never removed one, and the fit kept every checkpoint it saved. It keeps
    save_top_k of its own; the other run's files are never deleted."""
    iris = ("--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}")
    short = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    latest = ["--checkpoint.monitor=epoch", "--checkpoint.mode=max", *short]
    run_cli("fit", *iris, *latest, "--trainer.max_epochs=3", "--checkpoint.save_top_k=3")
    old = tmp_path / "iris/version_0/checkpoints"
    before = sorted(p.name for p in old.iterdir())
    assert len(before) == 4, before  # three best and last.ckpt
    run_cli(
        "fit",
        *iris,
        *latest,
        "--trainer.max_epochs=6",
        "--checkpoint.save_top_k=1",
        f"--ckpt_path={old / 'last.ckpt'}",
    )
    new = sorted(p.name for p in (tmp_path / "iris/version_1/checkpoints").iterdir())
    assert new == ["epoch005-step12.ckpt", "last.ckpt"], new
    assert sorted(p.name for p in old.iterdir()) == before


def test_a_fit_resumed_from_another_runs_checkpoint_never_takes_a_third_runs_file(tmp_path):
    """A fit resumed from run A's checkpoint into a --checkpoint.dirpath that a run C had
    saved into took C's file of the name of A's best (epoch000-step2.ckpt) for A's best,
    tested C's weights as its own best and deleted C's file once a validation beat it. A's
    best is looked up under its own name only for a fit resumed from a file of the folder
    it saves into (a run folder moved since)."""
    iris = ("--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}")
    short = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    latest = ["--checkpoint.monitor=epoch", "--checkpoint.mode=max", *short]
    a, c = tmp_path / "a", tmp_path / "c"
    for dirpath in (a, c):
        run_cli("fit", *iris, *latest, "--trainer.max_epochs=1", f"--checkpoint.dirpath={dirpath}")
    (a / "epoch000-step2.ckpt").unlink()  # A's best is gone: no candidate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(
            "fit",
            *iris,
            *latest,
            "--trainer.max_epochs=2",
            f"--checkpoint.dirpath={c}",
            f"--ckpt_path={a / 'last.ckpt'}",
        )
    said = [str(w.message) for w in caught if "no candidates" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert (c / "epoch000-step2.ckpt").is_file()
    assert cli.config_init["fit"]["checkpoint"].best_model_path == str(c / "epoch001-step4.ckpt")


def test_a_fit_resumed_from_another_runs_checkpoint_never_deletes_its_files_below(tmp_path):
    """A fit resumed from run A's checkpoint with a --checkpoint.dirpath above A's folder
    (here the run folders' root) kept A's best as a candidate, and Lightning's top-k
    cleanup, which deletes a dropped best anywhere under the folder it saves into, deleted
    A's file once a validation beat it. A's best files there are no candidates (a warning
    says why); A's files stay."""
    iris = ("--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}")
    short = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    latest = ["--checkpoint.monitor=epoch", "--checkpoint.mode=max", *short]
    run_cli("fit", *iris, *latest, "--trainer.max_epochs=1")
    old = tmp_path / "iris/version_0/checkpoints"
    before = sorted(p.name for p in old.iterdir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(
            "fit",
            *iris,
            *latest,
            "--trainer.max_epochs=2",
            f"--checkpoint.dirpath={tmp_path}",
            f"--ckpt_path={old / 'last.ckpt'}",
        )
    assert sorted(p.name for p in old.iterdir()) == before
    said = [str(w.message) for w in caught if "no candidates" in str(w.message)]
    assert len(said) == 1 and f"inside {tmp_path}" in said[0], [str(w.message) for w in caught]
    best = cli.config_init["fit"]["checkpoint"].best_model_path
    assert best == str(tmp_path / "epoch001-step4.ckpt")


def test_a_fit_resumed_in_its_own_run_folder_does_not_warn_that_the_folder_is_not_empty(
    tmp_path,
):
    """Lightning's "Checkpoint directory ... exists and is not empty" came on every
    ``fit --ckpt_path last``, whose checkpoint folder holds the run's own files; a new run
    into a --checkpoint.dirpath that holds another run's files is still told."""
    iris = ("--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}")
    short = ("--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")
    shared = f"--checkpoint.dirpath={tmp_path / 'shared'}"
    run_cli("fit", *iris, *short, "--trainer.max_epochs=1", shared)
    run_cli("fit", *iris, *short, "--trainer.max_epochs=1")
    not_empty = []
    for resume in (["--ckpt_path=last"], [shared]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_cli("fit", *iris, *short, "--trainer.max_epochs=2", *resume)
        said = [str(w.message) for w in caught]
        not_empty.append([m for m in said if "exists and is not empty" in m])
    assert not not_empty[0], not_empty[0]
    assert len(not_empty[1]) == 1, not_empty[1]


def test_a_fit_resumed_in_its_moved_run_folder_keeps_its_best(tmp_path):
    """A run folder moved, then resumed with --ckpt_path last: its best checkpoints are
    looked up under their names in the folder it now saves into (the checkpoint records
    the old one), and epoch 0 (best by ``epoch`` with mode min) stays its best."""
    common = ["--config", str(CONFIGS / "iris.yaml"), "--checkpoint.monitor=epoch"]
    common += ["--checkpoint.mode=min", "--trainer.limit_train_batches=2"]
    run_cli("fit", *common, f"--run_dir={tmp_path}/a", "--trainer.max_epochs=1")
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = (*common, f"--run_dir={tmp_path}/b", "--trainer.max_epochs=2", "--ckpt_path=last")
    cli = run_cli("fit", *moved)
    best = tmp_path / "b/iris/version_0/checkpoints/epoch000-step2.ckpt"
    assert cli.config_init["fit"]["checkpoint"].best_model_path == str(best)


def test_an_interrupt_never_saves_over_an_earlier_interrupts_checkpoint(tmp_path):
    """Lightning names its exception checkpoint without its version counter: a second run
    into the same --checkpoint.dirpath, interrupted at the same epoch and step (or value),
    saved its -interrupted.ckpt over the first run's. It is numbered as Lightning numbers
    its other checkpoints."""
    common = [
        "--config",
        str(CONFIGS / "iris.yaml"),
        f"--run_dir={tmp_path}",
        f"--checkpoint.dirpath={tmp_path / 'ck'}",
        "--trainer.max_epochs=1",
        "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptAt",
        "--trainer.callbacks.step=3",
    ]
    for lr in ("0.01", "0.02"):
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            run_cli("fit", *common, f"--model.optimizer.lr={lr}")
    saved = sorted((tmp_path / "ck").glob(f"*{INTERRUPTED_SUFFIX}.ckpt"))
    names = [p.name for p in saved]
    assert names == ["epoch000-step3-interrupted.ckpt", "epoch000-step3-v1-interrupted.ckpt"]
    lrs = [torch.load(p, weights_only=False)["optimizer_states"][0] for p in saved]
    assert [s["param_groups"][0]["lr"] for s in lrs] == [0.01, 0.02]


def test_ctrl_c_in_the_save_of_a_best_checkpoint_leaves_a_fit_that_resumes_and_tests(tmp_path):
    """Lightning counts a checkpoint among the best before writing it: Ctrl-C in that save
    left a last.ckpt whose state named a best file never written. The fit resumed from it
    kept the missing file as its best (epoch 0 stays best by ``epoch`` with mode min) and
    its final test failed to load it. The resumed fit drops the missing file, saying so."""
    common = ["fit", "--config", str(CONFIGS / "iris.yaml"), f"--run_dir={tmp_path}"]
    common += ["--trainer.max_epochs=2", "--checkpoint.monitor=epoch", "--checkpoint.mode=min"]
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_cli(*common, "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptInSave")
    folder = tmp_path / "iris/version_0/checkpoints"
    assert not (folder / "epoch000-step7.ckpt").exists()
    assert (folder / "last.ckpt").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(*common, "--run_name=iris", "--ckpt_path=last")
    said = [str(w.message) for w in caught]
    best = cli.config_init["fit"]["checkpoint"].best_model_path
    assert Path(best).name == "epoch001-step14.ckpt" and Path(best).is_file()
    # what happened, what the fit does instead and what to do, for the missing file
    (gone,) = [m for m in said if "whose files are missing" in m]
    missing = str(folder / "epoch000-step7.ckpt")
    assert f"missing: {missing}. Lightning counts a checkpoint" in gone, gone
    assert "an interrupt (Ctrl-C, SIGTERM) during that save leaves it unwritten" in gone
    assert "no best checkpoint is left: this fit's next validation saves the new best" in gone
    assert "Nothing to do after an interrupt" in gone
    assert "test/acc" in cli.trainer.callback_metrics


def test_ctrl_c_in_the_save_of_a_validations_best_checkpoint_records_it_unfinished(tmp_path):
    """A validation within the epoch (val_check_interval < 1) saves its best checkpoint in
    the checkpoint callback's on_validation_end; Ctrl-C in that save (Lightning has counted
    the weights among the best, not written them) was not recorded as an unfinished
    validation, so the resumed fit skipped it without a warning."""
    from torchbp.lightning.run_checkpoint import UNFINISHED_VALIDATION_KEY

    with pytest.raises((SystemExit, KeyboardInterrupt)):
        run_cli(
            "fit",
            "--config",
            str(CONFIGS / "iris.yaml"),
            f"--run_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.val_check_interval=3",
            "--trainer.callbacks+=tests.lightning.lightning_helpers.InterruptInSave",
        )
    folder = tmp_path / "iris/version_0/checkpoints"
    (interrupted,) = folder.glob(f"*{INTERRUPTED_SUFFIX}.ckpt")
    unfinished = torch.load(interrupted, weights_only=True).get(UNFINISHED_VALIDATION_KEY)
    assert unfinished == {"epoch": 0, "step": 3, "checkpoint": interrupted.name}, unfinished


def test_a_random_seed_after_a_ddp_run_of_the_same_process_is_refused(
    tmp_path, monkeypatch, capsys
):
    """Lightning's launcher of a DDP run leaves LOCAL_RANK set in its process and in each
    worker, which runs the same command: a second fit with --seed_everything true in that
    command is not launched but run by every process on its own, and each drew its own
    seed (seen: ranks 0 and 1 trained with 1178447967 and 110015314). Refused, as for
    processes started apart; a first run takes rank 0's seed, as before."""
    one_batch = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1"]
    one_batch += ["--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fit_digits(tmp_path, "--seed_everything=0", *one_batch)
    monkeypatch.setenv("LOCAL_RANK", "1")  # as Lightning's launcher leaves it in a worker
    with pytest.raises(SystemExit) as e:
        fit_digits(tmp_path, "--seed_everything=true", *one_batch)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "started apart (LOCAL_RANK=1, left by Lightning's launch of an earlier" in err, err


def test_a_seed_the_process_was_started_with_is_taken_by_every_random_seed_run(
    tmp_path, monkeypatch
):
    """PL_GLOBAL_SEED in the environment the process started with (given by the user, or
    rank 0's, by Lightning's launcher) is what Lightning's seed_everything takes for
    --seed_everything true, in every run; only the first run of a process took it, a second
    drew another seed, as after a seed an earlier run of the process left there."""
    import torchbp.lightning.cli as cli

    one_batch = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1"]
    one_batch += ["--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    monkeypatch.setitem(cli._ENVIRONMENT_AT_START, "PL_GLOBAL_SEED", "12345")
    monkeypatch.setenv("PL_GLOBAL_SEED", "12345")
    for run in range(2):
        fit_digits(tmp_path, "--seed_everything=true", *one_batch)
        config = yaml.safe_load((tmp_path / f"digits/version_{run}/config.yaml").read_text())
        assert config["seed_everything"] == 12345, (run, config["seed_everything"])


def test_a_fit_resumed_from_a_checkpoint_of_other_data_chooses_its_own_best(tmp_path):
    """The best of a run on other data (another file of the same columns) is no candidate
    for a fit resumed from that run's checkpoint: its score is of another validation set,
    and a fine-tune that never beat it would have been tested on the other run's weights.
    A warning says that this fit's best is among its own validations (Lightning's said
    only "The dirpath has changed")."""
    data = ["--data=torchbp.lightning.data.TabularFileDataModule", "--data.label_column=kind"]
    data += ["--data.batch_size=8", f"--run_dir={tmp_path}", "--model.hidden_sizes=[4]"]
    for name, shift in (("a", 0), ("b", 1)):
        rows = "".join(f"{(i + shift) % 5},{i % 3},{('cat', 'dog')[i % 2]}\n" for i in range(40))
        (tmp_path / f"{name}.csv").write_text("w,h,kind\n" + rows)
    run_cli("fit", *data, f"--data.path={tmp_path / 'a.csv'}", "--trainer.max_epochs=1")
    last = tmp_path / "a/version_0/checkpoints/last.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_cli(
            "fit",
            *data,
            f"--data.path={tmp_path / 'b.csv'}",
            "--trainer.max_epochs=2",
            f"--ckpt_path={last}",
        )
    said = [str(w.message) for w in caught if "no candidates" in str(w.message)]
    assert len(said) == 1 and "validated on data not known to be the configured" in said[0]
    best = Path(cli.config_init["fit"]["checkpoint"].best_model_path)
    assert best.parent == tmp_path / "b/version_0/checkpoints" and best.is_file()
