"""Describe a dataset before training on it: size, token lengths with the model's chat
template, truncation at ``max_length``, turns, labels and their balance, per-group counts
with a dataset-bias report (``tunesmith.data.bias``) and the tokens an epoch budget would
train on.

Streams: per example it keeps a few integers, never the text.
"""

from __future__ import annotations

import difflib
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tunesmith.data.chat import ChatExample
from tunesmith.data.records import Record, record_label
from tunesmith.data.rejects import Rejected
from tunesmith.errors import DataError

if TYPE_CHECKING:  # scipy loads only when a bias report is asked for
    from tunesmith.data.bias import BiasReport, GroupCounts, Reference

PERCENTILES = (50, 90, 95, 99)
MAX_CLASSES = 50  # more distinct answers than this: free text, not classification labels
MISSING = "<missing>"  # the group of rows without the group field


@dataclass
class InspectReport:
    """Statistics of a dataset; ``warnings`` say what looks wrong for training."""

    examples: int = 0
    rejected: int = 0
    tokens: dict[str, float] = field(default_factory=dict)  # min, mean, p50..p99, max
    over_max_length: int = 0
    max_length: int | None = None
    turns: dict[int, int] = field(default_factory=dict)  # assistant turns -> examples
    labels: dict[str, int] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # "field=group" if 2+
    bias: BiasReport | None = None
    epochs: int | None = None
    trained_tokens: int | None = None  # tokens of examples that fit, times epochs
    target_tokens: int | None = None  # of those, assistant tokens the loss is computed on
    warnings: list[str] = field(default_factory=list)
    histogram: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "bias": self.bias.to_dict() if self.bias else None}

    def lines(self) -> list[str]:
        out = [f"examples: {self.examples}" + (f" ({self.rejected} invalid rows left out)"
                                                if self.rejected else "")]
        if self.tokens:
            t = self.tokens
            out.append("tokens per example: " + ", ".join(f"{k} {v:g}" for k, v in t.items()))
        if self.max_length is not None:
            out.append(f"over max_length={self.max_length}: {self.over_max_length} "
                       "(left out of training)")
        out.append("assistant turns per example: "
                   + ", ".join(f"{k}: {v}" for k, v in sorted(self.turns.items())))
        if self.labels:
            out.append("labels: " + ", ".join(f"{k} {v}" for k, v in self.labels.items()))
        for name, g in self.groups.items():
            out.append(f"group {name}: {g['count']} ({g['share']:.1%})"
                       + (f", labels {g['labels']}" if g.get("labels") else ""))
        if self.bias is not None:
            out += self.bias.lines(warnings=False)  # its warnings are among ours
        if self.trained_tokens is not None:
            out.append(f"estimated trained tokens: {self.trained_tokens:,} over {self.epochs} "
                       f"epoch(s) ({self.target_tokens:,} assistant tokens)")
        if self.histogram:
            out.append(f"histogram: {self.histogram}")
        out += [f"warning: {w}" for w in self.warnings]
        return out


def _token_counts(tokenizer: Any, record: Record) -> tuple[int, int]:
    """(all tokens, assistant tokens) with the chat template; pairs count the longer answer."""
    from tunesmith.data.encode import encode_chat

    if isinstance(record, ChatExample):
        enc = encode_chat(tokenizer, record.messages)
        return len(enc), enc.n_targets
    both = [encode_chat(tokenizer, record.prompt + answer)
            for answer in (record.chosen, record.rejected)]
    return max(len(e) for e in both), max(e.n_targets for e in both)


def _balance_warnings(labels: Counter[str], imbalance_ratio: float) -> list[str]:
    if len(labels) < 2:
        return []
    (top, n_top), (low, n_low) = labels.most_common()[0], labels.most_common()[-1]
    if n_top / n_low >= imbalance_ratio:
        return [f"labels are imbalanced: {top!r} {n_top} vs {low!r} {n_low} "
                f"({n_top / n_low:.1f}:1); report per-class F1, or rebalance"]
    return []


def _group_report(groups: dict[str, Counter[str]], n: int, labels: Counter[str],
                  min_share: float) -> tuple[dict[str, dict[str, Any]], list[str]]:
    report, warnings = {}, []
    for name, label_counts in sorted(groups.items(), key=lambda kv: -kv[1].total()):
        count = label_counts.total()
        report[name] = {"count": count, "share": count / n,
                        "labels": dict(label_counts) if labels else {}}
        if count / n < min_share:
            warnings.append(f"group {name!r} has {count} examples ({count / n:.1%}); the model "
                            "will learn little about it")
        for label, overall in labels.items():
            here, everywhere = label_counts[label] / count, overall / n
            if count >= 10 and abs(here - everywhere) >= 0.2:
                warnings.append(f"group {name!r}: {here:.0%} {label!r} vs {everywhere:.0%} "
                                "overall; the model may learn the group as a shortcut")
    return report, warnings


def plot_histogram(lengths: np.ndarray, max_length: int | None, path: Path) -> Path:
    """A PNG histogram of token lengths with the max_length cut-off drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(lengths, bins=min(50, max(5, len(np.unique(lengths)))), color="#4878a8")
    if max_length is not None:
        ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length {max_length}")
        ax.legend()
    ax.set_xlabel("tokens per example (chat template included)")
    ax.set_ylabel("examples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class GroupCounter:
    """Examples per group field, group and label, and the fields the rows have."""

    def __init__(self, group_column: str | Sequence[str] | None) -> None:
        names = [group_column] if isinstance(group_column, str) else group_column or []
        self.fields = list(dict.fromkeys(names))
        self.counts: dict[str, dict[str, Counter[str]]] = {f: {} for f in self.fields}
        self.seen: set[str] = set()
        self.source: str | None = None
        self.examples = 0

    def add(self, item: Record, label: str | None) -> None:
        self.examples += 1
        self.seen.update(item.extra)
        self.source = self.source or item.source
        for f in self.fields:
            self.counts[f].setdefault(str(item.extra.get(f, MISSING)), Counter())[label or ""] += 1

    def check(self) -> None:
        """A group field no row has is a typo, not a group of missing values: say so."""
        absent = [f for f in self.fields if f not in self.seen]
        if not absent or not self.examples:
            return
        hints = []
        for f in absent:
            close = difflib.get_close_matches(f, sorted(self.seen), n=1)
            hints.append(f"{f!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise DataError(f"no row has the group field {', '.join(hints)}; the rows have "
                        + (", ".join(map(repr, sorted(self.seen))) or "no other fields"),
                        path=self.source, field=absent[0], code="unknown_field")

    def without_labels(self) -> dict[str, dict[str, Counter[str]]]:
        return {f: {g: Counter({"": c.total()}) for g, c in groups.items()}
                for f, groups in self.counts.items()}


def count_groups(items: Iterable[Record | Rejected], group_column: str | Sequence[str]
                 ) -> dict[str, dict[str, Counter[str]]]:
    """Examples per group field, group and label of a stream (a test split's coverage)."""
    counter = GroupCounter(group_column)
    for item in items:
        if not isinstance(item, Rejected):
            counter.add(item, record_label(item))
    counter.check()
    return counter.counts


def _group_sections(report: InspectReport, groups: GroupCounter, labels: Counter[str],
                    free_text: bool, min_group_share: float, reference: Reference | None,
                    test_counts: GroupCounts | None, positive_label: str | None) -> None:
    from tunesmith.data.bias import bias_report

    groups.check()
    counts = groups.without_labels() if free_text else groups.counts
    for f, by_group in counts.items():
        named = by_group if len(counts) == 1 else {f"{f}={g}": c for g, c in by_group.items()}
        more_groups, more = _group_report(named, report.examples,
                                          Counter() if free_text else labels, min_group_share)
        report.groups.update(more_groups)
        report.warnings += more
    report.bias = bias_report(counts, reference=reference, test_counts=test_counts,
                              positive_label=positive_label)
    report.warnings += report.bias.warnings


def inspect_records(items: Iterable[Record | Rejected], *, tokenizer: Any = None,
                    max_length: int | None = None, epochs: int | None = None,
                    group_column: str | Sequence[str] | None = None,
                    reference: Reference | None = None, positive_label: str | None = None,
                    test_counts: GroupCounts | None = None, imbalance_ratio: float = 5.0,
                    min_group_share: float = 0.05, plot: Path | None = None) -> InspectReport:
    """Statistics of a stream of records (token counts need the model's ``tokenizer``).

    With ``group_column`` (one field or several), per-group counts and the bias report of
    ``tunesmith.data.bias``: ``reference`` shares, ``positive_label`` and the test split's
    ``test_counts`` (see ``count_groups``) feed it.
    """
    from tunesmith.config import auto_epochs

    report = InspectReport(max_length=max_length)
    lengths, targets = array("I"), array("I")
    turns, labels = Counter[int](), Counter[str]()
    groups = GroupCounter(group_column)
    free_text = False  # the answers are prose, not class labels: no label statistics
    for item in items:
        if isinstance(item, Rejected):
            report.rejected += 1
            continue
        report.examples += 1
        turns[sum(1 for m in item.messages if m.get("role") == "assistant")] += 1
        label = None if free_text else record_label(item)
        if label is not None:
            labels[label] += 1
            if len(labels) > MAX_CLASSES and "label" not in item.extra:
                free_text, label = True, None
                labels.clear()
        if groups.fields:
            groups.add(item, label)
        if tokenizer is not None:
            n, t = _token_counts(tokenizer, item)
            lengths.append(n)
            targets.append(t)
    report.turns = dict(sorted(turns.items()))
    if labels and not free_text:
        report.labels = dict(labels.most_common())
        report.warnings += _balance_warnings(labels, imbalance_ratio)
    if groups.examples:
        _group_sections(report, groups, labels, free_text, min_group_share, reference,
                        test_counts, positive_label)
    if lengths:
        arr, tgt = np.asarray(lengths), np.asarray(targets)
        report.tokens = {"min": int(arr.min()), "mean": round(float(arr.mean()), 1),
                         **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES},
                         "max": int(arr.max())}
        fits = arr <= max_length if max_length is not None else np.ones(len(arr), bool)
        report.over_max_length = int((~fits).sum())
        report.epochs = epochs if epochs is not None else auto_epochs(int(fits.sum()))
        report.trained_tokens = int(arr[fits].sum()) * report.epochs
        report.target_tokens = int(tgt[fits].sum()) * report.epochs
        if report.over_max_length:
            report.warnings.append(f"{report.over_max_length} example(s) are longer than "
                                   f"max_length={max_length} and would be left out")
        if plot is not None:
            report.histogram = str(plot_histogram(arr, max_length, plot))
    return report
