"""The HTTP routes: each parses, checks the key, and calls one function of the service."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tunesmith.service import audit, files, jobs, models
from tunesmith.service.auth import org_for_key
from tunesmith.service.context import Service, get_service
from tunesmith.service.http_errors import bad_request
from tunesmith.service.schemas import ChatRequest, FeedbackCreate, JobCreate
from tunesmith.service.upload import receive_upload, too_large

router = APIRouter()
_bearer = HTTPBearer(auto_error=False, description="An API key from `tunesmith keys create`")
Svc = Annotated[Service, Depends(get_service)]


def current_org(svc: Svc, creds: Annotated[HTTPAuthorizationCredentials | None,
                                           Depends(_bearer)]) -> str:
    header = f"{creds.scheme} {creds.credentials}" if creds else None
    return org_for_key(svc.store, header)


Org = Annotated[str, Depends(current_org)]
After = Annotated[str | None, Query(description="The last id of the previous page.")]


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """``metadata[k]=v`` query pairs; ``metadata=null`` selects jobs without metadata."""
    if request.query_params.get("metadata") == "null":
        return {}
    pairs = {k[len("metadata["):-1]: v for k, v in request.query_params.multi_items()
             if k.startswith("metadata[") and k.endswith("]")}
    return pairs or None


@router.get("/health", include_in_schema=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


# ------------------------------------------------------------------------------- files


@router.post("/v1/files", tags=["files"])
async def upload_file(request: Request, svc: Svc, org: Org) -> dict[str, Any]:
    """Upload a chat JSONL file (multipart: file, purpose=fine-tune); validated on arrival."""
    limit = svc.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise too_large(limit)
    upload = await receive_upload(request.headers.get("content-type"), request.stream(),
                                  temp_dir=svc.settings.files_dir, limit=limit)
    if upload.file_path is None:
        raise bad_request("the form has no 'file' part", param="file")
    return await run_in_threadpool(files.save_upload, svc.store, svc.settings.files_dir, org,
                                   upload)


@router.get("/v1/files", tags=["files"])
def list_files(svc: Svc, org: Org, after: After = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
               order: Literal["asc", "desc"] = "desc", purpose: str | None = None
               ) -> dict[str, Any]:
    return files.list_files(svc.store, org, after=after, limit=limit, order=order,
                            purpose=purpose)


@router.get("/v1/files/{file_id}", tags=["files"])
def retrieve_file(file_id: str, svc: Svc, org: Org) -> dict[str, Any]:
    return files.file_object(files.get_file(svc.store, org, file_id))


@router.get("/v1/files/{file_id}/content", tags=["files"])
def file_content(file_id: str, svc: Svc, org: Org) -> FileResponse:
    row = files.get_file(svc.store, org, file_id)
    return FileResponse(svc.settings.files_dir / row.id, filename=row.filename,
                        media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", tags=["files"])
def delete_file(file_id: str, svc: Svc, org: Org) -> dict[str, Any]:
    return files.delete_file(svc.store, svc.settings.files_dir, org, file_id)


# ------------------------------------------------------------------------------- jobs


@router.post("/v1/fine_tuning/jobs", tags=["fine-tuning"])
def create_job(body: JobCreate, svc: Svc, org: Org) -> dict[str, Any]:
    return jobs.create_job(svc.store, svc.settings, org, body)


@router.get("/v1/fine_tuning/jobs", tags=["fine-tuning"])
def list_jobs(request: Request, svc: Svc, org: Org, after: After = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    return jobs.list_jobs(svc.store, org, after=after, limit=limit,
                          metadata=_metadata_filter(request))


@router.get("/v1/fine_tuning/jobs/{job_id}", tags=["fine-tuning"])
def retrieve_job(job_id: str, svc: Svc, org: Org) -> dict[str, Any]:
    return jobs.get_job(svc.store, org, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", tags=["fine-tuning"])
def cancel_job(job_id: str, svc: Svc, org: Org) -> dict[str, Any]:
    return jobs.cancel_job(svc.store, org, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/pause", tags=["fine-tuning"])
def pause_job(job_id: str, svc: Svc, org: Org) -> dict[str, Any]:
    return jobs.pause_job(svc.store, org, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/resume", tags=["fine-tuning"])
def resume_job(job_id: str, svc: Svc, org: Org) -> dict[str, Any]:
    return jobs.resume_job(svc.store, org, job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/events", tags=["fine-tuning"])
def list_events(job_id: str, svc: Svc, org: Org, after: After = None,
                limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    return jobs.list_events(svc.store, org, job_id, after=after, limit=limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", tags=["fine-tuning"])
def list_checkpoints(job_id: str, svc: Svc, org: Org, after: After = None,
                     limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
    return jobs.list_checkpoints(svc.store, org, job_id, after=after, limit=limit)


# ------------------------------------------------------------------------------- models, chat


@router.get("/v1/models", tags=["models"])
def list_models(svc: Svc, org: Org) -> dict[str, Any]:
    return models.list_models(svc.store, svc.settings, org)


@router.get("/v1/models/{model_id}", tags=["models"])
def retrieve_model(model_id: str, svc: Svc, org: Org) -> dict[str, Any]:
    return models.model_info(svc.store, svc.settings, org, model_id)


@router.delete("/v1/models/{model_id}", tags=["models"])
def delete_model(model_id: str, svc: Svc, org: Org) -> dict[str, Any]:
    deleted = models.delete_model(svc.store, svc.settings, org, model_id)
    svc.cache.forget(model_id)
    return deleted


@router.post("/v1/chat/completions", tags=["chat"], response_model=None)
def chat_completions(body: ChatRequest, svc: Svc, org: Org
                     ) -> dict[str, Any] | StreamingResponse:
    if body.stream:
        # no-cache and no proxy buffering: each chunk must reach the client as it is made
        return StreamingResponse(svc.chat.stream(org, body), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    return svc.chat.complete(org, body)


@router.post("/v1/feedback", tags=["feedback"])
def feedback(body: FeedbackCreate, svc: Svc, org: Org) -> dict[str, Any]:
    """Rate a logged chat completion and/or correct it (tunesmith's extension)."""
    return audit.add_feedback(svc.store, org, body)
