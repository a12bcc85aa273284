"""`tunesmith data ...`: data preparation commands (parse, call tunesmith.flows.prepare, print)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from tunesmith.cli.common import friendly, out

data_app = typer.Typer(no_args_is_help=True,
                       help="Check, convert, clean, redact, split and inspect training data.")

DEFAULT_MODEL = "smollm2-135m-instruct"
FORMAT = typer.Option(None, "--format", help="chat, prompt_completion, alpaca, sharegpt, "
                      "classification, preference (OpenAI) or trl_preference. Empty: detected "
                      "from the file.")
TEXT_COLUMN = typer.Option("text", help="Classification: the column holding the text.")
LABEL_COLUMN = typer.Option("label", help="Classification: the column holding the label.")
SYSTEM_PROMPT = typer.Option(None, help="Classification: a system message for every example.")
ON_ERROR = typer.Option("raise", "--on-error", help="'raise': stop and list invalid rows; "
                        "'skip': set them aside in the rejects file and go on.")
REJECTS = typer.Option(None, help="Where rows left out go. Empty: <output>.rejects.jsonl.")
AS_JSON = typer.Option(False, "--json", help="Print the report as JSON.")
MODEL = typer.Option(DEFAULT_MODEL, help="Model whose tokenizer and chat template count tokens.")
NO_TOKENS = typer.Option(False, "--no-tokens", help="Skip token counts (no model is loaded).")


def _read(format: str | None, text_column: str, label_column: str,
          system_prompt: str | None) -> Any:
    from tunesmith.data.formats import ReadOptions

    return ReadOptions(format=format, text_column=text_column, label_column=label_column,
                       system_prompt=system_prompt)


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _say(lines: list[str], *, style: str | None = None) -> None:
    for line in lines:
        out.print(line, style=style, markup=False, highlight=False, soft_wrap=True)


def _emit(report: Any, as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        _say(lines)


def _stage_lines(report: Any) -> list[str]:
    lines = [f"{report.input} ({report.format}) -> {report.output}", report.tally.summary()]
    if report.rejects:
        lines.append(f"rows left out, with line and reason: {report.rejects}")
    return lines


@data_app.command("validate")
@friendly
def validate_cmd(
    file: Path = typer.Argument(..., help="Data file (JSONL, JSON, CSV, TSV or Parquet)."),
    format: str | None = FORMAT, text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN, system_prompt: str | None = SYSTEM_PROMPT,
    model: str = MODEL, no_tokens: bool = NO_TOKENS,
    max_tokens: int = typer.Option(512, help="Longest example in tokens (data.max_length)."),
    labels: str | None = typer.Option(None, help="Allowed labels, comma-separated."),
    min_examples: int = typer.Option(10, help="Fewest valid examples accepted."),
    as_json: bool = AS_JSON,
) -> None:
    """Check a data file: every problem with its line and field. Exit 1 when there are errors."""
    from tunesmith.flows.prepare import load_tokenizer_for, validate_file

    tokenizer = None if no_tokens else load_tokenizer_for(model)
    report = validate_file(file, read=_read(format, text_column, label_column, system_prompt),
                           tokenizer=tokenizer, max_tokens=None if no_tokens else max_tokens,
                           labels=_csv(labels), min_examples=min_examples)
    _emit(report, as_json, report.lines())
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("convert")
@friendly
def convert_cmd(
    file: Path = typer.Argument(..., help="Data file in any supported format."),
    output: Path = typer.Argument(..., help="Canonical JSONL to write."),
    format: str | None = FORMAT, text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN, system_prompt: str | None = SYSTEM_PROMPT,
    on_error: str = ON_ERROR, rejects: Path | None = REJECTS, as_json: bool = AS_JSON,
) -> None:
    """Convert to canonical JSONL (OpenAI chat, or OpenAI preference pairs)."""
    from tunesmith.flows.prepare import convert_file

    report = convert_file(file, output, read=_read(format, text_column, label_column,
                                                   system_prompt),
                          on_error=on_error, rejects=rejects)  # type: ignore[arg-type]
    _emit(report, as_json, _stage_lines(report))


@data_app.command("clean")
@friendly
def clean_cmd(
    file: Path = typer.Argument(..., help="Data file in any supported format."),
    output: Path = typer.Argument(..., help="Cleaned canonical JSONL to write."),
    format: str | None = FORMAT, text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN, system_prompt: str | None = SYSTEM_PROMPT,
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Drop exact duplicates."),
    near_dedup: bool = typer.Option(True, "--near-dedup/--no-near-dedup",
                                    help="Drop near-duplicates (MinHash LSH)."),
    near_threshold: float = typer.Option(0.85, help="Similarity (Jaccard of character "
                                         "5-grams) from which texts are near-duplicates."),
    min_chars: int = typer.Option(1, help="Drop examples with fewer characters of text."),
    max_chars: int | None = typer.Option(None, help="Drop examples with more characters."),
    confusables: bool = typer.Option(True, "--confusables/--no-confusables",
                                     help="Fold look-alike letters from other scripts."),
    redact: bool = typer.Option(False, "--redact", help="Also replace personal data."),
    redact_urls: bool = typer.Option(False, help="With --redact: URLs too."),
    redact_names: bool = typer.Option(False, help="With --redact: names too (heuristic)."),
    on_error: str = ON_ERROR, rejects: Path | None = REJECTS, as_json: bool = AS_JSON,
) -> None:
    """Normalise text, drop duplicates and out-of-range lengths, optionally redact."""
    from tunesmith.data.clean import CleanOptions
    from tunesmith.data.normalize import TextOptions
    from tunesmith.flows.prepare import clean_file

    options = CleanOptions(
        text=TextOptions(confusables=confusables), exact_duplicates=dedup,
        near_duplicates=near_dedup, near_threshold=near_threshold, min_chars=min_chars,
        max_chars=max_chars,
        redact=_redact_options(None, redact_urls, redact_names, None) if redact else None)
    report = clean_file(file, output, options=options,
                        read=_read(format, text_column, label_column, system_prompt),
                        on_error=on_error, rejects=rejects)  # type: ignore[arg-type]
    _emit(report, as_json, _stage_lines(report) + (report.clean.lines() if report.clean else []))


def _redact_options(entities: str | None, urls: bool, names: bool, regions: str | None) -> Any:
    from tunesmith.data.pii import DEFAULT_ENTITIES, DEFAULT_REGIONS, RedactOptions

    chosen = set(_csv(entities.upper()) if entities else DEFAULT_ENTITIES)
    chosen |= {"URL"} if urls else set()
    chosen |= {"NAME"} if names else set()
    try:
        return RedactOptions(entities=frozenset(chosen),
                             regions=tuple(_csv(regions.upper()) if regions else DEFAULT_REGIONS))
    except ValueError as e:
        from tunesmith.errors import DataError

        raise DataError(str(e)) from e


@data_app.command("redact")
@friendly
def redact_cmd(
    file: Path = typer.Argument(..., help="Data file in any supported format."),
    output: Path = typer.Argument(..., help="Redacted canonical JSONL to write."),
    format: str | None = FORMAT, text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN, system_prompt: str | None = SYSTEM_PROMPT,
    entities: str | None = typer.Option(None, help="Comma-separated kinds. Empty: EMAIL, "
                                        "PHONE, CREDIT_CARD, IBAN, IP_ADDRESS, US_SSN."),
    urls: bool = typer.Option(False, "--urls", help="Also replace URLs."),
    names: bool = typer.Option(False, "--names", help="Also replace names (a heuristic: "
                               "after titles, 'my name is', 'Dear', sign-offs)."),
    regions: str | None = typer.Option(None, help="Phone regions, e.g. US,GB,DE."),
    on_error: str = ON_ERROR, rejects: Path | None = REJECTS, as_json: bool = AS_JSON,
) -> None:
    """Replace personal data with typed placeholders such as [EMAIL] and [PHONE]."""
    from tunesmith.flows.prepare import redact_file

    report = redact_file(file, output, options=_redact_options(entities, urls, names, regions),
                         read=_read(format, text_column, label_column, system_prompt),
                         on_error=on_error, rejects=rejects)  # type: ignore[arg-type]
    counts = report.redacted or {}
    _emit(report, as_json, _stage_lines(report) + [
        "placeholders: " + (", ".join(f"[{k}] {v}" for k, v in counts.items()) or "none")])


@data_app.command("split")
@friendly
def split_cmd(
    file: Path = typer.Argument(..., help="Data file in any supported format."),
    out_dir: Path = typer.Argument(..., help="Directory for train/validation/test.jsonl."),
    format: str | None = FORMAT, text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN, system_prompt: str | None = SYSTEM_PROMPT,
    validation_fraction: float = typer.Option(0.1, help="Share for validation (0: none)."),
    test_fraction: float = typer.Option(0.1, help="Share for test (0: none)."),
    seed: int = typer.Option(42, help="Seed of the split."),
    stratify: bool = typer.Option(True, "--stratify/--no-stratify", help="Keep label shares."),
    near_threshold: float = typer.Option(0.8, help="Near-duplicates from this similarity "
                                         "stay in one split."),
    near_dedup: bool = typer.Option(True, "--near-dedup/--no-near-dedup",
                                    help="Group near-duplicates into one split."),
    on_error: str = ON_ERROR, as_json: bool = AS_JSON,
) -> None:
    """Seeded, stratified train/validation/test split with no near-duplicate leaking across."""
    from tunesmith.flows.prepare import split_file

    report = split_file(file, out_dir, read=_read(format, text_column, label_column,
                                                  system_prompt),
                        validation_fraction=validation_fraction, test_fraction=test_fraction,
                        seed=seed, stratify=stratify,
                        near_threshold=near_threshold if near_dedup else None,
                        on_error=on_error)  # type: ignore[arg-type]
    lines = [f"{name}: {report.counts[name]} -> {path}" for name, path in report.files.items()]
    lines += [f"{name} labels: {labels}" for name, labels in report.labels.items() if labels]
    lines += [f"{report.duplicate_groups} near-duplicate group(s), each kept in one split",
              report.tally.summary()]
    if report.rejects:
        lines.append(f"rows left out, with line and reason: {report.rejects}")
    _emit(report, as_json, lines)


@data_app.command("inspect")
@friendly
def inspect_cmd(
    file: Path = typer.Argument(..., help="Data file in any supported format."),
    format: str | None = FORMAT, text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN, system_prompt: str | None = SYSTEM_PROMPT,
    model: str = MODEL, no_tokens: bool = NO_TOKENS,
    max_length: int = typer.Option(512, help="Longest example trained on (data.max_length)."),
    epochs: int | None = typer.Option(None, help="Epochs for the token estimate. Empty: "
                                      "what train.epochs='auto' would choose."),
    group_column: list[str] | None = typer.Option(None, "--group-field", "--group-column",
                                                  help="A field or column to count "
                                                  "by, with a dataset-bias report; repeat "
                                                  "for several."),
    reference: Path | None = typer.Option(None, help="JSON or YAML of expected group shares: "
                                          '{"field": {"group": share, ...}}.'),
    positive_label: str | None = typer.Option(None, help="Bias report: the label whose rate "
                                              "per group matters. Empty: every label."),
    test_file: Path | None = typer.Option(None, help="Bias report: the test split, to check "
                                          "each group has enough test examples."),
    plot: Path | None = typer.Option(None, help="Write a token-length histogram PNG here."),
    as_json: bool = AS_JSON,
) -> None:
    """Sizes, token lengths, truncation, turns, labels, groups and the trained-token estimate."""
    from tunesmith.flows.prepare import inspect_file, load_tokenizer_for

    report = inspect_file(file, read=_read(format, text_column, label_column, system_prompt),
                          tokenizer=None if no_tokens else load_tokenizer_for(model),
                          max_length=max_length, epochs=epochs, group_column=group_column,
                          reference=reference, positive_label=positive_label,
                          test_file=test_file, plot=plot)
    _emit(report, as_json, report.lines())


@data_app.command("label-issues")
@friendly
def label_issues_cmd(
    file: Path = typer.Argument(..., help="Labelled data in any supported format."),
    format: str | None = FORMAT, text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN, system_prompt: str | None = SYSTEM_PROMPT,
    model: str = typer.Option(DEFAULT_MODEL, help="Model whose hidden states the probe reads."),
    action: str = typer.Option("report", help="'report': only list the suspects; 'drop': "
                               "also write the data without them; 'relabel': also write it "
                               "with the suggested labels."),
    output: Path | None = typer.Option(None, "--output", "-o", help="With --action drop or "
                                       "relabel: where the changed data goes. Empty: "
                                       "<file>.<action>.jsonl."),
    issues: Path | None = typer.Option(None, help="Where the suspects go. Empty: "
                                       "<file>.label_issues.jsonl."),
    folds: int = typer.Option(5, min=2, max=20, help="Cross-validation folds of the probe."),
    layer: int | None = typer.Option(None, help="Decoder block whose output is pooled "
                                     "(1-based). Empty: the middle one."),
    seed: int = typer.Option(0, help="Seed of the folds."),
    as_json: bool = AS_JSON,
) -> None:
    """Suspected wrong labels: a cross-validated probe on the model's hidden states, then
    cleanlab. Lists them (line, given, suggested, confidence); changes data only if asked."""
    from rich.console import Console
    from rich.progress import Progress

    from tunesmith.flows.label_issues import label_issues_file

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("reading the texts with the model", total=None)
        found = label_issues_file(file, read=_read(format, text_column, label_column,
                                                   system_prompt),
                                  model=model, layer=layer, folds=folds, seed=seed,
                                  action=action, output=output,  # type: ignore[arg-type]
                                  issues_file=issues,
                                  advance=lambda n: progress.advance(task, n))
    if as_json:
        typer.echo(json.dumps({**found.report.to_json(), "issues_file": str(found.issues_file),
                               "output": str(found.output) if found.output else None,
                               "rejects": str(found.rejects) if found.rejects else None},
                              ensure_ascii=False))
    else:
        _say(found.lines())


def parse_since(since: str | None) -> int | None:
    """``--since YYYY-MM-DD`` as Unix time (UTC midnight)."""
    from datetime import datetime, timezone

    from tunesmith.errors import ConfigError

    if not since:
        return None
    try:
        return int(datetime.strptime(since, "%Y-%m-%d").replace(tzinfo=timezone.utc)
                   .timestamp())
    except ValueError as err:
        raise ConfigError(f"--since {since!r}: expected a date like 2026-01-31") from err


@data_app.command("from-feedback")
@friendly
def from_feedback_cmd(
    org: str = typer.Option(..., "--org", help="Whose feedback (an org of the service)."),
    out: Path = typer.Option(Path("feedback"), "--out", help="Folder for the two files."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="The service's data folder. "
                                         "Empty: $TUNESMITH_HOME/service."),
    database_url: str | None = typer.Option(None, "--database-url",
                                            help="The service's database, if not SQLite."),
    since: str | None = typer.Option(None, "--since", help="Only feedback from this date "
                                     "on (YYYY-MM-DD)."),
    model: str | None = typer.Option(None, "--model", help="Only feedback on this model's "
                                     "answers (e.g. an ft: id)."),
) -> None:
    """Turn chat feedback into the next round's data: corrections as chat JSONL, rating pairs
    as OpenAI-DPO JSONL."""
    from tunesmith.models.resolve import default_home
    from tunesmith.service import export_feedback, store_url

    result = export_feedback(store_url(default_home(), data_dir=data_dir,
                                       database_url=database_url),
                             org=org, out_dir=out, since=parse_since(since), model=model)
    _say([f"{result.chat_examples} chat example(s) -> {result.chat_file}",
          f"{result.dpo_pairs} preference pair(s) -> {result.dpo_file}"])
