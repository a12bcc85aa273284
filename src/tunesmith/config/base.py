"""What every section of the run configuration shares."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Auto = Literal["auto"]


class _Section(BaseModel):
    # Unknown keys are errors: a typo like `lerning_rate` must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
