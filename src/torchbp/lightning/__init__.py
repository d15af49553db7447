"""Lightning side of torchbp: ERM training of MLP classifiers with hand-written backprop.

Needs the ``train`` extra (``pip install "torchbp[train]"``). ``import torchbp`` never imports
this package; ``torchbp-train`` (see :mod:`torchbp.lightning.cli`) is its command line.
"""

from torchbp.lightning.data import (
    ArrayDataModule,
    ClassificationDataModule,
    DataConfigError,
    DataError,
    DigitsDataModule,
    SklearnToyDataModule,
    SyntheticDataModule,
    TabularFileDataModule,
)
from torchbp.lightning.module import ERMClassifier, build_mlp

__all__ = [
    "ERMClassifier",
    "build_mlp",
    "ClassificationDataModule",
    "ArrayDataModule",
    "DigitsDataModule",
    "SklearnToyDataModule",
    "SyntheticDataModule",
    "TabularFileDataModule",
    "DataConfigError",
    "DataError",
]
