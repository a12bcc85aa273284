"""Job claims and leases (the store alone), and the worker turning a crash into a failed job."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql

from tests.helpers import jsonl_bytes, review_rows, training_children, wait_for
from tunesmith.service import ServiceSettings, Store, queue
from tunesmith.service.jobs import cancel_job, create_job, get_job, list_events
from tunesmith.service.schemas import JobCreate
from tunesmith.service.tables import Job, StoredFile
from tunesmith.service.worker import Worker, start_worker_thread


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path, tiny_model_dir: Path,
             test_home: Path) -> ServiceSettings:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return ServiceSettings(data_dir=tmp_path / "svc", home=test_home, database_url=url,
                           base_models={"tiny": str(tiny_model_dir),
                                        "broken": str(tmp_path)},
                           lease_seconds=30, poll_seconds=0.2, torch_threads=1)


def add_training_file(store: Store, settings: ServiceSettings, n: int = 12) -> str:
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    (settings.files_dir / f"file-t{n}").write_bytes(jsonl_bytes(review_rows(n)))
    with store.begin() as s:
        s.add(StoredFile(id=f"file-t{n}", org="acme", filename="t.jsonl", purpose="fine-tune",
                         bytes=1, examples=n))
    return f"file-t{n}"


def new_job(store: Store, settings: ServiceSettings, model: str = "tiny", n: int = 12,
            epochs: int = 1) -> str:
    file_id = add_training_file(store, settings, n)
    req = JobCreate(model=model, training_file=file_id,
                    hyperparameters={"n_epochs": epochs, "batch_size": 4})
    return create_job(store, settings, "acme", req)["id"]


def test_claims_are_fifo_exclusive_and_leased(settings: ServiceSettings) -> None:
    store = Store(settings.url)
    first, second = new_job(store, settings), new_job(store, settings, n=13)
    a = queue.claim_next(store, "w-a", lease_seconds=30)
    b = queue.claim_next(store, "w-b", lease_seconds=30)
    assert (a.job_id, b.job_id) == (first, second)
    assert queue.claim_next(store, "w-c", lease_seconds=30) is None  # both are held
    assert queue.set_status(store, first, "w-a", "running", expect=("validating_files",))
    assert not queue.set_status(store, first, "w-b", "succeeded", expect=("running",))
    assert queue.renew(store, first, "w-a", 30) and not queue.renew(store, first, "w-b", 30)

    # a worker that stops renewing loses the job to the next one, which resumes it
    with store.begin() as s:
        s.execute(update(Job).where(Job.id == first).values(lease_expires_at=time.time() - 1))
    again = queue.claim_next(store, "w-c", lease_seconds=30)
    assert again == queue.Claim(first, "running")
    assert not queue.renew(store, first, "w-a", 30)  # the old worker learns it lost it
    assert "stopped responding" in list_events(store, "acme", first, after=None,
                                               limit=1)["data"][0]["message"]
    # cancelling makes the holder's renewal fail: that is how a worker learns to stop
    cancel_job(store, "acme", first)
    assert not queue.renew(store, first, "w-c", 30)
    queue.release(store, first, "w-c")
    assert get_job(store, "acme", first)["status"] == "cancelled"
    assert queue.claim_next(store, "w-d", lease_seconds=30) is None


def test_dead_local_workers_release_their_jobs_at_once(settings: ServiceSettings) -> None:
    store = Store(settings.url)
    job_id = new_job(store, settings)
    dead = f"{queue.new_worker_id().split('/')[0]}/999999999/x"
    assert queue.claim_next(store, dead, lease_seconds=3600) is not None
    assert queue.claim_next(store, "w-b", lease_seconds=30) is None
    if not store.is_sqlite:  # a shared database: host names may repeat, wait for the lease
        assert queue.release_dead_local_leases(store) == 0
        return
    assert queue.release_dead_local_leases(store) == 1
    assert queue.claim_next(store, "w-b", lease_seconds=30).job_id == job_id


def test_concurrent_workers_never_claim_a_job_twice(settings: ServiceSettings) -> None:
    store = Store(settings.url)
    jobs = {new_job(store, settings, n=10 + i) for i in range(12)}
    claims: list[str] = []

    def worker(name: str) -> None:
        own = Store(settings.url)  # each worker its own connections, as in separate processes
        while (claim := queue.claim_next(own, name, lease_seconds=30)) is not None:
            claims.append(claim.job_id)
        own.close()

    threads = [threading.Thread(target=worker, args=(f"w-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(claims) == sorted(jobs)  # each exactly once


def test_postgres_claims_skip_locked_rows() -> None:
    from tunesmith.service.queue import _claimable

    query = select(Job.id).where(_claimable(0.0)).limit(1).with_for_update(skip_locked=True)
    sql = str(query.compile(dialect=postgresql.dialect()))
    assert "FOR UPDATE SKIP LOCKED" in sql


def test_a_crashing_training_fails_the_job_not_the_worker(settings: ServiceSettings) -> None:
    store = Store(settings.url)
    too_few = new_job(store, settings, n=5)
    broken = new_job(store, settings, model="broken")
    worker = Worker(settings, store)
    assert worker.run_once()  # validation: fewer than 10 examples
    job = get_job(store, "acme", too_few)
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_n_examples"
    assert job["error"]["param"] == "training_file" and "at least 10" in job["error"]["message"]

    assert worker.run_once()  # the training process fails to load the model
    job = get_job(store, "acme", broken)
    assert job["status"] == "failed" and job["error"]["code"] == "model_error"
    assert "holds no model" in job["error"]["message"]
    assert job["finished_at"] is not None and job["fine_tuned_model"] is None
    with store.begin() as s:
        held = s.scalar(select(Job.worker_id).where(Job.id == broken))
    assert held is None
    assert not worker.run_once()  # the worker is fine and idle


def test_a_killed_training_process_fails_the_job(settings: ServiceSettings) -> None:
    store = Store(settings.url)
    job_id = new_job(store, settings, n=20, epochs=500)
    worker = Worker(settings, store)
    thread = start_worker_thread(worker)
    try:
        def training_child():
            steps = list_events(store, "acme", job_id, after=None, limit=1)["data"]
            kids = training_children(os.getpid())
            return kids[0] if kids and steps and steps[0]["type"] == "metrics" else None

        wait_for(training_child, timeout=120, what="training to start").kill()  # as the OOM killer
        job = wait_for(lambda: (j := get_job(store, "acme", job_id))["status"] == "failed" and j,
                       timeout=30, what="the job to fail")
        assert job["error"]["code"] == "training_process_died"
        assert "exit code -9" in job["error"]["message"]
        assert thread.is_alive() and not worker.run_once()  # the worker goes on
    finally:
        worker.stop()
        thread.join(timeout=30)
