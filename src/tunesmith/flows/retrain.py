"""Train a model made from a finished run's tuned model on the run's own training data.

A pruned model's recovery fine-tune (its mask held by a wrapper) and a distilled student
(its objective the distillation loss) are both this: all weights trainable, the run's own
training and validation splits encoded as the run encoded them, the loop with its usual
policies (validation loss every few steps, early stopping, the best weights restored), and
a ``metrics.jsonl`` beside the new model. Nothing here is specific to either.

    from tunesmith.flows.retrain import retrain
    done = retrain(finished_run, model, tokenizer, folder, steps=100, learning_rate=5e-5,
                   wrappers=[keep_mask])
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tunesmith.config import RunConfig
from tunesmith.config.hyper import auto_learning_rate, resolve_hyperparameters
from tunesmith.errors import ConfigError
from tunesmith.flows.finetune import classifier_objective, loop_settings
from tunesmith.flows.finished import FinishedRun
from tunesmith.flows.steps import encode_examples, training_encoder
from tunesmith.training.callbacks import MetricsLog, ProgressBar
from tunesmith.training.loop import TrainResult, train
from tunesmith.training.setup import Wrapper


@dataclass
class Retrained:
    """What the loop did: its result, and the settings it ran with (for the report)."""

    result: TrainResult
    settings: dict[str, Any]


def retrain_config(done: FinishedRun, *, steps: int, learning_rate: float | None,
                   batch_size: int | None = None) -> RunConfig:
    """The run's configuration for training all weights for ``steps`` optimiser steps: no
    adapters, no differential privacy, and the supervised objective (a preference run's
    chosen answers), every other training setting as the run had it."""
    if steps < 1:
        raise ConfigError(f"{steps} training steps: give 1 or more")
    if learning_rate is not None and not 0 < learning_rate < 1:
        raise ConfigError(f"learning rate {learning_rate}: give a small positive number such "
                          "as 5e-5")
    t = done.config.train
    batch = batch_size or (t.batch_size if isinstance(t.batch_size, int) else 8)
    train_cfg = t.model_copy(update={
        "method": "full", "privacy": None, "objective": "sft", "max_steps": steps,
        "batch_size": batch, "epochs": "auto",
        "learning_rate": learning_rate or auto_learning_rate("full", batch),
        "eval_every": max(1, steps // 5)})
    return done.config.model_copy(update={"train": train_cfg})


def retrain(done: FinishedRun, model: Any, tokenizer: Any, folder: Path, *, steps: int,
            learning_rate: float | None = None, batch_size: int | None = None,
            make_objective: Callable[[Any, str], Any] | None = None,
            wrappers: Sequence[Wrapper] = (), console: Console | None = None,
            show_progress: bool = True) -> Retrained:
    """Train every weight of ``model`` for ``steps`` steps on the run's training split, in
    place, keeping the best weights by validation loss; ``metrics.jsonl`` goes to ``folder``.

    ``make_objective(model, precision)``: the loss (default: the run's own, the LM loss on
    target tokens or the classification head's cross-entropy); ``wrappers`` change the parts
    before the loop starts (a pruning mask held fixed)."""
    cfg = retrain_config(done, steps=steps, learning_rate=learning_rate, batch_size=batch_size)
    encode = training_encoder(tokenizer, cfg, done.labels)
    rows = {}
    for split in ("train", "validation"):
        rows[split], _ = encode_examples(encode, done.split(split),
                                         max_length=cfg.data.max_length, split=split)
    if not rows["train"]:
        raise ConfigError(f"{done.run_dir}: the run's training split is empty; nothing to "
                          "train on")
    per_epoch = math.ceil(len(rows["train"]) / cfg.train.batch_size)
    # as many passes over the data as the steps need
    cfg.train.epochs = max(1, math.ceil(steps / per_epoch))
    hp = resolve_hyperparameters(cfg.train, len(rows["train"]))
    if make_objective is None and done.head:
        make_objective = classifier_objective(cfg, rows["train"], len(done.labels or []),
                                              tokenizer.pad_token_id)
    torch.manual_seed(cfg.train.seed)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints = folder / "checkpoints"
    try:
        result = train(model, rows["train"], rows["validation"],
                       settings=loop_settings(cfg, hp), pad_id=tokenizer.pad_token_id,
                       checkpoint_dir=checkpoints,
                       callbacks=[MetricsLog(folder / "metrics.jsonl"),
                                  ProgressBar(console, enabled=show_progress)],
                       make_objective=make_objective, wrappers=wrappers)
    finally:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the best weights are in the model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Retrained(result, {
        "steps": result.state.step, "requested_steps": steps, "batch_size": hp.batch_size,
        "learning_rate": hp.learning_rate, "train_examples": len(rows["train"]),
        "validation_examples": len(rows["validation"]), "stop_reason": result.stop_reason,
        "best_step": result.state.best_step,
        "best_valid_loss": result.state.best_valid_loss})
