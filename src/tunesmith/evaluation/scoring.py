"""Label probabilities: how likely the model is to answer each label, for classification.

For a prompt and a label, the answer is scored as the tokens training teaches for it: the
conversation with the label as the final assistant turn is encoded by ``encode_chat`` (the one
place chat is tokenized), and the last assistant turn's target tokens are kept up to and
including the end-of-turn token (``<|im_end|>`` for ChatML: generation stops there, so what a
template renders after it is not part of the answer). The sum of those tokens' log-probabilities
after the context is the label's score; a softmax across the labels gives P(label | prompt).

Each distinct context is run once with a KV cache, and the cache is shared by that context's
label continuations, so scoring k labels costs about one pass over the prompts, not k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith.data.encode import IGNORE_INDEX, encode_chat
from tunesmith.errors import DataError
from tunesmith.models.generation import pad_batch
from tunesmith.models.heads import output_head
from tunesmith.models.load import unwrap


@dataclass(frozen=True)
class LabelScores:
    """Per prompt and label: the answer's summed log-probability and P(label) across labels."""

    labels: list[str]
    log_probs: np.ndarray  # [n, k] log P(answer tokens | context), not normalised across labels
    probs: np.ndarray      # [n, k] softmax of log_probs across the k labels; rows sum to 1

    @property
    def predicted(self) -> list[str]:
        return [self.labels[j] for j in self.probs.argmax(axis=1)]

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)


def answer_tokens(tokenizer: Any, prompt: Sequence[dict], answer: str
                  ) -> tuple[list[int], list[int]]:
    """The context ids and the answer's ids (through end-of-turn) as training encodes them."""
    enc = encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    targets = [i for i, t in enumerate(enc.labels) if t != IGNORE_INDEX]
    if not targets:
        raise DataError(f"the answer '{answer}' encodes to no tokens; labels must be non-empty")
    end = start = targets[-1] + 1
    while start > 0 and enc.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    answer_ids = enc.input_ids[start:end]
    eos = tokenizer.eos_token_id
    if eos in answer_ids:
        answer_ids = answer_ids[:answer_ids.index(eos) + 1]
    return enc.input_ids[:start], answer_ids


def _score_contexts(lm: Any, contexts: list[list[int]], answers: list[list[list[int]]],
                    pad_id: int, device: torch.device) -> list[list[float]]:
    """Summed log-probs of each context's answers; contexts left-padded and run once."""
    padded = pad_batch(contexts, pad_id=pad_id, side="left")
    ids, mask = padded.input_ids, padded.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    decoder, head = lm.get_decoder(), output_head(lm)
    out = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                  position_ids=positions.to(device), use_cache=True)
    first = F.log_softmax(head(out.last_hidden_state[:, -1]).float(), dim=-1)
    owners = [b for b, group in enumerate(answers) for _ in group]
    flat = [a for group in answers for a in group]
    scores = torch.stack([first[o, a[0]] for o, a in zip(owners, flat, strict=True)])
    longest = max(len(a) for a in flat)
    if longest > 1:
        # feed each answer but its last token after a copy of its context's cache
        cache = out.past_key_values
        cache.reorder_cache(torch.tensor(owners, device=device))
        tails = pad_batch([a[:-1] for a in flat], pad_id=pad_id, side="right")
        rest, rest_mask = tails.input_ids, tails.attention_mask
        own = torch.tensor(owners)
        full_mask = torch.cat([mask[own], rest_mask], dim=1)
        rest_pos = positions[own, -1:] + 1 + torch.arange(longest - 1)
        hidden = decoder(input_ids=rest.to(device), attention_mask=full_mask.to(device),
                         position_ids=rest_pos.to(device), past_key_values=cache,
                         use_cache=True).last_hidden_state
        for r, a in enumerate(flat):
            if len(a) > 1:
                logp = F.log_softmax(head(hidden[r, :len(a) - 1]).float(), dim=-1)
                scores[r] += logp.gather(1, torch.tensor(a[1:], device=device)[:, None]).sum()
    it = iter(scores.tolist())
    return [[next(it) for _ in group] for group in answers]


@torch.no_grad()
def label_probabilities(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict]],
                        labels: Sequence[str], *, batch_size: int = 16,
                        on_batch: Callable[[int], None] | None = None) -> LabelScores:
    """P(label | prompt) for every prompt (chat messages before the answer) and label.

    ``on_batch`` is told how many prompts each batch finished (progress bars)."""
    labels = list(labels)
    if not labels:
        raise DataError("no labels to score; set eval.labels")
    if not prompts:
        raise DataError("no prompts to score; the evaluation set is empty")
    # group answers by context: labels whose encoding shares the context share one forward pass
    groups: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
    for i, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            context, answer = answer_tokens(tokenizer, prompt, label)
            groups.setdefault(tuple(context), []).append((i, j, answer))
    was_training = model.training
    model.eval()
    lm = unwrap(model)
    device = next(model.parameters()).device
    log_probs = np.full((len(prompts), len(labels)), np.nan)
    # a prompt is done when all its contexts are (labels may encode with different contexts)
    pending = np.zeros(len(prompts), dtype=int)
    for items in groups.values():
        for i in {i for i, _, _ in items}:
            pending[i] += 1
    # longest first: the first batch shows the peak memory, and batches pad little
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[0]))
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start:start + batch_size]
        scores = _score_contexts(lm, [list(c) for c, _ in chunk],
                                 [[a for _, _, a in items] for _, items in chunk],
                                 tokenizer.pad_token_id, device)
        finished = 0
        for (_, items), row in zip(chunk, scores, strict=True):
            for (i, j, _), s in zip(items, row, strict=True):
                log_probs[i, j] = s
            for i in {i for i, _, _ in items}:
                pending[i] -= 1
                finished += pending[i] == 0
        if on_batch is not None and finished:
            on_batch(int(finished))
    model.train(was_training)
    shifted = log_probs - log_probs.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return LabelScores(labels=labels, log_probs=log_probs, probs=probs)
