"""A finished run, opened for what comes after it (export, compression, audits): its config,
its results, the merged model and the exact splits it trained and tested on.

    from tunesmith.flows.finished import open_run
    done = open_run("runs/sms-spam")
    model_dir, test = done.merged, done.split("test")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.data.chat import ChatExample
from tunesmith.data.formats import ReadOptions, iter_records
from tunesmith.data.rejects import Rejected
from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluation.report import read_results
from tunesmith.flows.steps import run_config

SPLITS = ("train", "validation", "test")


@dataclass
class FinishedRun:
    run_dir: Path
    config: RunConfig
    results: dict[str, Any]  # metrics.json

    @property
    def merged(self) -> Path:
        """The tuned model as a standalone Hugging Face directory."""
        return self.run_dir / "merged"

    @property
    def labels(self) -> list[str] | None:
        """The classification labels, in the order the run used them."""
        return self.results.get("labels")

    @property
    def head(self) -> bool:
        """Whether the model labels text through a classification head (no generation)."""
        return self.config.train.head == "classifier"

    def split(self, name: str) -> list[ChatExample]:
        """The examples of a split exactly as the run used them (``data/<name>.jsonl``); pairs
        come back as the chat example of their preferred answer."""
        from tunesmith.data.records import as_chat

        if name not in SPLITS:
            raise ValueError(f"split {name!r}: one of {SPLITS}")
        path = self.run_dir / "data" / f"{name}.jsonl"
        if not path.is_file():
            raise DataError(f"the run kept no {name} split; was it made by an older tunesmith? "
                            "Run it again", path=path)
        out = []
        for item in iter_records(path, ReadOptions()):
            if isinstance(item, Rejected):
                raise DataError(f"the run's own {name} split has a broken row ({item.reason}); "
                                "was it edited? Run it again", path=path, line=item.line)
            out.append(as_chat(item))
        return out


def open_run(run_dir: Path | str) -> FinishedRun:
    """The run in ``run_dir``, or a ``ConfigError`` saying what is missing and what to do."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory; pass one `tunesmith run` made "
                          "(runs/NAME)")
    cfg = run_config(run_dir)
    missing = [name for name in ("config.yaml", "metrics.json", "merged/config.json")
               if not (run_dir / name).is_file()]
    if cfg is None or missing:
        raise ConfigError(f"{run_dir} is not a finished run (missing {', '.join(missing)}); "
                          "finish it with `tunesmith run CONFIG --resume`")
    return FinishedRun(run_dir, cfg, read_results(run_dir))
