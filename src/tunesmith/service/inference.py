"""Chat models in memory, and token-by-token generation for the chat completions API.

``ModelCache`` keeps loaded models under a memory budget, evicting the least recently used.
``generate_stream`` yields the reply as text pieces with exact token counts; streaming and
non-streaming answers go through it, so both give the same text for the same seed.

Generation runs under one process-wide lock: the 'seed' parameter is honoured through torch's
global random state, and on CPU two concurrent generations would only share the same cores.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tunesmith.service")
GENERATION_LOCK = threading.Lock()


def model_bytes(model: Any) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class ModelCache:
    """Loaded (model, tokenizer) pairs by name, within ``budget_bytes`` (LRU eviction)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[str, tuple[Any, Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, load: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        with self._lock:  # one load at a time: two loads at once could both overrun memory
            if name in self._items:
                self._items.move_to_end(name)
                model, tokenizer, _ = self._items[name]
                return model, tokenizer
            model, tokenizer = load()
            model.eval()
            size = model_bytes(model)
            while self._items and self.used + size > self.budget:
                evicted, _ = self._items.popitem(last=False)
                log.info("model cache: evicted %s", evicted)
            if size > self.budget:
                log.warning("model %s (%d MB) is larger than the cache budget; serving it "
                            "alone", name, size // 2**20)
            self._items[name] = (model, tokenizer, size)
            return model, tokenizer

    @property
    def used(self) -> int:
        return sum(size for _, _, size in self._items.values())

    def forget(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._items)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Finish:
    """The end of a reply: why it ended and how many tokens it took."""

    reason: str  # "stop" or "length"
    completion_tokens: int


class _TokenQueue:
    """A transformers streamer (``put``/``end``) that hands the new token ids to a queue."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt itself
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still turn into a stop sequence."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def _start_generation(model: Any, tokenizer: Any, prompt_ids: list[int], sampling: Sampling,
                      stopped: threading.Event) -> tuple[queue.Queue[Any], threading.Thread]:
    """Run ``model.generate`` in a thread; new token ids (or its error) arrive on the queue.

    Setting ``stopped`` ends the generation at the next token (a stop sequence was met, or
    the client went away).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stopped.is_set(), dtype=torch.bool)

    streamer = _TokenQueue()
    sampled = sampling.temperature > 0

    def work() -> None:
        try:
            with GENERATION_LOCK, torch.no_grad():
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
                model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids),
                    max_new_tokens=sampling.max_new_tokens, do_sample=sampled,
                    temperature=sampling.temperature if sampled else None,
                    top_p=sampling.top_p if sampled else None, top_k=None,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]),
                    use_cache=True)
        except BaseException as err:  # handed to the consumer, raised there
            streamer.queue.put(err)

    thread = threading.Thread(target=work, name="generate", daemon=True)
    thread.start()
    return streamer.queue, thread


def generate_stream(model: Any, tokenizer: Any, prompt_ids: list[int], sampling: Sampling
                    ) -> Iterator[str | Finish]:
    """Text pieces of the reply to ``prompt_ids``, then one ``Finish``.

    The text is decoded from all tokens so far (a token alone may be half a character), and
    the tail that could still become a stop sequence is held back until it is clear.
    """
    stopped = threading.Event()
    tokens, thread = _start_generation(model, tokenizer, prompt_ids, sampling, stopped)
    generated: list[int] = []
    text, sent, stop_at = "", 0, None
    try:
        while (item := tokens.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            generated.extend(item)
            text = tokenizer.decode(generated, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in sampling.stop) if i >= 0]
            if hits:
                stop_at = min(hits)
                break
            if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
                continue
            ready = len(text) - _held_back(text, sampling.stop)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        final = text[:stop_at] if stop_at is not None else text
        if len(final) > sent:
            yield final[sent:]
        ended = stop_at is not None or (generated and generated[-1] == tokenizer.eos_token_id)
        yield Finish("stop" if ended else "length", len(generated))
    finally:
        stopped.set()
        thread.join()
