"""Claiming jobs with leases, so several workers on several machines share one queue safely.

A worker claims a job by writing its id and a lease expiry onto the row, and renews the lease
while the job runs. A job whose lease ran out (its worker died: kill -9, a lost machine) is
claimable again and resumes from its last checkpoint.

The claim is one transaction: on PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED`` lets
concurrent workers pass over each other's candidate rows; SQLite ignores that clause but
serialises writers (``BEGIN IMMEDIATE``, see ``store``). On both, the UPDATE repeats the
conditions it was chosen under (a compare-and-swap), so a row taken in between is never
claimed twice.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, or_, select, update

from tunesmith.service.jobs import add_event
from tunesmith.service.store import Store
from tunesmith.service.tables import Job, new_id, now

CLAIMABLE = ("validating_files", "queued", "running")


def new_worker_id() -> str:
    """``host/pid/random``: the host and pid let a restarted server spot its dead leases."""
    return f"{socket.gethostname()}/{os.getpid()}/{new_id('', 6)}"


@dataclass(frozen=True)
class Claim:
    job_id: str
    status: str
    """The status the job had when claimed; 'running' means its previous worker died."""


def _claimable(at: float) -> Any:
    return and_(Job.status.in_(CLAIMABLE),
                or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < at))


def claim_next(store: Store, worker_id: str, lease_seconds: float) -> Claim | None:
    """Take the oldest job that is waiting or orphaned; None when there is none."""
    at = time.time()
    with store.begin() as s:
        row = s.execute(select(Job.id, Job.status, Job.worker_id, Job.lease_expires_at)
                        .where(_claimable(at)).order_by(Job.order, Job.id).limit(1)
                        .with_for_update(skip_locked=True)).first()
        if row is None:
            return None
        same_lease = (Job.lease_expires_at.is_(None) if row.lease_expires_at is None
                      else Job.lease_expires_at == row.lease_expires_at)
        taken = s.execute(
            update(Job).where(Job.id == row.id, Job.status == row.status, same_lease)
            .values(worker_id=worker_id, lease_expires_at=at + lease_seconds,
                    attempts=Job.attempts + 1)).rowcount
        if taken != 1:
            return None
        if row.status == "running" and row.worker_id is not None:  # not released: lost
            add_event(s, row.id, "The worker training this job stopped responding; "
                      "resuming from the last checkpoint", level="warn")
    return Claim(row.id, row.status)


def set_status(store: Store, job_id: str, worker: str, status: str, *,
               expect: tuple[str, ...], message: str | None = None, **values: Any) -> bool:
    """Move a job ``worker`` holds to ``status`` (and set ``values``); False when it is no
    longer that worker's to move."""
    with store.begin() as s:
        changed = s.execute(
            update(Job).where(Job.id == job_id, Job.worker_id == worker,
                              Job.status.in_(expect))
            .values(status=status, **values)).rowcount
        if changed and message:
            add_event(s, job_id, message, level="error" if status == "failed" else "info")
    return changed == 1


def renew(store: Store, job_id: str, worker_id: str, lease_seconds: float) -> bool:
    """Extend the lease of a running job; False when it was cancelled, paused or taken."""
    with store.begin() as s:
        return s.execute(
            update(Job).where(Job.id == job_id, Job.worker_id == worker_id,
                              Job.status == "running")
            .values(lease_expires_at=time.time() + lease_seconds)).rowcount == 1


def release(store: Store, job_id: str, worker_id: str, message: str | None = None) -> None:
    """Let go of a job (stopped by the user, or the worker shuts down): free to claim now."""
    with store.begin() as s:
        changed = s.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id)
                            .values(worker_id=None, lease_expires_at=None)).rowcount
        if changed and message:
            add_event(s, job_id, message)


def fail(store: Store, job_id: str, worker_id: str, *, code: str, message: str,
         param: str | None = None) -> bool:
    return set_status(store, job_id, worker_id, "failed",
                      expect=("validating_files", "queued", "running"),
                      message=f"Fine-tuning job failed: {message}",
                      error={"code": code, "message": message, "param": param},
                      finished_at=now(), estimated_finish=None, worker_id=None,
                      lease_expires_at=None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_local_leases(store: Store) -> int:
    """Expire the leases of this host's dead workers (a restart after kill -9): no waiting.

    Only for SQLite, which lives on one machine: with a shared PostgreSQL, two machines may
    carry the same host name, and a live worker elsewhere must keep its job until its lease
    runs out.
    """
    if not store.is_sqlite:
        return 0
    host = socket.gethostname()
    with store.begin() as s:
        held = s.execute(select(Job.id, Job.worker_id).where(
            Job.status.in_(CLAIMABLE), Job.worker_id.like(f"{host}/%"))).all()
        dead = [r.id for r in held
                if r.worker_id.split("/")[1].isdigit()
                and int(r.worker_id.split("/")[1]) != os.getpid()
                and not _pid_alive(int(r.worker_id.split("/")[1]))]
        if dead:
            s.execute(update(Job).where(Job.id.in_(dead)).values(lease_expires_at=0.0))
    return len(dead)
