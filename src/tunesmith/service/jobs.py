"""Fine-tuning jobs as the API sees them: create, read, list, and the user's state changes.

Status flow: validating_files -> queued -> running -> succeeded | failed | cancelled, and
running/queued <-> paused. A request only writes the new status; the worker holding the job
notices on its next check and stops the training process (see ``worker``).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunesmith.errors import ServiceError
from tunesmith.service.files import PURPOSES, get_file
from tunesmith.service.http_errors import bad_request, conflict, not_found
from tunesmith.service.models import base_for_training
from tunesmith.service.objects import checkpoint_object, event_object, job_object, page
from tunesmith.service.schemas import Hyperparameters, JobCreate
from tunesmith.service.settings import ServiceSettings
from tunesmith.service.store import Store
from tunesmith.service.tables import Checkpoint, Job, JobEvent, new_id, now

FINAL = ("succeeded", "failed", "cancelled")


def add_event(s: Session, job_id: str, message: str, *, level: str = "info",
              type: str = "message", data: dict[str, Any] | None = None,
              step: int | None = None) -> None:
    s.add(JobEvent(id=new_id("ftevent-"), job_id=job_id, created_at=now(), level=level,
                   type=type, message=message, data=data, step=step))


def _requested_hyperparameters(req: JobCreate) -> Hyperparameters:
    method = req.method
    if method is not None and method.type != "supervised":
        raise bad_request(f"fine-tuning method '{method.type}' is not supported yet; use "
                          "method.type 'supervised'", param="method.type",
                          code="unsupported_method")
    in_method = method.supervised.hyperparameters if method and method.supervised else None
    if in_method is not None and req.hyperparameters is not None:
        raise bad_request("give hyperparameters once, under method.supervised.hyperparameters "
                          "(the top-level field is the deprecated form)",
                          param="hyperparameters")
    return in_method or req.hyperparameters or Hyperparameters()


def _training_input(store: Store, org: str, file_id: str, param: str) -> str:
    try:
        row = get_file(store, org, file_id)
    except ServiceError:
        raise bad_request(f"invalid {param}: {file_id} (no such file)", param=param,
                          code="file_not_found") from None
    if row.purpose not in PURPOSES:
        raise bad_request(f"invalid {param}: {file_id} has purpose '{row.purpose}'; upload "
                          "training data with purpose 'fine-tune'", param=param)
    return row.id


def create_job(store: Store, settings: ServiceSettings, org: str, req: JobCreate
               ) -> dict[str, Any]:
    """Record a new job (validating_files); a worker validates, queues and trains it."""
    hp = _requested_hyperparameters(req)
    if req.integrations:
        raise bad_request("integrations are not supported by this server",
                          param="integrations")
    base_ref, base_name = base_for_training(store, settings, org, req.model)
    training = _training_input(store, org, req.training_file, "training_file")
    validation = (_training_input(store, org, req.validation_file, "validation_file")
                  if req.validation_file else None)
    job_id = new_id("ftjob-")
    job = Job(id=job_id, org=org, model=req.model, base_ref=base_ref, training_file=training,
              validation_file=validation, suffix=req.suffix or None,
              seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
              metadata_=req.metadata, hyperparameters=hp.model_dump(), status="validating_files",
              output_model=f"ft:{base_name}:{org}:{req.suffix or ''}:{job_id[-8:]}",
              result_files=[], created_at=now())
    with store.begin() as s:
        s.add(job)
        add_event(s, job_id, f"Created fine-tuning job: {job_id}")
        add_event(s, job_id, f"Validating training file: {training}"
                  + (f" and validation file: {validation}" if validation else ""))
    return job_object(job)


def owned_job(s: Session, org: str, job_id: str) -> Job:
    job = s.get(Job, job_id)
    if job is None or job.org != org:
        raise not_found("fine_tuning_job", job_id)
    return job


def get_job(store: Store, org: str, job_id: str) -> dict[str, Any]:
    with store.begin() as s:
        return job_object(owned_job(s, org, job_id))


def _matches(meta: dict[str, Any] | None, wanted: Mapping[str, str] | None) -> bool:
    if wanted is None:
        return True
    if not wanted:  # `metadata=null`: jobs without metadata
        return not meta
    return all((meta or {}).get(k) == v for k, v in wanted.items())


def list_jobs(store: Store, org: str, *, after: str | None, limit: int,
              metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """Newest first; ``metadata`` keeps jobs whose metadata holds every given pair."""
    with store.begin() as s:
        query = select(Job).where(Job.org == org).order_by(Job.order.desc(), Job.id.desc())
        if after:
            mark = owned_job(s, org, after)
            query = query.where((Job.order < mark.order) | (
                (Job.order == mark.order) & (Job.id < mark.id)))
        found: list[dict[str, Any]] = []
        for job in s.scalars(query.execution_options(yield_per=200)):
            if _matches(job.metadata_, metadata):
                found.append(job_object(job))
                if len(found) > limit:
                    break
    return page(found, limit)


def _transition(store: Store, org: str, job_id: str, allowed: tuple[str, ...], new: str,
                message: str, verb: str) -> dict[str, Any]:
    with store.begin() as s:
        job = owned_job(s, org, job_id)
        if job.status not in allowed:
            raise conflict(f"Job {job_id} is {job.status}; only a job that is "
                           f"{' or '.join(allowed)} can be {verb}", code=f"job_not_{verb}")
        job.status = new
        job.estimated_finish = None
        if new in FINAL:
            job.finished_at = now()
        add_event(s, job_id, message)
        return job_object(job)


def cancel_job(store: Store, org: str, job_id: str) -> dict[str, Any]:
    return _transition(store, org, job_id, ("validating_files", "queued", "running", "paused"),
                       "cancelled", "Job cancelled", "cancelled")


def pause_job(store: Store, org: str, job_id: str) -> dict[str, Any]:
    return _transition(store, org, job_id, ("queued", "running"), "paused",
                       "Job paused; checkpoints are kept and resume continues from the last",
                       "paused")


def resume_job(store: Store, org: str, job_id: str) -> dict[str, Any]:
    return _transition(store, org, job_id, ("paused",), "queued",
                       "Job resumed; it continues from its last checkpoint", "resumed")


def list_events(store: Store, org: str, job_id: str, *, after: str | None, limit: int
                ) -> dict[str, Any]:
    """Newest first, like OpenAI; ``after`` is the last event id of the previous page."""
    with store.begin() as s:
        owned_job(s, org, job_id)
        query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc())
        if after:
            mark = s.scalar(select(JobEvent.seq).where(JobEvent.id == after,
                                                       JobEvent.job_id == job_id))
            if mark is None:
                raise not_found("event", after, "after")
            query = query.where(JobEvent.seq < mark)
        rows = list(s.scalars(query.limit(limit + 1)))
    return page([event_object(e) for e in rows], limit)


def list_checkpoints(store: Store, org: str, job_id: str, *, after: str | None, limit: int
                     ) -> dict[str, Any]:
    """The checkpoints still on disk, newest first."""
    with store.begin() as s:
        owned_job(s, org, job_id)
        query = (select(Checkpoint).where(Checkpoint.job_id == job_id, ~Checkpoint.gone)
                 .order_by(Checkpoint.step_number.desc()))
        if after:
            mark = s.get(Checkpoint, after)
            if mark is None or mark.job_id != job_id:
                raise not_found("checkpoint", after, "after")
            query = query.where(Checkpoint.step_number < mark.step_number)
        rows = list(s.scalars(query.limit(limit + 1)))
    return page([checkpoint_object(c) for c in rows], limit)
