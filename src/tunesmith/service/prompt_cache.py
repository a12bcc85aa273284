"""Prompt caching: the keys and values of prompts' opening tokens, kept across chat requests.

Requests to one model open alike: a system prompt every request carries, a document several
questions are asked about, a conversation's earlier turns sent again with each new one. Their
keys and values come out the same every time, so the service keeps them. A prompt is cut into
blocks of ``BLOCK`` tokens, and each block's keys and values are kept under the blocks before
it (a block's keys and values depend on every token before it): a tree per model. A new
prompt runs only what follows the longest run of its leading blocks found there, and leaves
its own blocks for the next. This is OpenAI's prompt caching as its API reports it
(``usage.prompt_tokens_details.cached_tokens``), and vLLM's automatic prefix caching (blocks
of 16 tokens; the least recently used block that no other follows is evicted first).

Requests admitted together whose prompts share blocks not kept yet run those once, first. A
reply's blocks are kept too when its row ends, so a conversation's next request, which sends
the reply back, finds them (where the chat template renders the reply as the tokens the model
generated, which is the common case).

``PromptPool`` holds every model's tree within one memory budget
(``ServiceSettings.prompt_cache_bytes``), evicting across models; a model's tree goes with
its batcher, and so with the model. Only models whose attention takes a mask with padding
inside a row use it (``prefix_pass.mask_kind``): a row laid out from the cache is
``[its kept blocks | padding | the rest of its prompt]``, each part left-padded, and
transformers takes each row's positions from the mask, as ``models.generation.generate_rows``
does after a shared prefix.

Written here: transformers' only prefix reuse across requests is inside its continuous-
batching manager (paged attention, which ``service.batching`` does not use; see there), while
its ``generate`` goes on from any ``DynamicCache``, which is all this needs.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.models.generation import pad_batch
from tunesmith.models.prefix_pass import cache_pass, mask_kind, shared_prefix

BLOCK = 16


class _Node:
    """One block: its tokens, and each layer's keys and values [kv heads, BLOCK, head dim]."""

    __slots__ = ("children", "parent", "tokens", "kv", "used", "bytes")

    def __init__(self, parent: _Node | None, tokens: tuple[int, ...],
                 kv: list[tuple[torch.Tensor, torch.Tensor]], used: int) -> None:
        self.children: dict[tuple[int, ...], _Node] = {}
        self.parent, self.tokens, self.kv, self.used = parent, tokens, kv, used
        self.bytes = sum(k.nbytes + v.nbytes for k, v in kv)


class PromptPool:
    """The prompt caches of every model, within ``budget`` bytes of keys and values."""

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ValueError("the prompt cache's budget must be >= 0 bytes")
        self.budget = budget
        self.lock = threading.Lock()
        self._caches: weakref.WeakSet[PromptCache] = weakref.WeakSet()
        self._clock = itertools.count(1)

    def tick(self) -> int:
        return next(self._clock)

    @property
    def used(self) -> int:
        return sum(c.bytes for c in list(self._caches))

    def add(self, cache: PromptCache) -> None:
        self._caches.add(cache)

    def make_room(self) -> None:
        """Evict the least recently used leaves until the caches fit (under ``lock``).

        A scan of every block per eviction: a budget holds hundreds of blocks, not millions,
        and evictions come a few per request at most."""
        caches = list(self._caches)
        total = sum(c.bytes for c in caches)
        while total > self.budget:
            leaves = [(n.used, id(n), n, c) for c in caches for n in c.nodes if not n.children]
            if not leaves:
                return
            _, _, node, cache = min(leaves, key=lambda x: x[:2])
            total -= cache.evict(node)


@dataclass
class Laid:
    """Rows laid out from the cache: ``ids`` and ``mask`` [rows, kept + rest columns], the
    ``cache`` holding the kept columns, and how many prompt tokens each row took from it."""

    ids: torch.Tensor
    mask: torch.Tensor
    cache: Any
    cached: list[int]


class PromptCache:
    """One model's tree of kept blocks, in ``pool``."""

    def __init__(self, pool: PromptPool) -> None:
        self.pool = pool
        self.root = _Node(None, (), [], 0)
        self.nodes: set[_Node] = set()
        self.bytes = 0
        pool.add(self)

    @staticmethod
    def usable(model: Any) -> bool:
        return mask_kind(model.config, 0) is not None

    def evict(self, node: _Node) -> int:
        assert node.parent is not None and not node.children
        del node.parent.children[node.tokens]
        self.nodes.discard(node)
        self.bytes -= node.bytes
        return node.bytes

    def _walk(self, prompt: Any, blocks: int) -> list[_Node]:
        """The kept blocks ``prompt`` opens with, up to ``blocks`` of them."""
        node, found = self.root, []
        for j in range(blocks):
            node = node.children.get(tuple(prompt[j * BLOCK:(j + 1) * BLOCK]))  # type: ignore
            if node is None:
                break
            found.append(node)
        return found

    def lay_out(self, model: Any, prompts: list[Any], pad_id: int) -> Laid | None:
        """The rows of ``prompts`` going on from their kept blocks (each leaves at least its
        last token to run, whose logits choose the first new token); None where no row has
        any. Blocks the prompts share and nobody kept yet run once, first."""
        device = next(model.parameters()).device
        with self.pool.lock:
            self._share(model, prompts, device)
            found = [self._walk(p, (len(p) - 1) // BLOCK) for p in prompts]
            tick = self.pool.tick()
            for node in itertools.chain.from_iterable(found):
                node.used = tick
        kept = max(len(f) for f in found) * BLOCK
        if not kept:
            return None
        cached = [len(f) * BLOCK for f in found]
        parts = [pad_batch([p[:c] for p, c in zip(prompts, cached, strict=True)],
                           pad_id=pad_id, side="left"),
                 pad_batch([p[c:] for p, c in zip(prompts, cached, strict=True)],
                           pad_id=pad_id, side="left")]
        return Laid(torch.cat([x.input_ids for x in parts], dim=1),
                    torch.cat([x.attention_mask for x in parts], dim=1), _cache(found, kept),
                    cached)

    def _share(self, model: Any, prompts: list[Any], device: torch.device) -> None:
        """Run once the blocks all ``prompts`` share that are not kept yet (under the lock)."""
        blocks = shared_prefix(prompts) // BLOCK
        found = self._walk(prompts[0], blocks) if blocks else []
        if len(found) == blocks:
            return
        start, end = len(found) * BLOCK, blocks * BLOCK
        layers = cache_pass(model, torch.tensor([list(prompts[0][start:end])], device=device),
                            _cache([found], start) if found else None).layers
        self._keep(prompts[0], found, [(la.keys[0], la.values[0]) for la in layers],
                   torch.arange(start, end, device=device))

    def store(self, rows: Sequence[tuple[int, Sequence[int]]], cache: Any,
              mask: torch.Tensor) -> None:
        """Keep the blocks of each (row, tokens) of a batch: ``tokens`` are what the row
        holds (a prompt; a prompt and its reply), ``cache`` its columns, ``mask`` [rows,
        columns] which of them are its tokens, in order. The cache holds every column of a
        batch but the last, so a row's last token may be missing; its blocks stop there."""
        with self.pool.lock:
            for i, tokens in rows:
                columns = mask[i, :cache.get_seq_length()].nonzero().squeeze(1)
                tokens = tokens[:len(columns)]
                blocks = len(tokens) // BLOCK
                found = self._walk(tokens, blocks)
                if len(found) < blocks:
                    self._keep(tokens, found, [(la.keys[i], la.values[i]) for la in cache.layers],
                               columns[len(found) * BLOCK:len(tokens)].to(
                                   cache.layers[0].keys.device))
            self.pool.make_room()

    def _keep(self, prompt: Any, found: list[_Node],
              kv: list[tuple[torch.Tensor, torch.Tensor]], columns: torch.Tensor) -> None:
        """Add the whole blocks of ``prompt`` after ``found``: its tokens from there on are at
        ``columns`` of ``kv`` (each layer's [heads, columns, dim]; ``index_select`` copies
        them, so the batch's cache is not held)."""
        node, tick = (found[-1] if found else self.root), self.pool.tick()
        for b in range(len(columns) // BLOCK):
            j = len(found) + b
            at = columns[b * BLOCK:(b + 1) * BLOCK]
            tokens = tuple(prompt[j * BLOCK:(j + 1) * BLOCK])
            child = _Node(node, tokens, [(k.index_select(1, at), v.index_select(1, at))
                                         for k, v in kv], tick)
            node.children[tokens] = child
            self.nodes.add(child)
            self.bytes += child.bytes
            node = child


def _cache(found: list[list[_Node]], kept: int) -> Any:
    """A ``DynamicCache`` of ``kept`` columns: each row's blocks at its right end, zeros (and
    a masked column) before them."""
    from transformers import DynamicCache

    rows, cache = len(found), DynamicCache()
    first = next(f for f in found if f)[0]
    for layer, (k0, v0) in enumerate(first.kv):
        keys = k0.new_zeros((rows, k0.shape[0], kept, k0.shape[2]))
        values = v0.new_zeros((rows, v0.shape[0], kept, v0.shape[2]))
        for i, nodes in enumerate(found):
            if nodes:
                c = len(nodes) * BLOCK
                keys[i, :, kept - c:] = torch.cat([n.kv[layer][0] for n in nodes], dim=1)
                values[i, :, kept - c:] = torch.cat([n.kv[layer][1] for n in nodes], dim=1)
        cache.update(keys, values, layer)
    return cache
