"""Files: uploads validated with tunesmith's data checks, stored on disk, listed.

A fine-tuning file holds OpenAI chat examples (supervised jobs) or OpenAI preference pairs (DPO
jobs); which one is told by its first rows, and every row is checked as that kind with the
row checks of ``tunesmith data validate`` (``tunesmith.data.formats.iter_records``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tunesmith.data.formats import ReadOptions, detect_format, iter_records
from tunesmith.data.rejects import Rejected
from tunesmith.errors import DataError, Problem, ServiceError
from tunesmith.service.http_errors import bad_request, not_found
from tunesmith.service.objects import file_object, page
from tunesmith.service.store import Store
from tunesmith.service.tables import StoredFile, new_id, now
from tunesmith.service.upload import Upload

PURPOSES = ("fine-tune",)
RESULTS_PURPOSE = "fine-tune-results"


# what each kind of file holds, for messages: its name, and its name with its keys
KIND_NAMES = {"chat": "chat examples", "preference": "preference pairs"}
KINDS = {"chat": 'chat examples ({"messages": [...]})',
         "preference": "preference pairs (input, preferred_output, non_preferred_output)"}
EXAMPLE_LINES = {
    "chat": '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}',
    "preference": '{"input": {"messages": [{"role": "user", ...}]}, "preferred_output": '
                  '[{"role": "assistant", ...}], "non_preferred_output": [{"role": '
                  '"assistant", ...}]}'}


def file_kind(path: Path) -> str:
    """'preference' for a file of OpenAI preference pairs, else 'chat' (a file that is neither
    is checked as chat data, so its problems are reported as chat problems)."""
    try:
        return "preference" if detect_format(path) == "preference" else "chat"
    except DataError:  # keys of no known format
        return "chat"


def validate_training_file(path: Path, display_name: str) -> tuple[int, str]:
    """The number of examples and the kind of a fine-tuning file (JSONL), or a 400 naming
    every bad line and field."""
    kind = file_kind(path)
    problems: list[Problem] = []
    examples = 0
    for item in iter_records(path, ReadOptions(format=kind)):
        if isinstance(item, Rejected):
            problems.extend(item.problems)
        else:
            examples += 1
    if problems:
        err = DataError(f"{display_name}: {len(problems)} problem(s) in the data (read as "
                        f"{KINDS[kind]}); fix these lines and upload again", path=display_name,
                        problems=problems)
        raise ServiceError(str(err), status=400, code="invalid_file_format", param="file")
    if examples == 0:
        raise bad_request(f"{display_name}: the file is empty; expected one JSON object per "
                          f"line like {EXAMPLE_LINES['chat']} (or, for DPO, "
                          f"{EXAMPLE_LINES['preference']})", param="file",
                          code="invalid_file_format")
    return examples, kind


def save_upload(store: Store, files_dir: Path, org: str, upload: Upload) -> dict[str, Any]:
    """Validate an uploaded file and keep it; the temporary file is moved or removed."""
    path = upload.file_path
    if path is None:
        raise bad_request("the form has no 'file' part", param="file")
    try:
        purpose = upload.fields.get("purpose")
        if purpose not in PURPOSES:
            raise bad_request(f"purpose {purpose!r} is not supported here; use 'fine-tune'",
                              param="purpose")
        examples, _ = validate_training_file(path, upload.filename or "upload.jsonl")
        file_id = new_id("file-")
        final = files_dir / file_id
        os.replace(path, final)
    finally:
        path.unlink(missing_ok=True)
    row = StoredFile(id=file_id, org=org, filename=upload.filename or "upload.jsonl",
                     purpose=purpose, bytes=upload.size, examples=examples, created_at=now())
    with store.begin() as s:
        s.add(row)
    return file_object(row)


def add_file(store: Store, files_dir: Path, org: str, *, filename: str, purpose: str,
             content: bytes) -> StoredFile:
    """Store a file the service made (a job's results), written atomically."""
    file_id = new_id("file-")
    files_dir.mkdir(parents=True, exist_ok=True)
    tmp = files_dir / f".{file_id}.tmp"
    with tmp.open("wb") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, files_dir / file_id)
    row = StoredFile(id=file_id, org=org, filename=filename, purpose=purpose,
                     bytes=len(content), created_at=now())
    with store.begin() as s:
        s.add(row)
    return row


def get_file(store: Store, org: str, file_id: str, *, param: str | None = None) -> StoredFile:
    with store.begin() as s:
        row = s.get(StoredFile, file_id)
    if row is None or row.org != org:
        raise not_found("file", file_id, param)
    return row


def list_files(store: Store, org: str, *, after: str | None, limit: int, order: str,
               purpose: str | None) -> dict[str, Any]:
    newest_first = order == "desc"
    key = (StoredFile.order.desc(), StoredFile.id.desc()) if newest_first else (
        StoredFile.order.asc(), StoredFile.id.asc())
    with store.begin() as s:
        query = select(StoredFile).where(StoredFile.org == org).order_by(*key)
        if purpose:
            query = query.where(StoredFile.purpose == purpose)
        if after:
            mark = s.get(StoredFile, after)
            if mark is None or mark.org != org:
                raise not_found("file", after, "after")
            cmp = (StoredFile.order < mark.order) | (
                (StoredFile.order == mark.order) & (StoredFile.id < mark.id))
            if not newest_first:
                cmp = (StoredFile.order > mark.order) | (
                    (StoredFile.order == mark.order) & (StoredFile.id > mark.id))
            query = query.where(cmp)
        rows = list(s.scalars(query.limit(limit + 1)))
    return page([file_object(r) for r in rows], limit)


def delete_file(store: Store, files_dir: Path, org: str, file_id: str) -> dict[str, Any]:
    row = get_file(store, org, file_id)
    with store.begin() as s:
        s.delete(s.get(StoredFile, row.id))
    (files_dir / row.id).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
