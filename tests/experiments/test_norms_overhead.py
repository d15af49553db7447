"""experiments.norms_overhead runs end to end (tiny)."""

from __future__ import annotations

import pytest

from experiments import norms_overhead


def test_runs_and_prints_every_case(capsys):
    assert norms_overhead.main(["--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("plain", "norms", "bare_deferred", "context: build"):
        assert name in out


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        norms_overhead.main(["--rounds", "0"])
