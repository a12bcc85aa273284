"""The job store's tables (SQLAlchemy 2.x). Every row that belongs to a customer carries its org.

Times are Unix seconds, as in OpenAI's API. A file lives at ``files/{id}`` and a job's run
at ``runs/{id}`` under the data directory (shared by every server and worker). Public ids are
random strings with OpenAI's prefixes; events also get an integer sequence, because many
share one second and pagination must be exact.

A column added to a table after stores were made must be nullable: ``Store`` adds it to an
older store's table when it opens it (``store.add_new_columns``).
"""

from __future__ import annotations

import secrets
import string
import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def now() -> int:
    return int(time.time())


def order_key() -> float:
    """Creation order finer than a second: FIFO claims and newest-first lists need it."""
    return time.time()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class StoredFile(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    examples: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    order: Mapped[float] = mapped_column("sort_key", Float, default=order_key, index=True)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(256))
    base_ref: Mapped[str] = mapped_column(Text)
    """What the base model resolves from on a worker (bundled name, path, run directory)."""
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    task: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    output_model: Mapped[str] = mapped_column(String(512), unique=True)
    """The fine-tuned model's name; shown as fine_tuned_model once the job succeeded."""
    model_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    result_files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    privacy: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """A private job's (epsilon, delta) spent and mechanism, from its run's metrics.json."""
    energy: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The run's energy (kWh) and emissions (kg CO2e) per phase, from its metrics.json."""
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    order: Mapped[float] = mapped_column("sort_key", Float, default=order_key, index=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class JobEvent(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    step: Mapped[int | None] = mapped_column(Integer)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    step_number: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(600), unique=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    gone: Mapped[bool] = mapped_column(Boolean, default=False)
    """Pruned by training (only the last ones are kept) or deleted as a model."""


class Completion(Base):
    """The audit log: one chat completion, redacted before it was stored."""

    __tablename__ = "completions"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(600))
    messages: Mapped[list[Any]] = mapped_column(JSON)
    choices: Mapped[list[Any]] = mapped_column(JSON)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


class Feedback(Base):
    __tablename__ = "feedback"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    org: Mapped[str] = mapped_column(String(64), index=True)
    completion_id: Mapped[str] = mapped_column(String(40), index=True)
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    rating: Mapped[str | None] = mapped_column(String(8))
    correction: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
