"""Chat models in memory for the chat completions API.

``ModelCache`` keeps loaded models under a memory budget, evicting the least recently used.
Generation itself is ``tunesmith.models.generation``, the path evaluation and
``tunesmith chat`` use too.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

# the service's unit tests import the stop-sequence hold-back from here

log = logging.getLogger("tunesmith.service")


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
