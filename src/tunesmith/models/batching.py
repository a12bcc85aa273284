"""Replies on their way: streamed as they come, and batched with the other requests to a model.

A ``Ticket`` is one reply being generated: its token ids arrive as the model produces them
(``pieces`` turns them into text pieces for streaming) and its ``result`` is ready as soon as
its row ends, even while a longer row of the same batch goes on.

``Batcher`` is how the service answers requests that arrive together: every request to a
model is queued on that model's batcher, whose worker thread waits ``window_s`` for others
to arrive, then generates the queued requests that share their sampling parameters (see
``generation.batch_key``) in one ``generation.generate_rows`` call of up to ``max_batch``
rows: one forward pass per step for all of them, each row with its own KV cache, stop strings,
token limit and cancellation. Requests that arrive while a batch runs form the next one (a
running batch takes no new rows: transformers' ``generate`` keeps one KV cache per call).
Greedy rows give what they give alone, because the batch is the same left-padded ``generate``
that evaluation runs and a row never attends to another. A seeded sample runs alone: its
random draws would be shared with the rest of the batch.

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
from collections.abc import Iterator, Sequence
from typing import Any

from tunesmith.models.generation import (
    Generated,
    GenerationParams,
    Row,
    batch_key,
    first_stop,
    generate_rows,
    generating,
    held_back,
)


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
        """The reply as text pieces, as its tokens come.

        A piece ends where the decoded text ends in whitespace, the rule of transformers'
        ``TextStreamer``: a word still growing (or a character whose bytes span tokens) is held
        back, and so is text that could still become a stop string; what the stop cuts is never
        sent. After the last token, whatever was held back and kept follows."""
        stops, sent = self.params.stop, 0
        for ids in iter(self._tokens.get, None):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = first_stop(text, stops)
            held = min(len(text) - held_back(text, stops), _word_end(text))
            ready = held if cut is None else cut
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        reply = self.result()
        if len(reply.text) > sent:
            yield reply.text[sent:]


def _word_end(text: str) -> int:
    """Where the last whole word ends: all of ``text`` if it ends in whitespace."""
    if not text or text[-1].isspace():
        return len(text)
    return max(text.rfind(" "), text.rfind("\n")) + 1


def _run(batch: list[Ticket]) -> None:
    live = [t for t in batch if not t.cancelled]
    for t in batch:
        if t.cancelled:
            t._settle(error=Cancelled("the request was cancelled"))
    if not live:
        return
    model, tokenizer = live[0].model, live[0].tokenizer
    try:
        with generating(model, live[0].params.seed):
            generate_rows(model, tokenizer, [t.row for t in live])
    except BaseException as err:  # each waiting request hears of it
        for t in live:
            t._settle(error=err)
        if not isinstance(err, Exception):
            raise


class Batcher:
    """The queue of replies to one model and the worker that generates them in batches."""

    def __init__(self, *, max_batch: int = 8, window_s: float = 0.01) -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError("max_batch must be >= 1 and window_s >= 0")
        self.max_batch, self.window_s = max_batch, window_s
        self._pending: list[Ticket] = []
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.batches: list[int] = []
        """The size of each batch run so far (for tests and benchmarks)."""

    def submit(self, ticket: Ticket) -> Ticket:
        with self._lock:
            self._pending.append(ticket)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
                self._worker.start()
        return ticket

    def _next_batch(self) -> list[Ticket]:
        """The oldest request and the queued ones that can share its batch (under the lock)."""
        first = self._pending[0]
        if first.key is None:
            batch = [first]
        else:
            batch = [t for t in self._pending if t.key == first.key][:self.max_batch]
        self._pending = [t for t in self._pending if not any(t is b for b in batch)]
        return batch

    def _work(self) -> None:
        while True:
            time.sleep(self.window_s)  # requests sent together arrive a few ms apart
            with self._lock:
                if not self._pending:
                    self._worker = None
                    return
                batch = self._next_batch()
            self.batches.append(len(batch))
            _run(batch)


_BATCHERS: weakref.WeakKeyDictionary[Any, Batcher] = weakref.WeakKeyDictionary()
_BATCHERS_LOCK = threading.Lock()


def batcher_for(model: Any, *, max_batch: int = 8, window_s: float = 0.01) -> Batcher:
    """The batcher of ``model``: one per model object, gone with the model."""
    with _BATCHERS_LOCK:
        batcher = _BATCHERS.get(model)
        if batcher is None or (batcher.max_batch, batcher.window_s) != (max_batch, window_s):
            batcher = _BATCHERS[model] = Batcher(max_batch=max_batch, window_s=window_s)
        return batcher
