"""Overfitting: the train/validation loss gap over time, read from a run's ``metrics.jsonl``.

The loop logs a ``train`` record per optimiser step (``step``, ``train_loss``) and an ``eval``
record per evaluation (``step``, ``valid_loss``, ``best_step``). A single step's train loss is
noisy, so at each evaluation the train loss is the mean over the steps since the previous
evaluation: the loss on the data the model saw in that stretch.

Two signs are flagged: validation loss rising while train loss falls for ``patience``
evaluations in a row (memorising, not learning), and a final gap valid - train above
``max_gap`` nats. Early stopping keeps the checkpoint of the best validation loss whatever
happens after it; ``best_step`` is that checkpoint, the one the run evaluates and ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GapPoint:
    """At one evaluation: smoothed train loss, validation loss, and valid - train."""

    step: int
    train_loss: float | None
    valid_loss: float
    gap: float | None


@dataclass(frozen=True)
class OverfittingResult:
    points: list[GapPoint]
    best_step: int | None
    best_valid_loss: float | None
    last_step: int | None
    patience: int
    max_gap: float
    reasons: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.reasons)

    def to_dict(self) -> dict:
        return {**asdict(self), "flagged": self.flagged}


def _by_step(records: Sequence[dict[str, Any]], kind: str, key: str) -> dict[int, float]:
    # a resumed run may log a step twice; the later record is the one that counts
    return {int(r["step"]): float(r[key]) for r in records
            if r.get("kind") == kind and r.get(key) is not None}


def loss_gap(records: Sequence[dict[str, Any]]) -> list[GapPoint]:
    """The gap at each evaluation, train loss averaged since the previous evaluation."""
    train = _by_step(records, "train", "train_loss")
    valid = _by_step(records, "eval", "valid_loss")
    points, previous = [], -1
    for step in sorted(valid):
        window = [v for s, v in train.items() if previous < s <= step]
        t = sum(window) / len(window) if window else None
        points.append(GapPoint(step=step, train_loss=t, valid_loss=valid[step],
                               gap=None if t is None else valid[step] - t))
        previous = step
    return points


def _diverging_run(points: Sequence[GapPoint]) -> tuple[int, int | None]:
    """The longest run of evaluations with validation up and train down, and where it began."""
    best, best_start, run, start = 0, None, 0, None
    for prev, cur in zip(points, points[1:], strict=False):
        if (cur.train_loss is not None and prev.train_loss is not None
                and cur.valid_loss > prev.valid_loss and cur.train_loss < prev.train_loss):
            start = prev.step if run == 0 else start
            run += 1
            if run > best:
                best, best_start = run, start
        else:
            run = 0
    return best, best_start


def overfitting_check(records: Sequence[dict[str, Any]], *, patience: int = 3,
                      max_gap: float = 0.5) -> OverfittingResult:
    """The gap over time, the best step, and the reasons (if any) to suspect overfitting."""
    points = loss_gap(records)
    evals = [r for r in records if r.get("kind") == "eval"]
    best_step = evals[-1].get("best_step") if evals else None
    if best_step is None and points:
        best_step = min(points, key=lambda p: p.valid_loss).step
    best_valid = next((p.valid_loss for p in points if p.step == best_step), None)
    steps = [int(r["step"]) for r in records if "step" in r]
    reasons = []
    run, start = _diverging_run(points)
    if run >= patience:
        reasons.append(f"validation loss rose while train loss fell for {run} evaluations in a "
                       f"row from step {start}")
    last = next((p for p in reversed(points) if p.gap is not None), None)
    if last is not None and last.gap > max_gap:
        reasons.append(f"validation loss exceeds train loss by {last.gap:.3f} at step "
                       f"{last.step} (threshold {max_gap})")
    return OverfittingResult(points=points, best_step=best_step, best_valid_loss=best_valid,
                             last_step=max(steps) if steps else None, patience=patience,
                             max_gap=max_gap, reasons=reasons)


# What the loop logs beside an objective's own metrics: bookkeeping, not results.
_BOOKKEEPING = {"kind", "step", "epoch", "tokens", "tokens_per_s", "learning_rate", "grad_norm",
                "best_step"}


def training_metrics(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every named metric the objective logged (``train_*``, ``valid_*``): first, last, best.

    Whatever an objective emits (token accuracy, reward margins, ...) reaches the report this
    way, with no code here that knows its name. "best" is the value at the best step for
    validation metrics (or the last, when no best step was logged).
    """
    evals = [r for r in records if r.get("kind") == "eval"]
    best_step = evals[-1].get("best_step") if evals else None
    out: dict[str, dict[str, float]] = {}
    for kind in ("train", "eval"):
        rows = [r for r in records if r.get("kind") == kind]
        names = sorted({k for r in rows for k in r if k not in _BOOKKEEPING})
        for name in names:
            values = [(int(r.get("step", 0)), r[name]) for r in rows
                      if isinstance(r.get(name), int | float)]
            if not values:
                continue
            at_best = next((v for s, v in values if s == best_step), values[-1][1])
            out[name] = {"first": float(values[0][1]), "last": float(values[-1][1]),
                         "at_best_step": float(at_best)}
    return out
