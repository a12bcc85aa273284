"""Label probabilities: how likely the model is to answer each label, for classification.

For a prompt and a label, the answer is scored as the tokens training teaches for it: the
conversation with the label as the final assistant turn is encoded by ``encode_chat`` (the one
place chat is tokenized), and the last assistant turn's target tokens are kept up to and
including the end-of-turn token (``<|im_end|>`` for ChatML: generation stops there, so what a
template renders after it is not part of the answer). The sum of those tokens' log-probabilities
after the context is the label's score; a softmax across the labels gives P(label | prompt).

A batch of contexts is scored in one forward pass (``models.prefix_pass``): the prefix the
set's contexts share (system prompt, chat header) runs once, and each context's labels branch
off it in the same row (each label's tokens attend to the context and to themselves, at the
positions they take after the context), so k labels cost their own few tokens, not k copies
of the context, and nothing is run twice. Repeated prompts are scored once.

Models with a sliding attention window shorter than a batch's sequences, or whose attention
takes no custom mask, score each (context, label) sequence whole instead (same numbers).
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
from tunesmith.models.prefix_pass import PrefixCache, batched, mask_kind, tree_pass


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


def _score_tree(lm: Any, contexts: list[list[int]], answers: list[list[list[int]]],
                pad_id: int, device: torch.device, kind: str, prefixes: PrefixCache
                ) -> torch.Tensor:
    """Summed log-probs of every (context, answer) pair, in one pass (``tree_pass``)."""
    hidden, tree = tree_pass(lm.get_decoder(), contexts, answers, pad_id=pad_id,
                             device=device, kind=kind, prefixes=prefixes)
    rows, cols, tokens, pairs = (c.to(device) for c in tree.reads.unbind(1))
    logp = F.log_softmax(output_head(lm)(hidden[rows, cols]).float(), dim=-1)
    picked = logp.gather(1, tokens[:, None])[:, 0]
    total = sum(len(group) for group in answers)
    return torch.zeros(total, device=device).index_add_(0, pairs, picked)


def _score_each(lm: Any, contexts: list[list[int]], answers: list[list[list[int]]],
                pad_id: int, device: torch.device) -> torch.Tensor:
    """The same sums with each (context, answer) sequence run whole, left-padded: for models
    the tree cannot be given to (see ``prefix_pass.mask_kind``)."""
    pairs = [(c, a) for c, group in zip(contexts, answers, strict=True) for a in group]
    padded = pad_batch([c + a[:-1] for c, a in pairs], pad_id=pad_id, side="left")
    ids, mask = padded.input_ids, padded.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = lm.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                              position_ids=positions.to(device)).last_hidden_state
    width, head = ids.shape[1], output_head(lm)
    scores = []
    for r, (_, answer) in enumerate(pairs):
        logp = F.log_softmax(head(hidden[r, width - len(answer):]).float(), dim=-1)
        scores.append(logp.gather(1, torch.tensor(answer, device=device)[:, None]).sum())
    return torch.stack(scores)


def _score_contexts(lm: Any, contexts: list[list[int]], answers: list[list[list[int]]],
                    pad_id: int, device: torch.device, prefixes: PrefixCache
                    ) -> list[list[float]]:
    """Summed log-probs of each context's answers, context by context (``prefixes``: the set's
    shared prefixes, run once)."""
    longest = max(len(c) + len(a) for c, group in zip(contexts, answers, strict=True)
                  for a in group)
    kind = mask_kind(lm.config, longest)
    if kind is None:
        scores = _score_each(lm, contexts, answers, pad_id, device)
    else:
        scores = _score_tree(lm, contexts, answers, pad_id, device, kind, prefixes)
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
    # context -> answer -> the (prompt, label) pairs it scores: labels whose encoding shares
    # the context share its pass, and repeated prompts (an evaluation set has duplicate
    # messages) are scored once
    groups: dict[tuple[int, ...], dict[tuple[int, ...], list[tuple[int, int]]]] = {}
    for i, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            context, answer = answer_tokens(tokenizer, prompt, label)
            groups.setdefault(tuple(context), {}).setdefault(tuple(answer), []).append((i, j))
    was_training = model.training
    model.eval()
    lm = unwrap(model)
    device = next(model.parameters()).device
    log_probs = np.full((len(prompts), len(labels)), np.nan)
    # a prompt is done when all its contexts are (labels may encode with different contexts)
    pending = np.zeros(len(prompts), dtype=int)
    for answers in groups.values():
        for i in {i for pairs in answers.values() for i, _ in pairs}:
            pending[i] += 1
    # a row holds the context and each answer but its last token
    contexts = list(groups)
    prefixes, batches = batched(contexts, batch_size, sizes=[
        len(c) + sum(len(a) - 1 for a in groups[c]) for c in contexts])
    for batch in batches:
        chunk = [contexts[k] for k in batch]
        scores = _score_contexts(lm, [list(c) for c in chunk],
                                 [[list(a) for a in groups[c]] for c in chunk],
                                 tokenizer.pad_token_id, device, prefixes)
        finished = 0
        for answers, row in zip((groups[c] for c in chunk), scores, strict=True):
            for pairs, s in zip(answers.values(), row, strict=True):
                for i, j in pairs:
                    log_probs[i, j] = s
            for i in {i for pairs in answers.values() for i, _ in pairs}:
                pending[i] -= 1
                finished += pending[i] == 0
        if on_batch is not None and finished:
            on_batch(int(finished))
    model.train(was_training)
    shifted = log_probs - log_probs.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return LabelScores(labels=labels, log_probs=log_probs, probs=probs)
