"""Evaluate a model on test conversations: answer each (by scoring the labels, or generating
the last assistant turn) and compute the task metrics.

Two ways to answer (``eval.mode``, resolved by ``resolve_mode``):

- ``score`` (classification): the label with the highest log-probability
  (``scoring.label_probabilities``: about each item's own tokens, once). Every answer is a label,
  so the invalid-answer rate is 0 by construction; the scores ride along in ``Predictions``
  so a caller that also wants label probabilities (calibration, confident errors) reuses them.
- ``generate``: the greedy reply, parsed to a label for classification.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tunesmith.config.sections import SCORE_NEEDS_CLASSIFICATION
from tunesmith.data.chat import ChatExample
from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluation.generate import generate
from tunesmith.evaluation.metrics import (
    classification_metrics,
    generation_metrics,
    parse_label,
)
from tunesmith.evaluation.scoring import LabelScores, label_probabilities

Mode = Literal["score", "generate"]


def resolve_mode(mode: str, task: str) -> Mode:
    """The way test answers are obtained for ``eval.mode`` (auto, score, generate) and task."""
    if mode == "auto":
        return "score" if task == "classification" else "generate"
    if mode == "score" and task != "classification":
        raise ConfigError(SCORE_NEEDS_CLASSIFICATION)
    if mode not in ("score", "generate"):
        raise ConfigError(f"eval.mode '{mode}' is not one of auto, score, generate")
    return mode  # type: ignore[return-value]


@dataclass
class Predictions:
    """Per test item: the reply (in score mode the chosen label), the label or answer it is
    read as, and the expected one. ``mode`` says how the replies came: 'score', 'generate',
    or 'head' (a classification head); ``scores`` are the label scores in score mode."""

    replies: list[str]
    predicted: list[str]
    expected: list[str]
    mode: str = "generate"
    scores: LabelScores | None = None


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
                      batch_size: int, mode: str = "auto",
                      on_batch: Callable[[int], None] | None = None
                      ) -> tuple[dict[str, Any], Predictions]:
    """Task metrics of ``model`` on ``examples`` and the predictions behind them.

    ``mode`` is ``eval.mode`` (see ``resolve_mode``); ``max_new_tokens`` bounds generation only.
    """
    how = resolve_mode(mode, task)
    expected = [ex.label for ex in examples]
    prompts = [ex.prompt for ex in examples]
    if task == "classification" and not labels:
        raise ConfigError("a classification evaluation needs its labels; set eval.labels "
                          "or give examples whose answers are the labels")
    if how == "score":
        assert labels is not None
        scores = label_probabilities(model, tokenizer, prompts, labels, batch_size=batch_size,
                                     on_batch=on_batch)
        predicted = scores.predicted
        metrics = classification_metrics(predicted, expected, labels, positive)
        return metrics, Predictions(list(predicted), predicted, expected, how, scores)
    replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, on_batch=on_batch)
    if task == "classification":
        assert labels is not None
        predicted = [parse_label(r, labels) for r in replies]
        metrics = classification_metrics(predicted, expected, labels, positive)
    else:
        predicted = replies
        metrics = generation_metrics(replies, expected)
    return metrics, Predictions(replies, predicted, expected, how)
