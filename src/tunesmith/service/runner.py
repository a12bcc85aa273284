"""The training process of one job (started by a worker with multiprocessing 'spawn').

A crash here fails the job, never the server. The process ends itself when its worker dies
(the pipe from the worker closes), so a killed server leaves no training behind that could
race the job's resumption.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    ServiceError,
    TrainingError,
)

OUTCOME_FILE = "service_outcome.json"
EXIT_SUPERSEDED = 3  # the job was cancelled, paused or taken over while training
EXIT_PARENT_GONE = 70
_CODES = ((DataError, "invalid_training_file"), (ConfigError, "invalid_hyperparameters"),
          (ModelError, "model_error"), (TrainingError, "training_error"),
          (CheckpointError, "checkpoint_error"))


@dataclass(frozen=True)
class ChildArgs:
    """Everything the training process needs: plain, picklable values."""

    database_url: str
    job_id: str
    worker_id: str
    output_model: str
    config: dict[str, Any]
    home: str
    torch_threads: int | None


def _exit_with_parent(conn: Any) -> None:
    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            conn.recv()  # the worker never sends: this returns only when its end closes
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def write_outcome(run_dir: Path, outcome: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{OUTCOME_FILE}.tmp"
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, run_dir / OUTCOME_FILE)


def read_outcome(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / OUTCOME_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def error_code(err: BaseException) -> str:
    if isinstance(err, ServiceError) and err.code:
        return err.code
    return next((code for kind, code in _CODES if isinstance(err, kind)), "server_error")


def child_main(args: ChildArgs, parent: Any) -> None:
    """Entry point of the training process."""
    _exit_with_parent(parent)
    import torch
    from rich.console import Console

    from tunesmith.config import parse_config
    from tunesmith.flows import run
    from tunesmith.service.reporter import JobReporter
    from tunesmith.service.store import Store

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    run_dir = Path(args.config["output_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / OUTCOME_FILE).unlink(missing_ok=True)
    store = Store(args.database_url)
    reporter = JobReporter(store, args.job_id, args.worker_id,
                           checkpoint_dir=run_dir / "checkpoints", output_model=args.output_model)
    with (run_dir / "console.log").open("a", encoding="utf-8") as log:
        try:
            cfg = parse_config(args.config, source=f"job {args.job_id}")
            result = run(cfg, resume=True, home=Path(args.home), show_progress=False,
                         console=Console(file=log, width=120), callbacks=[reporter])
        except Exception as err:
            log.write(traceback.format_exc())
            write_outcome(run_dir, {"ok": False, "code": error_code(err),
                                    "message": str(err) or type(err).__name__,
                                    "param": getattr(err, "param", None)})
            raise SystemExit(1) from None
    if reporter.superseded:
        os._exit(EXIT_SUPERSEDED)
    write_outcome(run_dir, {"ok": True, "tuned": result.tuned,
                            "warnings": (result.results.get("training") or {}).get("warnings",
                                                                                  []),
                            "rejected": _count_lines(run_dir / "rejects.jsonl")})


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as fh:
        return sum(1 for _ in fh)


RESULT_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss",
                  "valid_mean_token_accuracy")


def results_csv(records: list[dict[str, Any]]) -> bytes:
    """The job's result file: one row per step, from the run's metrics.jsonl records."""
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        step = int(r.get("step", 0))
        if step < 1:
            continue
        row = rows.setdefault(step, {"step": step})
        if r.get("kind") == "train":
            row.update(train_loss=r.get("train_loss"),
                       train_accuracy=r.get("train_token_accuracy"))
        elif r.get("kind") == "eval":
            row.update(valid_loss=r.get("valid_loss"),
                       valid_mean_token_accuracy=r.get("valid_token_accuracy"))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[k] for k in sorted(rows))
    return out.getvalue().encode()
