"""The README and the pages under ``docs/`` stay true: every Python example runs as
written and prints what the comments beside its ``print`` calls say, every relative link
(file and ``#anchor``) resolves, and every command they give names a real module or CLI
taking the flags shown."""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import inspect
import io
import re
import runpy
import sys
import tokenize
from collections import defaultdict
from pathlib import Path

import pytest
import torch

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


def _shown_outputs() -> dict[tuple[str, int], str]:
    """``{(page, line): text}``: a bare fenced block right after a ```python block (only
    blank lines between) shows what that example prints."""
    shown = {}
    for page in PAGES:
        text = page.read_text()
        matches = list(_FENCE.finditer(text))
        for block, after in zip(matches, matches[1:]):
            adjacent = not text[block.end() : after.start()].strip()
            if block.group(1) == "python" and after.group(1) == "" and adjacent:
                line = text.count("\n", 0, block.start()) + 1
                shown[(_name(page), line)] = after.group(2)
    return shown


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


def _claimed_outputs(code: str) -> dict[int, str]:
    """``{line: text}`` for every ``print(...)`` call whose last line carries a comment: the
    comment states what the call prints (``print(y.shape)  # torch.Size([32])``)."""
    comments = {
        token.start[0]: token.string[1:].strip()
        for token in tokenize.generate_tokens(io.StringIO(code).readline)
        if token.type == tokenize.COMMENT
    }
    claims = {}
    for node in ast.walk(ast.parse(code)):
        is_print = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
        if is_print and node.end_lineno in comments:
            claims[node.lineno] = comments[node.end_lineno]
    return claims


@functools.cache
def _run_printing(code: str, name: str) -> tuple[dict[int, str], str]:
    """Run ``code`` in a fresh namespace (once per code); ``{line of a print call: what it
    printed}`` and all it printed (also echoed to stdout). Prints to a file other than stdout
    are passed through."""
    printed: dict[int, list[str]] = defaultdict(list)

    def recording_print(*args, **kwargs):
        if kwargs.get("file") not in (None, sys.stdout):
            return print(*args, **kwargs)
        buffer = io.StringIO()
        print(*args, **{**kwargs, "file": buffer})
        caller = inspect.currentframe().f_back
        if caller.f_code.co_filename == name:
            printed[caller.f_lineno].append(buffer.getvalue())
        sys.stdout.write(buffer.getvalue())

    namespace = {"__name__": "__docs__", "print": recording_print}
    exec(compile(code, name, "exec"), namespace)
    everything = "".join(part for parts in printed.values() for part in parts)
    return {line: "".join(parts).strip() for line, parts in printed.items()}, everything


def _states(claim: str, output: str) -> bool:
    """The comment gives the output exactly, or the output then ``: `` and an explanation
    (``# torch.Size([32]): each sample's gradient norm``). The docs state no approximate
    (``~``/``≈``) outputs, so none is accepted."""
    return claim == output or claim.startswith(output + ": ")


_MEASURED = re.compile(r"\b\d+(?:\.\d+)? m?s\b|\b\d\.\de[+-]\d+\b")


def _shape(line: str) -> str:
    """A line of output with its measurements (``293 ms``, ``1.81 s``, ``5.4e-10``) as ``~``
    and runs of spaces as one: timings and rounding errors vary from run to run; names,
    statuses, counts and messages do not."""
    return " ".join(_MEASURED.sub("~", line).split())


def _unshown_lines(shown: str, output: str) -> list[str]:
    """Lines of a shown output block that the real output lacks, in order: each must match
    (:func:`_shape`) a later line of the output than the one before; ``...`` marks lines
    left out (a block may also leave out lines silently)."""
    actual = [_shape(line) for line in output.splitlines()]
    position, missing = 0, []
    for line in shown.splitlines():
        wanted = _shape(line)
        if not wanted or wanted == "...":
            continue
        if wanted in actual[position:]:
            position = actual.index(wanted, position) + 1
        else:
            missing.append(line)
    return missing


def _wrong_outputs(code: str, name: str, shown: str = "") -> list[str]:
    printed, everything = _run_printing(code, name)
    wrong = []
    for line, claim in sorted(_claimed_outputs(code).items()):
        if line not in printed:
            wrong.append(f"{name}+{line}: never printed; comment says {claim!r}")
        elif not _states(claim, printed[line]):
            wrong.append(f"{name}+{line}: prints {printed[line]!r}; comment says {claim!r}")
    for line in _unshown_lines(shown, everything):
        wrong.append(f"{name}: the output shown after it has {line!r}; it prints:\n{everything}")
    return wrong


@pytest.mark.parametrize(("page", "line", "code"), _python_blocks(), ids=lambda v: str(v)[:40])
def test_python_example_runs_and_prints_what_it_says(page, line, code):
    """Each example is self-contained, runs in a fresh namespace, and each commented print
    call prints what its comment says, as does the output block shown right after it."""
    if "mode.counts" in code and not hasattr(torch.overrides, "redispatch_function"):
        pytest.skip(
            "the counts need torch.overrides.redispatch_function (torch 2.13+): without it "
            "MultiheadAttention's projections stay native"
        )
    wrong = _wrong_outputs(code, f"{page}:{line}", _shown_outputs().get((page, line), ""))
    assert not wrong, "\n".join(wrong)


def test_commented_prints_are_found():
    claims = [c for _, _, code in _python_blocks() for c in _claimed_outputs(code).values()]
    assert "torch.Size([32])" in claims and len(claims) >= 3, claims


_BROKEN_OUTPUTS = [
    ("docs/dropin.md", "{'linear': 5, 'gelu'", "{'linear': 4, 'gelu'"),
    ("docs/per_sample.md", "# torch.Size([32]): each", "# torch.Size([32, 1]): each"),
    ("docs/per_sample.md", "# torch.Size([32]): each", "# torch.Size([32]) each"),
    ("docs/per_sample.md", "print(ps.norms.shape)", "if False:\n    print(ps.norms.shape)"),
]


_BROKEN_SHOWN = [
    ("docs/verify.md", "vmap                unsupported", "vmap                pass"),
    ("docs/verify.md", "Square: OK (2 unsupported)", "Square: OK (1 unsupported)"),
    (
        "docs/verify.md",
        "forward_ad [unsupported]: Function has no jvp",
        "forward_ad [unsupported]: no",
    ),
    ("docs/verify.md", "gradcheck           pass         5.4e-10", "gradcheck           pass   -"),
    ("docs/verify.md", "extreme_values      pass", "...\nextreme_values      pass\nforward   pass"),
]


def test_shown_outputs_are_found():
    assert ("docs/verify.md", 3) in _shown_outputs()


@pytest.mark.parametrize(("page", "old", "new"), _BROKEN_SHOWN)
def test_output_check_catches_a_wrong_shown_output(page, old, new):
    """A broken copy of an output block shown after an example fails the check."""
    ((line, shown),) = [(n, s) for (p, n), s in _shown_outputs().items() if p == page]
    assert old in shown
    code = next(c for p, n, c in _python_blocks() if (p, n) == (page, line))
    assert not _wrong_outputs(code, f"{page}:{line}", shown)
    assert _wrong_outputs(code, f"{page}:{line}", shown.replace(old, new))


@pytest.mark.parametrize(("page", "old", "new"), _BROKEN_OUTPUTS)
def test_output_check_catches_a_wrong_comment(page, old, new):
    """The check above fails on a deliberately broken copy of a doc example."""
    ((line, code),) = [(n, c) for p, n, c in _python_blocks() if p == page and old in c]
    assert _wrong_outputs(code.replace(old, new), f"{page}:{line}")


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


# --- names the docs give: CLI flags, bundled configs, repository paths --------------------

_SPAN = re.compile(r"`([^`]+)`")
_FLAG = re.compile(r"(?<![\w-])--([a-z][\w.-]*)")
_CONFIG = re.compile(r"--config\s+([\w./-]+)")
_PATH = re.compile(r"^(?:src|experiments|tests|scripts|configs|docs|torchbp)/[\w./-]*[\w/]$")
_PAGE_CLI = {"docs/training.md": "torchbp-train", "docs/verify.md": "torchbp-verify"}


def _snippets(text: str) -> list[str]:
    """Every line of a shell (or bare) fenced block and every code span outside blocks."""
    snippets = []
    for match in _FENCE.finditer(text):
        if match.group(1) in ("bash", "sh", ""):
            snippets += match.group(2).splitlines()
    return snippets + _SPAN.findall(_FENCE.sub("", text))


def _commands(page: str, text: str) -> list[tuple[str, str]]:
    """``(cli, snippet)`` for every code span or shell line that gives flags to a torchbp CLI.

    A snippet naming ``torchbp-train`` or ``torchbp-verify`` belongs to it; one naming another
    program (``python``, ``pip``, ``bash``) to none; a bare snippet of flags to the page's
    own CLI (``docs/training.md``: torchbp-train, ``docs/verify.md``: torchbp-verify)."""
    found = []
    for snippet in _snippets(text):
        words = snippet.split()
        named = [cli for cli in ("torchbp-train", "torchbp-verify") if cli in words]
        other = any(w in words for w in ("python", "pip", "bash", "nice"))
        cli = named[0] if named else None if other else _PAGE_CLI.get(page)
        if cli and "--" in snippet:
            found.append((cli, snippet))
    return found


def _doc_commands() -> list[tuple[str, str, str]]:
    return [(_name(p), *c) for p in PAGES for c in _commands(_name(p), p.read_text())]


@pytest.fixture(scope="module")
def train_help() -> str:
    import subprocess
    import sys

    pytest.importorskip("pytorch_lightning")
    run = subprocess.run(
        [sys.executable, "-m", "torchbp.lightning.cli", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def _data_parameters() -> set[str]:
    import inspect

    import pytorch_lightning as pl

    from torchbp.lightning import data

    names = set()
    for value in vars(data).values():
        if inspect.isclass(value) and issubclass(value, pl.LightningDataModule):
            names |= set(inspect.signature(value).parameters)
    return names


def _unknown_train_flags(flags: list[str], help_text: str) -> list[str]:
    """Flags torchbp-train does not take: ``--data.X`` must be a DataModule argument, any
    other its first two dotted parts an option of ``torchbp-train fit --help`` (the rest,
    ``--model.optimizer.lr``, belongs to the class named there)."""
    known = set(_FLAG.findall(help_text))
    unknown = []
    for flag in flags:
        parts = flag.split(".")
        if parts[0] == "data" and len(parts) > 1:
            ok = parts[-1] in _data_parameters()
        else:
            ok = ".".join(parts[:2]) in known
        if not ok:
            unknown.append("--" + flag)
    return unknown


def _unknown_verify_flags(flags: list[str]) -> list[str]:
    from torchbp.verify.cli import _parser

    known = {o for action in _parser()._actions for o in action.option_strings}
    return ["--" + f for f in flags if "--" + f not in known]


#: the configs ``torchbp-train`` bundles; the repository's ``configs/`` links here (a link an
#: sdist cannot hold: its ``configs/X.yaml`` is this folder's ``X.yaml``)
_BUNDLED_CONFIGS = ROOT / "src/torchbp/lightning/configs"


def _config_file_exists(name: str) -> bool:
    if (ROOT / name).is_file():
        return True
    folder, _, file = name.rpartition("/")
    return folder == "configs" and (_BUNDLED_CONFIGS / file).is_file()


def _unknown_configs(snippet: str) -> list[str]:
    """``--config NAME`` must name a bundled config, ``--config dir/file.yaml`` a file of the
    repository, ``configs/X.yaml`` one of the bundled files (``path/to/...`` is a placeholder)."""
    bundled = {p.stem for p in _BUNDLED_CONFIGS.glob("*.yaml")}
    unknown = []
    for name in _CONFIG.findall(snippet):
        if name.startswith("path/to/"):
            continue
        exists = _config_file_exists(name) if "/" in name else name in bundled
        if not exists:
            unknown.append(name)
    return unknown


def _unknown_names(cli: str, snippet: str, train_help: str) -> list[str]:
    flags = _FLAG.findall(snippet)
    if cli == "torchbp-train":
        return _unknown_train_flags(flags, train_help) + _unknown_configs(snippet)
    return _unknown_verify_flags(flags)


@pytest.mark.parametrize(("page", "cli", "snippet"), _doc_commands(), ids=lambda v: str(v)[:50])
def test_cli_flags_and_configs_exist(page, cli, snippet, train_help):
    unknown = _unknown_names(cli, snippet, train_help)
    assert not unknown, f"{page}: {cli} has no {unknown} (in `{snippet}`)"


# --- python -m experiments.X / python experiments/X.py: real modules, real flags ---------

_PYTHON_RUN = re.compile(r"\bpython3?\s+(?:-m\s+([\w.]+)|((?:experiments|scripts)/[\w/]+\.py))")
_OURS = ("experiments", "torchbp")


def _python_commands(text: str) -> list[tuple[str, str, list[str]]]:
    """``(target, snippet, flags)`` for every ``python -m M`` (M of this project) or
    ``python experiments/X.py`` a snippet gives: target is the module or the script path;
    flags are those written after it, up to the next command (a ``# ...`` remark that names
    more flags of it, ``# --quick, --case NAME``, counts)."""
    found = []
    for snippet in _snippets(text):
        matches = list(_PYTHON_RUN.finditer(snippet))
        for match, after in zip(matches, [*matches[1:], None]):
            module, script = match.groups()
            if module and module.split(".")[0] not in _OURS:
                continue
            rest = snippet[match.end() : after.start() if after else None]
            rest = re.split(r"&&|\|", rest)[0]
            found.append((module or script, snippet, _FLAG.findall(rest)))
    return found


def _doc_python_commands() -> list[tuple[str, str, str, list[str]]]:
    return [(_name(p), *c) for p in PAGES for c in _python_commands(p.read_text())]


def _runnable(target: str) -> bool:
    """``python -m target`` / ``python target`` would find something to run."""
    if target.endswith(".py"):
        return (ROOT / target).is_file()
    try:
        spec = importlib.util.find_spec(target)
    except ModuleNotFoundError:
        return False
    if spec is not None and spec.submodule_search_locations is not None:
        return _runnable(target + ".__main__")
    return spec is not None


def _help(target: str, monkeypatch) -> str:
    """What ``python -m target --help`` (or ``python target --help``) prints, run in this
    process through runpy, as the interpreter would run it."""
    monkeypatch.setattr(sys, "argv", [target, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # a script may insert its folder
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        if target.endswith(".py"):
            runpy.run_path(str(ROOT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None), f"{target} --help exited with {exit_.value.code}"
    return out.getvalue()


def _unknown_script_flags(flags: list[str], help_text: str) -> list[str]:
    known = set(_FLAG.findall(help_text))
    return ["--" + f for f in flags if f not in known]


def test_python_commands_are_found():
    targets = {t for _, t, _, _ in _doc_python_commands()}
    assert {"experiments.bench", "experiments/compare_backends.py"} <= targets, targets


@pytest.mark.parametrize(
    ("page", "target", "snippet", "flags"), _doc_python_commands(), ids=lambda v: str(v)[:50]
)
def test_python_command_names_a_module_taking_its_flags(page, target, snippet, flags, monkeypatch):
    assert _runnable(target), f"{page}: nothing to run at {target} (in `{snippet}`)"
    if flags:
        unknown = _unknown_script_flags(flags, _help(target, monkeypatch))
        assert not unknown, f"{page}: {target} has no {unknown} (in `{snippet}`)"


_BROKEN_PYTHON = [
    ("docs/benchmarks.md", "`python -m experiments.benches --device cpu`"),
    ("docs/training.md", "`python experiments/compare_backend.py --epochs 20`"),
    ("docs/training.md", "`python -m torchbp.lightning.curve runs/digits/version_0`"),
    ("docs/benchmarks.md", "`python -m experiments.bench --devices cpu`"),
    ("README.md", "`python -m experiments.bench_per_sample --rund 60`"),
    ("docs/training.md", "`python experiments/compare_backends.py --epochz 20 --repeats 2`"),
    ("docs/verify.md", "`python -m experiments.verify_zoo_table --output FILE`"),
    ("docs/benchmarks.md", "```bash\npython -m experiments.bench  # --quick, --cases NAME\n```\n"),
]


@pytest.mark.parametrize(("page", "text"), _BROKEN_PYTHON)
def test_python_command_check_catches_a_broken_name(page, text, monkeypatch):
    """The check above fails on a deliberately broken copy of a doc command."""
    ((target, _, flags),) = _python_commands(text)
    assert not _runnable(target) or _unknown_script_flags(flags, _help(target, monkeypatch))


def _repository_path(word: str) -> str:
    """``torchbp/...`` is the package, under ``src/``."""
    return "src/" + word if word.startswith("torchbp/") else word


def _doc_paths() -> list[tuple[str, str]]:
    paths = []
    for page in PAGES:
        for span in _SPAN.findall(page.read_text()):
            for word in span.split():
                if _PATH.match(word) and not re.search(r"[*<]", word):
                    paths.append((_name(page), _repository_path(word)))
    return sorted(set(paths))


@pytest.mark.parametrize(("page", "path"), _doc_paths())
def test_named_repository_paths_exist(page, path):
    assert (ROOT / path).exists(), f"{page}: names {path}, which does not exist"


_BROKEN = [
    ("docs/training.md", "`--trainer.max_epoch 1`"),
    ("docs/training.md", '`--model.hidden_size "[64]"`'),
    ("docs/training.md", "`--data.label_col y`"),
    ("docs/training.md", "`torchbp-train fit --config digit`"),
    ("README.md", "```bash\ntorchbp-train fit --config configs/digit.yaml\n```\n"),
    ("docs/verify.md", "`--no-compiles`"),
    ("README.md", "`torchbp-verify --ops linear`"),
]


@pytest.mark.parametrize(("page", "text"), _BROKEN)
def test_cli_check_catches_a_broken_name(page, text, train_help):
    """The checks above fail on a deliberately broken copy of a doc snippet."""
    ((cli, snippet),) = _commands(page, text)
    unknown = _unknown_names(cli, snippet, train_help)
    assert unknown


def test_path_check_catches_a_missing_path():
    assert not (ROOT / _repository_path("torchbp/per_sample/memories.py")).exists()
    assert _PATH.match("torchbp/per_sample/memories.py") and _PATH.match("experiments/bench.py")
