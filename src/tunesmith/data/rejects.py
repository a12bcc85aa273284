"""Rows left out of the data, and the one file they are written to.

``tunesmith run`` (``<run dir>/rejects.jsonl``) and ``tunesmith data convert | clean | redact |
split`` (``<output>.rejects.jsonl``, ``<out dir>/rejects.jsonl``) write the same JSON object
per line, with exactly these keys (``KEYS``)::

    file      the data file the row came from
    line      its line (JSONL, CSV, TSV) or item number (JSON array, Parquet); null if unknown
    split     "train", "validation" or "test" when the row was in a split; null when it was
              left out before the data was split
    stage     where it was left out (``STAGES``): validate, clean, dedup, encode or
              label_issues
    code      its category (``PROBLEM_CODES``): the first problem's code
    reason    what is wrong and what to change, for a person: every problem, with its field
    problems  every problem found: [{"code", "message", "line", "field"}]
    row       the row as read (an object; the line's text when it could not be decoded), or
              for a record a later stage left out, its canonical JSON

To add a row back, fix it as ``reason`` says and put ``row`` back into the data file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import Problem

KEYS = ("file", "line", "split", "stage", "code", "reason", "problems", "row")

STAGES = {
    "validate": "the row is not valid data of its format (cannot be decoded, or a field is "
                "missing or wrong); fix the row",
    "clean": "after cleaning (and redaction) the example is empty, or shorter or longer than "
             "the character limits",
    "dedup": "an exact or near duplicate of an earlier line (named in the reason), which is kept",
    "encode": "with the model's chat template the example is over data.max_length tokens, or "
              "has no assistant tokens to learn from",
    "label_issues": "the label looks wrong to a cross-validated probe (tunesmith data "
                    "label-issues --action drop, or data.label_issues: drop in a run)",
}

# Every Problem code, with what it means. The OpenAI data-check names are kept where they exist.
PROBLEM_CODES = {
    # the row does not fit its format
    "not_utf8": "bytes that are not UTF-8",
    "invalid_json": "the line is not one JSON value",
    "data_type": "a value of the wrong type, or a table row with the wrong number of fields",
    "missing_messages_list": "no list of messages (or conversations, or outputs)",
    "message_missing_key": "a message without a role (a ShareGPT turn without from)",
    "message_unrecognized_key": "a message key the chat format does not have",
    "unrecognized_role": "a role that is not system, user, assistant or tool",
    "missing_content": "an empty or missing text",
    "invalid_weight": "a message weight that is not 0 or 1",
    "example_missing_assistant_message": "no assistant message to learn from",
    "missing_label": "a classification row without a label",
    "input_ends_with_assistant": "a preference prompt that ends with an assistant turn",
    "identical_outputs": "preferred and non-preferred answers are the same",
    "multiple_output_messages": "a preference answer of more than one message (it must be "
                                "exactly one assistant message)",
    "output_role_not_assistant": "a preference answer whose message is not the assistant's",
    "no_shared_prompt": "TRL chosen and rejected conversations (no prompt key) that do not "
                        "share a prompt and differ only in their final answer",
    "wrong_kind_of_example": "chat examples where the objective needs preference pairs, or "
                             "pairs where it needs chat examples",
    # a valid record a stage leaves out
    "empty": "a message has no text left after cleaning",
    "too_short": "fewer characters than the minimum",
    "too_long": "more characters, or tokens with the chat template, than the limit",
    "duplicate": "the same messages as an earlier line",
    "near_duplicate": "nearly the same text as an earlier line",
    "no_trainable_tokens": "no assistant token to train on (every assistant weight is 0)",
    # found by validation of the whole file
    "template_error": "the model's chat template cannot render the example",
    "system_role_unsupported": "a system message where the chat template has no system role "
                               "(data.system_fallback: refuse)",
    "label_not_allowed": "a label outside the allowed labels",
    "conflicting_labels": "the same input with another label on an earlier line",
    "missing_file": "the file or directory named does not exist",
    "empty_file": "the file holds no examples",
    "too_few_examples": "fewer valid examples than needed",
    "data_error": "the file as a whole cannot be used (see the message)",
    # the dataset-bias report (data inspect --group-column)
    "unknown_field": "a group field that no row has",
    "bad_reference": "a reference file of group shares that is malformed or does not fit the data",
    # the label check (data label-issues)
    "label_issue": "a label that a probe which never saw it finds unlikely (a suspected error)",
}


@dataclass(frozen=True)
class Rejected:
    """A row left out: where it was, at which stage, every problem, and the row itself."""

    file: str
    line: int | None
    stage: str  # one of STAGES
    problems: tuple[Problem, ...]
    row: Any = None
    split: str | None = None

    def __post_init__(self) -> None:
        if not self.problems:
            raise ValueError("a Rejected row needs at least one problem saying why")
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {list(STAGES)}")

    @property
    def code(self) -> str:
        return self.problems[0].code

    @property
    def invalid(self) -> bool:
        """Whether the row itself is broken (as opposed to a valid record a stage left out)."""
        return self.stage == "validate"

    @property
    def reason(self) -> str:
        return "; ".join(f"{p.field}: {p.message}" if p.field else p.message
                         for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        """The rejects-file line (see the module docstring for the keys)."""
        return {"file": self.file, "line": self.line, "split": self.split, "stage": self.stage,
                "code": self.code, "reason": self.reason,
                "problems": [p.to_json() for p in self.problems], "row": self.row}


def write_rejects(path: Path | str, rejects: Iterable[Rejected]) -> Path | None:
    """Write rows left out to ``path``, one JSON object a line; the path, or None if none.

    ``rejects`` may be a stream (the data commands write theirs while the output is written):
    the file is written beside its place and renamed into it only when the stream ends, so an
    error leaves no half-written file. With nothing to write, a file left there by an earlier
    run is removed, since it would describe data that is no longer there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    count = 0
    try:
        with partial.open("w", encoding="utf-8") as fh:
            for item in rejects:
                # default=str: Parquet and CSV metadata columns may hold dates or decimals
                fh.write(json.dumps(item.to_json(), ensure_ascii=False, default=str) + "\n")
                count += 1
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if count == 0:
        partial.unlink()
        path.unlink(missing_ok=True)
        return None
    os.replace(partial, path)
    return path
