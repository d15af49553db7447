"""The parts of ``torchbp-train``: bundled configs and how they are named, short error
messages, hidden Lightning noise, and the run folder's CSV logger."""

from __future__ import annotations

import fnmatch
import logging
import re
import warnings
from pathlib import Path

import pytest
import yaml
from tests.lightning.lightning_helpers import REPO, run_cli

from torchbp.lightning.config_files import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    bundled_configs,
    describe_bundled_configs,
    with_config_files,
)
from torchbp.lightning.console import LIGHTNING_LOGGERS, headline, quiet_lightning
from torchbp.lightning.run_logger import RunCSVLogger

DIGITS = str(CONFIG_DIR / "digits.yaml")


# -- bundled configs ----------------------------------------------------------------------------
def test_bundled_configs():
    names = set(bundled_configs())
    assert {"digits", "digits_native", "iris", "wine", "breast_cancer"} <= names
    assert {"synthetic_large", "ddp_cpu"} <= names and DEFAULT_CONFIG in names


def test_bundled_configs_are_package_data():
    """``pip install`` ships every bundled config (pyproject's package-data names them)."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["torchbp"]
    package = CONFIG_DIR.parents[1]  # the imported torchbp: the checkout's or an installed one
    for path in bundled_configs().values():
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in patterns), rel


@pytest.mark.parametrize(
    "args, expected",
    [
        (["fit"], ["fit", "--config", DIGITS]),
        (["fit", "--trainer.max_epochs=2"], ["fit", "--config", DIGITS, "--trainer.max_epochs=2"]),
        (["test", "--ckpt_path", "x.ckpt"], ["test", "--config", DIGITS, "--ckpt_path", "x.ckpt"]),
        (["fit", "--config", "iris"], ["fit", "--config", str(CONFIG_DIR / "iris.yaml")]),
        (["fit", "-c", "wine"], ["fit", "-c", str(CONFIG_DIR / "wine.yaml")]),
        (["fit", "--config=wine"], ["fit", f"--config={CONFIG_DIR / 'wine.yaml'}"]),
        (["fit", "--config", "my.yaml"], ["fit", "--config", "my.yaml"]),
        (["fit", "-cmy.yaml"], ["fit", "-cmy.yaml"]),
        # argparse's attached forms of the short option name a bundled config too
        (["fit", "-cwine"], ["fit", f"-c{CONFIG_DIR / 'wine.yaml'}"]),
        (["fit", "-c=wine"], ["fit", f"-c={CONFIG_DIR / 'wine.yaml'}"]),
        (["--help"], ["--help"]),
        ([], []),
    ],
)
def test_with_config_files(args, expected):
    assert with_config_files(args) == expected


def test_an_existing_file_wins_over_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("iris").write_text("seed_everything: 3\n")
    assert with_config_files(["fit", "--config", "iris"]) == ["fit", "--config", "iris"]


def _printed_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as e:
        run_cli("fit", *args, "--print_config")
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_no_config_and_config_by_name_equal_the_files(capsys):
    by_file = _printed_config(capsys, "--config", DIGITS)
    assert _printed_config(capsys) == by_file
    assert _printed_config(capsys, "--config", "digits") == by_file
    iris = _printed_config(capsys, "--config", "iris")
    assert iris == _printed_config(capsys, "--config", str(CONFIG_DIR / "iris.yaml"))
    assert iris["data"]["init_args"]["name"] == "iris"


def test_options_after_the_default_config_override_it(capsys):
    cfg = _printed_config(capsys, "--model.hidden_sizes=[32]", "--trainer.max_epochs=3")
    assert cfg["model"]["hidden_sizes"] == [32] and cfg["trainer"]["max_epochs"] == 3
    assert cfg["model"]["optimizer"]["init_args"]["lr"] == 0.002  # the rest is digits.yaml's


def test_help_names_the_bundled_configs(capsys):
    with pytest.raises(SystemExit):
        run_cli("--help")
    out = " ".join(capsys.readouterr().out.split())
    assert describe_bundled_configs() in out and "digits_native" in out


# -- messages -----------------------------------------------------------------------------------
NESTED = """Parser key "data":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'ClassificationDataModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'torchbp.lightning.data.DigitsDataModule':
        Parser key "batch_size":
          Expected a <class 'int'>. Got value: x
    - Expected a <class 'NoneType'>"""

# an error raised while instantiating a Union-typed argument: no "Parser key" line
UNION_NO_KEY = """Does not validate against any of the Union subtypes
Subtypes: [<class 'torchbp.lightning.privacy.Privacy'>, <class 'NoneType'>]
Errors:
  - privacy.max_grad_norm must be > 0 and finite, got 0.0
  - Expected a <class 'NoneType'>
Given value type: <class 'jsonargparse._namespace.Namespace'>"""


@pytest.mark.parametrize(
    "message, expected",
    [
        (
            "Parser key \"model.hidden_sizes\":\n  Expected a <class 'list'>. Got value: oops",
            "model.hidden_sizes: Expected a <class 'list'>. Got value: oops",
        ),
        (NESTED, "data.batch_size: Expected a <class 'int'>. Got value: x"),
        ("unrecognized arguments: --nope 3", "unrecognized arguments: --nope 3"),
        (UNION_NO_KEY, "privacy.max_grad_norm must be > 0 and finite, got 0.0"),
    ],
)
def test_headline(message, expected):
    assert headline(message) == expected


def test_long_parse_error_keeps_its_details_after_the_cause(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--data.init_args.batch_size=x")
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: data.batch_size: Expected a <class 'int'>. Got value: x", lines
    assert lines[-1].startswith("tip: ") and len(lines) > 3


TYPO_CONFIGS = {
    "config-key": ("model:\n  hiden_sizes: [8]\n", "'model.hidden_sizes'"),
    "trainer-key": ("trainer:\n  max_epoch: 1\n", "'trainer.max_epochs'"),
    "data-class-key": (
        "data:\n  class_path: torchbp.lightning.data.TabularFileDataModule\n"
        "  init_args:\n    path: my.csv\n    label_colum: y\n",
        "'label_column'",
    ),
}


@pytest.mark.parametrize("case", sorted(TYPO_CONFIGS))
def test_a_misspelt_config_key_is_named_with_the_key_it_means(tmp_path, capsys, case):
    """A typo in a config file's key was named ("does not accept option
    'model.hiden_sizes'", "Option 'label_colum' is not accepted") with no hint at the key
    meant; the first line now suggests it."""
    text, meant = TYPO_CONFIGS[case]
    config = tmp_path / "typo.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", str(config))
    assert e.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("error: ") and f"did you mean {meant}?" in first, first


@pytest.mark.parametrize(("given", "meant"), [("irs", "iris"), ("my_own.yaml", None)])
def test_a_config_that_is_no_file_nor_bundled_name_lists_the_bundled_ones(
    tmp_path, monkeypatch, capsys, given, meant
):
    """``--config digit`` (a misspelt bundled name) said only "File does not exist" at a
    path the user never typed, with nothing to say that names of bundled configs work."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--config", given)
    assert e.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert f"no file '{tmp_path / given}', nor a bundled config (" in first, first
    assert ", ".join(bundled_configs()) in first, first
    assert first.endswith(f"; did you mean {meant}?" if meant else ")"), first


def test_a_misspelt_command_line_option_is_named_with_the_option_it_means(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("fit", "--model.hiden_sizes", "[4]")
    assert e.value.code == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert "--model.hiden_sizes" in first and "did you mean --model.hidden_sizes?" in first


def test_quiet_lightning_hides_unactionable_noise(caplog):
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        with quiet_lightning():
            message = "`isinstance(treespec, LeafSpec)` is deprecated, use ..."
            warnings.warn(message, FutureWarning, stacklevel=1)
            rank_zero_info("💡 Tip: For seamless cloud logging, try litlogger")
            rank_zero_info("GPU available: False, used: False")
        warnings.warn("a warning outside the block", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning outside the block"]
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_quiet_lightning_nested_keeps_the_outer_blocks_filter_and_leaves_none(caplog):
    """A quiet_lightning block inside another (torchbp-train's cli_main run within a caller's
    own block) removed the log filter at its end, which the outer block had added: the
    outer block's rest showed Lightning's adverts again. No filter is left after both."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    advert = "💡 Tip: For seamless cloud logging, try litlogger"
    with caplog.at_level(logging.INFO):
        with quiet_lightning():
            with quiet_lightning():
                rank_zero_info(advert)
            rank_zero_info(advert)
            rank_zero_info("GPU available: False, used: False")
        rank_zero_info("after the block")
    assert [r.getMessage() for r in caplog.records] == [
        "GPU available: False, used: False",
        "after the block",
    ]
    for name in LIGHTNING_LOGGERS:
        assert logging.getLogger(name).filters == [], name


# -- run logger ---------------------------------------------------------------------------------
def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    import csv

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_run_logger_writes_lightnings_layout_and_appends_on_resume(tmp_path):
    logger = RunCSVLogger(tmp_path, "digits", version=0)
    run = tmp_path / "digits/version_0"
    assert logger.log_dir == logger.save_dir == str(run)
    assert (logger.name, logger.version) == ("digits", 0)
    logger.log_hyperparams({"hidden_sizes": [256], "activation": "relu"})
    assert yaml.safe_load((run / "hparams.yaml").read_text())["hidden_sizes"] == [256]
    logger.log_metrics({"val/acc": 0.5, "epoch": 0}, step=9)
    logger.save()
    logger.log_metrics({"train/loss": 1.5, "epoch": 0}, step=9)  # a new column: rewritten
    logger.save()
    header, rows = _read_csv(run / "metrics.csv")
    assert header == ["epoch", "step", "train/loss", "val/acc"]
    assert rows == [
        {"epoch": "0", "step": "9", "train/loss": "", "val/acc": "0.5"},
        {"epoch": "0", "step": "9", "train/loss": "1.5", "val/acc": ""},
    ]
    resumed = RunCSVLogger(tmp_path, "digits", version=0)  # a resumed run: same folder
    resumed.log_metrics({"val/acc": 0.75, "epoch": 1}, step=19)
    resumed.finalize("success")
    header, rows = _read_csv(run / "metrics.csv")
    assert len(rows) == 3 and rows[-1]["val/acc"] == "0.75" and rows[0]["val/acc"] == "0.5"


def _ddp_trainer(devices: int, **kwargs):
    """A Trainer of ``devices`` CPU processes (DDP); made, not launched."""
    import pytorch_lightning as pl

    strategy = "ddp" if devices > 1 else "auto"
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, **kwargs)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            {"limit_val_batches": 0.15},
            "limit_val_batches=0.15 keeps none of the 5 val batches of process 0 (of 2, DDP)",
        ),
        (
            {"val_check_interval": 30},
            "val_check_interval=30 (batches) is above the 19 training batches of an epoch "
            "of process 0 (of 2, DDP)",
        ),
    ],
    ids=["limit_val_batches", "val_check_interval"],
)
def test_batch_counts_under_ddp_are_those_of_each_process(option, message):
    """Under DDP each process counts the batches of its shard (digits, 32 a batch: 37
    training and 9 validation batches in one process, 19 and 5 in each of 2): the check
    was skipped there, and Lightning refused these settings in every launched process,
    with a traceback, once the run folder was written."""
    from torchbp.lightning.data import DigitsDataModule
    from torchbp.lightning.run_checks import check_batch_counts

    data = DigitsDataModule(batch_size=32)
    check_batch_counts("fit", data, _ddp_trainer(1, **option))  # one process: enough batches
    with pytest.raises(ValueError, match=re.escape(message)):
        check_batch_counts("fit", data, _ddp_trainer(2, **option))


@pytest.mark.parametrize(
    "option",
    [
        {"fast_dev_run": True, "min_epochs": 3},  # Lightning runs one batch, as asked
        {"fast_dev_run": 2, "min_steps": 50},
        {"max_epochs": -1, "min_epochs": 3},  # no maximum
        {"max_steps": -1, "min_steps": 50, "max_epochs": 5},
        {"min_epochs": 2, "max_epochs": 2},
    ],
    ids=["fast_dev_run_epochs", "fast_dev_run_steps", "no_max_epochs", "no_max_steps", "equal"],
)
def test_training_length_takes_a_minimum_that_can_hold(option):
    """``--trainer.fast_dev_run`` (a one-batch check of a config whose min_epochs or
    min_steps is above 1) was refused as a minimum above the maximum: Lightning sets that
    maximum to 1 epoch and n steps itself, and means to."""
    from torchbp.lightning.run_checks import check_training_length

    check_training_length("fit", _ddp_trainer(1, **option))


@pytest.mark.parametrize("interval", ["00:00:01:00", {"minutes": 1}], ids=["str", "dict"])
def test_time_based_val_check_interval_passes_the_checks(interval):
    """Lightning 2.6 validates every ``val_check_interval`` of wall time given as
    ``DD:HH:MM:SS``, a dict or a timedelta, and then leaves ``trainer.val_check_interval``
    unset: the checks raised an AttributeError traceback."""
    from torchbp.lightning.data import DigitsDataModule
    from torchbp.lightning.run_checks import check_batch_counts, check_trainer_intervals

    try:
        trainer = _ddp_trainer(1, val_check_interval=interval)
    except Exception as e:  # Lightning < 2.6 takes a number of batches or a fraction only
        pytest.skip(f"this Lightning has no time-based val_check_interval: {e}")
    check_trainer_intervals("fit", trainer)
    check_batch_counts("fit", DigitsDataModule(batch_size=32), trainer)


# -- seeds --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("environment", "num_nodes", "cause"),
    [
        ({"WORLD_SIZE": "2"}, 1, "WORLD_SIZE=2"),  # torchrun
        ({"SLURM_NTASKS": "4"}, 1, "SLURM_NTASKS=4"),  # srun
        ({}, 2, "trainer.num_nodes=2"),  # a command per node
    ],
)
def test_a_random_seed_in_processes_started_apart_is_refused(
    monkeypatch, capsys, environment, num_nodes, cause
):
    """``--seed_everything true`` drew a seed in every process that torchrun, srun or each
    node's command started: the ranks trained with different seeds, and config.yaml recorded
    rank 0's only. Only Lightning's own workers inherit rank 0's (PL_GLOBAL_SEED)."""
    from jsonargparse import Namespace

    from torchbp.lightning.cli import _random_seed_if_asked

    for variable in ("PL_GLOBAL_SEED", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    parsed = Namespace(seed_everything=True, trainer=Namespace(num_nodes=num_nodes))
    with pytest.raises(SystemExit) as e:
        _random_seed_if_asked(parsed)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "seed_everything: true draws a random seed in each process" in err, err
    assert f"started apart ({cause})" in err and "same int seed" in err, err
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # a worker Lightning launched: rank 0's seed
    _random_seed_if_asked(parsed)
    assert parsed.seed_everything is True  # left to Lightning, which takes PL_GLOBAL_SEED


@pytest.mark.parametrize("job_name", ["bash", "interactive"])
def test_a_random_seed_in_an_interactive_slurm_job_of_several_tasks_is_drawn(monkeypatch, job_name):
    """``salloc -n 4`` then one command in its shell: SLURM_NTASKS=4, but Lightning takes an
    interactive job (named bash or interactive) for no srun launch and starts its own
    workers, which inherit the seed drawn here; it was refused as processes started apart."""
    from jsonargparse import Namespace

    from torchbp.lightning.cli import _random_seed_if_asked

    for variable in ("PL_GLOBAL_SEED", "WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", job_name)
    parsed = Namespace(seed_everything=True, trainer=Namespace(num_nodes=1))
    _random_seed_if_asked(parsed)
    assert isinstance(parsed.seed_everything, int) and 0 <= parsed.seed_everything < 2**32


def test_a_random_seed_in_one_process_is_drawn(monkeypatch):
    from jsonargparse import Namespace

    from torchbp.lightning.cli import _random_seed_if_asked

    for variable in ("PL_GLOBAL_SEED", "SLURM_NTASKS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    parsed = Namespace(seed_everything=True, trainer=Namespace(num_nodes=1))
    _random_seed_if_asked(parsed)
    assert isinstance(parsed.seed_everything, int) and 0 <= parsed.seed_everything < 2**32


# -- monitors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("callback", ["ModelCheckpoint", "EarlyStopping"])
def test_a_subclass_of_erm_classifier_gets_the_monitors_mode_check_too(tmp_path, callback):
    """A subclass of ERMClassifier logs ERMClassifier's metrics (and maybe more): a callback
    on its ``val/acc`` left at Lightning's default mode ``min`` would keep its worst
    checkpoints / stop while it improves, as for ERMClassifier itself; only the check that
    the monitor is logged is skipped for a subclass (it may log names of its own)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    from torchbp.lightning import ERMClassifier
    from torchbp.lightning.run_checks import check_monitors

    class Subclass(ERMClassifier):
        pass

    model = Subclass(input_size=4, num_classes=3, hidden_sizes=[5])
    kinds = {"ModelCheckpoint": ModelCheckpoint, "EarlyStopping": EarlyStopping}

    def trainer(monitor, **mode):
        made = kinds[callback](monitor=monitor, **mode)
        return pl.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[made])

    with pytest.raises(ValueError, match=r"monitors 'val/acc' with mode 'min'.*give it mode: max"):
        check_monitors(model, trainer("val/acc"), own=None)
    check_monitors(model, trainer("val/acc", mode="max"), own=None)
    check_monitors(model, trainer("val/its_own_metric"), own=None)  # a subclass's own name


# -- checkpoint callback's warnings ----------------------------------------------------------
def test_the_missing_best_warning_names_the_best_that_is_left():
    """A fit resumed in its own folder whose checkpoint records a best file that is missing
    says which file, why, and which best the fit's test and --ckpt_path best take."""
    import torch

    from torchbp.lightning.run_checkpoint import RunCheckpoint, _gone_best_warning

    callback = RunCheckpoint(monitor="val/acc", mode="max")
    callback._keep_best_k_models(
        {"/r/epoch001.ckpt": torch.tensor(0.9), "/r/e2": torch.tensor(0.8)}
    )
    said = _gone_best_warning(["/r/epoch003.ckpt"], callback)
    assert "records best checkpoints whose files are missing: /r/epoch003.ckpt." in said
    assert "the best so far is /r/epoch001.ckpt (val/acc=0.9000), which the fit's final" in said


@pytest.mark.parametrize(
    "monitor, name",
    [
        ("val/acc", "epoch004-val_acc0.9666.ckpt"),
        ("val/f1", "epoch004-val_f1=0.9666.ckpt"),  # was epoch004-val_f10.9666.ckpt
        ("epoch", "epoch004-step95.ckpt"),
    ],
)
def test_the_best_checkpoints_name_sets_the_monitored_value_apart(monitor, name):
    """The best checkpoint's file name joins the monitored metric and its value; a name
    ending in a digit ran into the value: val/f1 at 0.9666 was ``val_f10.9666``."""
    import torch

    from torchbp.lightning.run_checkpoint import RunCheckpoint, checkpoint_filename

    callback = RunCheckpoint(
        monitor=monitor, filename=checkpoint_filename(monitor), auto_insert_metric_name=False
    )
    metrics = {"epoch": torch.tensor(4), "step": torch.tensor(95)}
    metrics.setdefault(monitor, torch.tensor(0.9666))
    assert callback.format_checkpoint_name(metrics) == name
