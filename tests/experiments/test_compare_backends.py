"""``experiments/compare_backends.py``: arguments it cannot report on are refused up front."""

import logging

import pytest

from experiments import compare_backends


@pytest.fixture(autouse=True)
def _lightning_log_levels_restored():
    """compare_backends.main quiets Lightning's loggers for the whole process, as a script
    may: put their levels back, or later tests that read Lightning's messages see none."""
    names = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--epochs", "1", "--repeats", "1", "--timing-rounds", "1"], "--epochs"),
        (["--epochs", "2", "--repeats", "0", "--timing-rounds", "1"], "--repeats"),
        (["--epochs", "2", "--repeats", "1", "--timing-rounds", "0"], "--timing-rounds"),
    ],
)
def test_a_run_too_short_to_report_is_refused_before_training(tmp_path, capsys, argv, named):
    # the epoch-time median skips each run's first epoch, the tables read the first repeat,
    # and the plain-loop ratio needs a timed round: without them the run trained for
    # minutes, then died in statistics.median or an IndexError, writing nothing
    with pytest.raises(SystemExit) as exc:
        compare_backends.main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert named in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_report_names_the_command_that_made_it(tmp_path):
    # before: it always read "--epochs E --repeats R", whatever --seed, --threads or
    # --timing-rounds the figures came from
    argv = ["--epochs", "2", "--repeats", "1", "--timing-rounds", "1", "--seed", "3"]
    compare_backends.main([*argv, "--out", str(tmp_path)])
    text = (tmp_path / "compare_backends.md").read_text()
    expected = "python experiments/compare_backends.py --epochs 2 --repeats 1 --timing-rounds 1"
    assert f"`{expected} --seed 3 --out {tmp_path}`" in text
