"""Rows as the JSON objects of OpenAI's API (the shapes the official client parses)."""

from __future__ import annotations

from typing import Any

from tunesmith.service.tables import Checkpoint, Job, JobEvent, StoredFile

OWNED_BY_SERVER = "tunesmith"


def page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """A cursor page; ``items`` holds up to ``limit + 1`` objects, the extra one means more."""
    data = items[:limit]
    return {"object": "list", "data": data, "has_more": len(items) > limit,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def file_object(row: StoredFile) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": row.created_at,
            "filename": row.filename, "purpose": row.purpose, "status": "processed",
            "status_details": None, "expires_at": None}


def organization_id(org: str) -> str:
    return f"org-{org}"


def method_type(hyperparameters: dict[str, Any]) -> str:
    """'dpo' or 'supervised'. A job keeps its method in its hyperparameters (no column of its
    own, so stores made before DPO need no migration): only DPO has ``beta``."""
    return "dpo" if "beta" in hyperparameters else "supervised"


def method_object(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``method``: ``{"type": "dpo", "dpo": {"hyperparameters": {...}}}``; a private
    supervised job's section also holds its ``privacy`` settings (tunesmith's extension)."""
    kind = method_type(hyperparameters)
    hp = dict(hyperparameters)
    section: dict[str, Any] = {"hyperparameters": hp}
    if "privacy" in hp:
        section["privacy"] = hp.pop("privacy")
    return {"type": kind, kind: section}


def job_object(job: Job) -> dict[str, Any]:
    method = method_object(job.hyperparameters)
    # the top-level field is OpenAI's deprecated supervised form: the three shared values
    hp = {k: v for k, v in job.hyperparameters.items() if k not in ("beta", "privacy")}
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": job.created_at,
        "error": job.error, "fine_tuned_model": job.output_model if job.status == "succeeded"
        else None, "finished_at": job.finished_at, "hyperparameters": hp, "model": job.model,
        "organization_id": organization_id(job.org), "result_files": list(job.result_files),
        "seed": job.seed, "status": job.status, "trained_tokens": job.trained_tokens,
        "training_file": job.training_file, "validation_file": job.validation_file,
        "estimated_finish": job.estimated_finish if job.status == "running" else None,
        "integrations": [], "metadata": job.metadata_, "suffix": job.suffix,
        "method": method,
        "user_provided_suffix": job.suffix,
        # tunesmith's extension: the (epsilon, delta) a private job spent, once it succeeded
        "privacy": job.privacy if job.status == "succeeded" else None,
        # and the energy (kWh) and emissions (kg CO2e) its run measured (metrics.json)
        "energy": job.energy if job.status == "succeeded" else None,
    }


def event_object(event: JobEvent) -> dict[str, Any]:
    return {"id": event.id, "object": "fine_tuning.job.event", "created_at": event.created_at,
            "level": event.level, "message": event.message, "type": event.type,
            "data": event.data or {}}


def checkpoint_object(ckpt: Checkpoint) -> dict[str, Any]:
    return {"id": ckpt.id, "object": "fine_tuning.job.checkpoint",
            "created_at": ckpt.created_at, "fine_tuned_model_checkpoint": ckpt.model_name,
            "fine_tuning_job_id": ckpt.job_id, "step_number": ckpt.step_number,
            "metrics": ckpt.metrics}


def model_object(model_id: str, *, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
