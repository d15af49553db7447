"""Lightning side of torchbp: ERM training of MLP classifiers with hand-written backprop.

Needs the ``train`` extra (``pip install "torchbp[train]"``). ``import torchbp`` never imports
this package; ``torchbp-train`` (see :mod:`torchbp.lightning.cli`) is its command line.
"""

from torchbp.lightning import data
from torchbp.lightning.data import *  # noqa: F403 (the DataModules, their errors, the sampler)
from torchbp.lightning.module import ERMClassifier, build_mlp

__all__ = ["ERMClassifier", "build_mlp", *data.__all__]
