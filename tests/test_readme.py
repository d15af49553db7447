"""The README's API tour runs as written."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_api_tour_runs():
    text = README.read_text()
    start = text.index("```python", text.index("## The API in 30 lines")) + len("```python")
    code = text[start : text.index("```", start)]
    assert len(code.strip().splitlines()) <= 32
    exec(compile(code, str(README), "exec"), {})
