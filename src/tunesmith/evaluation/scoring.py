"""Label probabilities: how likely the model is to answer each label, for classification.

For a prompt and a label, the answer is scored as the tokens training teaches for it: the
conversation with the label as the final assistant turn is encoded by ``encode_chat`` (the one
place chat is tokenized), and the last assistant turn's target tokens are kept up to and
including the end-of-turn token (``<|im_end|>`` for ChatML: generation stops there, so what a
template renders after it is not part of the answer). The sum of those tokens' log-probabilities
after the context is the label's score; a softmax across the labels gives P(label | prompt).

A batch of contexts is scored in one forward pass, with two savings over running each
(context, label) sequence:

- the tokens every context starts with (the system prompt and the chat header of an
  evaluation set: about half of each SMS demo prompt) run once for the whole set, and each
  batch goes on from a copy of their KV cache (a batch whose contexts share more runs only the
  rest);
- each context's labels branch off it in the same row (a tree: each label's tokens attend to
  the context and to themselves, at the positions they take after the context), so k labels
  cost their own few tokens, not k copies of the context, and nothing is run twice.

Models with a sliding attention window shorter than a batch's sequences, or whose attention
takes no custom mask, score each (context, label) sequence whole instead (same numbers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith.data.encode import IGNORE_INDEX, encode_chat
from tunesmith.errors import DataError
from tunesmith.models.generation import cache_argument, pad_batch
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


def _shared_prefix(contexts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all the contexts share (none for a lone context), keeping at
    least each context's last token, whose hidden state predicts the answers."""
    if len(contexts) < 2:
        return 0
    first, n = contexts[0], min(len(c) for c in contexts) - 1
    for c in contexts[1:]:
        k = 0
        while k < n and c[k] == first[k]:
            k += 1
        n = k
    return n


def _tree_mask_kind(config: Any, longest: int) -> str | None:
    """How the tree's mask is given to this model's attention: 'bool' (SDPA takes it), 'add'
    (eager attention adds it to the scores), or None where it cannot be: another attention
    (flash-attention kernels take no mask), or a sliding window the sequences outgrow (one
    custom mask would serve windowed and full layers alike)."""
    from tunesmith.models.packed_attention import NAME

    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None) or ()
    windowed = window is not None and getattr(config, "use_sliding_window", True) is not False \
        and (not kinds or "sliding_attention" in kinds)
    if windowed and longest > window:
        return None
    return {"sdpa": "bool", NAME: "bool", "eager": "add"}.get(
        getattr(config, "_attn_implementation", "sdpa"))


@dataclass
class _Tree:
    """A batch as one left-padded pass: per context, its tokens after the shared prefix, then
    each answer but its last token. ``branch`` is 0 on context tokens, j + 1 on answer j's,
    -1 on padding; ``reads`` are (row, column, token, pair): the hidden state at that column
    predicts ``token`` of that pair's answer (pairs numbered context by context)."""

    ids: torch.Tensor
    positions: torch.Tensor
    branch: torch.Tensor
    reads: torch.Tensor  # [reads, 4]


def _tree(contexts: Sequence[Sequence[int]], answers: Sequence[Sequence[Sequence[int]]],
          shared: int, pad_id: int) -> _Tree:
    laid, reads, pair = [], [], 0
    for context, group in zip(contexts, answers, strict=True):
        ids, positions = list(context[shared:]), list(range(shared, len(context)))
        branch, last = [0] * len(ids), len(ids) - 1
        found = []
        for j, answer in enumerate(group):
            found.append((last, answer[0], pair))  # the first token follows the context
            for t, token in enumerate(answer[:-1]):
                ids.append(token)
                positions.append(len(context) + t)
                branch.append(j + 1)
                found.append((len(ids) - 1, answer[t + 1], pair))
            pair += 1
        laid.append((ids, positions, branch, found))
    width = max(len(ids) for ids, *_ in laid)
    tree = _Tree(torch.full((len(laid), width), pad_id), torch.zeros((len(laid), width),
                 dtype=torch.long), torch.full((len(laid), width), -1), torch.empty(0))
    for r, (ids, positions, branch, found) in enumerate(laid):
        pad = width - len(ids)
        tree.ids[r, pad:] = torch.tensor(ids)
        tree.positions[r, pad:] = torch.tensor(positions)
        tree.branch[r, pad:] = torch.tensor(branch)
        reads.extend((r, pad + col, token, p) for col, token, p in found)
    tree.reads = torch.tensor(reads)
    return tree


def _tree_mask(branch: torch.Tensor, shared: int) -> torch.Tensor:
    """[rows, 1, width, shared + width], True where a query column may attend to a key: every
    shared-prefix key; earlier context keys of its row; earlier keys of its own answer. A
    padding column attends to itself alone (no row of the mask is empty)."""
    rows, width = branch.shape
    q, k = branch[:, :, None], branch[:, None, :]
    col = torch.arange(width)
    own = (col[None, :, None] >= col[None, None, :]) & (k >= 0) & ((k == 0) | (k == q))
    own |= torch.eye(width, dtype=torch.bool)
    prefix = (q >= 0).expand(rows, width, shared)
    return torch.cat([prefix, own], dim=2)[:, None]


def _prefix_cache(decoder: Any, prefix: tuple[int, ...], prefixes: dict[tuple[int, ...], Any],
                  device: torch.device, name: str) -> Any:
    """The KV cache of ``prefix`` (one row), made once: from the longest prefix of it already
    in ``prefixes``, a batch's prefix that goes on past the set's runs only the rest."""
    if prefix not in prefixes:
        start = max((p for p in prefixes if prefix[:len(p)] == p), key=len, default=())
        out = decoder(input_ids=torch.tensor([prefix[len(start):]], device=device),
                      use_cache=True, **{name: copy.deepcopy(prefixes[start]) if start else None})
        prefixes[prefix] = getattr(out, name)
    return prefixes[prefix]


def _score_tree(lm: Any, contexts: list[list[int]], answers: list[list[list[int]]],
                pad_id: int, device: torch.device, kind: str,
                prefixes: dict[tuple[int, ...], Any], floor: int) -> torch.Tensor:
    """Summed log-probs of every (context, answer) pair, in one pass (see ``_Tree``) after
    the shared prefix's (kept in ``prefixes``, by its tokens)."""
    decoder, head = lm.get_decoder(), output_head(lm)
    shared = max(_shared_prefix(contexts), floor)
    tree = _tree(contexts, answers, shared, pad_id)
    cache, name = None, cache_argument()
    if shared:
        if floor:  # the set's prefix first: every batch's goes on from it
            _prefix_cache(decoder, tuple(contexts[0][:floor]), prefixes, device, name)
        # a copy for this batch: the pass appends to it
        cache = copy.deepcopy(_prefix_cache(decoder, tuple(contexts[0][:shared]), prefixes,
                                            device, name))
        cache.reorder_cache(torch.zeros(len(contexts), dtype=torch.long, device=device))
    mask = _tree_mask(tree.branch, shared).to(device)
    if kind == "add":
        # the embeddings' dtype: a 4-bit base's first parameters are packed integers
        dtype = lm.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    hidden = decoder(input_ids=tree.ids.to(device), attention_mask=mask,
                     position_ids=tree.positions.to(device), use_cache=cache is not None,
                     **{name: cache}).last_hidden_state
    rows, cols, tokens, pairs = (c.to(device) for c in tree.reads.unbind(1))
    logp = F.log_softmax(head(hidden[rows, cols]).float(), dim=-1)
    picked = logp.gather(1, tokens[:, None])[:, 0]
    total = sum(len(group) for group in answers)
    return torch.zeros(total, device=device).index_add_(0, pairs, picked)


def _score_each(lm: Any, contexts: list[list[int]], answers: list[list[list[int]]],
                pad_id: int, device: torch.device) -> torch.Tensor:
    """The same sums with each (context, answer) sequence run whole, left-padded: for models
    the tree cannot be given to (see ``_tree_mask_kind``)."""
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
                    pad_id: int, device: torch.device, prefixes: dict[tuple[int, ...], Any],
                    floor: int = 0) -> list[list[float]]:
    """Summed log-probs of each context's answers, context by context. ``prefixes`` keeps
    the KV cache of each shared prefix run so far, for the next batches; ``floor`` is a
    prefix length all of them share (a lone context's batch shares that much)."""
    longest = max(len(c) + len(a) for c, group in zip(contexts, answers, strict=True)
                  for a in group)
    kind = _tree_mask_kind(lm.config, longest)
    if kind is None:
        scores = _score_each(lm, contexts, answers, pad_id, device)
    else:
        scores = _score_tree(lm, contexts, answers, pad_id, device, kind, prefixes, floor)
    it = iter(scores.tolist())
    return [[next(it) for _ in group] for group in answers]


# A batch takes contexts, longest first, while its padding stays under this share of its
# slots (and up to ``batch_size`` of them): sorted lengths still leave long tails (a few long
# messages), and a padded slot costs as much as a real token.
MAX_PADDING = 0.1


def _batches(rows: list[int], batch_size: int) -> list[slice]:
    """Consecutive slices of ``rows`` (token counts, longest first) into batches."""
    cuts, start, padding = [], 0, 0
    for end in range(1, len(rows) + 1):
        if end == len(rows):
            cuts.append(slice(start, end))
            break
        padding += rows[start] - rows[end]
        if end - start == batch_size or padding > MAX_PADDING * rows[start] * (end - start + 1):
            cuts.append(slice(start, end))
            start, padding = end, 0
    return cuts


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
    # longest first, by the tokens a row will hold, so that batches pad little
    sizes = {c: len(c) + sum(len(a) - 1 for a in answers) for c, answers in groups.items()}
    ordered = sorted(groups.items(), key=lambda kv: -sizes[kv[0]])
    prefixes: dict[tuple[int, ...], Any] = {}
    floor = _shared_prefix(list(groups))
    for cut in _batches([sizes[c] for c, _ in ordered], batch_size):
        chunk = ordered[cut]
        scores = _score_contexts(lm, [list(c) for c, _ in chunk],
                                 [[list(a) for a in answers] for _, answers in chunk],
                                 tokenizer.pad_token_id, device, prefixes, floor)
        finished = 0
        for (_, answers), row in zip(chunk, scores, strict=True):
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
