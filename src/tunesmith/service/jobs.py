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
from tunesmith.service.files import KIND_NAMES, KINDS, PURPOSES, file_kind, get_file
from tunesmith.service.http_errors import bad_request, conflict, not_found
from tunesmith.service.models import base_for_training, fine_tune_name
from tunesmith.service.objects import (
    checkpoint_object,
    event_object,
    job_object,
    method_type,
    page,
)
from tunesmith.service.plan import JobDataError, PrivacyPlanError, check_job_data, plan_run
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


METHODS = ("supervised", "dpo", "reinforcement")
# the kind of file each method trains on (see ``files.file_kind``)
FILE_KIND = {"supervised": "chat", "dpo": "preference"}


def requested_hyperparameters(req: JobCreate) -> dict[str, Any]:
    """The job's hyperparameters as asked ('auto' where not given); a DPO job's have ``beta``,
    a private supervised job's ``privacy`` (the settings of ``method.supervised.privacy``).

    They come from ``method.<type>.hyperparameters`` or from the deprecated top-level field,
    never both. Only the section of the method ``type`` names may be given.
    """
    method = req.method
    kind = method.type if method is not None else "supervised"
    if kind not in FILE_KIND:
        raise bad_request(f"fine-tuning method '{kind}' is not supported yet; use method.type "
                          "'supervised' (chat examples) or 'dpo' (preference pairs)",
                          param="method.type", code="unsupported_method")
    for other in METHODS:
        if other != kind and method is not None and getattr(method, other) is not None:
            raise bad_request(f"method.type is '{kind}', but method.{other} is given; put the "
                              f"hyperparameters under method.{kind}.hyperparameters",
                              param=f"method.{other}")
    section = getattr(method, kind) if method is not None else None
    in_method = section.hyperparameters if section is not None else None
    if in_method is not None and req.hyperparameters is not None:
        raise bad_request(f"give hyperparameters once, under method.{kind}.hyperparameters "
                          "(the top-level field is the deprecated form)",
                          param="hyperparameters")
    values = (in_method or req.hyperparameters or Hyperparameters()).model_dump()
    if kind == "dpo":
        values.setdefault("beta", "auto")  # the top-level form has no beta
        if section is not None and section.privacy is not None:
            raise bad_request("differential privacy (method.dpo.privacy) works with supervised "
                              "jobs only: DP-SGD clips each example's gradient, and a "
                              "preference pair spans two rows; train a supervised job with "
                              "method.supervised.privacy, or leave privacy out of the DPO job",
                              param="method.dpo.privacy", code="unsupported_method")
    elif section is not None and section.privacy is not None:
        values["privacy"] = section.privacy.model_dump(mode="json", exclude_none=True)
    return values


def _check_private_job(settings: ServiceSettings, req: JobCreate, job_id: str,
                       base_ref: str, hp: dict[str, Any], seed: int, training: str,
                       validation: str | None) -> None:
    """Plan a private job now, as its worker will, so privacy settings that cannot work
    with its data answer 400 naming the field. Problems of the data itself are left to the
    worker, which reports them for every job alike."""
    method = req.method
    in_method = method is not None and method.supervised is not None \
        and method.supervised.hyperparameters is not None
    files = settings.files_dir
    train_path, valid_path = files / training, files / validation if validation else None
    try:
        task = check_job_data(train_path, valid_path, "supervised")
        plan_run(job_id=job_id, run_dir=settings.runs_dir / job_id, base_ref=base_ref,
                 train_path=train_path, valid_path=valid_path, requested=hp, task=task,
                 seed=seed, max_eval_examples=settings.max_eval_examples,
                 energy=settings.energy,
                 hyperparameters_param=("method.supervised.hyperparameters" if in_method
                                        or req.hyperparameters is None else "hyperparameters"))
    except PrivacyPlanError as err:
        raise bad_request(str(err), param=err.param, code=err.code) from None
    except JobDataError:
        pass


def _training_input(store: Store, settings: ServiceSettings, org: str, file_id: str,
                    param: str, method: str) -> str:
    try:
        row = get_file(store, org, file_id)
    except ServiceError:
        raise bad_request(f"invalid {param}: {file_id} (no such file)", param=param,
                          code="file_not_found") from None
    if row.purpose not in PURPOSES:
        raise bad_request(f"invalid {param}: {file_id} has purpose '{row.purpose}'; upload "
                          "training data with purpose 'fine-tune'", param=param)
    path = settings.files_dir / row.id
    wanted = FILE_KIND[method]
    # a file gone from disk is reported by the worker, which checks every file again
    found = file_kind(path) if path.is_file() else wanted
    if found != wanted:
        fix = ("upload a file of preference pairs, or use method.type 'supervised' to train "
               "on chat examples" if method == "dpo" else
               "use method.type 'dpo' to train on preference pairs, or upload chat examples")
        raise bad_request(f"invalid {param}: {file_id} holds {KIND_NAMES[found]}; a {method} job "
                          f"needs {KINDS[wanted]}: {fix}", param=param,
                          code="invalid_file_format")
    return row.id


def create_job(store: Store, settings: ServiceSettings, org: str, req: JobCreate
               ) -> dict[str, Any]:
    """Record a new job (validating_files); a worker validates, queues and trains it."""
    hp = requested_hyperparameters(req)
    method = method_type(hp)
    if req.integrations:
        raise bad_request("integrations are not supported by this server",
                          param="integrations")
    base_ref, base_name = base_for_training(store, settings, org, req.model)
    training = _training_input(store, settings, org, req.training_file, "training_file",
                               method)
    validation = (_training_input(store, settings, org, req.validation_file,
                                  "validation_file", method)
                  if req.validation_file else None)
    job_id = new_id("ftjob-")
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    if "privacy" in hp:
        _check_private_job(settings, req, job_id, base_ref, hp, seed, training, validation)
    job = Job(id=job_id, org=org, model=req.model, base_ref=base_ref, training_file=training,
              validation_file=validation, suffix=req.suffix or None, seed=seed,
              metadata_=req.metadata, hyperparameters=hp, status="validating_files",
              output_model=fine_tune_name(base_name, org, req.suffix, job_id),
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
