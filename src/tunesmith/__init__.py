"""tunesmith: fine-tune an open language model on your own data, evaluate it, chat with it."""

from tunesmith.api import RunResult, chat, load_for_chat, run
from tunesmith.config import RunConfig, load_config
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

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "ModelError", "RunConfig", "RunResult",
    "ServiceError", "TrainingError", "TunesmithError", "chat", "load_config", "load_for_chat",
    "run",
]
