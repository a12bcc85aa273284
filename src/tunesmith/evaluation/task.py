"""Evaluate a model on test conversations: generate the last assistant turn and score it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunesmith.data.chat import ChatExample
from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluation.generate import generate
from tunesmith.evaluation.metrics import (
    classification_metrics,
    generation_metrics,
    parse_label,
)


@dataclass
class Predictions:
    replies: list[str]
    predicted: list[str]
    expected: list[str]


def label_token_budget(tokenizer: Any, labels: Sequence[str]) -> int:
    """Enough new tokens to say the longest label, and the end-of-turn token after it."""
    return max(len(tokenizer(lab, add_special_tokens=False)["input_ids"]) for lab in labels) + 2


def check_labels(examples: Sequence[ChatExample], labels: Sequence[str], split: str) -> None:
    unknown = sorted({ex.label for ex in examples} - set(labels))
    if unknown:
        first = next(ex for ex in examples if ex.label in unknown)
        raise DataError(
            f"the {split} set has label(s) {unknown} the model is not trained on (labels: "
            f"{list(labels)}); add them to eval.labels or remove those examples",
            path=first.source, line=first.line, field="messages[-1].content")


def evaluate_examples(model: Any, tokenizer: Any, examples: Sequence[ChatExample], *, task: str,
                      labels: Sequence[str] | None, positive: str | None, max_new_tokens: int,
                      batch_size: int, on_batch: Callable[[int], None] | None = None
                      ) -> tuple[dict[str, Any], Predictions]:
    """Task metrics of ``model`` on ``examples`` and the predictions behind them."""
    expected = [ex.label for ex in examples]
    replies = generate(model, tokenizer, [ex.prompt for ex in examples],
                       max_new_tokens=max_new_tokens, batch_size=batch_size, on_batch=on_batch)
    if task == "classification":
        if not labels:
            raise ConfigError("a classification evaluation needs its labels; set eval.labels "
                              "or give examples whose answers are the labels")
        predicted = [parse_label(r, labels) for r in replies]
        metrics = classification_metrics(predicted, expected, labels, positive)
    else:
        predicted = replies
        metrics = generation_metrics(replies, expected)
    return metrics, Predictions(replies, predicted, expected)
