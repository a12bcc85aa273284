"""Chat models in memory for the chat completions API.

``ModelCache`` keeps loaded models under a memory budget, evicting the least recently used.
It holds three kinds of entry: a whole model (a full fine-tune, a checkpoint, a fine-tune
whose adapter cannot be shared), a shared base (``lora.SharedBase``: a configured base model,
also serving every LoRA fine-tune of it), and an adapter attached to a shared base. A base
costs its bytes once and each adapter its own; evicting an adapter unloads it from its base,
evicting a base drops its adapters with it. Using an adapter also counts as using its base,
so a base is always more recent than its adapters and the adapters go first.

Generation itself is ``tunesmith.models.generation``, the path evaluation and
``tunesmith chat`` use too.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from tunesmith.service.lora import (
    LoraSource,
    Served,
    SharedBase,
    adapter_name,
    base_key,
    model_bytes,
    same_tokenizer,
)

__all__ = ["ModelCache", "model_bytes"]

log = logging.getLogger("tunesmith.service")

Loader = Callable[[], tuple[Any, Any]]


@dataclass
class _Entry:
    model: Any  # a model, or a ``Served`` view of a shared base
    tokenizer: Any
    size: int
    shared: SharedBase | None = None
    """A base entry's own shared base, or the base an adapter entry is attached to."""
    base: str | None = None
    """An adapter entry's base key."""


class ModelCache:
    """Loaded (model, tokenizer) pairs by name, within ``budget_bytes`` (LRU eviction)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, load: Loader) -> tuple[Any, Any]:
        """A whole model: ``load()`` unless it is loaded."""
        with self._lock:  # one load at a time: two loads at once could both overrun memory
            if name in self._items:
                return self._touch(name)
            model, tokenizer = load()
            model.eval()
            self._add(name, _Entry(model, tokenizer, model_bytes(model)))
            return model, tokenizer

    def get_base(self, key: str, load: Loader) -> tuple[Any, Any]:
        """A shared base with its adapters switched off; ``key`` from ``lora.base_key``."""
        with self._lock:
            entry = self._base(key, load)
            return entry.model, entry.tokenizer

    def get_adapter(self, name: str, source: LoraSource, load_base: Loader
                    ) -> tuple[Any, Any]:
        """The LoRA fine-tune ``name``: its adapter on the shared base of ``source.base_dir``
        (``load_base()`` loads that base where it is not loaded)."""
        from tunesmith.models.load import load_tokenizer

        with self._lock:
            if name in self._items:
                return self._touch(name)
            key = base_key(source.base_dir)
            base = self._base(key, load_base)
            shared = base.shared
            assert shared is not None  # a base entry always has its shared base
            tokenizer = load_tokenizer(source.tokenizer_dir)
            if same_tokenizer(tokenizer, base.tokenizer):
                tokenizer = base.tokenizer  # one copy where they are alike
            pname = adapter_name(name)
            size = shared.attach(pname, source.adapter_dir)
            self._add(name, _Entry(Served(shared, pname, source.adapter_dir), tokenizer, size,
                                   shared=shared, base=key), keep=(key,))
            self._items.move_to_end(key)
            return self._items[name].model, tokenizer

    def cached(self, name: str) -> tuple[Any, Any] | None:
        """The model ``name`` if it is loaded (a use, for the LRU order), else None."""
        with self._lock:
            return self._touch(name) if name in self._items else None

    @property
    def used(self) -> int:
        return sum(e.size for e in self._items.values())

    def forget(self, name: str) -> None:
        """Unload ``name`` (a deleted model); an adapter leaves its base loaded."""
        with self._lock:
            if name in self._items:
                self._drop(name)

    def names(self) -> list[str]:
        """What is loaded, least recently used first (bases as ``base:{directory}``)."""
        with self._lock:
            return list(self._items)

    # ------------------------------------------------------------------- under the lock

    def _touch(self, name: str) -> tuple[Any, Any]:
        entry = self._items[name]
        self._items.move_to_end(name)
        if entry.base is not None:
            self._items.move_to_end(entry.base)
        return entry.model, entry.tokenizer

    def _base(self, key: str, load: Loader) -> _Entry:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        model, tokenizer = load()
        model.eval()
        shared = SharedBase(model, tokenizer)
        self._add(key, _Entry(Served(shared), tokenizer, model_bytes(model), shared=shared))
        return self._items[key]

    def _add(self, name: str, entry: _Entry, keep: Collection[str] = ()) -> None:
        """Make room for ``entry`` (loaded already), evicting the least recently used but
        ``keep``, then add it."""
        while self.used + entry.size > self.budget:
            victim = next((k for k in self._items if k not in keep), None)
            if victim is None:
                break
            self._drop(victim)
            log.info("model cache: evicted %s", victim)
        if self.used + entry.size > self.budget:
            log.warning("model %s (%d MB) does not fit the cache budget; serving it over the "
                        "budget", name, entry.size // 2**20)
        self._items[name] = entry

    def _drop(self, name: str) -> None:
        entry = self._items.pop(name)
        if entry.base is not None and entry.shared is not None:
            entry.shared.detach(adapter_name(name))  # frees the adapter's weights
        elif entry.shared is not None:  # a base: its adapters go with it
            for k in [k for k, e in self._items.items() if e.base == name]:
                del self._items[k]
