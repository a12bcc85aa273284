"""The privacy audit of a DP run: canaries and membership inference, with and without DP.

``audit_privacy(run_dir)`` trains two *audit twins* of a finished run that used
``train.privacy``: the same data splits, hyperparameters and seed, with ``canaries`` secret
canaries each repeated ``repeats`` times added to the training data; one twin with the run's
differential privacy, one without. Each twin's merged model is then audited
(``evaluation.privacy_audit``): the canaries' exposure in bits among random candidates, and the
AUC of telling training examples from test examples by their loss. Both go side by side into
``privacy_audit.json``, ``metrics.json["privacy"]["audit"]`` and the run's report.

The twins live in ``RUN/privacy_audit/{dp,no_dp}``; a twin already finished there is reused,
so an interrupted audit continues where it stopped. The run itself is never retrained: its
canary-free model is what ships.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig, dump_config, parse_config
from tunesmith.errors import ConfigError
from tunesmith.evaluation.privacy_audit import (
    audit_model,
    canary_training_rows,
    make_canaries,
)
from tunesmith.evaluation.report import read_results, write_reports, write_results
from tunesmith.flows.steps import run_config, write_json

AUDIT_DIR = "privacy_audit"
ARMS = ("dp", "no_dp")


def _read_chats(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def twin_config(cfg: RunConfig, results: dict[str, Any], run_dir: Path, train_file: Path,
                arm: str) -> RunConfig:
    """The run's configuration for an audit twin: its saved splits plus the canaries, its
    resolved hyperparameters, no base comparison, forgetting or calibration; DP only for 'dp'.

    Cleaning and redaction are off: the splits were cleaned already, deduplication would drop
    the repeated canaries, and redaction could mask their digits.
    """
    spec = dump_config(cfg)
    data_dir = run_dir / "data"
    spec["name"] = f"{cfg.name or run_dir.name}-audit-{arm}"
    spec["output_dir"] = str(run_dir / AUDIT_DIR / arm)
    spec["data"].update(train_file=str(train_file), format=None,
                        validation_file=str(data_dir / "validation.jsonl"),
                        test_file=str(data_dir / "test.jsonl"), clean=False, redact=False,
                        max_train_examples=None)
    hp = results.get("hyperparameters") or {}
    spec["train"].update(epochs=hp.get("epochs", spec["train"]["epochs"]),
                         batch_size=hp.get("batch_size", spec["train"]["batch_size"]),
                         learning_rate=hp.get("learning_rate", spec["train"]["learning_rate"]),
                         packing=False)  # both twins one example per row: only DP differs
    if arm == "no_dp":
        spec["train"]["privacy"] = None
    # the canaries' answers are no class label: the twins answer in text, scored by exact
    # match (for a classification run the same as accuracy on its test split)
    spec["eval"].update(compare_base=False, forgetting=False, calibration=False,
                        task="generation", labels=None,
                        positive_label=None, group_field=None)
    return parse_config(spec, source=f"privacy audit of {run_dir}")


def audit_privacy(run_dir: Path | str, *, canaries: int = 5, repeats: int = 10,
                  n_candidates: int = 1000, members: int = 200, seed: int = 0,
                  show_progress: bool = True, say: Callable[[str], None] = print
                  ) -> dict[str, Any]:
    """Train the DP and non-DP audit twins of ``run_dir`` and audit both (see the module)."""
    from tunesmith.flows.run import run
    from tunesmith.models.load import load

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if cfg is None or not (run_dir / "metrics.json").is_file():
        raise ConfigError(f"{run_dir} is not a finished run (no config.yaml or metrics.json); "
                          "run it first with tunesmith run")
    if cfg.train.privacy is None:
        raise ConfigError(f"{run_dir} was trained without train.privacy: the audit compares a "
                          "DP run with its non-DP twin; add train.privacy and run it again")
    if cfg.train.head != "lm":
        raise ConfigError("the privacy audit's canaries are secrets in text answers: it needs "
                          "a model that answers in text (train.head: lm)")
    if canaries < 1 or repeats < 1 or n_candidates < 10 or members < 10:
        raise ConfigError("the audit needs at least 1 canary repeated at least once, 10 "
                          "candidates and 10 members")
    results = read_results(run_dir)
    secrets = make_canaries(canaries, seed=seed)
    root = run_dir / AUDIT_DIR
    root.mkdir(exist_ok=True)
    train = _read_chats(run_dir / "data" / "train.jsonl")
    rows = [{"messages": m} for m in train] + canary_training_rows(secrets, repeats)
    random.Random(seed).shuffle(rows)
    train_file = root / "train.jsonl"
    partial = train_file.with_suffix(".jsonl.tmp")
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    partial.replace(train_file)
    pick = random.Random(seed + 1)
    member_chats = pick.sample(train, min(members, len(train)))
    test = _read_chats(run_dir / "data" / "test.jsonl")
    nonmember_chats = pick.sample(test, min(members, len(test)))
    found: dict[str, Any] = {"canaries": canaries, "repeats": repeats,
                             "n_candidates": n_candidates, "seed": seed}
    for arm in ARMS:
        twin = twin_config(cfg, results, run_dir, train_file, arm)
        twin_dir = Path(twin.output_dir)
        if not ((twin_dir / "metrics.json").is_file() and (twin_dir / "merged").is_dir()):
            say(f"privacy audit: training the {arm.replace('_', '-')} twin in {twin_dir}")
            run(twin, overwrite=True, show_progress=show_progress)
        twin_results = read_results(twin_dir)
        model, tokenizer = load(twin_dir / "merged")
        audit = audit_model(model, tokenizer, canaries=secrets, members=member_chats,
                            nonmembers=nonmember_chats, n_candidates=n_candidates, seed=seed)
        found[arm] = {**audit.to_dict(), "test": twin_results.get("tuned"),
                      "privacy": twin_results.get("privacy")}
        del model
    write_json(run_dir / "privacy_audit.json", found)
    results.setdefault("privacy", {})["audit"] = found
    write_results(run_dir / "metrics.json", results)
    write_reports(run_dir, results)
    return found
