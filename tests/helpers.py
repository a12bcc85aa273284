"""Helpers the tests share: small datasets, the tiny model's training, a live server.

Tests import these directly; conftest modules import them for their fixtures. Only the
standard library is imported up front, because a training script run under torchrun
(``tests/flow/ddp_train.py``) imports this module too: torch and the service's packages are
imported where they are used.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import openai
    import psutil

REPO = Path(__file__).resolve().parents[1]
# Imported models are cached across test sessions here (ignored by git), never in $HOME.
TEST_HOME = REPO / ".cache" / "test-home"

# ----------------------------------------------------------------------------- datasets

SYSTEM = "Label the review as good or bad."
GOOD = ["great product, works well", "I love it", "excellent value", "very happy with this",
        "works perfectly", "fantastic quality", "best purchase ever", "really good"]
BAD = ["broke after a day", "terrible quality", "I hate it", "waste of money",
       "does not work", "awful experience", "very disappointed", "really bad"]


def review_rows(n: int) -> list[dict]:
    """``n`` chat rows labelling reviews good or bad, alternating."""
    rows = []
    for i in range(n):
        good = i % 2 == 0
        text = (GOOD if good else BAD)[(i // 2) % 8] + f" (#{i})"
        rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": text},
                                  {"role": "assistant", "content": "good" if good else "bad"}]})
    return rows


def review_pairs(n: int) -> list[dict]:
    """``n`` preference pairs (OpenAI's format) on the reviews of ``review_rows``: the right
    label preferred over the wrong one, or over a chatty answer (every other pair)."""
    pairs = []
    for i, row in enumerate(review_rows(n)):
        prompt, answer = row["messages"][:2], row["messages"][2]["content"]
        wrong = {"good": "bad", "bad": "good"}[answer]
        rejected = wrong if i % 2 else f"Well, I would say this review is probably {wrong}."
        pairs.append({"input": {"messages": prompt},
                      "preferred_output": [{"role": "assistant", "content": answer}],
                      "non_preferred_output": [{"role": "assistant", "content": rejected}]})
    return pairs


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# ----------------------------------------------------------------------------- training


def loss_curve(run_dir: Path, kind: str = "train") -> dict[int, float]:
    """A run's logged losses by step (its ``metrics.jsonl``): the training loss of every
    ``train`` record, or the validation loss of every ``eval`` record."""
    from tunesmith.training.callbacks import read_metrics

    key = {"train": "train_loss", "eval": "valid_loss"}[kind]
    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == kind}


def finish_tiny_run(folder: Path, base: Path, **train: Any) -> Path:
    """A finished tiny run on the review data (LoRA, one epoch, a short evaluation)."""
    import yaml

    from tunesmith.flows.run import run

    write_jsonl(folder / "train.jsonl", review_rows(80))
    cfg = {
        "energy": {"enabled": False},  # codecarbon costs seconds per phase
        "name": "tiny", "output_dir": str(folder / "run"), "model": {"base": str(base)},
        "data": {"train_file": "train.jsonl", "validation_fraction": 0.1, "test_fraction": 0.1,
                 "max_length": 128},
        "train": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                  "epochs": 1, "batch_size": 8, "learning_rate": 2e-2, "eval_every": 5,
                  "early_stopping_patience": None, "seed": 7, **train},
        "eval": {"task": "classification", "labels": ["good", "bad"], "positive_label": "bad",
                 "batch_size": 16, "compare_base": False, "calibration": False,
                 "forgetting": False},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    run(folder / "config.yaml", show_progress=False)
    return folder / "run"


def train_tiny(model: Any, tokenizer: Any, encoded: list, *, steps: int, lr: float,
               batch_size: int = 16) -> Any:
    """Full fine-tuning of the tiny model with the training loss (no checkpoints, no logs)."""
    import torch

    from tunesmith.training.batches import collate
    from tunesmith.training.loss import TargetLoss

    torch.manual_seed(0)
    loss_module = TargetLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        start = (step * batch_size) % len(encoded)
        batch = (encoded + encoded)[start:start + batch_size]
        out = loss_module(**collate(batch, pad_id=tokenizer.pad_token_id))
        (out.loss_sum / out.n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


# ----------------------------------------------------------------------------- live server

START_TIMEOUT_S = 60


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
        from tunesmith.service import Store, create_key, sqlite_url

        if org not in self.keys:
            store = Store(sqlite_url(self.data_dir))
            self.keys[org], _ = create_key(store, org)
            store.close()
        return self.keys[org]

    def client(self, org: str = "acme", *, timeout: float = 60) -> openai.OpenAI:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key(org),
                             max_retries=0, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def start_server(data_dir: Path, model_dir: Path, home: Path, *extra: str,
                 timeout: float = START_TIMEOUT_S) -> LiveServer:
    """Start `tunesmith serve` in its own process group and wait until it answers (for up to
    ``timeout`` seconds)."""
    import httpx

    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = data_dir / f"server-{port}.log"
    cmd = [sys.executable, "-m", "tunesmith.cli", "serve", "--port", str(port),
           "--data-dir", str(data_dir), "--model", f"tiny={model_dir}", "--threads", "1",
           "--lease-seconds", "5", "--audit-log",
           # codecarbon costs seconds per job phase; energy reaching a job's run is tested in
           # tests/unit/service/test_plan.py, a run's measurement in tests/flow/test_run_cli.py
           *(() if any(a.startswith("--energy") for a in extra) else ("--no-energy",)),
           *extra]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env={**os.environ, "TUNESMITH_HOME": str(home),
                                     "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    server = LiveServer(data_dir, proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
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
    raise RuntimeError(f"the server did not start in {timeout} s:\n{server.log()}")


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
    import psutil

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


def federated_config(root: Path, model_dir: Path, clients: list[Path], **federated) -> Path:
    """``root/config.yaml``: a federated run of the tiny model ``model_dir`` over the client
    files ``clients`` (LoRA r=4, batch 4, 2 local steps a round, min_clients 2); ``federated``
    adds to or overrides the federated section."""
    import yaml

    cfg = {
        "name": "fed", "output_dir": str(root / "run"), "model": {"base": str(model_dir)},
        "data": {"train_file": clients[0].name, "max_length": 128},
        "train": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                  "batch_size": 4, "learning_rate": 2e-2, "early_stopping_patience": None,
                  "seed": 7},
        "eval": {"task": "classification", "labels": ["good", "bad"]},
        "energy": {"enabled": False},
        "federated": {"clients": [f.name for f in clients], "local_steps": 2, "min_clients": 2,
                      **federated},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def queued_job(data_dir: Path, model_dir: Path, home: Path) -> tuple[Any, Any, str]:
    """(settings, store, job id) of a service with one job on a 12-review training file."""
    from tunesmith.service import ServiceSettings, Store
    from tunesmith.service.jobs import create_job
    from tunesmith.service.schemas import JobCreate
    from tunesmith.service.tables import StoredFile

    settings = ServiceSettings(data_dir=data_dir, home=home, base_models={"tiny": str(model_dir)})
    store = Store(settings.url)
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    (settings.files_dir / "file-t").write_bytes(jsonl_bytes(review_rows(12)))
    with store.begin() as s:
        s.add(StoredFile(id="file-t", org="acme", filename="t.jsonl", purpose="fine-tune",
                         bytes=1, examples=12))
    job_id = create_job(store, settings, "acme", JobCreate(model="tiny",
                                                             training_file="file-t"))["id"]
    return settings, store, job_id


def start_job(store: Any, job_id: str, worker_id: str) -> None:
    """Claim the job for ``worker_id`` and set it running, as a worker does before training."""
    from tunesmith.service import queue

    assert queue.claim_next(store, worker_id, lease_seconds=30).job_id == job_id
    assert queue.set_status(store, job_id, worker_id, "running", expect=("validating_files",))


@contextlib.contextmanager
def decoder_passes(module: Any) -> Iterator[list[tuple[int, ...]]]:
    """The shape (rows, columns) of ``input_ids`` in every pass ``module`` (a decoder) runs
    inside the block, in order; of a head, the shape of its input (rows, positions, hidden)."""
    seen: list[tuple[int, ...]] = []

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(tuple(ids.shape))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
