"""``improve``: one round of the feedback loop, from the model in use to the next, gated.

    from tunesmith import improve
    r = improve("runs/sms-spam", feedback="feedback/", holdout="holdout.jsonl")
    print(r.promoted, r.current)

A round takes what users said about the current model (``tunesmith data from-feedback`` or
the service's export: ``feedback_dpo.jsonl``, corrections against the logged answer, and
``feedback_chat.jsonl``, corrected or well-rated answers), trains the next model *from the
current one* (preference pairs with DPO plus an SFT term on the corrections; chat rows alone
with SFT), and evaluates the current and the new model on the same held-out set with the
paired-bootstrap CI of ``tunesmith run``. The new model is promoted only when it is not worse:
the lower end of the CI of (new - current) on the gate metric is at least ``-margin`` (a
non-inferiority test). Every round is appended to ``rounds.jsonl``, promoted or not.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith.config import RunConfig, dump_config, load_config, parse_config
from tunesmith.errors import ConfigError, DataError
from tunesmith.flows.run import RunResult, run
from tunesmith.flows.steps import run_config

PAIRS_FILE = "feedback_dpo.jsonl"
CHAT_FILE = "feedback_chat.jsonl"
HISTORY_FILE = "rounds.jsonl"
# fewer rows than this cannot be split into train and validation (see load_splits)
MIN_ROWS = 10


@dataclass
class Round:
    """One round of the loop, as ``rounds.jsonl`` records it."""

    round: int
    previous: str  # the model in use before the round (a run directory)
    candidate: str  # the run this round trained
    objective: str
    feedback: dict[str, int]  # rows used: pairs, chat
    holdout: str
    metric: str
    previous_value: float
    candidate_value: float
    difference: float
    ci_low: float
    ci_high: float
    margin: float
    promoted: bool
    reason: str
    current: str  # the model in use after the round
    finished_at: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _count(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def feedback_files(feedback: Path) -> tuple[Path | None, Path | None]:
    """(pairs file, chat file) of a feedback export directory, or one file of either kind."""
    feedback = Path(feedback)
    if feedback.is_dir():
        pairs, chat = feedback / PAIRS_FILE, feedback / CHAT_FILE
        found = (pairs if _count(pairs) else None, chat if _count(chat) else None)
        if found == (None, None):
            raise DataError(f"{feedback}: no feedback to learn from (expected {PAIRS_FILE} or "
                            f"{CHAT_FILE} with rows; write them with `tunesmith data "
                            "from-feedback`)", path=feedback, code="empty_file")
        return found
    if not feedback.is_file():
        raise DataError(f"{feedback}: no such feedback file or directory", path=feedback,
                        code="missing_file")
    first = next((line for line in feedback.read_text(encoding="utf-8").splitlines()
                  if line.strip()), "")
    is_pairs = '"preferred_output"' in first or '"chosen"' in first
    return (feedback, None) if is_pairs else (None, feedback)


def _history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def round_config(previous: RunConfig, current: Path, *, pairs: Path | None, chat: Path | None,
                 holdout: Path, output_dir: Path, settings: RunConfig | None = None
                 ) -> RunConfig:
    """The next round's run: the previous run's settings (or ``settings``' train and eval),
    the current model as the base, the feedback as training data, the hold-out as test."""
    source = settings or previous
    data = dump_config(source)
    use_pairs = pairs is not None and _count(pairs) >= MIN_ROWS
    train_file = pairs if use_pairs else chat
    if train_file is None or _count(train_file) < MIN_ROWS:
        raise DataError(f"the feedback has {_count(pairs) if pairs else 0} pair(s) and "
                        f"{_count(chat) if chat else 0} chat row(s); a round needs at least "
                        f"{MIN_ROWS} of one kind", path=pairs or chat, code="empty_file")
    train = data["train"]
    if use_pairs:
        train["objective"] = train["objective"] if train["objective"] != "sft" else "dpo"
        if settings is None:  # keep the corrections likely, not only preferred (RPO)
            train["preference"]["sft_weight"] = max(train["preference"]["sft_weight"], 1.0)
    else:
        train["objective"] = "sft"
    data["model"]["base"] = str(current)
    data["data"] = {**data["data"], "train_file": str(train_file), "validation_file": None,
                    "test_file": str(holdout), "max_train_examples": None,
                    "max_test_examples": None}
    data["eval"]["compare_base"] = True
    data["output_dir"] = str(output_dir)
    data["name"] = output_dir.name
    data.pop("tune", None)
    return parse_config(data, source=f"round from {current}")


def gate(result: RunResult, metric: str, margin: float) -> tuple[dict[str, Any], bool, str]:
    """The comparison on ``metric`` and whether the candidate passes the non-inferiority gate."""
    comparison = (result.results.get("comparison") or {}).get(metric)
    if comparison is None:
        known = sorted(result.results.get("comparison") or {})
        raise ConfigError(f"no '{metric}' comparison in the round's results (has: {known}); "
                          "choose --metric among them")
    lo = comparison["ci_low"]
    if lo >= -margin:
        return comparison, True, (f"{metric} {comparison['tuned']:.4f} vs "
                                  f"{comparison['base']:.4f}: the 95% CI of the difference "
                                  f"starts at {lo:+.4f} >= -{margin}")
    return comparison, False, (f"{metric} {comparison['tuned']:.4f} vs "
                               f"{comparison['base']:.4f}: the 95% CI of the difference starts "
                               f"at {lo:+.4f} < -{margin}; the new model may be worse")


def improve(current: str | Path, feedback: str | Path, *, holdout: str | Path | None = None,
            margin: float = 0.02, metric: str | None = None, output_dir: str | Path | None = None,
            config: str | Path | None = None, history: str | Path | None = None,
            home: Path | None = None, console: Console | None = None,
            show_progress: bool = True) -> Round:
    """Train the next round from ``current`` on ``feedback``; promote it if it is not worse.

    ``current``: the run directory of the model in use. ``holdout``: chat JSONL both models
    are compared on (default: the current run's test split; give a separate file when the
    feedback came from that split). ``config``: the round's train/eval settings (default:
    the current run's). ``history``: the rounds file (default: ``rounds.jsonl`` beside the
    current run).
    """
    current = Path(current)
    previous = run_config(current)
    if previous is None:
        raise ConfigError(f"{current}: not a tunesmith run directory (no config.yaml); improve "
                          "continues from a finished run")
    if margin < 0:
        raise ConfigError("--margin must be 0 or more (the accepted drop in the gate metric)")
    holdout = Path(holdout) if holdout else current / "data" / "test.jsonl"
    if not holdout.is_file():
        raise DataError(f"{holdout}: no hold-out set; pass --holdout FILE (chat JSONL)",
                        path=holdout, code="missing_file")
    history = Path(history) if history else current.parent / HISTORY_FILE
    rounds = _history(history)
    number = len(rounds) + 1
    output_dir = Path(output_dir) if output_dir else current.parent / f"round-{number}"
    pairs, chat = feedback_files(Path(feedback))
    cfg = round_config(previous, current, pairs=pairs, chat=chat, holdout=holdout,
                       output_dir=output_dir, settings=load_config(config) if config else None)
    metric = metric or ("accuracy" if cfg.eval.task == "classification" else "exact_match")
    result = run(cfg, home=home, console=console, show_progress=show_progress)
    comparison, promoted, reason = gate(result, metric, margin)
    record = Round(
        round=number, previous=str(current), candidate=str(result.run_dir),
        objective=cfg.train.objective,
        feedback={"pairs": _count(pairs) if pairs else 0, "chat": _count(chat) if chat else 0},
        holdout=str(holdout), metric=metric, previous_value=comparison["base"],
        candidate_value=comparison["tuned"], difference=comparison["difference"],
        ci_low=comparison["ci_low"], ci_high=comparison["ci_high"], margin=margin,
        promoted=promoted, reason=reason,
        current=str(result.run_dir if promoted else current),
        finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    history.parent.mkdir(parents=True, exist_ok=True)
    with history.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record.to_json()) + "\n")
    return record
