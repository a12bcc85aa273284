"""A client's part of a round: the same ``fine_tune`` as ``tunesmith run``, on the client's own
data file, for ``local_steps`` steps, starting from the global adapter.

What changes for a federated client is passed to the loop as *wrappers* (``TrainParts ->
TrainParts``), never by changing the loop: FFA-LoRA freezes the A matrices, the global adapter
is loaded into the model, FedProx pulls the update towards the global weights, and each round
draws a different batch order. What leaves the client is ``LocalUpdate``: trainable tensors,
an example count and numeric metrics; never text.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.flows.finetune import fine_tune
from tunesmith.flows.run import prepare_headless
from tunesmith.models.adapters import load_trainable_state, trainable_state_copy
from tunesmith.training.setup import TrainParts, Wrapper

log = logging.getLogger("tunesmith")

# PEFT's name for the down-projection of a LoRA pair (B is "lora_B")
LORA_A = "lora_A"


@dataclass
class LocalUpdate:
    """What a client sends back: its trainable tensors, its example count, its metrics; and
    the optimiser steps it took (the loop's count)."""

    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]
    steps: int


def steps_for(local_steps: int | None, local_epochs: float | None, n_train: int,
              batch_size: int) -> int:
    """A client's steps this round: ``local_steps``, or ``local_epochs`` of its own data."""
    if local_epochs is None:
        if not local_steps:
            raise ValueError("a round needs local_steps or local_epochs")
        return local_steps
    return max(1, math.ceil(local_epochs * n_train / batch_size))


# ----------------------------------------------------------------------------- wrappers


def freeze_lora_a(model: torch.nn.Module) -> None:
    """FFA-LoRA: every A matrix keeps its seeded initialisation (the same on every client and
    on the server, since all build the adapters from ``train.seed``)."""
    for name, p in model.named_parameters():
        if LORA_A in name:
            p.requires_grad_(False)


def ffa_lora(parts: TrainParts) -> TrainParts:
    """Freeze A before the loop starts; AdamW skips parameters without a gradient."""
    freeze_lora_a(parts.model)
    return parts


def load_global(state: dict[str, torch.Tensor]) -> Wrapper:
    """Start from the global adapter (after ``ffa_lora``: only the B matrices are in it)."""
    def wrap(parts: TrainParts) -> TrainParts:
        load_trainable_state(parts.model, state)
        return parts
    return wrap


def proximal_term(params: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor],
                  mu: float) -> torch.Tensor:
    """FedProx's mu/2 * ||w - w_global||^2 over the trainable tensors (Li et al. 2020)."""
    total = sum(((p - global_state[n].to(p)) ** 2).sum() for n, p in params.items())
    return 0.5 * mu * torch.as_tensor(total)


def fedprox(global_state: dict[str, torch.Tensor], mu: float) -> Wrapper:
    """Add the proximal term's gradient, mu * (w - w_global), before every optimiser step.

    The loop normalises each objective's loss by its own batch count (tokens, examples,
    pairs); adding the term's gradient at the optimiser keeps it one term per step whatever
    the objective, without touching the loop or the objectives.
    """
    def wrap(parts: TrainParts) -> TrainParts:
        named = {n: p for n, p in parts.model.named_parameters() if p.requires_grad}
        anchors = {n: global_state[n].detach().to(p) for n, p in named.items()}

        def add_proximal_gradient(optimizer: Any, args: Any, kwargs: Any) -> None:
            with torch.no_grad():
                for n, p in named.items():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.add_(p.detach() - anchors[n], alpha=mu)

        parts.optimizer.register_step_pre_hook(add_proximal_gradient)
        return parts
    return wrap


def round_order(round_number: int) -> Wrapper:
    """Each round a new batch order (seed + round): otherwise every round would train on the
    same first ``local_steps`` batches."""
    def wrap(parts: TrainParts) -> TrainParts:
        if dataclasses.is_dataclass(parts.batches) and hasattr(parts.batches, "seed"):
            parts.batches = dataclasses.replace(parts.batches,
                                                seed=parts.batches.seed + round_number)
        return parts
    return wrap


class _LastMetrics:
    """A loop callback keeping the mean training loss and the last evaluation's metrics."""

    def __init__(self) -> None:
        self.train_losses: list[float] = []
        self.valid: dict[str, float] = {}

    def on_step(self, loop: Any, metrics: dict[str, Any]) -> None:
        self.train_losses.append(float(metrics["train_loss"]))

    def on_evaluate(self, loop: Any, metrics: dict[str, Any]) -> None:
        self.valid = {k: float(v) for k, v in metrics.items()
                      if k.startswith("valid_") and isinstance(v, int | float)}

    def metrics(self) -> dict[str, float]:
        found = {"train_loss": sum(self.train_losses) / max(1, len(self.train_losses)),
                 **self.valid}
        return {k: v for k, v in found.items() if math.isfinite(v)}


# ----------------------------------------------------------------------------- the round


def client_config(cfg: RunConfig, data_file: Path, work_dir: Path) -> RunConfig:
    """The run configuration a client trains with: its own file, validation split off it (no
    test split: the server evaluates on the test set)."""
    data = cfg.data.model_copy(update={"train_file": Path(data_file), "validation_file": None,
                                       "test_file": None})
    return cfg.model_copy(update={"data": data, "output_dir": work_dir})


def evaluate_locally(cfg: RunConfig, data_file: Path, work_dir: Path,
                     global_state: dict[str, torch.Tensor], *, home: Path, ffa: bool = False
                     ) -> tuple[int, dict[str, float]]:
    """The global adapter on this client's own validation split (the split ``train_locally``
    validates on): (its size, validation loss and, for classification, accuracy and macro-F1
    as ``eval.mode`` computes them). Only these numbers leave the client. Under FFA-LoRA
    (``ffa``) the global adapter holds only the B matrices, as the model here trains."""
    from tunesmith.data.records import as_chat
    from tunesmith.flows.assess import evaluate_lm
    from tunesmith.flows.steps import prepare_model_for_training
    from tunesmith.training.loop import evaluate_objective
    from tunesmith.training.objectives import LMObjective

    cfg = client_config(cfg, data_file, work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ready = prepare_headless(cfg, work_dir, home, carve_test=False)
    model = prepare_model_for_training(ready.model, cfg)
    if ffa:
        freeze_lora_a(model)
    load_trainable_state(model, global_state)
    model.eval()
    objective = LMObjective(model, pad_id=ready.tokenizer.pad_token_id)
    loss = evaluate_objective(objective, ready.prepared.valid, batch_size=cfg.eval.batch_size,
                              device=torch.device("cpu"))["valid_loss"]
    found = {"valid_loss": loss}
    if ready.labels:
        metrics = evaluate_lm(model, ready.tokenizer, [as_chat(e) for e in
                                                       ready.splits.validation],
                              cfg.eval, ready.labels, score_labels=False).metrics
        found.update({k: float(metrics[k]) for k in ("accuracy", "macro_f1")
                      if metrics.get(k) is not None})
    return len(ready.splits.validation), {k: v for k, v in found.items() if math.isfinite(v)}


def train_locally(cfg: RunConfig, data_file: Path, work_dir: Path,
                  global_state: dict[str, torch.Tensor], *, home: Path,
                  local_steps: int | None, round_number: int, proximal_mu: float = 0.0,
                  ffa: bool = False, local_epochs: float | None = None, rounds: int = 1
                  ) -> LocalUpdate:
    """One client's round: ``local_steps`` of the run's training from ``global_state`` (or
    ``local_epochs`` of its own training examples, ``steps_for``); ``rounds`` rounds' worth of
    steps in one go for the clients-alone baseline."""
    cfg = client_config(cfg, data_file, work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # checkpoints of an earlier round belong to another global adapter
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    ready = prepare_headless(cfg, work_dir, home, carve_test=False)
    prepared = ready.prepared
    steps = rounds * steps_for(local_steps, local_epochs, len(prepared.train),
                               prepared.hp.batch_size)
    hp = prepared.hp.model_copy(update={"total_steps": steps, "eval_every": steps,
                                        "warmup_steps": 0, "epochs": steps})
    wrappers: list[Wrapper] = [ffa_lora] if ffa else []
    wrappers += [load_global(global_state), round_order(round_number)]
    if proximal_mu > 0:
        wrappers.append(fedprox(global_state, proximal_mu))
    seen = _LastMetrics()
    tuned = fine_tune(cfg, work_dir, ready.model, ready.model_dir, ready.tokenizer,
                      train_rows=prepared.train, valid_rows=prepared.valid, hp=hp,
                      labels=ready.labels, callbacks=[seen],
                      wrappers=wrappers, restore_best=False, save=False)
    return LocalUpdate(state=trainable_state_copy(tuned.model),
                       num_examples=len(prepared.train), metrics=seen.metrics(),
                       steps=len(seen.train_losses))
