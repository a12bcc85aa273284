"""A job whose training left warnings (e.g. the best model is the untrained start) says so in
its events, at warn level, beside the usual success events."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import queued_job, start_job
from tunesmith.service.jobs import list_events
from tunesmith.service.tables import Job
from tunesmith.service.worker import Worker


def test_a_successful_job_carries_the_runs_warnings(tmp_path: Path, tiny_model_dir: Path,
                                                    test_home: Path) -> None:
    settings, store, job_id = queued_job(tmp_path / "svc", tiny_model_dir, test_home)
    worker = Worker(settings, store)
    start_job(store, job_id, worker.id)
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
