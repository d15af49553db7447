"""The YAML configs shipped inside the package, and how ``torchbp-train`` names them.

``src/torchbp/lightning/configs/*.yaml`` is their one copy (the repository's ``configs/`` is a
link to it). On the command line ``--config NAME`` names a bundled config by its file stem
(``digits``, ``iris``, ...) unless a file ``NAME`` exists; a subcommand given no ``--config``
at all runs the default config, ``digits`` (the main job).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
    "bundled_configs",
    "describe_bundled_configs",
    "is_config_option",
    "with_config_files",
]

#: the folder of the bundled configs
CONFIG_DIR = Path(__file__).with_name("configs")
#: the bundled config a subcommand runs when the command line names none
DEFAULT_CONFIG = "digits"

_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: the options that give a config, with their value in the next argument
_CONFIG_OPTIONS = ("-c", "--config")


def bundled_configs() -> dict[str, Path]:
    """Bundled config name -> path of its YAML file.

    Examples::

        >>> sorted(bundled_configs())[:3]
        ['breast_cancer', 'ddp_cpu', 'digits']
    """
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def describe_bundled_configs() -> str:
    """One sentence for ``--help``: the bundled configs' names and the default.

    Examples::

        >>> describe_bundled_configs()  # doctest: +ELLIPSIS
        '--config NAME runs a bundled config: breast_cancer, ..., wine; with no --config: digits.'
    """
    names = ", ".join(bundled_configs())
    return f"--config NAME runs a bundled config: {names}; with no --config: {DEFAULT_CONFIG}."


def is_config_option(arg: str) -> bool:
    """Whether ``arg`` gives a config: ``-c`` or ``--config``, alone or with its value
    attached (``--config=FILE``, ``-cFILE``, ``-c=FILE``)."""
    return arg in _CONFIG_OPTIONS or _attached_config_value(arg) is not None


def _attached_config_value(arg: str) -> tuple[str, str] | None:
    """``(option part, value)`` of a config option with its value attached, as argparse
    reads it: ``--config=FILE``, ``-c=FILE`` or ``-cFILE``; ``None`` for anything else."""
    for prefix in ("--config=", "-c=", "-c"):
        if arg.startswith(prefix):
            return prefix, arg.removeprefix(prefix)
    return None


def with_config_files(args: list[str]) -> list[str]:
    """``args`` of ``torchbp-train`` with bundled config names replaced by their paths, and
    ``--config <default>`` added after the subcommand when no ``-c``/``--config`` is given.

    Args:
        args: Command line arguments (without the program name).

    Examples::

        >>> with_config_files(["fit", "--config", "iris"])[2].endswith("configs/iris.yaml")
        True
        >>> with_config_files(["fit", "--trainer.max_epochs=2"])[1:3] == [
        ...     "--config", str(CONFIG_DIR / "digits.yaml")]
        True
    """
    bundled = bundled_configs()

    def resolve(value: str) -> str:
        if value in bundled and not Path(value).exists():
            return str(bundled[value])
        return value

    out: list[str] = []
    for i, arg in enumerate(args):
        attached = _attached_config_value(arg)
        if i > 0 and args[i - 1] in _CONFIG_OPTIONS:
            arg = resolve(arg)
        elif attached is not None:
            option, value = attached
            arg = option + resolve(value)
        out.append(arg)
    if any(is_config_option(a) for a in args):
        return out
    first = next((i for i, a in enumerate(args) if a in _SUBCOMMANDS), None)
    if first is None:
        return out
    return [*out[: first + 1], "--config", str(bundled[DEFAULT_CONFIG]), *out[first + 1 :]]
