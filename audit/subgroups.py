"""Recall per subgroup and class (paper 000, Sec. 5.2, Fig. 7).

The bookkeeping goes through fairlearn's ``MetricFrame``; this module only shapes
its output into the plain dictionaries the manifest and the reports carry.
"""

from __future__ import annotations

import numpy as np
from fairlearn.metrics import MetricFrame
from sklearn.metrics import recall_score

__all__ = ["recall_by_group"]


def _recall_of(cls: int):
    def recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
        if not (y_true == cls).any():
            return float("nan")
        return float(recall_score(y_true == cls, y_pred == cls, zero_division=0))

    return recall


def recall_by_group(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                    classes: list[str]) -> dict[str, dict[str, float]]:
    """``{group value: {class name: recall}}``; classes absent from a group are left out."""
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups).astype(str)
    metrics = {name: _recall_of(i) for i, name in enumerate(classes)}
    frame = MetricFrame(metrics=metrics, y_true=y_true, y_pred=y_pred, sensitive_features=groups)
    table = frame.by_group
    out: dict[str, dict[str, float]] = {}
    for value in table.index:
        row = {c: float(table.loc[value, c]) for c in classes if not np.isnan(table.loc[value, c])}
        out[str(value)] = row
    return out
