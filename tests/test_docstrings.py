"""torchbp's docstrings stay true: every ``>>>`` example in the package runs and prints
what it shows (doctest, one test per module), and the public API's docstrings keep their
``Args:`` (naming every parameter), ``Shape:`` (ops and modules) and a run example."""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import io
import re
from pathlib import Path

import pytest
import torch

import torchbp
import torchbp.functional
import torchbp.nn
import torchbp.per_sample
import torchbp.verify

PACKAGE_DIR = Path(torchbp.__file__).parent
_PROMPT = re.compile(r"^\s*>>>", re.M)
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_name(path: Path) -> str:
    parts = ("torchbp", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules_with_examples() -> list[str]:
    """Dotted names of torchbp's modules whose source holds a ``>>>`` prompt (read from
    the files, so that collecting imports nothing, ``torchbp.lightning`` included)."""
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    return [_module_name(path) for path in paths if _PROMPT.search(path.read_text())]


def _import(name: str):
    """The module, skipping the test where it needs the ``train`` extra and it is absent."""
    if name.split(".")[:2] == ["torchbp", "lightning"]:
        pytest.importorskip("pytorch_lightning")
    return importlib.import_module(name)


def _doctests(module) -> list[doctest.DocTest]:
    """The docstrings of ``module``'s own objects that hold examples."""
    return [test for test in doctest.DocTestFinder().find(module) if test.examples]


def _needs_absent_gpu(test: doctest.DocTest) -> bool:
    return not torch.cuda.is_available() and any("cuda" in ex.source for ex in test.examples)


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples_run_as_shown(name):
    module = _import(name)
    tests = _doctests(module)
    prompts = len(_PROMPT.findall(Path(module.__file__).read_text()))
    found = sum(len(test.examples) for test in tests)
    assert found == prompts, (
        f"{name}: {prompts - found} of its {prompts} '>>>' lines are outside the docstrings "
        "doctest reaches (a module's, its own functions', classes' and methods')"
    )
    runner = doctest.DocTestRunner(optionflags=_FLAGS)
    log = io.StringIO()
    failed = 0
    for test in tests:
        if _needs_absent_gpu(test):
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            failed += runner.run(test, out=log.write).failed
    assert failed == 0, log.getvalue()


def _public_callables() -> list[tuple[str, object]]:
    """``(qualified name, object)`` of each callable exported by a public ``__all__``."""
    modules = [torchbp, torchbp.functional, torchbp.nn, torchbp.per_sample, torchbp.verify]
    return [
        (f"{module.__name__}.{name}", getattr(module, name))
        for module in modules
        for name in module.__all__
        if callable(getattr(module, name)) and not inspect.ismodule(getattr(module, name))
    ]


PUBLIC = _public_callables()
# ops and modules taking tensors document their shapes
TENSOR_API = [
    *(f"torchbp.functional.{name}" for name in torchbp.functional.__all__),
    *(f"torchbp.nn.{name}" for name in torchbp.nn.__all__),
    "torchbp.per_sample_grads",
    "torchbp.per_sample.per_sample_grads",
]


def _named_parameters(obj) -> list[str]:
    """The parameters a caller passes by name (not ``self``, ``*args``, ``**kwargs`` or a
    private ``_name``)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        p.name
        for p in inspect.signature(obj).parameters.values()
        if p.kind not in variadic and p.name != "self" and not p.name.startswith("_")
    ]


def _args_entries(doc: str) -> set[str]:
    """The names the ``Args:`` section describes: each line at its first indent starts an
    entry ``name: ...`` or ``name1, name2: ...`` (``*inputs`` counts as ``inputs``)."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return set()
    base = len(lines[start]) - len(lines[start].lstrip())
    names: set[str] = set()
    entry_indent = None
    for line in lines[start + 1 :]:
        indent = len(line) - len(line.lstrip())
        if line.strip() and indent <= base:
            break
        if not line.strip() or ":" not in line:
            continue
        entry_indent = indent if entry_indent is None else entry_indent
        if indent == entry_indent:
            head = line.split(":", 1)[0]
            names.update(part.strip().lstrip("*") for part in head.split(","))
    return names


_BY_NAME = dict(PUBLIC)


@pytest.mark.parametrize("name", [name for name, _ in PUBLIC])
def test_public_docstring_has_an_example_that_runs(name):
    obj = _BY_NAME[name]
    module = importlib.import_module(obj.__module__)
    run = {test.name for test in _doctests(module)}
    assert f"{obj.__module__}.{obj.__qualname__}" in run, (
        f"{name}: no '>>>' example in its docstring (or one doctest does not reach)"
    )


@pytest.mark.parametrize("name", [name for name, _ in PUBLIC])
def test_public_docstring_args_name_every_parameter(name):
    obj = _BY_NAME[name]
    missing = set(_named_parameters(obj)) - _args_entries(inspect.getdoc(obj) or "")
    assert not missing, f"{name}: Args does not describe {sorted(missing)}"


@pytest.mark.parametrize("name", TENSOR_API)
def test_tensor_api_docstring_has_shape(name):
    module_name, _, attr = name.rpartition(".")
    doc = inspect.getdoc(getattr(importlib.import_module(module_name), attr)) or ""
    assert re.search(r"^\s*Shape:", doc, re.M), f"{name}: no Shape: section"


def test_args_parser_reads_grouped_and_variadic_entries():
    doc = "Summary.\n\nArgs:\n    fn: the function.\n        More on fn: detail.\n"
    doc += "    *inputs: the inputs.\n    device, dtype: factory kwargs.\n\nReturns:\n    x: y.\n"
    assert _args_entries(doc) == {"fn", "inputs", "device", "dtype"}


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
_FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def _flags_named(doc: str) -> set[str]:
    """The flags a docstring tells to pass: on its ``python ...`` command lines, and as
    ``--flag`` literals in its prose (a ``pip install --no-deps`` line is not ours)."""
    commands = [line for line in doc.splitlines() if line.strip().startswith("python")]
    literals = re.findall(r"``(--[a-z][\w-]*)", doc)
    return {flag for line in commands for flag in _FLAG.findall(line)} | set(literals)


def _flags_taken(script: Path) -> set[str]:
    """The flags the argument parser of ``script`` takes: its own ``add_argument`` calls,
    or its package's for a module of ``experiments/bench`` (run as one command)."""
    sources = [script] if script.parent == EXPERIMENTS else sorted(script.parent.glob("*.py"))
    added = re.compile(r"add_argument\(\s*\"(--[\w-]+)\"")
    return {flag for source in sources for flag in added.findall(source.read_text())}


def _documented_scripts() -> list[str]:
    scripts = sorted(EXPERIMENTS.rglob("*.py"))
    return [
        str(path.relative_to(EXPERIMENTS.parent))
        for path in scripts
        if _flags_named(ast.get_docstring(ast.parse(path.read_text())) or "")
    ]


@pytest.mark.parametrize("script", _documented_scripts())
def test_experiment_docstring_names_only_flags_its_parser_takes(script):
    path = EXPERIMENTS.parent / script
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    unknown = _flags_named(doc) - _flags_taken(path)
    assert not unknown, f"{script}: its docstring names {sorted(unknown)}, which it does not take"
