"""Task metrics: classification (scikit-learn) and exact match for generation."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

INVALID = "<invalid>"


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", text).strip(" \t\n.,;:!?\"'`*")


def parse_label(reply: str, labels: Sequence[str]) -> str:
    """The label a generated reply names.

    An exact answer, else the one label it mentions as a whole word ("The spam message is..."
    names spam). A reply naming no label, or several ("spam or ham"),
    is ``<invalid>`` and counts as wrong: the model has not answered.
    """
    normal = {_norm(lab): lab for lab in labels}
    said = _norm(reply)
    if said in normal:
        return normal[said]
    named = {lab for key, lab in normal.items()
             if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", said)}
    return named.pop() if len(named) == 1 else INVALID


def classification_metrics(predicted: Sequence[str], expected: Sequence[str],
                           labels: Sequence[str], positive: str | None = None) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1, and the share of invalid answers."""
    labels = list(labels)
    p, r, f, support = precision_recall_fscore_support(
        expected, predicted, labels=labels, zero_division=0)
    per_class = {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(support[i])} for i, lab in enumerate(labels)}
    result = {
        "n": len(expected),
        "accuracy": float(accuracy_score(expected, predicted)),
        "macro_f1": float(f1_score(expected, predicted, labels=labels, average="macro",
                                   zero_division=0)),
        "invalid_rate": sum(1 for x in predicted if x == INVALID) / max(1, len(predicted)),
        "per_class": per_class,
    }
    if positive is not None:
        result[f"f1_{positive}"] = per_class[positive]["f1"]
    return result


def exact_match(predicted: Sequence[str], expected: Sequence[str]) -> dict:
    hits = sum(1 for a, b in zip(predicted, expected, strict=True) if _norm(a) == _norm(b))
    return {"n": len(expected), "exact_match": hits / max(1, len(expected))}
