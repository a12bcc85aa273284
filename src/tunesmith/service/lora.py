"""Many LoRA fine-tunes of one base, served from one copy of the base.

A fine-tune trained with LoRA keeps its adapter (``adapter/``) beside its merged model. Where
the adapter fits the base it was trained on (``lora_source``), the chat API attaches it to a
``SharedBase`` (PEFT multi-adapter) instead of loading the merged copy: ten fine-tunes of one
base cost the base once and ten adapters of a few MB.

Exactness under concurrency: a ``SharedBase`` has one lock. Every generation on it
(``Served.generate``) holds the lock from choosing its adapter (``set_adapter``, or
``disable_adapter`` for the plain base) to its last token, and attaching or unloading an
adapter takes the same lock, so no forward pass ever sees another request's adapter or a
half-loaded one. The service already runs one generation (one batch of requests to one
model) at a time (``models.generation.GENERATION_LOCK``, taken before this one), so the lock
costs no throughput; it makes the adapter switch safe on its own, whoever calls ``generate``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import ServiceError, TunesmithError

log = logging.getLogger("tunesmith.service")

# keys of config.json that differ between a base and a model saved from it, weights aside
_NOT_ARCHITECTURE = ("_name_or_path", "torch_dtype", "dtype", "transformers_version")


def model_bytes(model: Any) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class LoraSource:
    """A fine-tune that can be served as an adapter on its base."""

    adapter_dir: Path
    base_dir: Path
    """The resolved model directory the adapter was trained on; the shared base's key."""
    tokenizer_dir: Path
    """The fine-tune's merged model, whose tokenizer it was saved with."""


def base_key(model_dir: Path) -> str:
    """The cache key of a base model directory: one key per directory, whatever its names."""
    return f"base:{model_dir.resolve()}"


def adapter_name(model_name: str) -> str:
    """A PEFT adapter name for a model name (module names cannot hold dots)."""
    return "ft_" + hashlib.sha256(model_name.encode()).hexdigest()[:16]


def _architecture(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}


def lora_source(run_dir: Path, *, home: Path) -> LoraSource | None:
    """How the fine-tune in ``run_dir`` is served on a shared base; None where it is served
    from its merged model as before: a full fine-tune, a classifier, an adapter that also
    saved whole modules, or a base that is gone or is not the model the adapter was trained
    on (a distilled student, say)."""
    from tunesmith.flows.steps import run_config
    from tunesmith.models.resolve import resolve_model

    adapter_dir, merged = run_dir / "adapter", run_dir / "merged"
    if not ((adapter_dir / "adapter_config.json").is_file()
            and (merged / "config.json").is_file()):
        return None
    try:
        cfg = run_config(run_dir)
        if cfg is None or cfg.train.method != "lora" or cfg.train.head != "lm":
            return None
        adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
        if (adapter.get("peft_type") != "LORA" or adapter.get("task_type") != "CAUSAL_LM"
                or adapter.get("modules_to_save")):
            return None
        base_dir = resolve_model(cfg.model.base, home=home)
        if _architecture(base_dir) != _architecture(merged):
            log.info("%s: its merged model differs from the base %s; served from the merged "
                     "model", run_dir, base_dir)
            return None
    except (TunesmithError, OSError, ValueError) as err:
        log.info("%s: served from its merged model (%s)", run_dir, err)
        return None
    return LoraSource(adapter_dir, base_dir.resolve(), merged)


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two fast tokenizers encode and render chats alike (vocabulary, merges,
    special tokens, chat template)."""
    return (a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
            and a.chat_template == b.chat_template
            and a.special_tokens_map == b.special_tokens_map)


class SharedBase:
    """One base model in memory with the LoRA adapters attached to it (see the module)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.lock = threading.Lock()

    @property
    def adapters(self) -> list[str]:
        return list(getattr(self.model, "peft_config", {}))

    def attach(self, name: str, adapter_dir: Path) -> int:
        """Load an adapter; the bytes it added."""
        with self.lock:
            return self._attach(name, adapter_dir)

    def detach(self, name: str) -> None:
        """Unload an adapter and free its weights."""
        with self.lock:
            self._detach(name)

    def _attach(self, name: str, adapter_dir: Path) -> int:
        from peft import PeftModel

        if not (adapter_dir / "adapter_config.json").is_file():
            raise ServiceError(f"the adapter at {adapter_dir} is gone (the model was deleted)",
                               status=404, code="model_not_found")
        before = model_bytes(self.model)
        with warnings.catch_warnings():
            # PEFT probes a property transformers has deprecated; nothing for users to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if self.adapters:
                self.model.load_adapter(str(adapter_dir), adapter_name=name)
            else:  # the first adapter wraps the base in place: its weights are not copied
                self.model = PeftModel.from_pretrained(self.model, str(adapter_dir),
                                                       adapter_name=name)
        self.model.eval()
        return model_bytes(self.model) - before

    def _detach(self, name: str) -> None:
        if name not in self.adapters:
            return
        if len(self.adapters) == 1:
            # PEFT cannot run a PeftModel left without adapters; unloading the last one gives
            # back the plain base, its LoRA layers removed
            self.model = self.model.unload()
        else:
            with warnings.catch_warnings():
                # "adapter X was active which is now deleted": the next request sets its own
                warnings.filterwarnings("ignore", message=".*which is now deleted.*")
                self.model.delete_adapter(name)

    @contextmanager
    def serving(self, name: str | None, adapter_dir: Path | None) -> Iterator[Any]:
        """The model with adapter ``name`` alone active (None: no adapter), held for the
        length of the block. An adapter the cache unloaded while this request waited is
        attached again for this block only."""
        with self.lock:
            if name is None:
                if self.adapters:
                    with self.model.disable_adapter():
                        yield self.model
                else:
                    yield self.model
                return
            transient = name not in self.adapters
            if transient:
                if adapter_dir is None:
                    raise ServiceError("the adapter was unloaded", status=500)
                self._attach(name, adapter_dir)
            try:
                self.model.set_adapter(name)
                yield self.model
            finally:
                if transient:
                    self._detach(name)


class Served:
    """A shared base as the generation path sees a model: the base with one adapter active
    (or none) for exactly the length of each ``generate`` call or forward pass. Served models
    never train."""

    def __init__(self, base: SharedBase, name: str | None = None,
                 adapter_dir: Path | None = None) -> None:
        self.base, self.adapter, self.adapter_dir = base, name, adapter_dir

    @property
    def config(self) -> Any:
        return self.base.model.config

    @property
    def training(self) -> bool:
        return False

    def parameters(self) -> Iterator[Any]:
        with self.base.lock:  # not while an adapter is being attached or unloaded
            return iter(list(self.base.model.parameters()))

    def eval(self) -> Served:
        return self

    def train(self, mode: bool = True) -> Served:
        if mode:
            raise RuntimeError("a served model does not train")
        return self

    def generate(self, **kwargs: Any) -> Any:
        with self.base.serving(self.adapter, self.adapter_dir) as model:
            return model.generate(**kwargs)

    def _supports_logits_to_keep(self) -> bool:
        """transformers' own test of the base's ``forward`` (``prefix_pass.cache_pass``)."""
        return bool(self.base.model._supports_logits_to_keep())

    def __call__(self, **kwargs: Any) -> Any:
        """One forward pass with the adapter active (generation runs a shared prefix so)."""
        with self.base.serving(self.adapter, self.adapter_dir) as model:
            return model(**kwargs)
