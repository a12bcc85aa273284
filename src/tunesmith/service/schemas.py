"""Request bodies, validated by pydantic as FastAPI reads them (a bad one answers 400).

tunesmith's extension to OpenAI's ``method.supervised``: a ``privacy`` object trains the job
with differential privacy (DP-SGD). It is the run configuration's ``train.privacy``
(``PrivacyConfig``: ``target_epsilon`` or ``noise_multiplier``, ``delta``, ``max_grad_norm``,
``accountant``, ``physical_batch_size``), validated by the same rules; unknown keys are
errors. The succeeded job reports the (epsilon, delta) spent in its ``privacy`` field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunesmith.config import PrivacyConfig


class _Body(BaseModel):
    # OpenAI clients send fields we do not use (e.g. `user`, `store`); accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=10)] = "auto"


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised three and ``beta``, the strength of the
    penalty for moving away from the reference model ('auto': tunesmith's default, 0.1)."""

    beta: Literal["auto"] | Annotated[float, Field(gt=0)] = "auto"


class SupervisedMethod(BaseModel):
    hyperparameters: Hyperparameters | None = None
    privacy: PrivacyConfig | None = None
    """tunesmith's extension: differential privacy (the run configuration's train.privacy)."""


class DpoMethod(BaseModel):
    # forbid: a misplaced {"dpo": {"beta": ...}} must not be silently ignored
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None
    privacy: dict[str, Any] | None = None
    """Accepted only to be refused with its reason: DP-SGD trains supervised jobs only."""


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: dict[str, Any] | None = None


class JobCreate(_Body):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9._-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    integrations: list[dict[str, Any]] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512
                                                 for k, x in v.items())):
            raise ValueError("metadata holds at most 16 pairs, keys up to 64 characters and "
                             "values up to 512")
        return v


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=16)
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=1024)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (len(v) > 4 or not all(v)):
            raise ValueError("stop holds up to 4 non-empty strings")
        return v


class FeedbackCreate(_Body):
    completion_id: str
    choice_index: int = Field(0, ge=0)
    rating: Literal["good", "bad"] | None = None
    correction: str | None = Field(None, min_length=1)
