"""The run configuration's ``train.privacy`` section: DP-SGD's budget and mechanism."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.base import Auto, _Section


class PrivacyConfig(_Section):
    target_epsilon: float | None = Field(
        None, gt=0, description="Differential privacy budget epsilon to spend over the whole "
        "run; the noise is chosen to reach it. Give this or noise_multiplier.")
    noise_multiplier: float | None = Field(
        None, gt=0, description="Noise std over the clipping bound, instead of target_epsilon; "
        "the epsilon it spends is reported.")
    delta: float | Auto = Field(
        "auto", description="The delta of (epsilon, delta). 'auto': "
        "min(1e-5, 1/(10 n)) for n training examples; must be below 1/n.")
    max_grad_norm: float = Field(
        1.0, gt=0, description="Each example's gradient is clipped to this L2 norm before the "
        "noise is added (the sensitivity bound).")
    accountant: Literal["prv", "rdp"] = Field(
        "prv", description="Privacy accountant: 'prv' (tight, numerical) or 'rdp' (Renyi DP, "
        "a looser closed-form bound).")
    physical_batch_size: int = Field(
        16, gt=0, description="Examples whose per-example gradients are held at once; the "
        "logical batch (train.batch_size, expected under Poisson sampling) is cut into these, "
        "so memory stays flat at large batches.")

    @field_validator("delta")
    @classmethod
    def _probability(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0 < v < 1:
            raise ValueError("delta must be between 0 and 1 (and below 1/n), or 'auto'")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> PrivacyConfig:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and noise_multiplier")
        return self
