"""Typed run configuration: one YAML file, validated at once, every problem reported together.

``sections`` holds the model/data/train/eval sections, ``search`` the ``tune:`` section,
``energy`` the ``energy:`` section,
``federated`` the ``federated:`` section, ``load`` the whole configuration and its YAML reading,
``hyper`` the ``auto`` values.
"""

from tunesmith.config.energy import EnergyConfig
from tunesmith.config.federated import FederatedConfig
from tunesmith.config.hyper import (
    HEAD_LR_FACTOR,
    ResolvedHyperparameters,
    auto_batch_size,
    auto_beta,
    auto_epochs,
    auto_learning_rate,
    resolve_hyperparameters,
)
from tunesmith.config.load import (
    RunConfig,
    dump_config,
    format_validation_error,
    load_config,
    parse_config,
)
from tunesmith.config.search import SearchDimension, TuneConfig
from tunesmith.config.sections import (
    DEFAULT_MODEL,
    REFERENCE_LOSSES,
    Auto,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    PreferenceConfig,
    PrivacyConfig,
    TrainConfig,
)

__all__ = ["DEFAULT_MODEL", "HEAD_LR_FACTOR", "REFERENCE_LOSSES", "Auto", "DataConfig",
           "EnergyConfig", "EvalConfig", "FederatedConfig", "LoraConfig", "ModelConfig",
           "PreferenceConfig",
           "PrivacyConfig", "ResolvedHyperparameters", "RunConfig", "SearchDimension",
           "TrainConfig", "TuneConfig",
           "auto_batch_size", "auto_beta", "auto_epochs", "auto_learning_rate", "dump_config",
           "format_validation_error", "load_config", "parse_config", "resolve_hyperparameters"]
