"""Replies on their way: streamed as they come, and batched with the other requests to a model.

A ``Ticket`` is one reply being generated: its token ids arrive as the model produces them
(``pieces`` turns them into text pieces for streaming) and its ``result`` is ready as soon as
its row ends, even while a longer row of the same batch goes on.

``Batcher`` is how the service answers requests that arrive together: every request to a
model is queued on that model's batcher. Its worker thread waits ``window_s`` for others to
arrive, then runs the queued requests that share their sampling parameters (see
``generation.batch_key``) as one batch of up to ``max_batch`` rows: one forward pass per
step for all of them, each row with its own stop strings, token limit and cancellation. The
batch goes on in ``generate`` calls of ``CHUNK_TOKENS`` tokens (``_Running``); between two
calls the rows that ended leave it and requests queued meanwhile join it, so a batch stays
full while clients come and go, and nobody waits for the longest reply of a batch to end.
A request joining a batch runs only what follows the opening blocks its prompt shares with
earlier ones, kept by the model's prompt cache (``service.prompt_cache``), where the batcher
has one (the service's do).
Greedy rows give what they give alone: a row attends only to its own tokens, and each call is
transformers' ``generate``, the path evaluation runs, going on from the batch's KV cache.
Requests that cannot join a running batch run in one ``generate`` call of their own batch:
a seeded sample (alone: its random draws are its own), a request with a minimum length, and
models with sliding-window layers (their caches drop columns, so rows cannot be merged).

Why not transformers' continuous batching (``ContinuousBatchingManager``): it generates
outside ``generate`` through a paged-attention implementation of the model's attention, so
its replies would not come from the path evaluation, ``tunesmith chat`` and the adapters on a
shared base use, and it has no per-request stop strings.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tunesmith.models.generation import (
    Generated,
    GenerationParams,
    Row,
    batch_key,
    extend,
    first_stop,
    generate_rows,
    generating,
    held_back,
    pad_batch,
)
from tunesmith.models.logprobs import TokenLogprob
from tunesmith.service.prompt_cache import PromptCache, PromptPool

# Tokens a running batch generates between two chances for rows to leave and join it: each
# ``generate`` call costs a little setting up; a row that ends mid-chunk idles for the rest.
CHUNK_TOKENS = 8


class Cancelled(Exception):
    """The reply was cancelled before its batch began."""


class Ticket:
    """One reply being generated. ``result`` waits for it; ``pieces`` streams its text; the
    pieces join to ``result().text``. ``cancel`` ends it at its next token."""

    def __init__(self, model: Any, tokenizer: Any, prompt: Sequence[int],
                 params: GenerationParams, *, streaming: bool = False) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.key = batch_key(params)
        self._tokens: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self._reply: Generated | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self.row = Row(prompt, params, on_tokens=self._tokens.put if streaming else None,
                       on_end=self._settle, cancel=self._cancel)
        self.cached_tokens = 0
        """Prompt tokens taken from the prompt cache (``service.prompt_cache``), not run."""

    def _settle(self, reply: Generated | None = None, error: BaseException | None = None
                ) -> None:
        if self._done.is_set():  # the first outcome stands (a row ends before its batch)
            return
        self._reply, self._error = reply, error
        self._done.set()
        self._tokens.put(None)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def result(self, timeout: float | None = None) -> Generated:
        if not self._done.wait(timeout):
            raise TimeoutError("the reply is not ready")
        if self._error is not None:
            raise self._error
        assert self._reply is not None
        return self._reply

    def pieces(self) -> Iterator[str]:
        """The reply as text pieces, as its tokens come (``chunks`` without log-probs)."""
        return (text for text, _ in self.chunks())

    def chunks(self) -> Iterator[tuple[str, list[TokenLogprob]]]:
        """The reply as text pieces, as its tokens come, each with the log-probability entries
        of the tokens it completes (with ``params.logprobs``; else none).

        A piece ends where the decoded text ends in whitespace, the rule of transformers'
        ``TextStreamer``: a word still growing (or a character whose bytes span tokens) is held
        back, and so is text that could still become a stop string; what the stop cuts is never
        sent. After the last token, whatever was held back and kept follows."""
        stops, sent, told, eos = self.params.stop, 0, 0, self.tokenizer.eos_token_id
        for ids in iter(self._tokens.get, None):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = first_stop(text, stops)
            held = min(len(text) - held_back(text, stops), _word_end(text))
            ready = held if cut is None else cut
            if ready > sent:
                start = told
                while self.params.logprobs is not None and told < len(ids) \
                        and ids[told] != eos and len(self.tokenizer.decode(
                            ids[:told + 1], skip_special_tokens=True)) <= ready:
                    told += 1
                yield text[sent:ready], self.row.taken[start:told]
                sent = ready
        reply = self.result()
        rest = list(reply.logprobs[told:]) if reply.logprobs is not None else []
        if len(reply.text) > sent or rest:
            yield reply.text[sent:], rest


def _word_end(text: str) -> int:
    """Where the last whole word ends: all of ``text`` if it ends in whitespace."""
    if not text or text[-1].isspace():
        return len(text)
    return max(text.rfind(" "), text.rfind("\n")) + 1


def _settle_all(tickets: Sequence[Ticket], err: BaseException) -> None:
    for t in tickets:
        t._settle(error=err)


def _run(batch: list[Ticket]) -> None:
    """One ``generate_rows`` call for ``batch``, start to end (rows that cannot join a
    running batch: a seeded sample, a minimum length, a model with sliding-window layers)."""
    live = _live(batch)
    if not live:
        return
    model, tokenizer = live[0].model, live[0].tokenizer
    try:
        with generating(model, live[0].params.seed):
            generate_rows(model, tokenizer, [t.row for t in live])
    except Exception as err:  # each waiting request hears of it
        _settle_all(live, err)


def _live(batch: Sequence[Ticket]) -> list[Ticket]:
    """The tickets not cancelled yet; the others are told so."""
    for t in batch:
        if t.cancelled:
            t._settle(error=Cancelled("the request was cancelled"))
    return [t for t in batch if not t.cancelled]


def _joinable(ticket: Ticket) -> bool:
    """Whether the ticket can run in a batch that rows join and leave: not a seeded sample,
    no minimum length (counted per ``generate`` call), and a model whose layers all keep a
    plain KV cache (rows are merged by left-padding it; sliding-window layers drop columns)."""
    if ticket.key is None or ticket.params.min_new_tokens:
        return False
    config = ticket.model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return all(t == "full_attention" for t in getattr(config, "layer_types", None) or ())


def _left_pad(x: torch.Tensor, columns: int, value: float = 0) -> torch.Tensor:
    """``x`` (rows first, sequence in dim 1 for ids/masks, dim 2 for [B, H, S, D] caches) with
    ``columns`` more columns on the left."""
    if columns == 0:
        return x
    if x.dim() == 2:
        return torch.nn.functional.pad(x, (columns, 0), value=value)
    return torch.nn.functional.pad(x, (0, 0, columns, 0), value=value)


class _Running:
    """A batch in progress: a left-padded block of sequences, their attention mask and one
    KV cache (every column but the last), to which rows are admitted and from which ended
    rows are dropped between ``generate`` calls of up to ``CHUNK_TOKENS`` tokens.

    A row's tokens are what the same row gets in a batch of its own: its columns attend only to
    its own tokens (the mask), its positions count from its first real token (transformers
    derives them from the mask), and a zero-padded cache column is masked like a padding
    token. Admitting a row runs its prompt in a ``generate`` call of one token, as the first
    step of a ``generate`` call over the whole reply would."""

    def __init__(self, model: Any, tokenizer: Any, key: Any,
                 prompts: PromptCache | None = None) -> None:
        self.model, self.tokenizer, self.key = model, tokenizer, key
        self.prompts = prompts if prompts is not None and prompts.usable(model) else None
        self.tickets: list[Ticket] = []
        self.ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.cache: Any = None
        self.new: list[int] = []  # tokens each row has generated

    def __len__(self) -> int:
        return len(self.tickets)

    def admit(self, tickets: list[Ticket]) -> None:
        from transformers import DynamicCache

        prompts, pad_id = [t.row.prompt for t in tickets], self.tokenizer.pad_token_id
        laid = None
        if self.prompts is not None:  # [kept blocks | padding | rest], see prompt_cache
            with generating(self.model, None):
                laid = self.prompts.lay_out(self.model, prompts, pad_id)
        if laid is None:
            batch = pad_batch(prompts, pad_id=pad_id, side="left")
            ids, mask, cache = batch.input_ids, batch.attention_mask, DynamicCache()
        else:
            ids, mask, cache = laid.ids, laid.mask, laid.cache
            for t, cached in zip(tickets, laid.cached, strict=True):
                t.cached_tokens = cached
        width = ids.shape[1]
        ids, mask, grown, ended = self._extend(tickets, ids, mask, [width] * len(tickets), 1,
                                               cache)
        if self.prompts is not None:
            self.prompts.store(list(enumerate(prompts)), cache, mask)
        self._merge(tickets, ids, mask, cache, [grown] * len(tickets))
        self._drop(ended, first=len(self) - len(tickets))

    def step(self) -> None:
        assert self.ids is not None and self.mask is not None
        width = self.ids.shape[1]
        room = max(t.params.max_new_tokens - n for t, n in zip(self.tickets, self.new,
                                                                 strict=True))
        self.ids, self.mask, grown, ended = self._extend(
            self.tickets, self.ids, self.mask, [width - n for n in self.new],
            min(CHUNK_TOKENS, room), self.cache)
        self.new = [n + grown for n in self.new]
        self._drop(ended)

    def _extend(self, tickets: Sequence[Ticket], ids: torch.Tensor, mask: torch.Tensor,
                starts: list[int], tokens: int, cache: Any
                ) -> tuple[torch.Tensor, torch.Tensor, int, list[int | None]]:
        """One ``generate`` call of up to ``tokens`` tokens: the grown ids and mask, how many
        columns they grew by, and where each row ended (None: it goes on)."""
        with generating(self.model, None):
            out, ends = extend(self.model, self.tokenizer, [t.row for t in tickets], ids, mask,
                               starts=starts, max_new_tokens=tokens, cache=cache)
        grown = out.shape[1] - ids.shape[1]
        mask = torch.cat([mask, mask.new_ones(len(tickets), grown)], dim=1)
        return out.cpu(), mask, grown, ends.ends

    def _merge(self, tickets: list[Ticket], ids: torch.Tensor, mask: torch.Tensor, cache: Any,
               new: list[int]) -> None:
        if self.ids is None or self.mask is None:
            self.tickets, self.ids, self.mask, self.cache, self.new = (
                list(tickets), ids, mask, cache, list(new))
            return
        width = max(self.ids.shape[1], ids.shape[1])
        a, b = width - self.ids.shape[1], width - ids.shape[1]
        pad_id = self.tokenizer.pad_token_id
        self.ids = torch.cat([_left_pad(self.ids, a, pad_id), _left_pad(ids, b, pad_id)])
        self.mask = torch.cat([_left_pad(self.mask, a), _left_pad(mask, b)])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, a), _left_pad(theirs.keys, b)])
            mine.values = torch.cat([_left_pad(mine.values, a), _left_pad(theirs.values, b)])
        self.tickets += tickets
        self.new += new

    def _drop(self, ended: Sequence[int | None], first: int = 0) -> None:
        """Drop the rows (from ``first`` on) that ended, keeping their prompts and replies in
        the prompt cache; trim the columns no row uses."""
        keep = [i for i in range(len(self))
                if i < first or ended[i - first] is None]
        if len(keep) == len(self):
            return
        assert self.ids is not None and self.mask is not None
        if self.prompts is not None:  # a row's tokens: its prompt, then its reply to its end
            done = [i for i in range(first, len(self)) if ended[i - first] is not None]
            self.prompts.store(
                [(i, self.ids[i][self.mask[i].bool()][:len(self.tickets[i].row.prompt)
                                                      + ended[i - first]].tolist())
                 for i in done], self.cache, self.mask)
        if not keep:
            self.tickets, self.ids, self.mask, self.cache, self.new = [], None, None, None, []
            return
        index = torch.tensor(keep)
        self.tickets = [self.tickets[i] for i in keep]
        self.new = [self.new[i] for i in keep]
        self.ids, self.mask = self.ids[index], self.mask[index]
        self.cache.batch_select_indices(index.to(self.cache.layers[0].keys.device))
        used = self.mask.any(dim=0).nonzero()
        cut = int(used[0]) if len(used) else 0
        if cut:
            self.ids, self.mask = self.ids[:, cut:], self.mask[:, cut:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]


class Batcher:
    """The queue of replies to one model and the worker that generates them in batches."""

    def __init__(self, *, max_batch: int = 8, window_s: float = 0.01,
                 pool: PromptPool | None = None) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError("max_batch must be >= 1 and window_s >= 0")
        self.max_batch, self.window_s, self.pool = max_batch, window_s, pool
        self.prompts = PromptCache(pool) if pool is not None and pool.budget else None
        """This model's prompt cache (its batches are the only ones to use it)."""
        self._pending: list[Ticket] = []
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.sizes: deque[int] = deque(maxlen=1024)
        """The rows of each recent ``generate`` call (for tests and benchmarks); bounded, as a
        server makes calls for as long as it runs."""

    def submit(self, ticket: Ticket) -> Ticket:
        with self._lock:
            self._pending.append(ticket)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
                self._worker.start()
        return ticket

    def _take(self, key: Any, room: int) -> list[Ticket]:
        """Up to ``room`` queued tickets of ``key``, oldest first (under the lock)."""
        batch = [t for t in self._pending if t.key == key][:room]
        taken = {id(t) for t in batch}
        self._pending = [t for t in self._pending if id(t) not in taken]
        return batch

    def _work(self) -> None:
        running: _Running | None = None
        while True:
            if running is None:
                time.sleep(self.window_s)  # requests sent together arrive a few ms apart
            with self._lock:
                if running is None:
                    if not self._pending:
                        self._worker = None
                        return
                    key = self._pending[0].key  # None: a seeded sample, which runs alone
                    batch = self._take(key, self.max_batch if key is not None else 1)
                else:
                    batch = self._take(running.key, self.max_batch - len(running))
            try:
                running = self._advance(running, batch)
            except Exception as err:  # every request of the batch hears of it
                _settle_all([*batch, *(running.tickets if running else [])], err)
                running = None

    def _advance(self, running: _Running | None, batch: list[Ticket]) -> _Running | None:
        """Admit ``batch`` and generate one chunk; the batch still running after it."""
        if running is None and batch and not _joinable(batch[0]):
            self.sizes.append(len(batch))
            _run(batch)
            return None
        batch = _live(batch)
        if batch:
            if running is None:
                running = _Running(batch[0].model, batch[0].tokenizer, batch[0].key,
                                   self.prompts)
            running.admit(batch)
        if running is None or not len(running):
            return None
        self.sizes.append(len(running))
        running.step()
        return running if len(running) else None


_BATCHERS: weakref.WeakKeyDictionary[Any, Batcher] = weakref.WeakKeyDictionary()
_BATCHERS_LOCK = threading.Lock()


def batcher_for(model: Any, *, max_batch: int = 8, window_s: float = 0.01,
                pool: PromptPool | None = None) -> Batcher:
    """The batcher of ``model``: one per model object, gone with the model (and with it its
    prompt cache in ``pool``)."""
    with _BATCHERS_LOCK:
        batcher = _BATCHERS.get(model)
        if batcher is None or (batcher.max_batch, batcher.window_s, batcher.pool) != (
                max_batch, window_s, pool):
            batcher = _BATCHERS[model] = Batcher(max_batch=max_batch, window_s=window_s,
                                                 pool=pool)
        return batcher
