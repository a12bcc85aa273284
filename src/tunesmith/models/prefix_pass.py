"""Forward passes over many prompts that start alike: the shared prefix once, each batch after it.

An evaluation set's prompts share their opening tokens (the system prompt and the chat header:
about half of each SMS demo prompt). ``PrefixCache`` runs those once, for the whole set, and
each batch goes on from a copy of their KV cache; a batch whose prompts share more runs only
the rest, from that cache. ``tree_pass`` runs a batch: per context its tokens after the
shared prefix, then optional short branches (label scoring's answers), each attending to the
context and to itself at the positions it takes after the context, through a 4D mask given to
transformers' attention. ``batches`` cuts a sorted set into batches whose padding stays small
(scoring's: a batch is one pass); ``generation_batches`` cuts it at the least cost of the
prompts' passes and the batches' decode steps (generation's: a batch is a pass, then a step
per new token). ``models.generation.generate`` goes on from the same ``PrefixCache``.

``mask_kind`` says where the mask cannot be given (attentions that take no mask, a sliding
window shorter than the sequences); callers run their sequences whole there.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# A batch takes contexts, longest first, while its padding stays under this share of its
# slots (and up to ``batch_size`` of them): sorted lengths still leave long tails (a few long
# messages), and a padded slot costs as much as a real token.
MAX_PADDING = 0.1


@functools.cache
def cache_argument() -> str:
    """The name of a KV cache in ``generate``'s and a model's ``forward``'s arguments and in
    its outputs: ``cache`` since transformers 5.24, which warns on the older
    ``past_key_values``, the only name before it."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__).release >= (5, 24)
    return "cache" if new else "past_key_values"


def cache_pass(model: Any, input_ids: torch.Tensor, cache: Any) -> Any:
    """The KV cache of ``input_ids`` after ``cache`` (None: from the start), from one pass of
    ``model``: a bare decoder, or a causal LM, which then computes its vocabulary head at
    the last position only (``logits_to_keep=1``, as ``generate``'s first step asks) where
    its ``forward`` takes it. A pass run for its cache alone would otherwise hold the logits
    of every position: for a 2,000-token prefix and a 128k vocabulary, 1 GB in fp32."""
    supports = getattr(model, "_supports_logits_to_keep", None)
    keep = {"logits_to_keep": 1} if callable(supports) and supports() else {}
    name = cache_argument()
    return getattr(model(input_ids=input_ids, use_cache=True, **{name: cache}, **keep), name)


def shared_prefix(contexts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all the contexts share (none for a lone context), keeping at
    least each context's last token, whose hidden state is read."""
    if len(contexts) < 2:
        return 0
    first, n = contexts[0], min(len(c) for c in contexts) - 1
    for c in contexts[1:]:
        k = 0
        while k < n and c[k] == first[k]:
            k += 1
        n = k
    return n


def mask_kind(config: Any, longest: int) -> str | None:
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


def batched(contexts: Sequence[Sequence[int]], batch_size: int, *,
            sizes: Sequence[int] | None = None, new_tokens: int | None = None
            ) -> tuple[PrefixCache, list[list[int]]]:
    """A set of contexts (token ids; ``sizes``: the tokens each one's row holds, its length by
    default) longest first, cut into batches of indices into ``contexts``, and the
    ``PrefixCache`` their passes share. A batch is one pass (``batches``), or with
    ``new_tokens`` a pass and then a step per new token (``generation_batches``)."""
    sizes = [len(c) for c in contexts] if sizes is None else list(sizes)
    order = sorted(range(len(contexts)), key=lambda i: -sizes[i])
    prefixes = PrefixCache([contexts[i] for i in order])
    rows = [sizes[i] - prefixes.floor for i in order]
    cuts = batches(rows, batch_size) if new_tokens is None else generation_batches(
        rows, batch_size, new_tokens)
    return prefixes, [order[cut] for cut in cuts]


def batches(rows: list[int], batch_size: int) -> list[slice]:
    """Consecutive slices of ``rows`` (token counts, longest first) into batches of up to
    ``batch_size`` whose padding stays within ``MAX_PADDING`` of their slots."""
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


# What one decode step costs, in prompt tokens run in a batch's pass: on a 2-core CPU a step
# of a 32-row batch took about as long as 70 prompt tokens (SMS test split, SmolLM2-135M;
# docs/benchmarks.md). A GPU runs prompt tokens in parallel, so a step costs it more, and the
# cuts below then keep batches whole.
STEP_TOKENS = 64


def generation_batches(rows: list[int], batch_size: int, new_tokens: int) -> list[slice]:
    """Consecutive slices of ``rows`` (prompt tokens to run, longest first) into batches of up
    to ``batch_size``, at the least cost: each batch's prompt pass (its rows x its longest)
    plus ``STEP_TOKENS`` for each of its ``new_tokens`` steps. A cut saves the padding of the
    shorter prompts and costs a batch's steps, so short replies cut where long prompts trail
    and long replies keep batches full. Exact, by dynamic programming over the cut points."""
    best, back = [0.0] + [float("inf")] * len(rows), [0] * (len(rows) + 1)
    for end in range(1, len(rows) + 1):
        for start in range(max(0, end - batch_size), end):
            cost = best[start] + (end - start) * rows[start] + STEP_TOKENS * new_tokens
            if cost < best[end]:
                best[end], back[end] = cost, start
    cuts, end = [], len(rows)
    while end:
        cuts.append(slice(back[end], end))
        end = back[end]
    return cuts[::-1]


@dataclass
class Tree:
    """A batch as one left-padded pass: per context, its tokens after the shared prefix, then
    each branch but its last token. ``branch`` is 0 on context tokens, j + 1 on branch j's,
    -1 on padding. ``last`` is each row's column of its context's last token. ``reads`` are
    (row, column, token, pair): the hidden state at that column predicts ``token`` of that
    pair's branch (pairs numbered context by context)."""

    ids: torch.Tensor
    positions: torch.Tensor
    branch: torch.Tensor
    last: torch.Tensor  # [rows]
    reads: torch.Tensor  # [reads, 4]


def tree(contexts: Sequence[Sequence[int]], branches: Sequence[Sequence[Sequence[int]]],
         shared: int, pad_id: int) -> Tree:
    laid, reads, pair = [], [], 0
    for context, group in zip(contexts, branches, strict=True):
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
        laid.append((ids, positions, branch, last, found))
    width = max(len(ids) for ids, *_ in laid)
    out = Tree(torch.full((len(laid), width), pad_id), torch.zeros((len(laid), width),
               dtype=torch.long), torch.full((len(laid), width), -1),
               torch.zeros(len(laid), dtype=torch.long), torch.empty(0))
    for r, (ids, positions, branch, last, found) in enumerate(laid):
        pad = width - len(ids)
        out.ids[r, pad:] = torch.tensor(ids)
        out.positions[r, pad:] = torch.tensor(positions)
        out.branch[r, pad:] = torch.tensor(branch)
        out.last[r] = pad + last
        reads.extend((r, pad + col, token, p) for col, token, p in found)
    out.reads = torch.tensor(reads, dtype=torch.long).reshape(-1, 4)
    return out


def tree_mask(branch: torch.Tensor, shared: int) -> torch.Tensor:
    """[rows, 1, width, shared + width], True where a query column may attend to a key: every
    shared-prefix key; earlier context keys of its row; earlier keys of its own branch. A
    padding column attends to itself alone (no row of the mask is empty)."""
    rows, width = branch.shape
    q, k = branch[:, :, None], branch[:, None, :]
    col = torch.arange(width)
    own = (col[None, :, None] >= col[None, None, :]) & (k >= 0) & ((k == 0) | (k == q))
    own |= torch.eye(width, dtype=torch.bool)
    prefix = (q >= 0).expand(rows, width, shared)
    return torch.cat([prefix, own], dim=2)[:, None]


class PrefixCache:
    """The KV caches of the prefixes a set's batches go on from (one row each). ``floor`` is
    how much every context of the set shares; it runs first, once, and a longer prefix goes on
    from the longest one kept. Kept: the floor's and the last longer one (a batch's prefix is
    rarely another's, and a big model's cache of a long prompt is tens of megabytes a copy)."""

    def __init__(self, contexts: Sequence[Sequence[int]]) -> None:
        self.floor = shared_prefix(contexts)
        self.caches: dict[tuple[int, ...], Any] = {}

    def get(self, decoder: Any, prefix: tuple[int, ...], device: torch.device) -> Any:
        if prefix not in self.caches:
            if 0 < self.floor < len(prefix):
                self.get(decoder, prefix[:self.floor], device)
            start = max((p for p in self.caches if prefix[:len(p)] == p), key=len, default=())
            cache = cache_pass(decoder, torch.tensor([prefix[len(start):]], device=device),
                               copy.deepcopy(self.caches[start]) if start else None)
            for kept in [p for p in self.caches if len(p) != self.floor]:
                del self.caches[kept]
            self.caches[prefix] = cache
        return self.caches[prefix]

    def rows(self, decoder: Any, prefix: tuple[int, ...], rows: int, device: torch.device
             ) -> Any:
        """A copy of ``prefix``'s cache for a batch of ``rows`` (the batch's pass appends to
        it; the cached one stays for the next batch)."""
        cache = copy.deepcopy(self.get(decoder, prefix, device))
        cache.reorder_cache(torch.zeros(rows, dtype=torch.long, device=device))
        return cache


def tree_pass(decoder: Any, contexts: Sequence[Sequence[int]],
              branches: Sequence[Sequence[Sequence[int]]], *, pad_id: int,
              device: torch.device, kind: str, prefixes: PrefixCache
              ) -> tuple[torch.Tensor, Tree]:
    """The last hidden states [rows, width, hidden] of one pass over ``contexts`` (after
    their shared prefix) with their ``branches``, and the ``Tree`` that says where each
    context and branch token sits. ``kind`` is ``mask_kind``'s answer."""
    shared = max(shared_prefix(contexts), prefixes.floor)
    laid = tree(contexts, branches, shared, pad_id)
    cache, name = None, cache_argument()
    if shared:
        cache = prefixes.rows(decoder, tuple(contexts[0][:shared]), len(contexts), device)
    mask = tree_mask(laid.branch, shared).to(device)
    if kind == "add":
        # the embeddings' dtype: a 4-bit base's first parameters are packed integers
        dtype = decoder.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
            ~mask, torch.finfo(dtype).min)
    hidden = decoder(input_ids=laid.ids.to(device), attention_mask=mask,
                     position_ids=laid.positions.to(device), use_cache=cache is not None,
                     **{name: cache}).last_hidden_state
    return hidden, laid
