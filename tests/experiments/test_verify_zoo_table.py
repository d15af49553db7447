"""experiments.verify_zoo_table's command line."""

from __future__ import annotations

import pytest

from experiments import verify_zoo_table


def test_help_runs_nothing_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """--help prints usage and exits 0; before, the arguments were ignored: it ran the
    whole zoo and overwrote the committed table."""
    monkeypatch.setattr(verify_zoo_table, "ZOO", [])  # a run would write an empty table
    monkeypatch.setattr(verify_zoo_table, "OUT", tmp_path / "zoo.md")
    with pytest.raises(SystemExit) as exit_info:
        verify_zoo_table.main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out
    assert not (tmp_path / "zoo.md").exists()
