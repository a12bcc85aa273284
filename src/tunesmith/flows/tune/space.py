"""The search space as Optuna sees it, and a trial's values put into a run configuration."""

from __future__ import annotations

import copy
from typing import Any

from tunesmith.config import RunConfig, SearchDimension, dump_config, parse_config


def suggest(trial: Any, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """Draw (or, for an enqueued trial, take) one value per dimension through Optuna."""
    values: dict[str, Any] = {}
    for name, dim in space.items():
        if dim.type == "choice":
            values[name] = trial.suggest_categorical(name, dim.values)
        elif dim.type == "int":
            values[name] = trial.suggest_int(name, int(dim.low), int(dim.high),
                                             step=int(dim.step or 1))
        else:
            values[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step,
                                               log=dim.type == "log_uniform")
    return values


def describe(space: dict[str, SearchDimension]) -> dict[str, dict[str, Any]]:
    return {name: dim.model_dump(exclude_none=True) for name, dim in space.items()}


def with_values(cfg: RunConfig, values: dict[str, Any], *, source: str,
                **top: Any) -> RunConfig:
    """``cfg`` with each dotted field set to its value (and top-level fields from ``top``),
    validated again: a value that does not fit its field is a ConfigError naming it."""
    data = copy.deepcopy(dump_config(cfg))
    for name, value in values.items():
        *sections, leaf = name.split(".")
        node = data
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    data.update(top)
    return parse_config(data, source=source)


def without_search(cfg: RunConfig, **top: Any) -> RunConfig:
    """The plain run configuration: no ``tune:`` section (what ``best.yaml`` holds)."""
    return cfg.model_copy(update={"tune": None, **top})
