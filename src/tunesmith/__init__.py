"""tunesmith: fine-tune an open language model on your own data, evaluate it, chat with it.

The flows (``run``, ``evaluate``, ``chat``) load torch and transformers; they are imported on
first use so that ``tunesmith data ...`` and ``import tunesmith.errors`` stay light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from tunesmith.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    ServiceError,
    TrainingError,
    TunesmithError,
)

__version__ = "0.1.0"

_LAZY = {
    "run": "tunesmith.flows", "evaluate": "tunesmith.flows", "chat": "tunesmith.flows",
    "load_for_chat": "tunesmith.flows", "RunResult": "tunesmith.flows",
    "tune": "tunesmith.flows.tune", "TuneResult": "tunesmith.flows.tune",
    "improve": "tunesmith.flows.improve", "Round": "tunesmith.flows.improve",
    "RunConfig": "tunesmith.config", "load_config": "tunesmith.config",
    "validate_file": "tunesmith.flows.prepare", "convert_file": "tunesmith.flows.prepare",
    "clean_file": "tunesmith.flows.prepare", "redact_file": "tunesmith.flows.prepare",
    "split_file": "tunesmith.flows.prepare", "inspect_file": "tunesmith.flows.prepare",
}

__all__ = ["CheckpointError", "ConfigError", "DataError", "ModelError", "ServiceError",
           "TrainingError", "TunesmithError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
