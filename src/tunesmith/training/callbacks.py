"""Callbacks: small objects the loop calls at each step and evaluation.

Composition, not inheritance: a callback implements any of the ``on_*`` methods of
``Callback``; the loop calls those that exist, in order, with a view of itself (state,
control). The loop's policies (evaluation, early stopping, checkpoints, best-weights restore)
are callbacks too: see ``tunesmith.training.policies``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunesmith.training.checkpoint import TrainState


@dataclass
class Control:
    """What callbacks ask of the loop (as HF's ``TrainerControl``): set ``should_stop`` and
    the loop ends after the current step, cleanly: checkpoint written, ``on_train_end`` called.
    """

    should_stop: bool = False
    reason: str | None = None

    def stop(self, reason: str) -> None:
        if not self.should_stop:
            self.should_stop, self.reason = True, reason


class LoopView(Protocol):
    """What a callback sees of the running loop (``tunesmith.training.loop.Loop``)."""

    state: TrainState
    control: Control
    total_steps: int


class Callback(Protocol):
    def on_train_begin(self, loop: LoopView) -> None: ...
    def on_step(self, loop: LoopView, metrics: dict[str, Any]) -> None: ...
    def on_evaluate(self, loop: LoopView, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, loop: LoopView, path: Path) -> None: ...
    def on_train_end(self, loop: LoopView) -> None: ...


def call(callbacks: Sequence[Any], event: str, *args: Any) -> None:
    for cb in callbacks:
        method = getattr(cb, event, None)
        if method is not None:
            method(*args)


class MetricsLog:
    """Appends every step's and every evaluation's metrics to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, loop: LoopView) -> None:
        state = loop.state
        # A resumed run starts again after its checkpoint: drop what was logged past it, so the
        # log reads as one uninterrupted run.
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= state.step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_step(self, loop: LoopView, metrics: dict[str, Any]) -> None:
        self._write({"kind": "train", **metrics})

    def on_evaluate(self, loop: LoopView, metrics: dict[str, Any]) -> None:
        self._write({"kind": "eval", **metrics})


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressBar:
    """A rich progress bar over optimiser steps, showing train and validation loss."""

    def __init__(self, console: Any = None, *, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console, disable=not enabled, transient=False)
        self.task = None
        self.valid = ""

    def on_train_begin(self, loop: LoopView) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=loop.total_steps,
                                           completed=loop.state.step, info="")

    def on_step(self, loop: LoopView, metrics: dict[str, Any]) -> None:
        info = f"loss {metrics['train_loss']:.4f} {metrics['tokens_per_s']:.0f} tok/s{self.valid}"
        self.progress.update(self.task, completed=loop.state.step, info=info)

    def on_evaluate(self, loop: LoopView, metrics: dict[str, Any]) -> None:
        self.valid = f" | valid {metrics['valid_loss']:.4f}"
        if "epsilon" in metrics:  # differential privacy: the budget spent so far
            self.valid += f" | ε {metrics['epsilon']:.2f}"

    def on_train_end(self, loop: LoopView) -> None:
        self.progress.stop()
