"""Callbacks: small objects the loop calls at each step and evaluation.

Composition, not inheritance: a callback implements any of the ``on_*`` methods of
``Callback``; the loop calls those that exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunesmith.training.checkpoint import TrainState


class Callback(Protocol):
    def on_train_begin(self, state: TrainState, total_steps: int) -> None: ...
    def on_step(self, state: TrainState, metrics: dict[str, Any]) -> None: ...
    def on_evaluate(self, state: TrainState, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, state: TrainState, path: Path) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...


def call(callbacks: list[Any], event: str, *args: Any) -> None:
    for cb in callbacks:
        method = getattr(cb, event, None)
        if method is not None:
            method(*args)


class MetricsLog:
    """Appends every step's and every evaluation's metrics to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, state: TrainState, total_steps: int) -> None:
        # A resumed run starts again after its checkpoint: drop what was logged past it, so the
        # log reads as one uninterrupted run.
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= state.step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_step(self, state: TrainState, metrics: dict[str, Any]) -> None:
        self._write({"kind": "train", **metrics})

    def on_evaluate(self, state: TrainState, metrics: dict[str, Any]) -> None:
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

    def on_train_begin(self, state: TrainState, total_steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=state.step,
                                           info="")

    def on_step(self, state: TrainState, metrics: dict[str, Any]) -> None:
        info = f"loss {metrics['train_loss']:.4f} {metrics['tokens_per_s']:.0f} tok/s{self.valid}"
        self.progress.update(self.task, completed=state.step, info=info)

    def on_evaluate(self, state: TrainState, metrics: dict[str, Any]) -> None:
        self.valid = f" | valid {metrics['valid_loss']:.4f}"

    def on_train_end(self, state: TrainState) -> None:
        self.progress.stop()
