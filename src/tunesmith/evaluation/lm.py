"""Language-modelling loss and perplexity of a model over plain texts, in fixed-length windows.

A long text (the general corpus of the forgetting check) is cut into windows of ``window``
tokens every ``stride`` tokens. Each token is scored once, in the first window that holds it
with at least one token of context before it; overlapping windows (``stride < window``) give
the later tokens more context at more cost. The loss is the training loss's own target-token
loss (``TargetLoss``), so a perplexity here and a validation loss in training are one measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tunesmith.data.encode import IGNORE_INDEX, Encoded
from tunesmith.errors import DataError
from tunesmith.evaluation.metrics import perplexity
from tunesmith.training.batches import collate, eval_batches
from tunesmith.training.loss import TargetLoss


@dataclass(frozen=True)
class LMResult:
    """Mean natural-log loss per scored token, its perplexity, and what was scored."""

    loss: float
    perplexity: float
    n_tokens: int
    n_windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def text_windows(token_ids: Sequence[int], *, window: int, stride: int | None = None
                 ) -> list[Encoded]:
    """Windows of a token sequence whose labels mark the tokens scored there (-100 elsewhere)."""
    stride = stride or window
    if window < 2 or not 0 < stride <= window:
        raise DataError(f"windows need window >= 2 and 0 < stride <= window (got window={window},"
                        f" stride={stride})")
    ids, n = list(token_ids), len(token_ids)
    windows: list[Encoded] = []
    begin, scored_until = 0, 0
    while begin < n:
        end = min(begin + window, n)
        labels = [IGNORE_INDEX] * (end - begin)
        # the window's first token has no context inside the window, so it is never scored here
        for j in range(max(scored_until, begin + 1), end):
            labels[j - begin] = ids[j]
        enc = Encoded(ids[begin:end], labels)
        if enc.n_targets:
            windows.append(enc)
        scored_until = end
        if end == n:
            break
        begin += stride
    return windows


@torch.no_grad()
def lm_loss(model: Any, tokenizer: Any, texts: Sequence[str], *, window: int = 512,
            stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8
            ) -> LMResult:
    """Mean token loss and perplexity of ``model`` over ``texts``.

    Each text is tokenized without special tokens and cut to its first ``max_tokens`` tokens
    (None: all), then scored in windows (see the module docstring). ``stride`` defaults to
    ``window``: disjoint windows, the cheapest choice, fine for comparing two models alike.
    """
    windows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        windows += text_windows(ids[:max_tokens], window=window, stride=stride)
    if not windows:
        raise DataError("no text to score: the texts are empty or shorter than two tokens")
    was_training = model.training
    model.eval()
    loss_module = TargetLoss(model)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in eval_batches(windows, batch_size):
        inputs = {k: v.to(device) for k, v in collate(batch, pad_id=tokenizer.pad_token_id
                                                      ).items()}
        out = loss_module(**inputs)
        total += float(out.loss_sum)
        tokens += out.n_tokens
    model.train(was_training)
    return LMResult(loss=total / tokens, perplexity=perplexity(total, tokens), n_tokens=tokens,
                    n_windows=len(windows))
