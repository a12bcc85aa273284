"""From a job to a tunesmith run: check its files, pick the task, resolve 'auto' values.

The run itself is ``tunesmith.flows.run`` with a RunConfig built here through ``parse_config``,
and its 'auto' values are resolved by tunesmith's own ``resolve_hyperparameters`` on the
training split the run makes, so the service trains exactly as the CLI does. A supervised job
trains chat examples (``train.objective: sft``); a DPO job trains preference pairs with
``train.objective: dpo`` and its ``beta`` as ``train.preference.beta``. A supervised job's
``privacy`` (tunesmith's extension) becomes ``train.privacy``; its noise is planned here, with
the training split's size, so settings that cannot work fail before training starts.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from tunesmith.config import (
    ResolvedHyperparameters,
    RunConfig,
    parse_config,
    resolve_hyperparameters,
)
from tunesmith.data.chat import ChatExample, read_chat_jsonl
from tunesmith.data.formats import ReadOptions, iter_records
from tunesmith.data.preference import PreferenceExample
from tunesmith.data.records import as_chat
from tunesmith.data.rejects import Rejected
from tunesmith.errors import ConfigError, DataError, Problem, ServiceError
from tunesmith.service.objects import method_type

MIN_EXAMPLES = 10  # OpenAI's minimum, and what tunesmith needs to split off held-out sets
METHOD = "lora"
KEEP_CHECKPOINTS = 3  # as OpenAI: the checkpoints of the last 3 epochs
# An answer set this small and this repetitive is a label set: evaluate as classification.
MAX_LABELS, MIN_PER_LABEL, MAX_LABEL_CHARS = 20, 3, 40


class JobDataError(ServiceError):
    """A job's data cannot be trained on (the job fails with this code and message)."""


class PrivacyPlanError(JobDataError):
    """A job's differential privacy settings cannot work with its data (named by ``param``)."""


PRIVACY = "method.supervised.privacy"
HYPERPARAMETERS = "method.supervised.hyperparameters"
# the run configuration's names in plan_privacy's messages, and the job's fields they are
_CONFIG_NAME = re.compile(r"\btrain\.(privacy\.\w+|batch_size)\b")


def _check_present(path: Path, param: str) -> None:
    if not path.is_file():
        raise JobDataError(f"the {param.replace('_', ' ')} was deleted before training "
                           "started; upload it again and create a new job",
                           code="file_not_found", param=param)


def read_examples(path: Path, param: str) -> list[ChatExample]:
    _check_present(path, param)
    try:
        return read_chat_jsonl(path)
    except Exception as err:
        raise JobDataError(str(err), code="invalid_file_format", param=param) from err


def read_pairs(path: Path, param: str) -> list[PreferenceExample]:
    """The preference pairs of a DPO job's file, or a JobDataError listing every bad line."""
    _check_present(path, param)
    pairs: list[PreferenceExample] = []
    problems: list[Problem] = []
    try:
        for item in iter_records(path, ReadOptions(format="preference")):
            if isinstance(item, Rejected):
                problems.extend(item.problems)
            elif isinstance(item, PreferenceExample):
                pairs.append(item)
    except DataError as err:
        raise JobDataError(str(err), code="invalid_file_format", param=param) from err
    if problems:
        err = DataError(f"{path.name}: {len(problems)} problem(s) in the preference pairs",
                        path=path.name, problems=problems)
        raise JobDataError(str(err), code="invalid_file_format", param=param)
    return pairs


def detect_task(train: list[ChatExample], valid: list[ChatExample] | None) -> str:
    """'classification' when every answer is one of a few short, repeated labels."""
    counts = Counter(ex.label for ex in train)
    labels_ok = (len(counts) <= MAX_LABELS and min(counts.values()) >= MIN_PER_LABEL
                 and all(0 < len(x) <= MAX_LABEL_CHARS and "\n" not in x for x in counts))
    if valid is not None and not {ex.label for ex in valid} <= set(counts):
        return "generation"
    return "classification" if labels_ok else "generation"


def _check_count(n: int) -> None:
    if n < MIN_EXAMPLES:
        raise JobDataError(f"Training file has {n} example(s), but must have at least "
                           f"{MIN_EXAMPLES} examples", code="invalid_n_examples",
                           param="training_file")


def check_job_data(train_path: Path, valid_path: Path | None, method: str = "supervised"
                   ) -> str:
    """The task of a job whose files are valid examples of its method (chat examples, or
    preference pairs for 'dpo'), enough of them; else a JobDataError.

    A DPO job's task is told from its preferred answers, as the run evaluates a pair: as the
    chat example of its preferred answer (``as_chat``).
    """
    if method == "dpo":
        train = [as_chat(p) for p in read_pairs(train_path, "training_file")]
        valid = ([as_chat(p) for p in read_pairs(valid_path, "validation_file")]
                 if valid_path else None)
    else:
        train = read_examples(train_path, "training_file")
        valid = read_examples(valid_path, "validation_file") if valid_path else None
    _check_count(len(train))
    return detect_task(train, valid)


def training_size(cfg: RunConfig) -> int:
    """How many examples the run trains on: its own reading and split of the data.

    Near-duplicates stay in one split, so this is not a fixed share of the file. Examples
    longer than ``data.max_length`` are left out later, once the run has the tokenizer.
    """
    # imported here: it loads torch, which the server needs only once it plans a job
    from tunesmith.flows.steps import load_splits

    try:
        return len(load_splits(cfg).train)
    except DataError as err:
        valid = cfg.data.validation_file
        param = ("validation_file" if valid is not None and err.path is not None
                 and Path(err.path) == valid else "training_file")
        raise JobDataError(str(err), code="invalid_file_format", param=param) from err


def check_privacy(cfg: RunConfig, hp: ResolvedHyperparameters, n_train: int, *,
                  hyperparameters: str = HYPERPARAMETERS) -> None:
    """Plan a private run's noise as the run will (``privacy_for``); settings that cannot
    work (a batch under 16 or not below n, delta not below 1/n, an unreachable
    target_epsilon) raise a PrivacyPlanError in the job's terms, naming the field:
    ``method.supervised.privacy.<field>`` or ``<hyperparameters>.batch_size``."""
    if cfg.train.privacy is None:
        return
    # imported here: it loads torch and Opacus, which the server needs only for a private job
    from tunesmith.flows.finetune import privacy_for

    def job_name(found: re.Match[str]) -> str:
        name = found.group(1)  # 'batch_size' or 'privacy.<field>'
        return (f"{hyperparameters}.batch_size" if name == "batch_size"
                else f"{PRIVACY}.{name.removeprefix('privacy.')}")

    try:
        privacy_for(cfg, hp, n_train)
    except ConfigError as err:
        named = _CONFIG_NAME.search(str(err))  # the first field the message names
        raise PrivacyPlanError(_CONFIG_NAME.sub(job_name, str(err)),
                               code="invalid_hyperparameters",
                               param=job_name(named) if named else PRIVACY) from err


def plan_run(*, job_id: str, run_dir: Path, base_ref: str, train_path: Path,
             valid_path: Path | None, requested: dict[str, Any], task: str, seed: int,
             max_eval_examples: int, hyperparameters_param: str = HYPERPARAMETERS,
             energy: dict[str, Any] | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """The tunesmith run of a job, and OpenAI's hyperparameters as the job reports them: the
    three of every job, ``beta`` for a DPO job (the job's method: ``method_type``), and a
    private job's ``privacy`` settings as asked. ``energy``: the service's ``energy:``
    section for the run (``ServiceSettings.energy``).

    A checkpoint per epoch, the last 3 kept, no early stop. ``resolve_hyperparameters`` turns
    each 'auto' into a number for the run's training split; ``learning_rate_multiplier``
    scales tunesmith's automatic learning rate. The run gets the resolved numbers, so
    planning the job again with them (when training starts) gives the same run. A private
    job's batch 'auto' is a DP-sized batch; its noise is planned with ``check_privacy``
    (errors name ``hyperparameters_param``.batch_size).
    """
    data: dict[str, Any] = {"train_file": str(train_path), "max_test_examples": max_eval_examples}
    if valid_path is not None:
        # the validation file doubles as the test set rather than taking training examples
        data.update(validation_file=str(valid_path), test_file=str(valid_path))
    spec: dict[str, Any] = {
        "name": job_id, "output_dir": str(run_dir), "model": {"base": base_ref}, "data": data,
        "train": {"method": METHOD, "epochs": requested.get("n_epochs", "auto"),
                  "batch_size": requested.get("batch_size", "auto"), "learning_rate": "auto",
                  "eval_every": "epoch", "keep_checkpoints": KEEP_CHECKPOINTS,
                  "early_stopping_patience": None, "seed": seed},
        "eval": {"task": task, "compare_base": False},
    }
    if energy:
        spec["energy"] = dict(energy)
    dpo = method_type(requested) == "dpo"
    if dpo:
        spec["train"].update(objective="dpo",
                             preference={"beta": requested.get("beta", "auto")})
    privacy = requested.get("privacy")
    if privacy:
        spec["train"]["privacy"] = dict(privacy)
    asked = parse_config(spec, source=f"job {job_id}")
    n_train = training_size(asked)
    hp = resolve_hyperparameters(asked.train, n_train)
    multiplier = requested.get("learning_rate_multiplier", "auto")
    multiplier = 1.0 if multiplier == "auto" else float(multiplier)
    spec["train"].update(epochs=hp.epochs, batch_size=hp.batch_size,
                         learning_rate=hp.learning_rate * multiplier)
    reported: dict[str, Any] = {"n_epochs": hp.epochs, "batch_size": hp.batch_size,
                                "learning_rate_multiplier": multiplier}
    if dpo:
        spec["train"]["preference"]["beta"] = reported["beta"] = hp.beta
    cfg = parse_config(spec, source=f"job {job_id}")
    if privacy:
        check_privacy(cfg, hp, n_train, hyperparameters=hyperparameters_param)
        reported["privacy"] = dict(privacy)
    return cfg, reported
