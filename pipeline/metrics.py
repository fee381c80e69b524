"""Classification metrics of predicted labels, shared by the trained classifiers and zero-shot CLIP (torch-free)."""

from __future__ import annotations

import numpy as np


def classification_metrics(predicted: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class accuracy (recall; None for a class absent from `labels`) and its mean
    over the classes present."""
    per_class = {}
    for index, name in enumerate(classes):
        of_class = labels == index
        per_class[name] = float((predicted[of_class] == index).mean()) if of_class.any() else None
    present = [value for value in per_class.values() if value is not None]
    return {
        "accuracy": float((predicted == labels).mean()),
        "mean_class_accuracy": float(np.mean(present)),
        "per_class_accuracy": per_class,
    }

