"""``tunesmith data label-issues FILE`` and the run's label check: suspected wrong labels.

The base model's middle-layer hidden states, mean-pooled per text (``models.embed``), feed a
k-fold logistic-regression probe; cleanlab names the examples whose given label the probe,
never having seen it, finds unlikely (``data.label_issues``). The suspects go to a JSONL file
to review: line, given label, suggested label, the probe's confidence and the text.

Nothing changes silently: ``action="drop"`` writes the data without the suspects (each one in
the rejects file with code ``label_issue``), ``"relabel"`` writes it with the suggested label
(each change listed in the issues file), and both are options the user names.

    from tunesmith.flows.label_issues import label_issues_file
    found = label_issues_file("tickets.jsonl")
    print(found.report.to_json()["found"], found.issues_file)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.chat import ChatExample
from tunesmith.data.formats import ReadOptions, detect_format, iter_records
from tunesmith.data.inspect import MAX_CLASSES
from tunesmith.data.label_issues import ACTIONS, Action, LabelIssueReport, find_issues
from tunesmith.data.records import Record, record_label, record_to_json, removed
from tunesmith.data.rejects import Rejected, write_rejects
from tunesmith.errors import ConfigError, DataError, Problem

__all__ = ["LabelIssueRun", "apply_action", "find_in_records", "label_issues_file",
           "probe_text", "with_label"]


@dataclass
class LabelIssueRun:
    """What a label-issue check found and wrote."""

    report: LabelIssueReport
    issues_file: Path
    action: Action
    output: Path | None = None    # the data with suspects dropped or relabelled
    rejects: Path | None = None   # rows left out: invalid ones, and with "drop" the suspects
    invalid: int = 0

    def lines(self, sample: int = 10) -> list[str]:
        r = self.report
        out = [f"{r.examples} labelled examples; probe accuracy (out of sample) "
               f"{r.probe_accuracy:.1%}; {len(r.issues)} suspected label issue(s) "
               f"({r.rate:.1%})"]
        out += [f"  {pair}: {n}" for pair, n in r.by_pair.items()]
        for i in r.issues[:sample]:
            text = (i.text or "").replace("\n", " ")
            out.append(f"  line {i.line}: given {i.given!r}, suggested {i.suggested!r} "
                       f"({i.confidence:.0%}): {text[:80]}")
        out.append(f"every suspect, most suspicious first: {self.issues_file}")
        if self.output is not None:
            done = "without the suspects" if self.action == "drop" else "with suggested labels"
            out.append(f"data {done}: {self.output}")
        if self.rejects is not None:
            out.append(f"rows left out, with reasons: {self.rejects}")
        if self.invalid:
            out.append(f"{self.invalid} invalid row(s) were not checked")
        return out


def probe_text(record: Record) -> str:
    """What the probe reads: the prompt's user (and earlier assistant) turns, no system
    message (the same for every row) and never the answer being judged."""
    prompt = record.prompt
    return "\n".join(m["content"] for m in prompt
                     if m.get("role") != "system" and isinstance(m.get("content"), str))


def with_label(record: ChatExample, label: str) -> ChatExample:
    """The record with its label (the last assistant answer, and a ``label`` field) replaced."""
    messages = [dict(m) for m in record.messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages[last]["content"] = label
    extra = {**record.extra, "label": label} if "label" in record.extra else record.extra
    return dataclasses.replace(record, messages=messages, extra=extra)


def _labelled(records: Sequence[Record], source: str) -> list[str]:
    labels = []
    for r in records:
        label = record_label(r) if isinstance(r, ChatExample) else None
        if not label:
            raise DataError("has no label (a classification label or a final assistant "
                            "answer); label issues need labelled data", path=source,
                            line=r.line, field="label", code="missing_label")
        labels.append(label)
    distinct = len(set(labels))
    if distinct > MAX_CLASSES:
        raise DataError(f"{distinct} different answers: this looks like generation data, not "
                        f"classification (at most {MAX_CLASSES} labels); label issues are "
                        "for labelled data", path=source)
    return labels


def find_in_records(records: Sequence[Record], model: Any, tokenizer: Any, *,
                    layer: int | None = None, folds: int = 5, seed: int = 0,
                    source: str = "", advance: Callable[[int], None] | None = None
                    ) -> LabelIssueReport:
    """Suspected label issues among labelled records (the loaded model gives the features).

    Identical texts are embedded once (real data repeats messages).
    """
    from tunesmith.models.embed import embed_texts

    if not records:
        raise DataError("no examples to check", path=source or None, code="empty_file")
    labels = _labelled(records, source)
    texts = [probe_text(r) for r in records]
    unique = list(dict.fromkeys(texts))
    features = embed_texts(model, tokenizer, unique, layer=layer, advance=advance)
    where = {t: k for k, t in enumerate(unique)}
    rows = features[[where[t] for t in texts]]
    return find_issues(rows, labels, folds=folds, seed=seed,
                       lines=[r.line for r in records], texts=texts)


def apply_action(records: Sequence[Record], report: LabelIssueReport, action: Action,
                 *, split: str | None = None) -> tuple[list[Record], list[Rejected]]:
    """The records to keep (relabelled where asked) and, with ``drop``, the suspects as
    rejects with code ``label_issue``."""
    if action not in ACTIONS:
        raise ConfigError(f"label-issue action {action!r}: expected one of {list(ACTIONS)}")
    if action == "report" or not report.issues:
        return list(records), []
    by_index = {i.index: i for i in report.issues}
    kept: list[Record] = []
    dropped: list[Rejected] = []
    for k, r in enumerate(records):
        issue = by_index.get(k)
        if issue is None:
            kept.append(r)
        elif action == "drop":
            dropped.append(removed(r, "label_issues", Problem(
                "label_issue", f"label {issue.given!r} looks wrong: a probe that never saw it "
                f"gives {issue.suggested!r} {issue.confidence:.0%} (and {issue.given!r} "
                f"{issue.given_probability:.0%}); check it, fix the label if needed and put "
                "the row back", line=r.line, field="label"), split))
        elif isinstance(r, ChatExample):  # _labelled accepts only chat examples
            kept.append(with_label(r, issue.suggested))
    return kept, dropped


def write_issues(path: Path, report: LabelIssueReport, *, action: Action) -> Path:
    """The suspects as JSONL (most suspicious first), written beside and renamed in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding="utf-8") as fh:
        for issue in report.issues:
            row = {"line": issue.line, "given": issue.given, "suggested": issue.suggested,
                   "confidence": issue.confidence,
                   "given_probability": issue.given_probability,
                   "action": {"report": "none", "drop": "dropped",
                              "relabel": "relabelled"}[action],
                   "text": issue.text}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(partial, path)
    return path


def label_issues_file(path: Path | str, *, read: ReadOptions | None = None,
                      model: str = "smollm2-135m-instruct", home: Path | None = None,
                      layer: int | None = None, folds: int = 5, seed: int = 0,
                      action: Action = "report", output: Path | str | None = None,
                      issues_file: Path | str | None = None,
                      advance: Callable[[int], None] | None = None) -> LabelIssueRun:
    """Check every labelled row of a data file; write the suspects (and, with ``drop`` or
    ``relabel``, the changed data to ``output``, default ``<file>.<action>.jsonl``)."""
    from tunesmith.models.load import load
    from tunesmith.models.resolve import default_home, resolve_model

    path = Path(path)
    if action not in ACTIONS:
        raise ConfigError(f"--action {action!r}: expected one of {list(ACTIONS)}")
    if output is not None and action == "report":
        raise ConfigError("--output is for the changed data: add --action drop or relabel")
    read = dataclasses.replace(read or ReadOptions(), format=detect_format(path, read))
    model_dir = resolve_model(model, home=home or default_home())  # fails before reading
    records: list[Record] = []
    invalid: list[Rejected] = []
    for item in iter_records(path, read):
        (invalid if isinstance(item, Rejected) else records).append(item)
    if not records:
        raise DataError("no valid example to check" + (
            f" ({len(invalid)} invalid row(s); see `tunesmith data validate`)" if invalid
            else ""), path=path, code="empty_file")
    _labelled(records, str(path))  # unlabelled data fails before the model loads
    net, tokenizer = load(model_dir)
    report = find_in_records(records, net, tokenizer, layer=layer, folds=folds, seed=seed,
                             source=str(path), advance=advance)
    stem = path.with_suffix("")
    found = LabelIssueRun(report, write_issues(
        Path(issues_file) if issues_file else Path(f"{stem}.label_issues.jsonl"), report,
        action=action), action, invalid=len(invalid))
    if action != "report":
        out = Path(output) if output else Path(f"{stem}.{action}.jsonl")
        kept, dropped = apply_action(records, report, action)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        with partial.open("w", encoding="utf-8") as fh:
            for r in kept:
                fh.write(json.dumps(record_to_json(r), ensure_ascii=False, default=str) + "\n")
        os.replace(partial, out)
        found.output = out
        found.rejects = write_rejects(Path(f"{out.with_suffix('')}.rejects.jsonl"),
                                      [*invalid, *dropped])
    return found
