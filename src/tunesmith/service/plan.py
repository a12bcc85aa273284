"""From a job to a tunesmith run: check its files, pick the task, resolve 'auto' values.

The run itself is ``tunesmith.api.run`` with a RunConfig built here through ``parse_config``,
so the service trains exactly as the CLI does.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tunesmith.config import (
    RunConfig,
    auto_batch_size,
    auto_epochs,
    auto_learning_rate,
    parse_config,
)
from tunesmith.data.chat import ChatExample, read_chat_jsonl
from tunesmith.errors import ServiceError

MIN_EXAMPLES = 10  # OpenAI's minimum, and what tunesmith needs to split off held-out sets
SPLIT_FRACTION = 0.1  # tunesmith's default validation and test fractions
METHOD = "lora"
KEEP_CHECKPOINTS = 3  # as OpenAI: the checkpoints of the last 3 epochs
# An answer set this small and this repetitive is a label set: evaluate as classification.
MAX_LABELS, MIN_PER_LABEL, MAX_LABEL_CHARS = 20, 3, 40


class JobDataError(ServiceError):
    """A job's data cannot be trained on (the job fails with this code and message)."""


def read_examples(path: Path, param: str) -> list[ChatExample]:
    if not path.is_file():
        raise JobDataError(f"the {param.replace('_', ' ')} was deleted before training "
                           "started; upload it again and create a new job",
                           code="file_not_found", param=param)
    try:
        return read_chat_jsonl(path)
    except Exception as err:
        raise JobDataError(str(err), code="invalid_file_format", param=param) from err


def detect_task(train: list[ChatExample], valid: list[ChatExample] | None) -> str:
    """'classification' when every answer is one of a few short, repeated labels."""
    counts = Counter(ex.label for ex in train)
    labels_ok = (len(counts) <= MAX_LABELS and min(counts.values()) >= MIN_PER_LABEL
                 and all(0 < len(x) <= MAX_LABEL_CHARS and "\n" not in x for x in counts))
    if valid is not None and not {ex.label for ex in valid} <= set(counts):
        return "generation"
    return "classification" if labels_ok else "generation"


def training_size(n_examples: int, has_validation_file: bool) -> int:
    """Examples left for training after tunesmith splits off validation and test sets."""
    if has_validation_file:
        return n_examples
    held_out = 2 * max(1, round(n_examples * SPLIT_FRACTION))
    return max(1, n_examples - held_out)


def resolve_hyperparameters(requested: dict[str, Any], n_train: int) -> dict[str, Any]:
    """OpenAI's three hyperparameters with every 'auto' made a number."""
    epochs = requested.get("n_epochs", "auto")
    batch = requested.get("batch_size", "auto")
    mult = requested.get("learning_rate_multiplier", "auto")
    batch = auto_batch_size(n_train) if batch == "auto" else min(int(batch), n_train)
    return {"n_epochs": auto_epochs(n_train) if epochs == "auto" else int(epochs),
            "batch_size": batch,
            "learning_rate_multiplier": 1.0 if mult == "auto" else float(mult)}


def check_job_data(train_path: Path, valid_path: Path | None, requested: dict[str, Any]
                   ) -> tuple[dict[str, Any], str, int]:
    """(resolved hyperparameters, task, examples) for a job's files, or a JobDataError."""
    train = read_examples(train_path, "training_file")
    valid = read_examples(valid_path, "validation_file") if valid_path else None
    if len(train) < MIN_EXAMPLES:
        raise JobDataError(f"Training file has {len(train)} example(s), but must have at "
                           f"least {MIN_EXAMPLES} examples", code="invalid_n_examples",
                           param="training_file")
    n_train = training_size(len(train), valid is not None)
    return resolve_hyperparameters(requested, n_train), detect_task(train, valid), len(train)


def run_config(*, job_id: str, run_dir: Path, base_ref: str, train_path: Path,
               valid_path: Path | None, hyperparameters: dict[str, Any], task: str, seed: int,
               max_eval_examples: int) -> RunConfig:
    """The tunesmith run of a job: a checkpoint per epoch, the last 3 kept, no early stop."""
    batch = int(hyperparameters["batch_size"])
    lr = auto_learning_rate(METHOD, batch) * float(hyperparameters["learning_rate_multiplier"])
    data: dict[str, Any] = {"train_file": str(train_path), "max_test_examples": max_eval_examples,
                            "validation_fraction": SPLIT_FRACTION,
                            "test_fraction": SPLIT_FRACTION}
    if valid_path is not None:
        # the validation file doubles as the test set rather than taking training examples
        data.update(validation_file=str(valid_path), test_file=str(valid_path))
    return parse_config({
        "name": job_id, "output_dir": str(run_dir), "model": {"base": base_ref}, "data": data,
        "train": {"method": METHOD, "epochs": int(hyperparameters["n_epochs"]),
                  "batch_size": batch, "learning_rate": lr, "eval_every": "epoch",
                  "keep_checkpoints": KEEP_CHECKPOINTS, "early_stopping_patience": None,
                  "seed": seed},
        "eval": {"task": task, "compare_base": False},
    }, source=f"job {job_id}")

