"""The README and the pages under ``docs/`` stay true: every Python example runs as
written, and every relative link (file and ``#anchor``) resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _python_blocks() -> list[tuple[str, int, str]]:
    """``(page, line, code)`` of every fenced ```python block."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in _FENCE.finditer(text):
            if match.group(1) == "python":
                line = text.count("\n", 0, match.start()) + 1
                blocks.append((_name(page), line, match.group(2)))
    return blocks


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_page_is_found():
    names = [_name(p) for p in PAGES]
    assert "README.md" in names and len(names) >= 7, names


def test_api_tour_fits_in_30_lines():
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index("## The API in 30 lines")) + len("```python")
    code = text[start : text.index("```", start)]
    assert len(code.strip().splitlines()) <= 32


@pytest.mark.parametrize(("page", "line", "code"), _python_blocks(), ids=lambda v: str(v)[:40])
def test_python_example_runs(page, line, code):
    """Each example is self-contained and runs in a fresh namespace."""
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__docs__"})


def _links() -> list[tuple[str, str]]:
    links = []
    for page in PAGES:
        text = _FENCE.sub("", page.read_text())
        for target in _LINK.findall(text):
            if not re.match(r"[a-z]+://", target):
                links.append((_name(page), target))
    return links


@pytest.mark.parametrize(("page", "target"), _links())
def test_relative_link_resolves(page, target):
    source = ROOT / page
    path, _, anchor = target.partition("#")
    destination = (source.parent / path).resolve() if path else source
    assert destination.exists(), f"{page}: link to missing {target}"
    if anchor:
        assert destination.suffix == ".md", f"{page}: anchor into a non-Markdown file {target}"
        assert anchor in _anchors(destination), f"{page}: no heading for #{anchor} in {path}"
