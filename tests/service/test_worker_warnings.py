"""A job whose training left warnings (e.g. the best model is the untrained start) says so in
its events, at warn level, beside the usual success events."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import jsonl_bytes, review_rows
from tunesmith.service import ServiceSettings, Store, queue
from tunesmith.service.jobs import create_job, list_events
from tunesmith.service.schemas import JobCreate
from tunesmith.service.tables import Job, StoredFile
from tunesmith.service.worker import Worker


def test_a_successful_job_carries_the_runs_warnings(tmp_path: Path, tiny_model_dir: Path,
                                                    test_home: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path / "svc", home=test_home,
                               base_models={"tiny": str(tiny_model_dir)})
    store = Store(settings.url)
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    (settings.files_dir / "file-t").write_bytes(jsonl_bytes(review_rows(12)))
    with store.begin() as s:
        s.add(StoredFile(id="file-t", org="acme", filename="t.jsonl", purpose="fine-tune",
                         bytes=1, examples=12))
    job_id = create_job(store, settings, "acme", JobCreate(model="tiny",
                                                             training_file="file-t"))["id"]
    worker = Worker(settings, store)
    assert queue.claim_next(store, worker.id, lease_seconds=30).job_id == job_id
    assert queue.set_status(store, job_id, worker.id, "running", expect=("validating_files",))
    run_dir = settings.runs_dir / job_id
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "train_loss": 1.0}\n')
    with store.begin() as s:
        job = s.get(Job, job_id)
    warning = ("training never improved on the starting point: the best validation loss was "
               "at step 0, so the saved model is the untrained one")
    worker._succeed(job, {"ok": True, "tuned": {"n": 2, "accuracy": 0.5},
                          "warnings": [warning]})
    events = list_events(store, "acme", job_id, after=None, limit=50)["data"]
    warned = [e for e in events if e["level"] == "warn"]
    assert [e["message"] for e in warned] == [f"Warning: {warning}"]
    assert warned[0]["data"] == {"warning": warning}
    assert any(e["message"] == "The job has successfully completed" for e in events)
