"""The run's checks of its own data before training: dataset bias per group field and, when
asked, suspected wrong labels in the training split (``data.group_fields``,
``data.group_reference``, ``data.label_issues``). Their figures go to the report's data section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.data.inspect import GroupCounter
from tunesmith.data.records import record_label
from tunesmith.data.rejects import Rejected
from tunesmith.data.split import Splits

SAMPLE = 10  # suspects shown in the report; the file has them all


@dataclass
class DataChecks:
    splits: Splits  # the training split without (or relabelled at) the suspects, if asked
    results: dict[str, Any] = field(default_factory=dict)  # data_bias, label_issues
    rejects: list[Rejected] = field(default_factory=list)  # suspects left out
    warnings: list[str] = field(default_factory=list)


def group_fields(cfg: RunConfig) -> list[str]:
    """The fields the bias report covers: data.group_fields, else eval.group_field."""
    fields = list(cfg.data.group_fields)
    return fields or ([cfg.eval.group_field] if cfg.eval.group_field else [])


def bias(cfg: RunConfig, splits: Splits) -> dict[str, Any] | None:
    """The bias report of the training split, with the test split's coverage."""
    from tunesmith.data.bias import bias_report, load_reference

    fields = group_fields(cfg)
    if not fields:
        return None
    is_cls = cfg.eval.task == "classification"
    train = GroupCounter(fields)
    for ex in splits.train:
        train.add(ex, record_label(ex) if is_cls else None)
    train.check()  # a field no training row has is a typo: say so, with "did you mean"
    test = GroupCounter(fields)
    for ex in splits.test:
        test.add(ex, None)
    reference = load_reference(cfg.data.group_reference, fields) \
        if cfg.data.group_reference else None
    report = bias_report(train.counts if is_cls else train.without_labels(),
                         reference=reference, test_counts=test.counts,
                         positive_label=cfg.eval.positive_label if is_cls else None)
    return report.to_dict()


def check_data(cfg: RunConfig, run_dir: Path, splits: Splits, model: Any, tokenizer: Any,
               *, advance: Callable[[int], None] | None = None, write: bool = True
               ) -> DataChecks:
    """Label check, then the bias report, of the run's splits (each only when configured).

    ``write=False`` (a process other than a distributed run's main one) checks alike but
    leaves ``label_issues.jsonl`` to the main process."""
    checks = DataChecks(splits)
    if cfg.data.label_issues != "off":
        _label_check(cfg, run_dir, checks, model, tokenizer, advance, write)
    found_bias = bias(cfg, checks.splits)  # of what is trained on, after any drop
    if found_bias is not None:
        checks.results["data_bias"] = found_bias
        checks.warnings += found_bias["warnings"]
    return checks


def _label_check(cfg: RunConfig, run_dir: Path, checks: DataChecks, model: Any,
                 tokenizer: Any, advance: Callable[[int], None] | None, write: bool) -> None:
    from tunesmith.flows.label_issues import apply_action, find_in_records, write_issues

    action, splits = cfg.data.label_issues, checks.splits
    report = find_in_records(splits.train, model, tokenizer, seed=cfg.train.seed,
                             source=str(cfg.data.train_file), advance=advance)
    path = run_dir / "label_issues.jsonl"
    if write:
        write_issues(path, report, action=action)
    kept, dropped = apply_action(splits.train, report, action, split="train")
    checks.splits = dataclasses.replace(splits, train=kept)
    checks.rejects = dropped
    summary = report.to_json()
    summary.pop("issues")
    checks.results["label_issues"] = {
        **summary, "action": action, "file": path.name,
        "sample": [i.to_json() for i in report.issues[:SAMPLE]]}
    if report.issues and action == "report":
        checks.warnings.append(
            f"{len(report.issues)} training label(s) look wrong ({report.rate:.1%}); review "
            f"{path.name}, or set data.label_issues: drop or relabel")
