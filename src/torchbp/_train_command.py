"""The ``torchbp-train`` console script: :func:`torchbp.lightning.cli.main`, or, where the
``train`` extra is not installed, one line saying so and exit status 1 (a broken
installation; a bad command line exits with 2).

It lives outside :mod:`torchbp.lightning` because the console script's wrapper imports its
entry point before any code of it runs: an entry point inside that package could not catch
the package's own import error.
"""

from __future__ import annotations

import sys

#: how the error for a missing module of the ``train`` extra begins (a plain
#: ModuleNotFoundError, as a user's own code expects from an import)
TRAIN_EXTRA_NEEDED = "torchbp.lightning and torchbp-train need the train extra"


def train_extra_error(missing: ModuleNotFoundError) -> ModuleNotFoundError:
    """The error naming the ``train`` extra for a third-party module that failed to import."""
    return ModuleNotFoundError(
        f"{TRAIN_EXTRA_NEEDED} ({missing.name} is not installed): pip install 'torchbp[train]'",
        name=missing.name,
    )


def main(args: list[str] | None = None) -> int | None:
    """Run ``torchbp-train`` with ``args`` (default: the command line)."""
    try:
        from torchbp.lightning.cli import main as cli_main
    except ModuleNotFoundError as error:
        if not str(error).startswith(TRAIN_EXTRA_NEEDED):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    cli_main(args)
    return None
