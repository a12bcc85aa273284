"""The loop's policies, as callbacks: evaluate, stop early, checkpoint, restore the best.

Each is a small object the loop calls like any other callback; a run composes the ones it
wants (``standard_policies``). A federated client, for instance, leaves out ``RestoreBest``
so it returns the weights it ended on, not a "best" that may be the server's own.

Order matters and is the list's; the loop calls a run's own callbacks first, then these.
``Evaluation`` records the best step and emits ``on_evaluate`` (which ``EarlyStopping``
reads) before ``Checkpointing`` saves that step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.training.checkpoint import list_checkpoints, load_weights, prune_checkpoints

log = logging.getLogger("tunesmith")


class Evaluation:
    """Validation loss and metrics before training, every ``every`` steps and at the end;
    the best step is tracked in the loop's state: the lowest validation loss, or with
    ``metric`` another validation metric ("macro_f1", "accuracy": the highest; a tie goes to
    the lower loss)."""

    def __init__(self, data: Sequence[Any], *, every: int, batch_size: int,
                 metric: str = "loss") -> None:
        self.data, self.every, self.batch_size = data, max(1, every), batch_size
        self.metric = metric

    def _value(self, metrics: dict[str, Any]) -> float:
        key = f"valid_{self.metric}"
        if key not in metrics:
            raise ValueError(f"best_metric {self.metric!r}: the objective reports no {key} "
                             f"(it reports {sorted(k for k in metrics if k.startswith('valid_'))})")
        return float(metrics[key])

    def _better(self, state: Any, value: float, loss: float) -> bool:
        if not (math.isfinite(value) and math.isfinite(loss)):
            return state.best_step is None  # a first evaluation that is NaN still starts
        best = state.best_score
        if best is None and self.metric == "loss":
            best = state.best_valid_loss  # a checkpoint written before best_score existed
        if best is None or not math.isfinite(best):
            return True  # nothing finite to beat yet
        sign = 1.0 if self.metric == "loss" else -1.0  # lower is better after the sign
        return (sign * value, loss) < (sign * best, state.best_valid_loss)

    def _run(self, loop: Any) -> None:
        state = loop.state
        metrics = {"step": state.step, "epoch": state.epoch,
                   **loop.evaluate(self.data, batch_size=self.batch_size)}
        loss, value = metrics["valid_loss"], self._value(metrics)
        if self._better(state, value, loss):
            state.best_score, state.best_valid_loss, state.best_step = value, loss, state.step
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        metrics["best_step"] = state.best_step
        loop.emit("on_evaluate", metrics)

    def on_train_begin(self, loop: Any) -> None:
        if self.data and loop.state.step == 0:
            self._run(loop)  # the starting point of the validation curve

    def on_step(self, loop: Any, metrics: dict[str, Any]) -> None:
        step = loop.state.step
        if self.data and (step % self.every == 0 or step >= loop.total_steps):
            self._run(loop)


class EarlyStopping:
    """Ask the loop to stop after ``patience`` evaluations without a better best step
    (``None``: never).

    No stop before ``min_steps``: a learning rate still warming up often makes the loss worse
    first, and stopping there would keep the untrained starting point.
    """

    def __init__(self, patience: int | None, *, min_steps: int = 0) -> None:
        self.patience, self.min_steps = patience, min_steps

    def on_evaluate(self, loop: Any, metrics: dict[str, Any]) -> None:
        state = loop.state
        if (self.patience and state.evals_without_improvement >= self.patience
                and self.min_steps <= state.step < loop.total_steps):  # the last step is no stop
            state.stopped_early = True
            loop.control.stop("early_stopping")


class Checkpointing:
    """Save a checkpoint every ``every`` steps and whenever training ends (done, stopped
    early, or stopped by a callback); keep the last ``keep_last`` plus the best."""

    def __init__(self, directory: Path, *, every: int, keep_last: int) -> None:
        self.directory, self.every, self.keep_last = directory, max(1, every), keep_last
        self.last_saved: int | None = None

    def _save(self, loop: Any) -> None:
        path = loop.save_checkpoint(self.directory)
        self.last_saved = loop.state.step
        if path is not None:
            prune_checkpoints(self.directory, keep_last=self.keep_last,
                              best_step=loop.state.best_step)
            loop.emit("on_checkpoint", path)

    def on_train_begin(self, loop: Any) -> None:
        if loop.state.step == 0 and loop.state.best_step == 0:
            self._save(loop)  # the starting point is a candidate for "best"

    def on_step(self, loop: Any, metrics: dict[str, Any]) -> None:
        step = loop.state.step
        if step % self.every == 0 or step >= loop.total_steps or loop.control.should_stop:
            self._save(loop)

    def on_train_end(self, loop: Any) -> None:
        if self.last_saved != loop.state.step:
            self._save(loop)


class RestoreBest:
    """At the end, load the weights of the best checkpoint (``Evaluation``'s best step)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, loop: Any) -> None:
        best = loop.state.best_step
        if best is None or best == loop.state.step:
            return
        path = self.directory / f"step-{best}"
        if path in list_checkpoints(self.directory):
            loop.load_trainable(load_weights(path))
        else:
            log.warning("the best checkpoint (step %s) is gone; keeping the last weights", best)


def standard_policies(valid_data: Sequence[Any], *, checkpoint_dir: Path, eval_every: int,
                      eval_batch_size: int, early_stopping_patience: int | None,
                      keep_checkpoints: int, restore_best: bool = True,
                      min_steps: int = 0, best_metric: str = "loss") -> list[Any]:
    """Evaluation, early stopping, checkpointing and (optionally) best-weights restore."""
    policies: list[Any] = [Evaluation(valid_data, every=eval_every, batch_size=eval_batch_size,
                                      metric=best_metric),
                           EarlyStopping(early_stopping_patience, min_steps=min_steps),
                           Checkpointing(checkpoint_dir, every=eval_every,
                                         keep_last=keep_checkpoints)]
    if restore_best:
        policies.append(RestoreBest(checkpoint_dir))
    return policies
