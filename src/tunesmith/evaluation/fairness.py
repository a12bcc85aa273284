"""Fairness: does the model work as well for every group of the test items? (fairlearn)

Given a group value per test item (a field of the data, such as language or region), the
metrics are computed per group with fairlearn's ``MetricFrame``, and the largest gap between
two groups is reported for each. Small groups give noisy metrics: groups under ``min_count``
items are marked, and a gap between them means little.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial

from fairlearn.metrics import MetricFrame, count
from sklearn.metrics import accuracy_score, f1_score

from tunesmith.errors import DataError


@dataclass(frozen=True)
class FairnessResult:
    """Per group: metric values and item counts; per metric: the largest gap and its groups."""

    metrics: list[str]
    by_group: dict[str, dict[str, float]]
    counts: dict[str, int]
    gaps: dict[str, float]
    worst_group: dict[str, str]
    best_group: dict[str, str]
    small_groups: list[str]
    min_count: int

    def to_dict(self) -> dict:
        return asdict(self)


def group_metrics(predicted: Sequence[str], expected: Sequence[str], groups: Sequence[str], *,
                  positive: str | None = None, min_count: int = 20) -> FairnessResult:
    """Accuracy (and F1 of ``positive``) per group, with the largest gap between groups."""
    if not (len(predicted) == len(expected) == len(groups)):
        raise DataError(f"{len(predicted)} predictions, {len(expected)} references and "
                        f"{len(groups)} group values; give one group value per test item")
    if not expected:
        raise DataError("no test items to compare groups on")
    missing = sum(1 for g in groups if g is None or str(g) == "")
    if missing:
        raise DataError(f"{missing} test item(s) have no group value; fill the group field for "
                        "every test example or leave fairness off")
    names = ["accuracy"]
    fns = {"accuracy": accuracy_score}
    if positive is not None:
        name = f"f1_{positive}"
        names.append(name)
        # F1 of the one positive label, in a form that works for any number of classes
        fns[name] = partial(f1_score, labels=[positive], average="macro", zero_division=0)
    frame = MetricFrame(metrics={**fns, "count": count}, y_true=list(expected),
                        y_pred=list(predicted), sensitive_features=[str(g) for g in groups])
    table = frame.by_group
    by_group = {str(g): {m: float(table.loc[g, m]) for m in names} for g in table.index}
    counts = {str(g): int(table.loc[g, "count"]) for g in table.index}
    diff = frame.difference(method="between_groups")
    return FairnessResult(
        metrics=names, by_group=by_group, counts=counts,
        gaps={m: float(diff[m]) for m in names},
        worst_group={m: str(table[m].astype(float).idxmin()) for m in names},
        best_group={m: str(table[m].astype(float).idxmax()) for m in names},
        small_groups=sorted(g for g, c in counts.items() if c < min_count), min_count=min_count)
