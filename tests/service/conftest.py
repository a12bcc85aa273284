"""Service fixtures: a live `tunesmith serve` subprocess on 127.0.0.1 with the tiny model
(``tests.helpers.start_server``), uploaded review files, a throwaway PostgreSQL.

Every server runs in its own process group and the whole group (the server and its training
processes) is killed when the test ends, whatever happened.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.helpers import (
    LiveServer,
    free_port,
    jsonl_bytes,
    review_rows,
    start_server,
    wait_status,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "dpo_training: trains a DPO job end to end, so it needs the DPO objective in "
        "`tunesmith run`; deselect with -m 'not dpo_training' where that is not there")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
           test_home: Path) -> Iterator[LiveServer]:
    """One live server for a test module (its jobs share it); killed when the module ends."""
    server = start_server(tmp_path_factory.mktemp("svc"), tiny_model_dir, test_home)
    try:
        yield server
    finally:
        server.kill_group()


@pytest.fixture
def launch(tiny_model_dir: Path, test_home: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start servers (``launch(data_dir, *extra_args)``); all are killed at the end."""
    started: list[LiveServer] = []

    def run(data_dir: Path, *extra: str) -> LiveServer:
        server = start_server(data_dir, tiny_model_dir, test_home, *extra)
        started.append(server)
        return server

    yield run
    for server in started:
        server.kill_group()


@pytest.fixture
def upload_reviews() -> Callable[..., tuple[str, str]]:
    """Upload a review training file (n rows) and a validation file (8 rows): their ids."""

    def upload(client: openai.OpenAI, n: int = 24) -> tuple[str, str]:
        rows = review_rows(n + 8)
        train = client.files.create(file=("train.jsonl", jsonl_bytes(rows[:n])),
                                    purpose="fine-tune")
        valid = client.files.create(file=("valid.jsonl", jsonl_bytes(rows[n:])),
                                    purpose="fine-tune")
        return train.id, valid.id

    return upload


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL on 127.0.0.1 (skipped where no server binaries or driver)."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="tunesmith-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "tunesmith", "--auth=trust"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w",
                        "-t", "60", "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                        "start"], check=True, capture_output=True, timeout=90)
        yield f"postgresql+psycopg://tunesmith@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh database on the throwaway server, dropped after the test."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = postgres_server.replace("postgresql+psycopg", "postgresql") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{postgres_server}/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
            test_home: Path) -> Iterator[tuple[LiveServer, object]]:
    """One server and one job trained to success on it, shared by the tests of a module; the
    server measures the job's energy, on France's grid."""
    server = start_server(tmp_path_factory.mktemp("svc"), tiny_model_dir, test_home,
                          "--energy-country", "FRA")
    try:
        client = server.client("acme")
        rows = review_rows(32)
        train = client.files.create(file=("train.jsonl", jsonl_bytes(rows[:24])),
                                    purpose="fine-tune")
        valid = client.files.create(file=("valid.jsonl", jsonl_bytes(rows[24:])),
                                    purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=train.id, validation_file=valid.id, suffix="reviews",
            seed=7, metadata={"team": "support", "round": "1"},
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 10}}})
        assert job.status == "validating_files" and job.fine_tuned_model is None
        done = wait_status(client, job.id, ("succeeded",), timeout=150)
        yield server, done
    finally:
        server.kill_group()
