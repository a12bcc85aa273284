"""The training loop: it receives its parts (``setup.TrainParts``) and its policies (callbacks).

Runs on Accelerate, so ``accelerate launch`` / ``torchrun`` give data parallelism (DDP) without a
launcher of ours: every process sees the same global batches and trains on its share. What a
step minimises is the objective's business (``objectives``); when to evaluate, stop, save and
restore is the policies' (``policies``). ``train`` composes the usual run from both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import TrainingError
from tunesmith.models.adapters import load_trainable_state, trainable_state
from tunesmith.training.batches import eval_batches, local_share, micro_batches
from tunesmith.training.callbacks import Control, call
from tunesmith.training.checkpoint import (
    TrainState,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tunesmith.training.objectives import LMObjective, summarise
from tunesmith.training.policies import standard_policies
from tunesmith.training.processes import same_everywhere
from tunesmith.training.setup import LoopSettings, TrainParts, Wrapper, setup
from tunesmith.training.sharding import (
    gathered_optimizer_state,
    gathered_trainable,
    is_fsdp,
    load_optimizer_state,
    max_passes,
    reshard_all,
    unshard,
    wrap_layers_of,
)

__all__ = ["Loop", "LoopSettings", "TrainResult", "evaluate_objective", "fit", "train",
           "train_step"]


@dataclass
class TrainResult:
    state: TrainState
    best_checkpoint: Path | None
    precision: str = "fp32"
    device: str = "cpu"  # where it trained: "cpu", "cuda:0", ...
    stop_reason: str = "completed"  # completed | early_stopping | whatever a callback said
    history: list[dict[str, Any]] = field(default_factory=list)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_objective(objective: Any, data: Sequence[Any], *, batch_size: int,
                       device: torch.device) -> dict[str, float]:
    """``valid_loss`` and ``valid_<metric>`` over ``data``, normalised as in training."""
    was_training = objective.training
    objective.eval()
    loss, norm, sums = 0.0, 0.0, {}
    for batch in eval_batches(data, batch_size, size=getattr(objective, "size", len)):
        norm += objective.normaliser(batch)
        for inputs in objective.collate(batch):
            out = objective(**_to(inputs, device))
            loss += float(out.loss_sum)
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    objective.train(was_training)
    if norm == 0:
        return {"valid_loss": float("nan")}
    metrics = summarise(objective, {k: v / norm for k, v in sums.items()})
    return {"valid_loss": loss / norm, **{f"valid_{k}": v for k, v in metrics.items()}}


def _passes(objective: Any, batch: Sequence[Any], accelerator: Any, micro: int | None
            ) -> tuple[list[dict[str, torch.Tensor]], int]:
    """This process's forward/backward passes for a global batch, and how many are real.

    With DDP every process must join the gradient all-reduce of a step. A process whose share
    of a small last batch is empty runs one pass on another example with its loss scaled to
    zero, so it contributes nothing and nobody waits forever. Under FSDP every pass gathers
    and reduces each layer, so every process runs as many passes as the busiest one, the
    extra ones scaled to zero the same way.
    """
    local = local_share(batch, rank=accelerator.process_index,
                        world_size=accelerator.num_processes)
    if local:
        passes = [p for part in micro_batches(local, micro) for p in objective.collate(part)]
    else:
        passes = objective.collate(list(batch[:1]))
    real = len(passes) if local else 0
    if accelerator.num_processes > 1 and is_fsdp(accelerator):
        passes = passes + passes[:1] * (max_passes(accelerator, len(passes)) - len(passes))
    return passes, real


def train_step(parts: TrainParts, batch: Sequence[Any], settings: LoopSettings
               ) -> dict[str, Any]:
    """One optimiser step over the global ``batch``, accumulated over micro-batches.

    The loss is normalised by the objective's normaliser of the whole global batch (target
    tokens for SFT), not per micro-batch or per process, so accumulation and data parallelism
    give the gradient of one big batch.
    """
    acc, module = parts.accelerator, parts.module
    objective = acc.unwrap_model(module)
    norm = objective.normaliser(batch) if batch else 0.0
    if batch and norm == 0:
        raise TrainingError("a batch has nothing to learn from (no target tokens); check the "
                            "data's assistant turns")
    world = acc.num_processes
    totals: dict[str, float] = {"loss": 0.0}
    if batch:  # a Poisson batch may be empty: the step then updates with zero gradient
        passes, n_real = _passes(objective, batch, acc, settings.micro_batch_size)
        for i, inputs in enumerate(passes):
            real = i < n_real
            # DDP (and FSDP's reduce-scatter) average gradients over processes; scaling by
            # world size makes that a sum.
            sync = i == len(passes) - 1
            with acc.no_sync(module) if not sync and world > 1 else nullcontext():
                out = module(**_to(inputs, acc.device))
                acc.backward(out.loss_sum * (world / norm if real else 0.0))
            if real:
                totals["loss"] += float(out.loss_sum.detach())
            for k, v in out.metrics.items():
                totals[k] = totals.get(k, 0.0) + (float(v) if real else 0.0)
    if world > 1:
        names = sorted(totals)  # the same order on every process
        summed = acc.reduce(torch.tensor([totals[k] for k in names], dtype=torch.float64,
                                         device=acc.device), reduction="sum").cpu().tolist()
        totals = dict(zip(names, summed, strict=True))
    grad_norm = None
    if settings.max_grad_norm is not None:
        params = [p for p in module.parameters() if p.requires_grad]
        grad_norm = float(acc.clip_grad_norm_(params, settings.max_grad_norm))
    lr = parts.scheduler.get_last_lr()[0]
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    scale = 1.0 / norm if norm else 0.0
    size = getattr(objective, "size", len)
    return {"train_loss": totals.pop("loss") * scale,
            **{f"train_{k}": v * scale for k, v in totals.items()},
            "learning_rate": lr, "grad_norm": grad_norm,
            "tokens": sum(size(e) for e in batch)}


class Loop:
    """The running loop as callbacks see it: state, control, and the few things policies do
    (evaluate, save a checkpoint, load weights, emit an event to every callback)."""

    def __init__(self, parts: TrainParts, settings: LoopSettings, callbacks: Sequence[Any]
                 ) -> None:
        self.parts, self.settings = parts, settings
        self.callbacks = list(callbacks)
        self.state, self.control = TrainState(), Control()
        self.total_steps = settings.total_steps

    def emit(self, event: str, *args: Any) -> None:
        call(self.callbacks, event, self, *args)

    def evaluate(self, data: Sequence[Any], *, batch_size: int) -> dict[str, float]:
        objective = self.parts.accelerator.unwrap_model(self.parts.module)
        return evaluate_objective(objective, data, batch_size=batch_size,
                                  device=self.parts.accelerator.device)

    @property
    def sharded(self) -> bool:
        return is_fsdp(self.parts.accelerator)

    def load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        if self.sharded:
            reshard_all(self.parts.module)  # load into the shards, not into gathered copies
        load_trainable_state(self.parts.model, weights)

    def save_checkpoint(self, directory: Path) -> Path | None:
        """Every process's RNG state goes in; the main process writes. Returns the path there.

        Under FSDP the weights and optimiser state are gathered first (see ``sharding``)."""
        acc, p = self.parts.accelerator, self.parts
        states = [rng_state()]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            states = gather_object(states)  # in memory, rank order
        if self.sharded:
            reshard_all(p.module)  # the optimiser holds the sharded parameters, not the gathered
            weights = gathered_trainable(p.model, keep=acc.is_main_process)
            optimizer: Any = _Stated(gathered_optimizer_state(p.module, p.optimizer))
        else:
            weights, optimizer = trainable_state(p.model), p.optimizer
        path = None
        if acc.is_main_process:
            path = save_checkpoint(directory, weights=weights, optimizer=optimizer,
                                   scheduler=p.scheduler, state=self.state, rng=states)
        acc.wait_for_everyone()
        return path

    def resume(self, checkpoint: Path) -> None:
        weights, extra, self.state = load_checkpoint(checkpoint)
        self.load_trainable(weights)
        if self.sharded:
            load_optimizer_state(self.parts.module, self.parts.optimizer, extra["optimizer"])
        else:
            self.parts.optimizer.load_state_dict(extra["optimizer"])
        self.parts.scheduler.load_state_dict(extra["scheduler"])
        states = extra["rng"]
        rank = self.parts.accelerator.process_index
        # the same number of processes continues exactly; another number continues from rank
        # 0's generators (the data order does not depend on them)
        set_rng_state(states[rank] if rank < len(states) else states[0])

    def run(self) -> TrainResult:
        p, s, state = self.parts, self.settings, self.state
        self.emit("on_train_begin")
        per_epoch = p.batches.steps_per_epoch()
        while (state.step < s.total_steps and state.epoch < s.epochs
               and not self.control.should_stop):
            for batch in p.batches.epoch(state.epoch, state.step_in_epoch):
                started = time.perf_counter()
                metrics = train_step(p, batch, s)
                elapsed = time.perf_counter() - started
                state.step += 1
                state.step_in_epoch += 1
                state.tokens_seen += int(metrics["tokens"])
                if state.step_in_epoch >= per_epoch:
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                metrics.update(step=state.step, epoch=state.epoch,
                               tokens_per_s=metrics["tokens"] / max(elapsed, 1e-9))
                if not math.isfinite(metrics["train_loss"]):
                    raise TrainingError(f"the training loss became {metrics['train_loss']} at "
                                        f"step {state.step}; lower train.learning_rate")
                self.emit("on_step", metrics)
                if state.step >= s.total_steps or self.control.should_stop:
                    break
        self.emit("on_train_end")
        return TrainResult(state=state, best_checkpoint=None, precision=p.precision,
                           device=str(p.accelerator.device),
                           stop_reason=self.control.reason or "completed")


def fit(parts: TrainParts, *, settings: LoopSettings, callbacks: Sequence[Any] = (),
        resume_from: Path | None = None) -> TrainResult:
    """Train with ``parts`` under ``callbacks`` (the run's own first, then its policies)."""
    acc = parts.accelerator
    sharded = is_fsdp(acc)
    if sharded:
        wrap_layers_of(acc, parts.model)
    module, optimizer = acc.prepare(parts.objective, parts.optimizer)
    parts.module, parts.optimizer = module, optimizer
    module.train()
    # a wrapper's own callbacks (differential privacy's epsilon meter) run first
    loop = Loop(parts, settings, [*parts.extra.get("callbacks", ()), *callbacks])
    if resume_from is not None:
        loop.resume(resume_from)
    result = loop.run()
    if sharded:  # what follows the loop (adapter, merge, evaluation) sees a plain model
        unshard(module)
    return result


class _Stated:
    """An optimiser state already in hand, for ``save_checkpoint``'s ``state_dict()`` call."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


def train(model: torch.nn.Module, train_data: Sequence[Any], valid_data: Sequence[Any],
          *, settings: LoopSettings, pad_id: int, checkpoint_dir: Path,
          callbacks: Sequence[Any] = (), resume: bool = False,
          make_objective: Callable[[torch.nn.Module, str], Any] | None = None,
          wrappers: Sequence[Wrapper] = ()) -> TrainResult:
    """The usual run: setup, wrappers, then the loop with the standard policies.

    ``make_objective(model, precision)`` builds the objective (default: causal-LM loss on
    target tokens, packed when ``settings.packing``). With ``settings.restore_best`` the model
    ends holding the best checkpoint's weights, otherwise its last ones.
    """
    s = settings

    def lm(m: torch.nn.Module, precision: str) -> LMObjective:
        return LMObjective(m, pad_id=pad_id, precision=precision, packing=s.packing,
                           pack_capacity=s.pack_capacity)

    parts = setup(model, make_objective or lm, train_data, settings=s)
    for wrap in wrappers:
        parts = wrap(parts)
    policies = standard_policies(
        valid_data, checkpoint_dir=checkpoint_dir, eval_every=s.eval_every,
        eval_batch_size=s.eval_batch_size, early_stopping_patience=s.early_stopping_patience,
        keep_checkpoints=s.keep_checkpoints, restore_best=s.restore_best,
        min_steps=s.warmup_steps, best_metric=s.best_metric)
    existing = list_checkpoints(checkpoint_dir) if resume else []
    resume_from = existing[-1] if existing else None
    # a process (a node) that saw another checkpoint, or none, would train other steps and
    # wait forever in a collective the others never join
    same_everywhere(parts.accelerator, resume_from and resume_from.name,
                    what="the checkpoint to resume from",
                    fix="the run directory (output_dir) must be on a filesystem every node sees")
    result = fit(parts, settings=s, callbacks=[*callbacks, *policies], resume_from=resume_from)
    best = result.state.best_step
    result.best_checkpoint = checkpoint_dir / f"step-{best}" if best is not None else None
    return result
