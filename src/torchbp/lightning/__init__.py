"""Lightning side of torchbp: ERM training of MLP classifiers with hand-written backprop.

Needs the ``train`` extra (``pip install "torchbp[train]"``); without it, importing this
package raises a :class:`ModuleNotFoundError` that says so, which ``torchbp-train`` (entry
point :mod:`torchbp._train_command`) prints as one line, exiting with status 1. ``import
torchbp`` never imports this package; ``torchbp-train`` (see :mod:`torchbp.lightning.cli`) is
its command line.
"""

from torchbp._train_command import train_extra_error

try:
    from torchbp.lightning import data
    from torchbp.lightning.data import *  # noqa: F403 (the DataModules, their errors, the sampler)
    from torchbp.lightning.module import ERMClassifier, build_mlp
except ModuleNotFoundError as exc:
    if (exc.name or "torchbp").partition(".")[0] == "torchbp":
        raise  # a module of torchbp itself is missing: not the extra's
    raise train_extra_error(exc) from None

__all__ = ["ERMClassifier", "build_mlp", *data.__all__]
