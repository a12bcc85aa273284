"""Service fixtures: a live `tunesmith serve` subprocess on 127.0.0.1 with the tiny model,
API keys, the official openai client, and small chat datasets as JSONL bytes.

Every server runs in its own process group and the whole group (the server and its training
processes) is killed when the test ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import review_rows
from tunesmith.service import Store, create_key, sqlite_url

START_TIMEOUT_S = 60


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """One `tunesmith serve` process; ``data_dir`` outlives it (restart on the same dir)."""

    data_dir: Path
    proc: subprocess.Popen
    url: str
    log_path: Path
    keys: dict[str, str] = field(default_factory=dict)

    def key(self, org: str) -> str:
        if org not in self.keys:
            store = Store(sqlite_url(self.data_dir))
            self.keys[org], _ = create_key(store, org)
            store.close()
        return self.keys[org]

    def client(self, org: str = "acme", *, timeout: float = 60) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key(org),
                             max_retries=0, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def start_server(data_dir: Path, model_dir: Path, home: Path, *extra: str) -> LiveServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = data_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "tunesmith.cli", "serve", "--port", str(port),
           "--data-dir", str(data_dir), "--model", f"tiny={model_dir}", "--threads", "1",
           "--lease-seconds", "5", "--audit-log", *extra]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env={**os.environ, "TUNESMITH_HOME": str(home),
                                     "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    server = LiveServer(data_dir, proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill_group()
    raise RuntimeError(f"the server did not start in {START_TIMEOUT_S} s:\n{server.log()}")


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


def wait_for(predicate: Callable[[], object], *, timeout: float, every: float = 0.3,
             what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_status(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...], *,
                timeout: float) -> object:
    def check() -> object:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status == "failed" and "failed" not in statuses:
            raise AssertionError(f"job failed: {job.error}")
        return job if job.status in statuses else None

    return wait_for(check, timeout=timeout, what=f"{job_id} to be {statuses}")


def all_events(client: openai.OpenAI, job_id: str) -> list:
    """Every event, oldest first, paging through the API (bounded)."""
    events, after = [], None
    for _ in range(200):
        page = client.fine_tuning.jobs.list_events(job_id, limit=100,
                                                   **({"after": after} if after else {}))
        events += page.data
        if not page.has_more:
            return events[::-1]
        after = page.data[-1].id
    raise AssertionError("more than 20000 events")


def training_children(pid: int) -> list[psutil.Process]:
    """The server's training processes (multiprocessing 'spawn' children)."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in kids:
        try:  # a child that just ended is a zombie until its parent reaps it: not training
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


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
