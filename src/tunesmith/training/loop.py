"""The training loop, as small functions: optimiser, schedule, one step, evaluation, train().

Runs on Accelerate, so ``accelerate launch`` / ``torchrun`` give data parallelism (DDP) without a
launcher of ours: every process sees the same global batches and trains on its share.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
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
    step_inputs,
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
from tunesmith.training.precision import cast_frozen, resolve_precision


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
    layer_lr_decay: float = 1.0
    packing: bool = False
    pack_capacity: int = 512
    group_by_length: bool = False
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_batch_size: int = 16


@dataclass
class TrainResult:
    state: TrainState
    best_checkpoint: Path | None
    precision: str = "fp32"
    history: list[dict[str, Any]] = field(default_factory=list)


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")


def _layer_scale(name: str, n_layers: int, decay: float) -> float:
    """lr multiplier: decay^(n-1-i) for layer i, decay^n for embeddings, 1 for the head."""
    if decay == 1.0:
        return 1.0
    found = _LAYER.search(name)
    if found:
        return decay ** (n_layers - 1 - int(found.group(1)))
    return decay ** n_layers if "embed" in name else 1.0


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    layer_lr_decay: float = 1.0, n_layers: int = 0) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on norms/biases; optional layer-wise lr."""
    groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (_no_decay(name, p), _layer_scale(name, n_layers, layer_lr_decay))
            groups.setdefault(key, []).append(p)
    if not groups:
        raise TrainingError("the model has no trainable parameters; check train.method and "
                            "train.lora.target_modules")
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": 0.0 if plain else weight_decay, "lr": lr * scale}
         for (plain, scale), ps in groups.items()], lr=lr)


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
               scheduler: Any, accelerator: Accelerator, settings: LoopSettings, pad_id: int
               ) -> dict[str, float]:
    """One optimiser step over the global ``batch``, accumulated over micro-batches.

    The loss is normalised by the target tokens of the whole global batch, not per micro-batch
    or per process, so accumulation and data parallelism give the gradient of one big batch.
    """
    s = settings
    n_targets = sum(e.n_targets for e in batch)
    if n_targets == 0:
        raise TrainingError("a batch has no assistant tokens to learn from")
    world = accelerator.num_processes
    inputs = step_inputs(batch, pad_id=pad_id, micro_batch_size=s.micro_batch_size,
                         packing=s.packing, pack_capacity=s.pack_capacity,
                         rank=accelerator.process_index, world_size=world)
    total = torch.zeros(2, dtype=torch.float64)  # loss sum, correct tokens (this process)
    for i, micro in enumerate(inputs):
        # DDP averages gradients over processes; scaling by world size makes that a sum.
        sync = i == len(inputs) - 1
        with accelerator.no_sync(loss_module) if not sync and world > 1 else nullcontext():
            out = loss_module(**_to(micro, accelerator.device))
            accelerator.backward(out.loss_sum * world / n_targets)
        total += torch.tensor([float(out.loss_sum.detach()), out.n_correct], dtype=torch.float64)
    if world > 1:
        total = accelerator.reduce(total.to(accelerator.device), reduction="sum").cpu()
    grad_norm = None
    if s.max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(
            [p for p in loss_module.parameters() if p.requires_grad], s.max_grad_norm))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"train_loss": float(total[0]) / n_targets,
            "train_token_accuracy": float(total[1]) / n_targets,
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


def _prepare_model(model: torch.nn.Module, s: LoopSettings, device: torch.device) -> str:
    precision = resolve_precision(s.precision, device)
    if precision == "bf16":
        cast_frozen(model, torch.bfloat16)
    if s.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return precision


def _lm_loss(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    return TargetLoss(model, precision=precision)


def _n_layers(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def train(model: torch.nn.Module, train_data: Sequence[Encoded], valid_data: Sequence[Encoded],
          *, settings: LoopSettings, pad_id: int, checkpoint_dir: Path,
          callbacks: Sequence[Any] = (), resume: bool = False,
          make_loss: Callable[[torch.nn.Module, str], torch.nn.Module] | None = None
          ) -> TrainResult:
    """Train ``model`` in place; on return it holds the weights of the best checkpoint.

    ``make_loss(model, precision)`` builds the objective (default: causal-LM loss on target
    tokens); any module returning ``LossSums`` fits, e.g. ``ClassifierLoss``.
    """
    s = settings
    accelerator = Accelerator()
    precision = _prepare_model(model, s, accelerator.device)
    loss_module = (make_loss or _lm_loss)(model, precision)
    optimizer = build_optimizer(loss_module, lr=s.learning_rate, weight_decay=s.weight_decay,
                                layer_lr_decay=s.layer_lr_decay, n_layers=_n_layers(model))
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
            patience = s.early_stopping_patience
            state.stopped_early = bool(patience and state.evals_without_improvement >= patience)
        metrics["best_step"] = state.best_step
        call(callbacks, "on_evaluate", state, metrics)
        if accelerator.is_main_process:
            path = save_checkpoint(checkpoint_dir, weights=_trainable(model),
                                   optimizer=optimizer, scheduler=scheduler, state=state)
            prune_checkpoints(checkpoint_dir, keep_last=s.keep_checkpoints,
                              best_step=state.best_step)
            call(callbacks, "on_checkpoint", state, path)
        accelerator.wait_for_everyone()

    call(callbacks, "on_train_begin", state, s.total_steps)
    if state.step == 0 and valid_data:
        evaluate_and_checkpoint()  # the starting point of the validation curve
    per_epoch = steps_per_epoch(len(train_data), s.batch_size)
    while state.step < s.total_steps and not state.stopped_early and state.epoch < s.epochs:
        for batch in epoch_batches(train_data, batch_size=s.batch_size, seed=s.seed,
                                   epoch=state.epoch, start_step=state.step_in_epoch,
                                   group_by_length=s.group_by_length and not s.packing):
            started = time.perf_counter()
            metrics = train_step(loss_module, batch, optimizer=optimizer, scheduler=scheduler,
                                 accelerator=accelerator, settings=s, pad_id=pad_id)
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
    return TrainResult(state=state, best_checkpoint=best, precision=precision)
