"""Clean canonical records: normalise text, optionally redact personal data, drop empty,
too short or too long examples, and exact and near duplicates (the first one seen is kept).

Works on any iterable of records, in memory (``clean_examples``) or streamed from a file
(``iter_clean``); every record left out comes back as a ``Rejected`` with its reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.data.dedup import CompactMap, NearDuplicateIndex
from tunesmith.data.normalize import TextOptions, clean_text
from tunesmith.data.pii import RedactOptions, redact_text
from tunesmith.data.records import (
    Record,
    empty_content_field,
    exact_key,
    map_contents,
    record_length,
    record_text,
    removed,
)
from tunesmith.data.rejects import Rejected
from tunesmith.errors import Problem


@dataclass(frozen=True)
class CleanOptions:
    """What cleaning does; the defaults are safe for any chat or classification data."""

    text: TextOptions = field(default_factory=TextOptions)
    redact: RedactOptions | None = None  # None: personal data is left as it is
    exact_duplicates: bool = True
    near_duplicates: bool = True
    near_threshold: float = 0.85  # Jaccard similarity of character 5-grams
    min_chars: int = 1  # shortest example kept, in characters of text content
    max_chars: int | None = None  # longest example kept; None: no limit
    seed: int = 1  # MinHash permutations: the same seed finds the same duplicates


@dataclass
class CleanReport:
    """What cleaning changed: texts per step, placeholders per entity, records left out."""

    changes: Counter[str] = field(default_factory=Counter)
    redacted: Counter[str] = field(default_factory=Counter)
    removed: Counter[str] = field(default_factory=Counter)
    examples_in: int = 0
    examples_out: int = 0
    left_out: list[Rejected] = field(default_factory=list)  # filled by clean_examples only

    def to_json(self) -> dict[str, Any]:
        return {"examples_in": self.examples_in, "examples_out": self.examples_out,
                "changes": dict(self.changes), "redacted": dict(self.redacted),
                "removed": dict(self.removed)}

    def lines(self) -> list[str]:
        """Human-readable summary, one fact a line."""
        out = [f"{self.examples_in} examples in, {self.examples_out} kept"]
        names = {"markup": "texts with HTML markup removed", "nfkc": "texts NFKC-normalised",
                 "confusables": "texts with look-alike letters folded",
                 "confusable_chars": "look-alike letters folded",
                 "control": "texts with control characters removed",
                 "whitespace": "texts with whitespace normalised"}
        out += [f"{n} {names.get(k, k)}" for k, n in sorted(self.changes.items())]
        out += [f"{n} [{k}] placeholders" for k, n in self.redacted.most_common()]
        out += [f"{n} removed: {k}" for k, n in self.removed.most_common()]
        return out


class _Cleaner:
    """The per-record steps, holding the duplicate indexes between records."""

    def __init__(self, options: CleanOptions, report: CleanReport) -> None:
        self.opts, self.report = options, report
        self.exact = CompactMap() if options.exact_duplicates else None
        self.near = (NearDuplicateIndex(options.near_threshold, seed=options.seed)
                     if options.near_duplicates else None)

    def text(self, value: str) -> str:
        value = clean_text(value, self.opts.text, self.report.changes)
        if self.opts.redact is not None:
            value = redact_text(value, self.opts.redact, self.report.redacted)
        return value

    def record(self, record: Record) -> Record | Rejected:
        record = map_contents(record, self.text)
        empty = empty_content_field(record)
        if empty is not None:
            return removed(record, "clean", Problem(
                "empty", "a message has no text left after cleaning", record.line, empty))
        length = record_length(record)
        if length < self.opts.min_chars:
            return removed(record, "clean", Problem(
                "too_short", f"{length} characters, under min_chars={self.opts.min_chars}",
                record.line))
        if self.opts.max_chars is not None and length > self.opts.max_chars:
            return removed(record, "clean", Problem(
                "too_long", f"{length} characters, over max_chars={self.opts.max_chars}",
                record.line))
        return self._deduplicate(record)

    def _deduplicate(self, record: Record) -> Record | Rejected:
        if self.exact is not None:
            key = exact_key(record)
            first = self.exact.get(key)
            if first is not None:
                return removed(record, "dedup", Problem(
                    "duplicate", f"same as line {first}, which is kept", record.line))
            self.exact.add_many(np.array([key], dtype=np.uint64), record.line)
        if self.near is not None:
            signature = self.near.hasher.signature(record_text(record))
            matches = self.near.query(signature)
            if matches:
                return removed(record, "dedup", Problem(
                    "near_duplicate", f"at least {self.opts.near_threshold:.0%} similar to "
                    f"line {matches[0]}, which is kept", record.line))
            self.near.insert(record.line, signature)
        return record

    def close(self) -> None:
        if self.near is not None:
            self.near.close()


def iter_clean(items: Iterable[Record | Rejected], options: CleanOptions | None = None,
               report: CleanReport | None = None) -> Iterator[Record | Rejected]:
    """Clean a stream of records; rejected rows pass through, removed records come out as
    ``Rejected`` with their reason. ``report`` (when given) is filled in as the stream goes.
    """
    report = report if report is not None else CleanReport()
    cleaner = _Cleaner(options or CleanOptions(), report)
    try:
        for item in items:
            if isinstance(item, Rejected):
                yield item
                continue
            report.examples_in += 1
            out = cleaner.record(item)
            if isinstance(out, Rejected):
                report.removed[out.code] += 1
            else:
                report.examples_out += 1
            yield out
    finally:
        cleaner.close()


def clean_examples(examples: Iterable[Record], options: CleanOptions | None = None
                   ) -> tuple[list[Record], CleanReport]:
    """Cleaned records in memory, and the report; ``report.left_out`` holds what was dropped."""
    report = CleanReport()
    kept: list[Record] = []
    for item in iter_clean(examples, options, report):
        if isinstance(item, Rejected):
            report.left_out.append(item)
        else:
            kept.append(item)
    return kept, report
