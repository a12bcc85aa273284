"""What flows between the data stages: canonical records, rows left out, and the tally.

Every stage (convert, validate, clean, redact, split) consumes and yields
``Record | Rejected``. A ``Rejected`` (see ``tunesmith.data.rejects``) carries the line, the
problems and the input as read, so nothing is dropped silently; ``Tally`` keeps the count
identity ``read == written + invalid + removed`` that each stage's summary states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.chat import ChatExample
from tunesmith.data.preference import PreferenceExample
from tunesmith.data.rejects import Rejected
from tunesmith.errors import Problem

Record = ChatExample | PreferenceExample


def removed(record: Record, stage: str, problem: Problem, split: str | None = None) -> Rejected:
    """A valid record a stage leaves out (a duplicate, too long...), kept for the rejects file."""
    return Rejected(record.source, record.line, stage, (problem,), record_to_json(record), split)


@dataclass
class Tally:
    """Counts in and out of a stage; ``balanced`` is the promise that nothing was lost."""

    read: int = 0
    written: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    removed: Counter[str] = field(default_factory=Counter)

    def add(self, item: Record | Rejected) -> None:
        """Count one item leaving the stage (a written record or a rejected row)."""
        if isinstance(item, Rejected):
            (self.invalid if item.invalid else self.removed)[item.code] += 1
        else:
            self.written += 1

    @property
    def left_out(self) -> int:
        return sum(self.invalid.values()) + sum(self.removed.values())

    @property
    def balanced(self) -> bool:
        return self.read == self.written + self.left_out

    def summary(self) -> str:
        def part(name: str, counts: Counter[str]) -> str:
            total = sum(counts.values())
            detail = ", ".join(f"{k} {v}" for k, v in counts.most_common())
            return f" + {name} {total}" + (f" ({detail})" if detail else "")

        text = (f"read {self.read} = written {self.written}" + part("invalid", self.invalid)
                + part("removed", self.removed))
        return text + ("" if self.balanced else "  [COUNTS DO NOT ADD UP: this is a bug]")

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "written": self.written, "invalid": dict(self.invalid),
                "removed": dict(self.removed), "balanced": self.balanced}


def record_to_json(record: Record) -> dict[str, Any]:
    """The canonical JSON line of a record (OpenAI chat or OpenAI preference format)."""
    if isinstance(record, PreferenceExample):
        return record.to_json()
    return {"messages": record.messages, **record.extra}


def all_messages(record: Record) -> Iterator[dict[str, Any]]:
    if isinstance(record, PreferenceExample):
        yield from (*record.prompt, *record.chosen, *record.rejected)
    else:
        yield from record.messages


def record_text(record: Record) -> str:
    """Every text content of a record, one per line: what duplicates are judged on."""
    return "\n".join(m["content"] for m in all_messages(record)
                     if isinstance(m.get("content"), str))


def record_length(record: Record) -> int:
    """Characters of text content in a record."""
    return sum(len(m["content"]) for m in all_messages(record)
               if isinstance(m.get("content"), str))


def exact_key(record: Record) -> int:
    """A 64-bit fingerprint of the record's messages (not its line or metadata)."""
    if isinstance(record, PreferenceExample):
        payload: Any = [record.prompt, record.chosen, record.rejected]
    else:
        payload = record.messages
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def map_contents(record: Record, fn: Callable[[str], str]) -> Record:
    """A copy of the record with ``fn`` applied to every text content."""

    def convert(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**m, "content": fn(m["content"])} if isinstance(m.get("content"), str) else m
                for m in messages]

    if isinstance(record, PreferenceExample):
        return dataclasses.replace(record, prompt=convert(record.prompt),
                                   chosen=convert(record.chosen),
                                   rejected=convert(record.rejected))
    return dataclasses.replace(record, messages=convert(record.messages))


def empty_content_field(record: Record) -> str | None:
    """The field of the first message whose text became empty, or None."""
    if isinstance(record, PreferenceExample):
        parts = [("input.messages", record.prompt), ("preferred_output", record.chosen),
                 ("non_preferred_output", record.rejected)]
    else:
        parts = [("messages", record.messages)]
    for where, messages in parts:
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, str) and not content.strip():
                return f"{where}[{i}].content"
            if content is None and not m.get("tool_calls"):
                return f"{where}[{i}].content"
    return None


def record_label(record: Record) -> str | None:
    """The class label: the ``label`` field where the source had one, else the last answer."""
    label = record.extra.get("label")
    if label is not None:
        return str(label)
    if isinstance(record, ChatExample):
        return record.label
    return None


def as_chat(record: Record) -> ChatExample:
    """A pair as the chat example it teaches (the prompt and the preferred answer)."""
    if isinstance(record, ChatExample):
        return record
    return ChatExample(record.messages, record.line, record.source, record.extra)


def example_label(record: Record) -> str:
    """The class label a model should answer: the (preferred) answer, stripped."""
    return as_chat(record).label
