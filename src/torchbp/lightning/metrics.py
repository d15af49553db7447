"""What ERMClassifier logs each epoch: the 0-1 risk, and the metric collections of the
train, validation and test stages."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

__all__ = ["ZeroOneError", "EVAL_METRICS", "stage_metrics"]


class ZeroOneError(MulticlassAccuracy):
    """The 0-1 risk: ``1 - accuracy`` (micro-averaged)."""

    def compute(self) -> torch.Tensor:
        return 1.0 - super().compute()


#: what the validation and test steps log, after ``val/`` and ``test/``
EVAL_METRICS = ("loss", "acc", "error", "f1")


def stage_metrics(prefix: str, num_classes: int, full: bool) -> MetricCollection:
    """The metrics of one stage, named after ``prefix``: accuracy, and with ``full`` the 0-1
    risk and the macro F1 (each stage has objects of its own: torchmetrics' advice)."""
    m: dict[str, Any] = {"acc": MulticlassAccuracy(num_classes, average="micro")}
    if full:
        m["error"] = ZeroOneError(num_classes, average="micro")
        m["f1"] = MulticlassF1Score(num_classes, average="macro")
    return MetricCollection(m, prefix=prefix)
