"""LightningDataModules for ERM classification that work offline.

Every DataModule exposes ``num_features`` and ``num_classes``; the ``torchbp-train`` CLI links
them to ``ERMClassifier(input_size=..., num_classes=...)`` so a config never repeats them.

- :class:`DigitsDataModule`: scikit-learn's bundled 8x8 handwritten digits (1797 x 64, 10 classes).
- :class:`SklearnToyDataModule`: iris, wine or breast_cancer (bundled with scikit-learn).
- :class:`SyntheticDataModule`: seeded Gaussian-mixture or teacher-network data, generated
  batch by batch (millions of samples cost no memory); the scale knob for benchmarks.
- :class:`TabularFileDataModule`: a user's CSV, NPZ or ``.pt`` file.

Array-backed modules split stratified train/val/test from ``seed`` and standardise features
with statistics fitted on the training split only. Shuffling uses a sampler seeded by
``(seed, epoch)``, so a run resumed from a checkpoint sees the same batches as an
uninterrupted one.

This module is where configs name them (``class_path: torchbp.lightning.data.<Name>``); each
lives in a module of its own: ``data_base`` (the base class and the errors), ``samplers``,
``array_data`` (``ArrayDataModule`` and the scikit-learn datasets), ``tabular_data`` and
``synthetic_data``.
"""

from torchbp.lightning.array_data import ArrayDataModule, DigitsDataModule, SklearnToyDataModule
from torchbp.lightning.data_base import ClassificationDataModule, DataConfigError, DataError
from torchbp.lightning.samplers import EpochSeededSampler
from torchbp.lightning.synthetic_data import SyntheticDataModule
from torchbp.lightning.tabular_data import TabularFileDataModule

__all__ = [
    "ClassificationDataModule",
    "ArrayDataModule",
    "DigitsDataModule",
    "SklearnToyDataModule",
    "SyntheticDataModule",
    "TabularFileDataModule",
    "DataConfigError",
    "DataError",
    "EpochSeededSampler",
]
