"""Data preparation flows on files: validate, convert, clean, redact, split, inspect.

Each reads a data file in any supported format (see ``tunesmith.data.formats``), streams it
through the stage, writes canonical JSONL and returns a typed report. Nothing is lost:
every row left out goes to a rejects file with its line and reason (the same file format as
a run's rejects.jsonl, see ``tunesmith.data.rejects``), and each report's ``tally`` states
``read = written + invalid + removed``.

    from tunesmith.flows.prepare import clean_file
    report = clean_file("tickets.csv", "tickets.clean.jsonl", on_error="skip")
    print(report.tally.summary())

``on_error="raise"`` (the default) stops with one ``DataError`` listing every invalid row and
writes nothing; ``"skip"`` writes the invalid rows to the rejects file and goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from tunesmith.data.clean import CleanOptions, CleanReport, iter_clean
from tunesmith.data.formats import ReadOptions, detect_format, iter_records
from tunesmith.data.inspect import InspectReport, inspect_records
from tunesmith.data.pii import RedactOptions, redact_text
from tunesmith.data.records import Record, Tally, map_contents, record_to_json
from tunesmith.data.rejects import Rejected, write_rejects
from tunesmith.data.validate import MIN_EXAMPLES, ValidationReport, Validator
from tunesmith.errors import ConfigError, DataError, Problem

OnError = Literal["raise", "skip"]
Stage = Callable[[Iterable[Record | Rejected]], Iterable[Record | Rejected]]
SPLITS = ("train", "validation", "test")


@dataclass
class StageReport:
    """What a file stage did: where it read and wrote, and the tally that must balance."""

    input: Path
    output: Path
    format: str
    tally: Tally
    rejects: Path | None = None  # written only when something was left out
    clean: CleanReport | None = None
    redacted: Counter[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"input": str(self.input), "output": str(self.output), "format": self.format,
                "tally": self.tally.to_json(),
                "rejects": str(self.rejects) if self.rejects else None,
                "clean": self.clean.to_json() if self.clean else None,
                "redacted": dict(self.redacted) if self.redacted is not None else None}


@dataclass
class SplitReport:
    """Where each split went, its size and labels, and how many near-duplicate groups held."""

    input: Path
    files: dict[str, Path]
    format: str
    tally: Tally
    counts: dict[str, int] = field(default_factory=dict)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    duplicate_groups: int = 0  # groups of 2+ near-duplicates, each kept inside one split
    rejects: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"input": str(self.input), "files": {k: str(v) for k, v in self.files.items()},
                "format": self.format, "tally": self.tally.to_json(), "counts": self.counts,
                "labels": self.labels, "duplicate_groups": self.duplicate_groups,
                "rejects": str(self.rejects) if self.rejects else None}


class _Jsonl:
    """A JSONL file written beside its target and renamed into place only on success.

    For outputs; rows left out go through ``write_rejects``, the one writer of rejects files.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.count = path, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f".{path.name}.partial")
        self._fh: IO[str] = self._tmp.open("w", encoding="utf-8")

    def write(self, value: Any) -> None:
        # default=str: Parquet and CSV metadata columns may hold dates or decimals
        self._fh.write(json.dumps(value, ensure_ascii=False, default=str) + "\n")
        self.count += 1

    def commit(self) -> Path:
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def drop(self) -> None:
        """Write nothing, and remove a file an earlier run left there: it would mislead."""
        self.discard()
        self.path.unlink(missing_ok=True)


def _resolve(path: Path | str, read: ReadOptions | None) -> tuple[Path, ReadOptions]:
    path, read = Path(path), read or ReadOptions()
    return path, dataclasses.replace(read, format=detect_format(path, read))


def _counted(items: Iterable[Record | Rejected], tally: Tally) -> Iterator[Record | Rejected]:
    for item in items:
        tally.read += 1
        yield item


def _default_rejects(output: Path) -> Path:
    return output.with_name(f"{output.stem}.rejects.jsonl")


def _invalid_error(path: Path, problems: list[Problem], count: int) -> DataError:
    return DataError(f"{path}: {count} invalid row(s); fix them, or pass on_error='skip' "
                     "(--on-error skip) to set them aside in a rejects file", path=path,
                     problems=problems)


def _run_stage(path: Path | str, output: Path | str, stage: Stage, *, read: ReadOptions | None,
               on_error: OnError, rejects: Path | str | None) -> StageReport:
    """Stream a file through ``stage`` into canonical JSONL; the shared skeleton of stages."""
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    path, read = _resolve(path, read)
    output = Path(output)
    if output.resolve() == path.resolve():
        raise DataError("the output would overwrite the input; write to another file",
                        path=output)
    tally, out = Tally(), _Jsonl(output)
    problems: list[Problem] = []

    def left_out() -> Iterator[Rejected]:
        # records go to the output as they pass; rows left out stream on to the rejects file
        for item in stage(_counted(iter_records(path, read), tally)):
            tally.add(item)
            if not isinstance(item, Rejected):
                out.write(record_to_json(item))
                continue
            if item.invalid and on_error == "raise":
                problems.extend(item.problems[: max(0, 200 - len(problems))])
            yield item
        if tally.invalid and on_error == "raise":
            # raised inside the stream, so write_rejects keeps no rejects file either
            raise _invalid_error(path, problems, sum(tally.invalid.values()))

    try:
        left = write_rejects(Path(rejects) if rejects else _default_rejects(output), left_out())
    except BaseException:
        out.discard()
        raise
    return StageReport(path, out.commit(), str(read.format), tally, left)


# ----------------------------------------------------------------------------- flows


def load_tokenizer_for(model: str, *, home: Path | None = None) -> Any:
    """The tokenizer (with chat template) of a model reference, for token counts."""
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.resolve import default_home, resolve_model

    return load_tokenizer(resolve_model(model, home=home or default_home()))


def validate_file(path: Path | str, *, read: ReadOptions | None = None, tokenizer: Any = None,
                  max_tokens: int | None = None, labels: list[str] | None = None,
                  min_examples: int = MIN_EXAMPLES) -> ValidationReport:
    """Every problem of a data file; token limits are checked when a tokenizer is given."""
    path, read = _resolve(path, read)
    validator = Validator(tokenizer=tokenizer, max_tokens=max_tokens, labels=labels,
                          min_examples=min_examples, path=str(path), format=read.format)
    for item in iter_records(path, read):
        validator.add(item)
    return validator.finish()


def convert_file(path: Path | str, output: Path | str, *, read: ReadOptions | None = None,
                 on_error: OnError = "raise", rejects: Path | str | None = None
                 ) -> StageReport:
    """Any supported format to canonical JSONL (OpenAI chat, or OpenAI preference pairs)."""
    return _run_stage(path, output, lambda items: items, read=read, on_error=on_error,
                      rejects=rejects)


def clean_file(path: Path | str, output: Path | str, *, options: CleanOptions | None = None,
               read: ReadOptions | None = None, on_error: OnError = "raise",
               rejects: Path | str | None = None) -> StageReport:
    """Normalise text, optionally redact, and drop duplicates and out-of-range lengths."""
    report = CleanReport()
    result = _run_stage(path, output, lambda items: iter_clean(items, options, report),
                        read=read, on_error=on_error, rejects=rejects)
    result.clean = report
    result.redacted = report.redacted if options and options.redact else None
    return result


def redact_file(path: Path | str, output: Path | str, *, options: RedactOptions | None = None,
                read: ReadOptions | None = None, on_error: OnError = "raise",
                rejects: Path | str | None = None) -> StageReport:
    """Replace personal data in every message with typed placeholders such as [EMAIL]."""
    counts: Counter[str] = Counter()

    def stage(items: Iterable[Record | Rejected]) -> Iterator[Record | Rejected]:
        for item in items:
            yield item if isinstance(item, Rejected) else map_contents(
                item, lambda text: redact_text(text, options, counts))

    result = _run_stage(path, output, stage, read=read, on_error=on_error, rejects=rejects)
    result.redacted = counts
    return result


def inspect_file(path: Path | str, *, read: ReadOptions | None = None, tokenizer: Any = None,
                 max_length: int | None = None, epochs: int | None = None,
                 group_column: str | Sequence[str] | None = None,
                 reference: Path | str | None = None, positive_label: str | None = None,
                 test_file: Path | str | None = None, plot: Path | str | None = None
                 ) -> InspectReport:
    """Counts, token lengths, truncation, turns, labels, groups and trained-token estimate.

    With ``group_column`` (one field or several) the report holds a dataset-bias section
    (``tunesmith.data.bias``): against the expected shares of a ``reference`` file, the rate
    of ``positive_label`` (else of every label) per group, and the coverage of each group in
    ``test_file`` (read with the same options).
    """
    from tunesmith.data.bias import load_reference
    from tunesmith.data.inspect import count_groups

    fields = [group_column] if isinstance(group_column, str) else list(group_column or [])
    extras = [name for name, v in (("--reference", reference), ("--test-file", test_file),
                                   ("--positive-label", positive_label)) if v is not None]
    if extras and not fields:
        raise ConfigError(f"{', '.join(extras)}: only for the bias report; name the group "
                          "field(s) with --group-field (group_column=...)")
    shares = load_reference(reference, fields) if reference is not None else None
    test_counts = None
    if test_file is not None:
        test_path, test_read = _resolve(test_file, read)
        test_counts = count_groups(iter_records(test_path, test_read), fields)
    path, read = _resolve(path, read)
    return inspect_records(iter_records(path, read), tokenizer=tokenizer, max_length=max_length,
                           epochs=epochs, group_column=fields or None, reference=shares,
                           positive_label=positive_label, test_counts=test_counts,
                           plot=Path(plot) if plot is not None else None)


def _split_plan(path: Path, read: ReadOptions, *, validation_fraction: float,
                test_fraction: float, seed: int, stratify: bool, near_threshold: float | None,
                on_error: OnError) -> tuple[bytearray, int]:
    """Pass 1: which split each valid example goes to, and the number of duplicate groups."""
    from tunesmith.data.dedup import near_duplicate_groups
    from tunesmith.data.inspect import MAX_CLASSES
    from tunesmith.data.records import record_label, record_text
    from tunesmith.data.split import split_examples

    labels: list[str] = []
    interned: dict[str, str] = {}  # one string object per label, not one per example
    problems: list[Problem] = []

    def texts() -> Iterator[str]:
        for item in iter_records(path, read):
            if isinstance(item, Rejected):
                problems.extend(item.problems)
                continue
            label = record_label(item) or ""
            labels.append(interned.setdefault(label, label))
            yield record_text(item)

    if near_threshold is not None:
        groups = near_duplicate_groups(texts(), near_threshold, seed=seed)
    else:
        groups = list(range(sum(1 for _ in texts())))
    if problems and on_error == "raise":
        raise _invalid_error(path, problems[:200], len(problems))
    n = len(labels)
    needed = 1 + (validation_fraction > 0) + (test_fraction > 0)
    if len(set(groups)) < max(needed, 3):
        raise DataError(f"only {n} example(s) ({len(set(groups))} after grouping "
                        "near-duplicates); too few to split", path=path)
    use_labels = stratify and len(interned) <= MAX_CLASSES
    parts = split_examples(range(n), validation_fraction=validation_fraction or 0.0,
                           test_fraction=test_fraction or 0.0, seed=seed,
                           labels=labels if use_labels else None, groups=groups,
                           need_validation=validation_fraction > 0, need_test=test_fraction > 0)
    which = bytearray(n)
    for k, name in enumerate(SPLITS):
        for i in getattr(parts, name):
            which[i] = k
    return which, sum(1 for size in Counter(groups).values() if size > 1)


def split_file(path: Path | str, out_dir: Path | str, *, read: ReadOptions | None = None,
               validation_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 42,
               stratify: bool = True, near_threshold: float | None = 0.8,
               on_error: OnError = "raise") -> SplitReport:
    """Seeded train/validation/test JSONL files in ``out_dir``, stratified by label, with
    near-duplicates kept in one split. Reads the file twice and holds a few bytes an example.

    ``near_threshold`` is lower than clean's 0.85 on purpose: grouping too much costs nothing,
    while MinHash estimates vary by a few points, so pairs just above 0.85 stay together.
    """
    from tunesmith.data.records import record_label

    path, read = _resolve(path, read)
    which, duplicate_groups = _split_plan(
        path, read, validation_fraction=validation_fraction, test_fraction=test_fraction,
        seed=seed, stratify=stratify, near_threshold=near_threshold, on_error=on_error)
    out_dir = Path(out_dir)
    writers = {name: _Jsonl(out_dir / f"{name}.jsonl") for name in SPLITS}
    tally = Tally()
    labels: dict[str, Counter[str]] = {name: Counter() for name in SPLITS}

    def left_out() -> Iterator[Rejected]:
        # pass 2: each example to the split the plan chose; rows left out to the rejects file
        index = 0
        for item in _counted(iter_records(path, read), tally):
            tally.add(item)
            if isinstance(item, Rejected):
                yield item
                continue
            name = SPLITS[which[index]]
            writers[name].write(record_to_json(item))
            labels[name][record_label(item) or ""] += 1
            index += 1

    try:
        rejects = write_rejects(out_dir / "rejects.jsonl", left_out())
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    files: dict[str, Path] = {}
    for name, w in writers.items():
        if w.count or name == "train":
            files[name] = w.commit()
        else:
            w.drop()
    return SplitReport(
        path, files, str(read.format), tally,
        counts={name: w.count for name, w in writers.items()},
        labels={k: dict(v.most_common()) for k, v in labels.items() if len(v) <= 50},
        duplicate_groups=duplicate_groups, rejects=rejects)
