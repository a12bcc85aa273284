"""``auto`` hyperparameters: concrete epochs, batch size, learning rate and steps for a set."""

from __future__ import annotations

import math

from pydantic import BaseModel

from tunesmith.config.sections import TrainConfig


class ResolvedHyperparameters(BaseModel):
    """The concrete values an 'auto' configuration ran with; written into the run directory."""

    epochs: int
    batch_size: int
    learning_rate: float
    total_steps: int
    warmup_steps: int
    eval_every: int
    head_learning_rate: float | None = None  # with a classification head
    beta: float | None = None  # with a preference objective


# The new classification layer's share of the learning rate, when 'auto' (see TrainConfig).
HEAD_LR_FACTOR = 0.1

# OpenAI's documented behaviour for n_epochs="auto": 3 epochs, adjusted so the number of
# examples seen stays between these bounds.
_MIN_TARGET_EXAMPLES = 100
_MAX_TARGET_EXAMPLES = 25_000


def auto_epochs(n_train: int) -> int:
    if n_train <= 0:
        return 1
    if n_train * 3 < _MIN_TARGET_EXAMPLES:
        return min(25, math.ceil(_MIN_TARGET_EXAMPLES / n_train))
    if n_train * 3 > _MAX_TARGET_EXAMPLES:
        return max(1, _MAX_TARGET_EXAMPLES // n_train)
    return 3


# The largest batch size 'auto' picks (without DP).
AUTO_BATCH_MAX = 32


def auto_batch_size(n_train: int) -> int:
    """A power of two near n/128, between 1 and 32: small sets get more optimiser steps."""
    if n_train <= 4:
        return max(1, n_train)
    exponent = round(math.log2(max(1.0, n_train / 128)))
    return int(min(AUTO_BATCH_MAX, max(4, 2**exponent)))


def auto_private_batch_size(n_train: int) -> int:
    """Under DP a larger batch: the noise on the averaged gradient shrinks as 1/batch, so
    DP-SGD trains best near n/16 (Poisson sample rate ~6%), at least 16, at most 256."""
    return int(min(256, max(16, 2 ** round(math.log2(max(1.0, n_train / 16))))))


def auto_learning_rate(method: str, batch_size: int) -> float:
    base = 2e-4 if method == "lora" else 2e-5
    return base * math.sqrt(batch_size / 8)


def auto_beta(objective: str) -> float:
    """OpenAI's DPO default (0.1), and SimPO's paper setting (2.0: its rewards are mean
    per-token log-probabilities, an order of magnitude smaller than DPO's summed ratios)."""
    return 2.0 if objective == "simpo" else 0.1


def resolve_hyperparameters(train: TrainConfig, n_train: int) -> ResolvedHyperparameters:
    """Turn every 'auto' into a number for a training set of ``n_train`` examples."""
    epochs = auto_epochs(n_train) if train.epochs == "auto" else int(train.epochs)
    if train.batch_size != "auto":
        batch = int(train.batch_size)
    elif train.privacy is not None:
        batch = auto_private_batch_size(n_train)
    else:
        batch = auto_batch_size(n_train)
    batch = max(1, min(batch, n_train)) if n_train else batch
    lr = (auto_learning_rate(train.method, batch) if train.learning_rate == "auto"
          else float(train.learning_rate))
    steps = epochs * math.ceil(n_train / batch) if n_train else 0
    if train.max_steps is not None:
        steps = min(steps, train.max_steps)
    if train.eval_every == "auto":
        every = max(1, steps // 10)
    elif train.eval_every == "epoch":
        every = max(1, math.ceil(n_train / batch)) if n_train else 1
    else:
        every = int(train.eval_every)
    return ResolvedHyperparameters(
        epochs=epochs, batch_size=batch, learning_rate=lr, total_steps=steps,
        warmup_steps=int(steps * train.warmup_ratio), eval_every=every,
        head_learning_rate=None if train.head != "classifier" else (
            lr * HEAD_LR_FACTOR if train.head_learning_rate == "auto"
            else float(train.head_learning_rate)),
        beta=None if train.objective == "sft" else (
            auto_beta(train.objective) if train.preference.beta == "auto"
            else float(train.preference.beta)))


