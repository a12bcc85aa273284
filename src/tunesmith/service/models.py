"""Model names: the configured base models, an org's fine-tuned models and their checkpoints.

A fine-tuned model is ``ft:{base}:{org}:{suffix}:{short id}`` (OpenAI's scheme) and lives in
its job's run directory; a checkpoint adds ``:ckpt-step-N``. Other orgs' names answer 404.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select

from tunesmith.errors import ConfigError, ServiceError
from tunesmith.service.http_errors import bad_request
from tunesmith.service.objects import OWNED_BY_SERVER, model_object, organization_id
from tunesmith.service.settings import ServiceSettings
from tunesmith.service.store import Store
from tunesmith.service.tables import Checkpoint, Job

_STARTED = int(time.time())


@dataclass(frozen=True)
class ModelSource:
    """Where a servable model's weights come from."""

    name: str
    kind: Literal["base", "fine-tune", "checkpoint"]
    ref: str
    """base: a model reference; fine-tune and checkpoint: the job's run directory."""
    step: int | None = None
    owner: str = OWNED_BY_SERVER
    created: int = _STARTED


def model_not_found(model_id: str, param: str | None = None) -> ServiceError:
    return ServiceError(f"The model '{model_id}' does not exist or you do not have access to "
                        "it.", status=404, code="model_not_found", param=param)


def fine_tune_name(base: str, org: str, suffix: str | None, job_id: str) -> str:
    """``ft:{base}:{org}:{suffix}:{short id}``, OpenAI's name of a job's fine-tuned model."""
    return f"ft:{base}:{org}:{suffix or ''}:{job_id[-8:]}"


def fine_tune_parts(model_id: str) -> tuple[str, str]:
    """(base name, org) of a fine-tuned model's name; a ConfigError when it is not one."""
    parts = model_id.split(":")
    if len(parts) != 5 or parts[0] != "ft" or not parts[1] or not parts[2]:
        raise ConfigError(f"{model_id!r}: a fine-tuned model's id is ft:BASE:ORG:SUFFIX:ID "
                          "(see GET /v1/models)")
    return parts[1], parts[2]


def fine_tune_job(s: Any, org: str, model_id: str) -> Job | None:
    job = s.scalar(select(Job).where(Job.output_model == model_id, Job.org == org))
    ok = job is not None and job.status == "succeeded" and not job.model_deleted
    return job if ok else None


def find_model(store: Store, settings: ServiceSettings, org: str, model_id: str,
               param: str | None = None) -> ModelSource:
    """The model ``model_id`` as ``org`` may use it, or a 404."""
    if model_id in settings.base_models:
        return ModelSource(model_id, "base", settings.base_models[model_id])
    with store.begin() as s:
        job = fine_tune_job(s, org, model_id)
        if job is not None:
            return ModelSource(model_id, "fine-tune", str(settings.runs_dir / job.id),
                               owner=organization_id(org),
                               created=job.finished_at or job.created_at)
        ckpt = s.scalar(select(Checkpoint).where(Checkpoint.model_name == model_id,
                                                 ~Checkpoint.gone))
        job = s.get(Job, ckpt.job_id) if ckpt is not None else None
        if ckpt is not None and job is not None and job.org == org:
            return ModelSource(model_id, "checkpoint", str(settings.runs_dir / job.id),
                               step=ckpt.step_number,
                               owner=organization_id(org), created=ckpt.created_at)
    raise model_not_found(model_id, param)


def base_for_training(store: Store, settings: ServiceSettings, org: str, model_id: str
                      ) -> tuple[str, str]:
    """(reference a worker resolves, base name for ``ft:{base}:...``) of a job's model."""
    try:
        source = find_model(store, settings, org, model_id, "model")
    except ServiceError:
        raise bad_request(f"Model '{model_id}' is not available for fine-tuning or does not "
                          f"exist; available: {', '.join(settings.base_models)} or one of "
                          "your fine-tuned models", param="model",
                          code="model_not_available") from None
    if source.kind == "checkpoint":
        raise bad_request("a checkpoint cannot be fine-tuned further; use the job's "
                          "fine-tuned model", param="model", code="model_not_available")
    if source.kind == "fine-tune":
        return source.ref, fine_tune_parts(model_id)[0]
    return source.ref, model_id


def list_models(store: Store, settings: ServiceSettings, org: str) -> dict[str, Any]:
    data = [model_object(name, created=_STARTED, owned_by=OWNED_BY_SERVER)
            for name in settings.base_models]
    with store.begin() as s:
        jobs = s.scalars(select(Job).where(Job.org == org, Job.status == "succeeded",
                                           ~Job.model_deleted).order_by(Job.finished_at))
        data += [model_object(j.output_model, created=j.finished_at or j.created_at,
                              owned_by=organization_id(org)) for j in jobs]
    return {"object": "list", "data": data}


def model_info(store: Store, settings: ServiceSettings, org: str, model_id: str
               ) -> dict[str, Any]:
    source = find_model(store, settings, org, model_id)
    return model_object(source.name, created=source.created, owned_by=source.owner)


def delete_model(store: Store, settings: ServiceSettings, org: str, model_id: str
                 ) -> dict[str, Any]:
    """Delete a fine-tuned model (its merged weights) or hide a checkpoint; base models stay."""
    source = find_model(store, settings, org, model_id)
    if source.kind == "base":
        raise ServiceError(f"'{model_id}' is a base model of this server; only fine-tuned "
                           "models can be deleted", status=403, code="permission_denied")
    with store.begin() as s:
        if source.kind == "fine-tune":
            job = s.scalar(select(Job).where(Job.output_model == model_id))
            job.model_deleted = True
        else:
            ckpt = s.scalar(select(Checkpoint).where(Checkpoint.model_name == model_id))
            ckpt.gone = True
    if source.kind == "fine-tune":
        for part in ("merged", "adapter"):
            shutil.rmtree(Path(source.ref) / part, ignore_errors=True)
    return {"id": model_id, "object": "model", "deleted": True}


def checkpoint_name(output_model: str, step: int) -> str:
    return f"{output_model}:ckpt-step-{step}"

