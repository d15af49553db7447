"""What an installed wheel needs, checked without building one.

``pip install torchbp`` gets only what ``pyproject.toml`` declares: the packages under
``src/``, the ``package-data`` globs, the dependencies and the console scripts. These tests
check that every data file under ``src/torchbp`` is declared, that the files the CLI reads at
run time are package resources (not the repository's ``configs/``, ``docs/`` or
``experiments/``), that every third-party module the code imports is a declared dependency,
and that the version and the console scripts agree with the code.
``scripts/check_wheel.sh`` builds the sdist and the wheel and runs the README's commands from
a fresh virtual environment.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.resources
import re
import sys
from pathlib import Path

import pytest

import torchbp

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "torchbp"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

#: imported where installed, never required: the Triton kernels (torch's CUDA builds bring
#: their own Triton; see .ci/run)
OPTIONAL_IMPORTS = {"triton"}
#: the packages whose modules only the ``train`` extra makes importable
TRAIN_PACKAGES = ("torchbp.lightning",)


def _package_data_globs() -> list[str]:
    return PYPROJECT["tool"]["setuptools"]["package-data"]["torchbp"]


def _data_files() -> list[Path]:
    """The non-Python files under ``src/torchbp`` (byte code left out)."""
    return sorted(
        p
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    )


def _modules() -> list[tuple[str, Path]]:
    """``(dotted module name, file)`` of every module under ``src/torchbp``."""
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules.append((name, path))
    return modules


def _imported_top_levels(path: Path) -> set[str]:
    """The top-level names of the absolute imports in ``path``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _third_party(names: set[str]) -> set[str]:
    return {n for n in names if n not in sys.stdlib_module_names and n != "torchbp"}


def _normalized(distribution: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _declared(requirements: list[str]) -> set[str]:
    """The normalized distribution names in requirement strings (``name[extra]>=1; marker``)."""
    return {_normalized(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in requirements}


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_every_package_data_glob_matches_a_file():
    for pattern in _package_data_globs():
        assert list(PACKAGE.glob(pattern)), f"package-data {pattern!r} matches no file"


def test_every_data_file_under_the_package_is_package_data():
    globs = _package_data_globs()
    missing = [
        str(path.relative_to(PACKAGE))
        for path in _data_files()
        if not any(path in PACKAGE.glob(pattern) for pattern in globs)
    ]
    assert not missing, f"not in [tool.setuptools.package-data], so not in the wheel: {missing}"


def test_bundled_configs_are_package_resources():
    pytest.importorskip("pytorch_lightning")
    from torchbp.lightning.config_files import bundled_configs, with_config_files

    resources = importlib.resources.files("torchbp.lightning").joinpath("configs")
    shipped = sorted(Path(r.name).stem for r in resources.iterdir() if r.name.endswith(".yaml"))
    assert shipped == sorted(bundled_configs())
    installed = Path(torchbp.__file__).resolve().parent
    default = Path(with_config_files(["fit"])[2]).resolve()
    for path in [*bundled_configs().values(), default]:
        assert path.resolve().is_relative_to(installed), f"{path} is outside the package"


def test_no_code_reads_the_repository_folders():
    """A string that starts with a folder the wheel does not hold (``docs/``,
    ``experiments/``, ``configs/``, ...) and is not a docstring would be a path that works
    only from a clone."""
    repo_only = tuple(f"{p.name}/" for p in ROOT.iterdir() if p.is_dir() and p.name != "src")
    found = []
    for name, path in _modules():
        tree = ast.parse(path.read_text())
        docstrings = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and node.value.startswith(repo_only)
            ):
                found.append(f"{name}:{node.lineno} {node.value!r}")
    assert not found, found


def test_every_third_party_import_is_a_declared_dependency():
    """Each module imported by torchbp's core is in ``dependencies``; each one imported by
    ``torchbp.lightning`` is there or in the ``train`` extra (a direct import declared,
    not left to another package's requirements)."""
    distributions = importlib.metadata.packages_distributions()
    core = _declared(PROJECT["dependencies"])
    train = core | _declared(PROJECT["optional-dependencies"]["train"])
    undeclared = []
    for name, path in _modules():
        declared = train if name.startswith(TRAIN_PACKAGES) else core
        for module in sorted(_third_party(_imported_top_levels(path)) - OPTIONAL_IMPORTS):
            candidates = {_normalized(d) for d in distributions.get(module, [module])}
            if not candidates & declared:
                undeclared.append(f"{name} imports {module} ({', '.join(sorted(candidates))})")
    assert not undeclared, undeclared


def test_version_agrees_with_the_installed_metadata():
    assert PROJECT["version"] == torchbp.__version__
    assert importlib.metadata.version("torchbp") == torchbp.__version__


def test_console_scripts_name_functions_that_exist():
    for script, target in PROJECT["scripts"].items():
        module, _, function = target.partition(":")
        path = SRC.joinpath(*module.split(".")).with_suffix(".py")
        assert path.is_file(), f"{script}: no module {module}"
        defined = {
            n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)
        }
        assert function in defined, f"{script}: {module} defines no {function}()"
