"""Lightning side of torchbp: ERM training of MLP classifiers with hand-written backprop.

Needs the ``train`` extra (``pip install "torchbp[train]"``); without it, importing this
package raises a :class:`ModuleNotFoundError` that says so, and ``torchbp-train`` prints that
one line and exits with status 1 (a broken installation, not a bad command line, which exits
with 2). ``import torchbp`` never imports this package; ``torchbp-train`` (see
:mod:`torchbp.lightning.cli`) is its command line.
"""

import sys
from pathlib import Path
from types import TracebackType

#: the names the ``torchbp-train`` console script runs under (pip's launchers on Windows)
_CONSOLE_SCRIPT_NAMES = {"torchbp-train", "torchbp-train.exe", "torchbp-train-script.py"}


def _train_extra_error(missing: ModuleNotFoundError) -> ModuleNotFoundError:
    """The error naming the ``train`` extra for a third-party module that failed to import."""
    return ModuleNotFoundError(
        f"torchbp.lightning and torchbp-train need the train extra ({missing.name} is not "
        "installed): pip install 'torchbp[train]'",
        name=missing.name,
    )


def _print_without_traceback(error: BaseException) -> None:
    """Have ``torchbp-train`` print ``error`` as one line, not a traceback, when it ends the
    process: the console script imports this package before any of its code can catch it."""
    previous_hook = sys.excepthook

    def hook(
        kind: type[BaseException], value: BaseException, traceback: TracebackType | None
    ) -> None:
        if value is error:
            sys.stderr.write(f"error: {error}\n")
        else:
            previous_hook(kind, value, traceback)

    sys.excepthook = hook


try:
    from torchbp.lightning import data
    from torchbp.lightning.data import *  # noqa: F403 (the DataModules, their errors, the sampler)
    from torchbp.lightning.module import ERMClassifier, build_mlp
except ModuleNotFoundError as exc:
    if (exc.name or "torchbp").partition(".")[0] == "torchbp":
        raise  # a module of torchbp itself is missing: not the extra's
    error = _train_extra_error(exc)
    if Path((getattr(sys, "argv", None) or [""])[0]).name in _CONSOLE_SCRIPT_NAMES:
        _print_without_traceback(error)
    raise error from None

__all__ = ["ERMClassifier", "build_mlp", *data.__all__]
