"""Evaluate a sequence-classification head: class probabilities and task metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tunesmith.data.chat import ChatExample
from tunesmith.data.encode import encode_prompt
from tunesmith.evaluation.metrics import classification_metrics
from tunesmith.evaluation.task import Predictions
from tunesmith.models.classifier import prompt_class_logits
from tunesmith.models.prefix_pass import batched


@torch.no_grad()
def class_probabilities(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict]], *,
                        batch_size: int = 16, on_batch: Callable[[int], None] | None = None
                        ) -> torch.Tensor:
    """Softmax of the head's logits for each conversation's prompt: [n, classes].

    The prefix the prompts share runs once, and each batch after it (``prompt_class_logits``);
    repeated prompts run once."""
    was_training = model.training
    model.eval()
    where: dict[tuple[int, ...], list[int]] = {}
    for i, conv in enumerate(conversations):
        where.setdefault(tuple(encode_prompt(tokenizer, conv)), []).append(i)
    out = torch.zeros((len(conversations), _num_labels(model)), dtype=torch.float32)
    distinct = list(where)
    prefixes, batches = batched(distinct, batch_size)
    for batch in batches:
        chunk = [distinct[k] for k in batch]
        logits = prompt_class_logits(model, chunk, pad_id=tokenizer.pad_token_id,
                                     prefixes=prefixes)
        probs = torch.softmax(logits, dim=-1).cpu()
        for p, row in zip(chunk, probs, strict=True):
            out[where[p]] = row
        if on_batch is not None:
            on_batch(sum(len(where[p]) for p in chunk))
    model.train(was_training)
    return out


def _num_labels(model: Any) -> int:
    return int(model.config.num_labels)


def evaluate_classifier(model: Any, tokenizer: Any, examples: Sequence[ChatExample], *,
                        labels: Sequence[str], positive: str | None, batch_size: int,
                        on_batch: Callable[[int], None] | None = None
                        ) -> tuple[dict[str, Any], Predictions, torch.Tensor]:
    """Task metrics of a classification head on ``examples``, its predictions and probabilities."""
    probs = class_probabilities(model, tokenizer, [ex.prompt for ex in examples],
                                batch_size=batch_size, on_batch=on_batch)
    predicted = [labels[i] for i in probs.argmax(-1).tolist()]
    expected = [ex.label for ex in examples]
    metrics = classification_metrics(predicted, expected, labels, positive)
    replies = [f"{p} ({probs[i].max():.3f})" for i, p in enumerate(predicted)]
    return metrics, Predictions(replies, predicted, expected, "head"), probs
