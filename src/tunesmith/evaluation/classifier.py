"""Evaluate a sequence-classification head: class probabilities and task metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tunesmith.data.chat import ChatExample
from tunesmith.data.encode import encode_prompt
from tunesmith.evaluation.metrics import classification_metrics
from tunesmith.evaluation.task import Predictions
from tunesmith.models.classifier import class_logits
from tunesmith.models.generation import pad_batch


@torch.no_grad()
def class_probabilities(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict]], *,
                        batch_size: int = 16, on_batch: Callable[[int], None] | None = None
                        ) -> torch.Tensor:
    """Softmax of the head's logits for each conversation's prompt: [n, classes]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, conv) for conv in conversations]
    out = torch.zeros((len(prompts), _num_labels(model)), dtype=torch.float32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = pad_batch([prompts[i] for i in idx], pad_id=tokenizer.pad_token_id,
                          side="right")
        logits = class_logits(model, batch.input_ids.to(device),
                              batch.attention_mask.to(device))
        out[idx] = torch.softmax(logits, dim=-1).cpu()
        if on_batch is not None:
            on_batch(len(idx))
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
