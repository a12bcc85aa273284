"""The training loop, as small functions: optimiser, schedule, one step, evaluation, train().

Runs on Accelerate, so ``accelerate launch`` gives data parallelism without a launcher of ours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from tunesmith.data.encode import Encoded
from tunesmith.errors import TrainingError
from tunesmith.training.batches import (
    collate,
    epoch_batches,
    eval_batches,
    micro_batches,
    steps_per_epoch,
)
from tunesmith.training.callbacks import call
from tunesmith.training.checkpoint import (
    TrainState,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from tunesmith.training.loss import TargetLoss


@dataclass(frozen=True)
class LoopSettings:
    """Concrete hyperparameters of one training run (no 'auto' left)."""

    learning_rate: float
    epochs: int
    batch_size: int
    total_steps: int
    warmup_steps: int = 0
    eval_every: int = 50
    micro_batch_size: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    early_stopping_patience: int | None = 3
    keep_checkpoints: int = 2
    schedule: str = "cosine"
    seed: int = 42
    eval_batch_size: int = 16


@dataclass
class TrainResult:
    state: TrainState
    best_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on norms and biases."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if _no_decay(name, p) else decay).append(p)
    if not decay and not plain:
        raise TrainingError("the model has no trainable parameters; check train.method and "
                            "train.lora.target_modules")
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(loss_module: torch.nn.Module, data: Sequence[Encoded], *, batch_size: int,
                  pad_id: int, device: torch.device) -> dict[str, float]:
    """Mean loss and token accuracy over the target tokens of ``data``."""
    was_training = loss_module.training
    loss_module.eval()
    total, tokens, correct = 0.0, 0, 0
    for batch in eval_batches(data, batch_size):
        out = loss_module(**_to(collate(batch, pad_id=pad_id), device))
        total += float(out.loss_sum)
        tokens += out.n_tokens
        correct += out.n_correct
    loss_module.train(was_training)
    if tokens == 0:
        return {"valid_loss": float("nan"), "valid_token_accuracy": float("nan")}
    return {"valid_loss": total / tokens, "valid_token_accuracy": correct / tokens}


def train_step(loss_module: torch.nn.Module, batch: Sequence[Encoded], *, optimizer: Any,
               scheduler: Any, accelerator: Accelerator, pad_id: int,
               micro_batch_size: int | None, max_grad_norm: float | None) -> dict[str, float]:
    """One optimiser step over ``batch``, accumulated over micro-batches.

    The loss is normalised by the target tokens of the whole batch, not per micro-batch, so
    accumulation gives the same gradient as one big batch.
    """
    parts = micro_batches(batch, micro_batch_size)
    n_targets = sum(e.n_targets for e in batch)
    if n_targets == 0:
        raise TrainingError("a batch has no assistant tokens to learn from")
    total, correct = 0.0, 0
    for part in parts:
        out = loss_module(**_to(collate(part, pad_id=pad_id), accelerator.device))
        accelerator.backward(out.loss_sum / n_targets)
        total += float(out.loss_sum.detach())
        correct += out.n_correct
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(
            [p for p in loss_module.parameters() if p.requires_grad], max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"train_loss": total / n_targets, "train_token_accuracy": correct / n_targets,
            "learning_rate": lr, "grad_norm": grad_norm,
            "tokens": sum(len(e) for e in batch)}


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = _trainable(model)
    missing = set(params) - set(weights)
    if missing:
        raise TrainingError(f"the checkpoint lacks {len(missing)} trainable tensors (e.g. "
                            f"{sorted(missing)[0]}); it belongs to another model or LoRA setup")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def train(model: torch.nn.Module, train_data: Sequence[Encoded], valid_data: Sequence[Encoded],
          *, settings: LoopSettings, pad_id: int, checkpoint_dir: Path,
          callbacks: Sequence[Any] = (), resume: bool = False) -> TrainResult:
    """Train ``model`` in place; on return it holds the weights of the best checkpoint."""
    s = settings
    accelerator = Accelerator()
    loss_module = TargetLoss(model)
    optimizer = build_optimizer(loss_module, lr=s.learning_rate, weight_decay=s.weight_decay)
    scheduler = get_scheduler(s.schedule, optimizer, num_warmup_steps=s.warmup_steps,
                              num_training_steps=max(1, s.total_steps))
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    loss_module.train()

    state = TrainState()
    existing = list_checkpoints(checkpoint_dir) if resume else []
    if existing:
        weights, extra, state = load_checkpoint(existing[-1])
        load_trainable(model, weights)
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])

    def evaluate_and_checkpoint() -> None:
        metrics = {"step": state.step, "epoch": state.epoch, **evaluate_loss(
            loss_module, valid_data, batch_size=s.eval_batch_size, pad_id=pad_id,
            device=accelerator.device)}
        loss = metrics["valid_loss"]
        if state.best_valid_loss is None or (math.isfinite(loss) and loss < state.best_valid_loss):
            state.best_valid_loss, state.best_step = loss, state.step
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
            if s.early_stopping_patience and state.evals_without_improvement >= \
                    s.early_stopping_patience:
                state.stopped_early = True
        metrics["best_step"] = state.best_step
        call(callbacks, "on_evaluate", state, metrics)
        if accelerator.is_main_process:
            save_checkpoint(checkpoint_dir, weights=_trainable(model), optimizer=optimizer,
                            scheduler=scheduler, state=state)
            prune_checkpoints(checkpoint_dir, keep_last=s.keep_checkpoints,
                              best_step=state.best_step)
        accelerator.wait_for_everyone()

    call(callbacks, "on_train_begin", state, s.total_steps)
    if state.step == 0 and valid_data:
        evaluate_and_checkpoint()  # the starting point of the validation curve
    per_epoch = steps_per_epoch(len(train_data), s.batch_size)
    while state.step < s.total_steps and not state.stopped_early and state.epoch < s.epochs:
        for batch in epoch_batches(train_data, batch_size=s.batch_size, seed=s.seed,
                                   epoch=state.epoch, start_step=state.step_in_epoch):
            started = time.perf_counter()
            metrics = train_step(loss_module, batch, optimizer=optimizer, scheduler=scheduler,
                                 accelerator=accelerator, pad_id=pad_id,
                                 micro_batch_size=s.micro_batch_size,
                                 max_grad_norm=s.max_grad_norm)
            elapsed = time.perf_counter() - started
            state.step += 1
            state.step_in_epoch += 1
            state.tokens_seen += int(metrics["tokens"])
            if state.step_in_epoch >= per_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            metrics.update(step=state.step, epoch=state.epoch,
                           tokens_per_s=metrics["tokens"] / max(elapsed, 1e-9))
            if not math.isfinite(metrics["train_loss"]):
                raise TrainingError(f"the training loss became {metrics['train_loss']} at step "
                                    f"{state.step}; lower train.learning_rate")
            call(callbacks, "on_step", state, metrics)
            if valid_data and (state.step % s.eval_every == 0 or state.step >= s.total_steps):
                evaluate_and_checkpoint()
            if state.step >= s.total_steps or state.stopped_early:
                break
    call(callbacks, "on_train_end", state)

    best = checkpoint_dir / f"step-{state.best_step}" if state.best_step is not None else None
    if best is not None and best.is_dir():
        load_trainable(model, load_weights(best))
    return TrainResult(state=state, best_checkpoint=best)
