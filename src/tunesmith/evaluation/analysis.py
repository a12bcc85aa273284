"""Error analysis: the wrong answers the model was surest of, which are the ones to read first.

Confident errors are often label noise in the test set, an ambiguous class definition, or a
shortcut the model learned; low-confidence errors are just hard items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tunesmith.errors import DataError


def prompt_text(messages: Sequence[dict[str, Any]], *, limit: int = 300) -> str:
    """The last user message of a conversation, shortened for a report table."""
    text = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"),
                "")
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def most_confident_errors(probs: np.ndarray, labels: Sequence[str], expected: Sequence[str],
                          inputs: Sequence[str], *, predicted: Sequence[str] | None = None,
                          n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` wrong predictions with the highest probability on the predicted label.

    ``probs`` [items, labels] are label probabilities (``scoring.label_probabilities``).
    ``predicted`` defaults to their argmax; pass the generated answers to rank those instead
    (an ``<invalid>`` answer has no label probability and is left out: it shows in
    ``invalid_rate``). Each entry: index, input, expected, predicted, confidence, p_expected.
    """
    p = np.asarray(probs, dtype=float)
    labels = list(labels)
    if p.shape != (len(expected), len(labels)) or len(inputs) != len(expected):
        raise DataError(f"probabilities of shape {p.shape} for {len(expected)} items, "
                        f"{len(inputs)} inputs and {len(labels)} labels; they must match")
    if predicted is None:
        predicted = [labels[j] for j in p.argmax(axis=1)]
    col = {lab: j for j, lab in enumerate(labels)}
    wrong = [i for i, (pr, ex) in enumerate(zip(predicted, expected, strict=True))
             if pr != ex and pr in col]
    wrong.sort(key=lambda i: -p[i, col[predicted[i]]])
    return [{"index": i, "input": inputs[i], "expected": expected[i], "predicted": predicted[i],
             "confidence": float(p[i, col[predicted[i]]]),
             "p_expected": float(p[i, col[expected[i]]]) if expected[i] in col else None}
            for i in wrong[:n]]
