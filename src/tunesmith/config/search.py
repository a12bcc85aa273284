"""The ``tune:`` section: the search space and how `tunesmith tune` judges and prunes trials."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from tunesmith.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    _Section,
)


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable field's dotted name (``train.lora.r``), sections excluded."""
    names: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += _leaf_fields(annotation, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


# the settable fields of a run (the run's own name and directory are not hyperparameters)
_SECTIONS: dict[str, type[BaseModel]] = {"model": ModelConfig, "data": DataConfig,
                                         "train": TrainConfig, "eval": EvalConfig}


def tunable_fields() -> list[str]:
    return [name for section, model in _SECTIONS.items()
            for name in _leaf_fields(model, f"{section}.")]


def _tunable(name: str) -> str:
    known = tunable_fields()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        raise ValueError(f"'{name}' is not a run setting" + (
            f"; did you mean '{close[0]}'?" if close else "; use a dotted name such as "
            "train.learning_rate"))
    return name


class SearchDimension(_Section):
    type: Literal["log_uniform", "uniform", "int", "choice"] = Field(
        ..., description="log_uniform (low > 0), uniform, int (low..high inclusive) or choice.")
    low: float | None = Field(None, description="Smallest value (not for choice).")
    high: float | None = Field(None, description="Largest value (not for choice).")
    step: float | None = Field(None, gt=0, description="uniform/int: a grid step. Empty: none.")
    values: list[Any] | None = Field(None, description="choice: the values to try.")

    @model_validator(mode="after")
    def _consistent(self) -> SearchDimension:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs at least one value in 'values'")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} distribution needs 'low' and 'high'")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "log_uniform" and self.low <= 0:
            raise ValueError(f"a log_uniform distribution needs low > 0 (got {self.low})")
        if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("an int distribution needs whole numbers for low and high")
        return self


class TuneConfig(_Section):
    space: dict[Annotated[str, AfterValidator(_tunable)], SearchDimension] = Field(
        ..., min_length=1, description="Run settings to search, by dotted name, e.g. "
        "train.learning_rate: {type: log_uniform, low: 1.0e-5, high: 1.0e-3}.")
    objective: Literal["valid_loss", "accuracy", "macro_f1", "positive_f1", "exact_match"] = Field(
        "valid_loss", description="What a trial is judged by, on the validation split only: "
        "the best validation loss, or a task metric (positive_f1: F1 of eval.positive_label).")
    direction: Literal["auto", "minimize", "maximize"] = Field(
        "auto", description="'auto': minimize valid_loss, maximize the task metrics.")
    trials: int = Field(20, gt=0, description="Trials in the study (tunesmith tune --trials).")
    timeout_minutes: float | None = Field(
        None, gt=0, description="Start no new trial after this many minutes. Empty: no limit.")
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="Stop hopeless trials early from their validation losses.")
    startup_trials: int = Field(
        4, ge=0, description="Trials sampled at random and never pruned before TPE and the "
        "pruner start to act.")
    seed: int | None = Field(None, description="Sampler seed. Empty: train.seed.")


