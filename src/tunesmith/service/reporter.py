"""The training callback of a job: turns the loop's events into job events and checkpoints.

Runs inside the training process and writes straight to the job store, so nothing is lost
when the server dies; the worker only supervises.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from tunesmith.service.jobs import add_event
from tunesmith.service.models import checkpoint_name
from tunesmith.service.plan import KEEP_CHECKPOINTS
from tunesmith.service.store import Store
from tunesmith.service.tables import Checkpoint, Job, JobEvent, new_id, now
from tunesmith.training.checkpoint import TrainState, list_checkpoints

# How often the progress fields of the job row are written, and its ownership re-checked: a
# pause or cancel takes effect within this time (a quarter second of small-model steps).
PROGRESS_EVERY_S = 0.25


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _named(metrics: dict[str, Any], prefix: str) -> dict[str, float | None]:
    """Every metric the objective named (e.g. ``train_reward_margin``), beside OpenAI's."""
    return {k: _finite(v) for k, v in metrics.items() if k.startswith(prefix)}


class JobReporter:
    """A tunesmith training callback (see ``tunesmith.training.callbacks``) for one job."""

    def __init__(self, store: Store, job_id: str, worker_id: str, *, checkpoint_dir: Path,
                 output_model: str) -> None:
        self.store, self.job_id, self.worker_id = store, job_id, worker_id
        self.checkpoint_dir, self.output_model = checkpoint_dir, output_model
        self.total_steps = 0
        # A step's event is written when the next step (or the evaluation of the same step)
        # comes, so an epoch's validation metrics land in that step's one metrics event.
        self.pending: dict[str, Any] | None = None
        self.started_at = time.time()
        self.first_step = 0
        self.last_progress = 0.0
        self.superseded = False

    # -------------------------------------------------------------- the callback protocol

    def on_train_begin(self, loop: Any) -> None:
        state, total_steps = loop.state, loop.total_steps
        self.total_steps, self.first_step = total_steps, state.step
        self.started_at = time.time()
        with self.store.begin() as s:
            s.execute(update(Job).where(Job.id == self.job_id)
                      .values(total_steps=total_steps, step=state.step))
            if state.step > 0:
                add_event(s, self.job_id, f"Resumed training from the checkpoint at step "
                          f"{state.step} of {total_steps}", data={"step": state.step})
            else:
                add_event(s, self.job_id, f"Training started: {total_steps} steps")
        self._sync_checkpoints()

    def on_step(self, loop: Any, metrics: dict[str, Any]) -> None:
        state = loop.state
        self._flush()
        self.pending = {"step": state.step, "total_steps": self.total_steps,
                        **_named(metrics, "train_"),
                        "train_loss": _finite(metrics.get("train_loss")),
                        "train_mean_token_accuracy": _finite(
                            metrics.get("train_token_accuracy"))}
        if time.time() - self.last_progress >= PROGRESS_EVERY_S:
            if not self._progress(state):
                # cancelled, paused or taken over: the loop stops after this step, writes its
                # checkpoint and returns; the run flow then ends without evaluating. The job's
                # rows are no longer ours to write, so its checkpoints are not listed either.
                self.superseded = True
                loop.control.stop("superseded")
                return
            self._sync_checkpoints()

    def on_evaluate(self, loop: Any, metrics: dict[str, Any]) -> None:
        state = loop.state
        loss = _finite(metrics.get("valid_loss"))
        accuracy = _finite(metrics.get("valid_token_accuracy"))
        if self.pending is None or self.pending["step"] != state.step:
            if state.step == 0:
                self._event(f"Validation loss before training: {loss}", level="info")
            return
        self.pending.update(_named(metrics, "valid_"))
        self.pending.update(valid_loss=loss, valid_mean_token_accuracy=accuracy,
                            full_valid_loss=loss, full_valid_mean_token_accuracy=accuracy)
        if "epsilon" in metrics:  # differential privacy: the budget spent so far
            self.pending["epsilon"] = _finite(metrics["epsilon"])
        self._flush()

    def on_train_end(self, loop: Any) -> None:
        state = loop.state
        # The last step trained is in the checkpoint the loop writes as it stops, and a
        # resumed job continues after it: its metrics event is written now or never (a paused
        # job's chart would miss that step). The job row itself is no longer ours to write.
        self._flush()
        if self.superseded:
            return
        with self.store.begin() as s:
            s.execute(update(Job).where(Job.id == self.job_id)
                      .values(trained_tokens=state.tokens_seen, step=state.step))
        self._sync_checkpoints()

    # -------------------------------------------------------------- helpers

    def _event(self, message: str, *, level: str = "info") -> None:
        with self.store.begin() as s:
            add_event(s, self.job_id, message, level=level)

    def _flush(self) -> None:
        if self.pending is None:
            return
        m, self.pending = self.pending, None
        text = f"Step {m['step']}/{m['total_steps']}: training loss={m['train_loss']:.4f}" \
            if m["train_loss"] is not None else f"Step {m['step']}/{m['total_steps']}"
        if m.get("valid_loss") is not None:
            text += f", validation loss={m['valid_loss']:.4f}"
        with self.store.begin() as s:
            add_event(s, self.job_id, text, type="metrics",
                      data={k: v for k, v in m.items() if v is not None}, step=m["step"])

    def _progress(self, state: TrainState) -> bool:
        """Write step and estimated finish; False when the job is no longer ours to train."""
        self.last_progress = time.time()
        done = state.step - self.first_step
        eta = None
        if done > 0 and self.total_steps:
            per_step = (time.time() - self.started_at) / done
            eta = int(time.time() + per_step * (self.total_steps - state.step))
        with self.store.begin() as s:
            owned = s.execute(
                update(Job).where(Job.id == self.job_id, Job.worker_id == self.worker_id,
                                  Job.status == "running")
                .values(step=state.step, estimated_finish=eta)).rowcount
        return bool(owned)

    def _sync_checkpoints(self) -> None:
        """Mirror the run's last checkpoint directories (step > 0) into the store.

        The loop also keeps the best checkpoint on disk (the final model is made from it);
        the API shows the last ``KEEP_CHECKPOINTS``, as OpenAI does.
        """
        steps = sorted(int(p.name.split("-", 1)[1]) for p in list_checkpoints(
            self.checkpoint_dir))
        # step 0 is the untrained starting point, kept only for the loss curve
        on_disk = {s for s in steps if s > 0}
        on_disk = set(sorted(on_disk)[-KEEP_CHECKPOINTS:])
        with self.store.begin() as s:
            known = {c.step_number: c for c in s.scalars(
                select(Checkpoint).where(Checkpoint.job_id == self.job_id))}
            for step in sorted(on_disk - set(known)):
                s.add(Checkpoint(id=new_id("ftckpt-"), job_id=self.job_id, step_number=step,
                                 model_name=checkpoint_name(self.output_model, step),
                                 metrics=self._metrics_at(s, step), created_at=now()))
                add_event(s, self.job_id, f"Checkpoint created at step {step}",
                          data={"step": step})
            for step, ckpt in known.items():
                ckpt.gone = ckpt.gone or step not in on_disk

    def _metrics_at(self, s: Any, step: int) -> dict[str, Any]:
        data = s.scalar(select(JobEvent.data).where(
            JobEvent.job_id == self.job_id, JobEvent.type == "metrics", JobEvent.step == step)
            .order_by(JobEvent.seq.desc()).limit(1)) or {}
        keys = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss",
                "valid_mean_token_accuracy", "full_valid_loss", "full_valid_mean_token_accuracy")
        return {k: data[k] for k in keys if k in data} | {"step": step}
