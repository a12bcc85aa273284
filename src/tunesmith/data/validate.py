"""Validate a stream of records: OpenAI's data checks plus what training here needs.

Errors (the file should not be trained on as it is): rows that do not fit the format (the
OpenAI categories data_type, missing_messages_list, message_missing_key,
message_unrecognized_key, unrecognized_role, missing_content,
example_missing_assistant_message; and invalid_json, not_utf8), empty_file,
too_few_examples, too_long (over ``max_tokens`` with the model's chat template),
no_trainable_tokens, label_not_allowed, template_error.
Warnings: duplicate, conflicting_labels.

Memory stays flat: duplicates are tracked by 64-bit fingerprints, and at most
``max_kept_per_code`` findings of each kind are kept (all are counted).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from tunesmith.data.chat import ChatExample
from tunesmith.data.dedup import CompactMap
from tunesmith.data.records import Record, exact_key, record_label
from tunesmith.data.rejects import Rejected
from tunesmith.errors import DataError, Problem

Severity = Literal["error", "warning"]
MIN_EXAMPLES = 10  # OpenAI's minimum for a fine-tuning file
TOKEN_BATCH = 256  # examples tokenized together


@dataclass(frozen=True)
class Finding:
    """A problem and how much it matters: an error fails the file, a warning does not."""

    severity: Severity
    problem: Problem

    @property
    def code(self) -> str:
        return self.problem.code

    @property
    def message(self) -> str:
        return self.problem.message

    @property
    def line(self) -> int | None:
        return self.problem.line

    @property
    def field(self) -> str | None:
        return self.problem.field

    def render(self, path: str | None) -> str:
        return f"{self.severity}: " + self.problem.render(path)

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, **self.problem.to_json()}


@dataclass
class ValidationReport:
    """Everything found in a file: kept findings, counts per code, and example counts."""

    path: str | None = None
    format: str | None = None
    rows: int = 0
    examples: int = 0
    findings: list[Finding] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    severities: dict[str, Severity] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def n_errors(self) -> int:
        return sum(n for c, n in self.counts.items() if self.severities[c] == "error")

    @property
    def n_warnings(self) -> int:
        return sum(n for c, n in self.counts.items() if self.severities[c] == "warning")

    @property
    def ok(self) -> bool:
        return self.n_errors == 0

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "rows": self.rows,
                "examples": self.examples, "ok": self.ok, "errors": self.n_errors,
                "warnings": self.n_warnings, "counts": dict(self.counts),
                "findings": [f.to_json() for f in self.findings]}

    def lines(self, limit: int = 50) -> list[str]:
        """Human-readable findings (errors first), then a one-line verdict."""
        def by_line(findings: list[Finding]) -> list[Finding]:
            return sorted(findings, key=lambda f: (f.line is None, f.line or 0))

        ordered = by_line(self.errors) + by_line(self.warnings)
        out = [f.render(self.path) for f in ordered[:limit]]
        if len(ordered) > limit:
            out.append(f"... and {len(ordered) - limit} more (use --json for all kept findings)")
        by_code = ", ".join(f"{c} {n}" for c, n in self.counts.most_common())
        verdict = "OK" if self.ok else "FAILED"
        out.append(f"{verdict}: {self.examples} valid examples in {self.rows} rows; "
                   f"{self.n_errors} error(s), {self.n_warnings} warning(s)"
                   + (f" ({by_code})" if by_code else ""))
        return out


def _fingerprint(value: Any) -> int:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class Validator:
    """Feed records one at a time with ``add``; ``finish`` returns the report."""

    def __init__(self, *, tokenizer: Any = None, max_tokens: int | None = None,
                 labels: Sequence[str] | None = None, min_examples: int = MIN_EXAMPLES,
                 max_kept_per_code: int = 200, path: str | None = None,
                 format: str | None = None) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.labels = list(labels) if labels is not None else None
        self.min_examples, self.max_kept = min_examples, max_kept_per_code
        self.report = ValidationReport(path=path, format=format)
        self._seen = CompactMap()  # fingerprint of the messages -> first line
        # prompt fingerprint -> first line << 16 | label id: flat memory for conflicting labels
        self._prompts = CompactMap()
        self._label_ids: dict[str, int] = {}
        self._pending: list[tuple[int, list[Any]]] = []  # examples waiting for token counts

    def _add(self, severity: Severity, problem: Problem) -> None:
        self.report.counts[problem.code] += 1
        self.report.severities[problem.code] = severity
        if self.report.counts[problem.code] <= self.max_kept:
            self.report.findings.append(Finding(severity, problem))

    def add(self, item: Record | Rejected) -> None:
        self.report.rows += 1
        if isinstance(item, Rejected):
            for p in item.problems:
                self._add("error", p)
            return
        self.report.examples += 1
        self._check_duplicate(item)
        if self.labels is not None or "label" in item.extra:
            self._check_label(item)
        if self.tokenizer is not None:
            self._check_tokens(item)

    def _check_duplicate(self, item: Record) -> None:
        key = exact_key(item)
        first = self._seen.get(key)
        if first is not None:
            self._add("warning", Problem("duplicate", f"same messages as line {first}",
                                         item.line))
        else:
            self._seen.add_many(np.array([key], dtype=np.uint64), item.line)

    def _check_label(self, item: Record) -> None:
        label = record_label(item)
        if label is None or not isinstance(item, ChatExample):
            return
        where = "label" if "label" in item.extra else f"messages[{len(item.messages) - 1}].content"
        if self.labels is not None and label not in self.labels:
            close = difflib.get_close_matches(label, self.labels, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self._add("error", Problem("label_not_allowed", f"{label!r} is not one of "
                                       f"{self.labels}{hint}", item.line, where))
        label_id = self._label_ids.setdefault(label, len(self._label_ids))
        if label_id >= 1 << 16:
            return  # free text, not class labels: conflicts mean nothing
        prompt = np.array([_fingerprint(item.prompt)], dtype=np.uint64)
        first = self._prompts.get(int(prompt[0]))
        if first is None:
            self._prompts.add_many(prompt, item.line << 16 | label_id)
        elif first & 0xFFFF != label_id:
            names = {i: name for name, i in self._label_ids.items()}
            self._add("warning", Problem(
                "conflicting_labels", f"same input as line {first >> 16} with label "
                f"{names[first & 0xFFFF]!r}, here {label!r}", item.line, where))

    def _check_tokens(self, item: Record) -> None:
        conversations = ([item.messages] if isinstance(item, ChatExample)
                         else [item.prompt + item.chosen, item.prompt + item.rejected])
        self._pending.append((item.line, conversations))
        if len(self._pending) >= TOKEN_BATCH:
            self._flush_tokens()

    def _flush_tokens(self) -> None:
        """Encode the pending examples as one batch; re-encode one by one to place an error."""
        from tunesmith.data.encode import encode_chats

        pending, self._pending = self._pending, []
        flat = [c for _, conversations in pending for c in conversations]
        try:
            encoded = iter(encode_chats(self.tokenizer, flat))
            results = [[next(encoded) for _ in conversations] for _, conversations in pending]
        except Exception:  # some example's template fails: find which
            results = [self._encode_one(line, conversations) for line, conversations in pending]
        for (line, _), found in zip(pending, results, strict=True):
            for enc in found or ():
                if self._token_problem(line, enc):
                    break

    def _encode_one(self, line: int, conversations: list[Any]) -> list[Any] | None:
        from tunesmith.data.encode import encode_chats

        try:
            return encode_chats(self.tokenizer, conversations)
        except DataError as err:
            self._add("error", Problem("template_error", str(err), line))
        except Exception as err:  # the model's Jinja template can raise anything
            self._add("error", Problem("template_error", "the chat template cannot render this "
                                       f"example ({type(err).__name__}: {err})", line))
        return None

    def _token_problem(self, line: int, encoded: Any) -> bool:
        if self.max_tokens is not None and len(encoded) > self.max_tokens:
            self._add("error", Problem(
                "too_long", f"{len(encoded)} tokens with the chat template, over "
                f"max_tokens={self.max_tokens}; shorten it or raise the limit (training leaves "
                "it out)", line, "messages"))
            return True
        if encoded.n_targets == 0:
            self._add("error", Problem(
                "no_trainable_tokens", "every assistant message has weight 0, so there is "
                "nothing to learn", line, "messages"))
            return True
        return False

    def finish(self) -> ValidationReport:
        if self._pending:
            self._flush_tokens()
        r = self.report
        if r.rows == 0:
            self._add("error", Problem("empty_file", "no examples; expected one JSON object "
                                       "(or table row) per line"))
        elif r.examples < self.min_examples:
            self._add("error", Problem("too_few_examples", f"{r.examples} valid example(s); "
                                       f"at least {self.min_examples} are needed"))
        return r


def validate_records(items: Iterable[Record | Rejected], **settings: Any) -> ValidationReport:
    """Validate a stream of records (see ``Validator`` for the settings)."""
    validator = Validator(**settings)
    for item in items:
        validator.add(item)
    return validator.finish()
