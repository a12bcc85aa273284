"""The run report: ``metrics.json`` (every number), ``report.md``, self-contained ``report.html``.

The flow builds one results dict, writes it with ``write_results`` to ``metrics.json``, makes
the plots with ``make_plots`` and renders both reports with ``write_reports``. The reports show
only what the dict holds, so a number in a report can always be found in metrics.json.

Results dict (schema_version 1). Required: name, model, task, data_counts, hyperparameters,
tuned. Every other key may be missing or null, and its report section is then left out.

    schema_version   1
    name             str: the run's name
    model            str: the base model reference
    task             "classification" | "generation"
    labels           [str] | null: the classification labels, in order
    positive_label   str | null
    data_counts      {split: int}: e.g. train, validation, test, "left out"
    token_lengths    {split: {"min", "mean", "p50", "p95", "max"}}: tokens per example
    hyperparameters  {name: value}: the resolved hyperparameters
    training         {name: value}: e.g. best_step, best_valid_loss, stopped_early,
                     tokens_seen, seconds (shown as a list, in this order)
    base, tuned      task metrics of each model on the test set: classification_metrics()
                     (accuracy, macro_f1, invalid_rate, per_class, f1_<positive>) or
                     generation_metrics() (exact_match, bleu 0-100, rouge_l, token_accuracy)
    eval_mode        {"base": str | null, "tuned": str}: how each model's test answers were
                     obtained: "score" (the most probable label), "generate" (a generated
                     reply, parsed to a label for classification) or "head" (a
                     classification head)
    comparison       {metric: stats.Comparison.to_dict()}: change, 95% CI, p(not better),
                     relative error reduction, from compare_classification/compare_generation
    confusion        {"base": metrics.confusion(), "tuned": metrics.confusion()}
    calibration      calibration.CalibrationResult.to_dict() (tuned model, label probabilities)
    forgetting       forgetting.ForgettingResult.to_dict()
    overfitting      overfitting.OverfittingResult.to_dict()
    data_bias        data.bias.BiasReport.to_dict() of the training split, per group field
                     (data.group_fields, else eval.group_field), with test coverage
    label_issues     data.label_issues.LabelIssueReport.to_json() without "issues", plus
                     action, file (label_issues.jsonl) and sample (the first suspects)
    data_warnings    [str]: warnings of the two data checks above
    fairness         {"group_field": str, "base": FairnessResult.to_dict() | null,
                      "tuned": FairnessResult.to_dict()}
    confident_errors analysis.most_confident_errors(): [{index, input, expected, predicted,
                     confidence, p_expected}]
    samples          [{input, expected, predicted, reply}]: a few tuned-model answers
    energy           codecarbon, offline (flows.energy.EnergyMeter.results()): {"training",
                     "evaluation", "total": {kwh, kg_co2e, seconds, cpu/gpu/ram_kwh, error},
                     method, country_iso_code, region, carbon_intensity_g_per_kwh, ...}
    plots            {"loss_curves", "confusion_base", "confusion_tuned", "reliability",
                      "token_lengths"}: PNG file names relative to the run directory

"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError
from tunesmith.evaluation.plots import (
    plot_confusion_matrix,
    plot_loss_curves,
    plot_reliability,
    plot_rewards,
)
from tunesmith.evaluation.sections import (
    Bullets,
    Image,
    Section,
    Table,
    Text,
    fmt,
    headline_metrics,
    numeric_columns,
    report_sections,
    signed,
)
from tunesmith.training.callbacks import read_metrics

__all__ = ["REQUIRED", "comparison_rows", "compare_runs", "headline_metrics", "json_safe",
           "make_plots", "plot_loss_curves", "read_results", "render_markdown",
           "sections_markdown",
           "write_reports", "write_results"]

SCHEMA_VERSION = 1
RESULTS_FILE = "metrics.json"
REQUIRED = ("name", "model", "task", "data_counts", "hyperparameters", "tuned")


def json_safe(x: Any) -> Any:
    """``x`` as plain JSON values: NaN and infinity become null (they are not JSON), numpy and
    torch scalars plain numbers, anything else (paths, enums, datetimes) its text."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    if hasattr(x, "item") and callable(x.item):  # numpy and torch scalars
        return json_safe(x.item())
    return str(x)


def check_results(results: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED if results.get(k) is None]
    if missing:
        raise DataError(f"the results dict lacks {missing}; see the schema in "
                        "tunesmith.evaluation.report")


def write_results(path: Path, results: dict[str, Any]) -> Path:
    """Write the results dict as JSON (``metrics.json``), NaN and infinity as null."""
    check_results(results)
    payload = {"schema_version": SCHEMA_VERSION, **json_safe(results)}
    Path(path).write_text(json.dumps(payload, indent=2, allow_nan=False), encoding="utf-8")
    return Path(path)


def read_results(run_dir: Path) -> dict[str, Any]:
    """A run's results: ``metrics.json``, or the base/tuned of an older run's results.json."""
    run_dir = Path(run_dir)
    for name in (RESULTS_FILE, "results.json"):
        path = run_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON ({err}); re-run the evaluation",
                                path=path) from err
            if "tuned" not in data:
                raise DataError("has no 'tuned' metrics; is this a tunesmith run?", path=path)
            return data
    raise DataError(f"{run_dir}: no {RESULTS_FILE} or results.json; pass a finished run "
                    "directory (runs/NAME)")


def make_plots(run_dir: Path, results: dict[str, Any],
               records: Sequence[dict[str, Any]] | None = None) -> dict[str, str]:
    """Draw the plots the results dict has data for; returns names for ``results["plots"]``.

    Loss curves come from ``records`` (default: the run's metrics.jsonl); the token-length
    histogram needs raw lengths, so the flow draws it with ``plots.plot_token_lengths``.
    """
    run_dir = Path(run_dir)
    plots: dict[str, str] = {}
    records = list(records) if records is not None else read_metrics(run_dir / "metrics.jsonl")
    if records:
        best = (results.get("overfitting") or {}).get("best_step")
        plot_loss_curves(records, run_dir / "loss_curve.png", best_step=best)
        plots["loss_curves"] = "loss_curve.png"
        if any("train_reward_margin" in r for r in records):
            plot_rewards(records, run_dir / "rewards.png")
            plots["rewards"] = "rewards.png"
    for which, c in (results.get("confusion") or {}).items():
        if c:
            name = f"confusion_{which}.png"
            plot_confusion_matrix(c, run_dir / name, title=f"Confusion matrix ({which})")
            plots[f"confusion_{which}"] = name
    cal = results.get("calibration")
    if cal:
        plot_reliability(cal["reliability_before"], run_dir / "reliability.png",
                         after=cal["reliability_after"])
        plots["reliability"] = "reliability.png"
    return plots


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def sections_markdown(sections: Sequence[Section]) -> list[str]:
    """Markdown lines of report sections; images are linked by file name."""
    lines: list[str] = []
    for section in sections:
        lines += [f"## {section.title}", ""]
        for b in section.blocks:
            if isinstance(b, Text):
                lines += [b.text, ""]
            elif isinstance(b, Bullets):
                lines += [f"- {item}" for item in b.items] + [""]
            elif isinstance(b, Table):
                lines.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
                lines.append("|" + "".join(" ---: |" if right else " --- |"
                                           for right in numeric_columns(b)))
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                lines.append("")
            elif isinstance(b, Image):
                lines += [f"![{b.alt}]({b.file})", ""]
    return lines


def render_markdown(results: dict[str, Any], sections: Sequence[Section] | None = None) -> str:
    """report.md: the sections of ``report_sections`` as Markdown."""
    check_results(results)
    head = [f"# Run report: {results['name']}", "",
            f"Base model: `{results['model']}` · task: {results['task']}", ""]
    body = sections_markdown(sections if sections is not None else report_sections(results))
    return "\n".join(head + body)


def write_reports(run_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.md`` and the self-contained ``report.html`` into the run directory."""
    from tunesmith.evaluation.html import render_html

    run_dir = Path(run_dir)
    sections = report_sections(results)
    md = run_dir / "report.md"
    md.write_text(render_markdown(results, sections), encoding="utf-8")
    html = run_dir / "report.html"
    html.write_text(render_html(results, run_dir, sections), encoding="utf-8")
    return md, html


# ----------------------------------------------------------------------------- comparing runs


def _hp_differences(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    ha, hb = a.get("hyperparameters") or {}, b.get("hyperparameters") or {}
    return [[k, fmt(ha.get(k)), fmt(hb.get(k))] for k in sorted(set(ha) | set(hb), key=str)
            if ha.get(k) != hb.get(k)]


def _extras(r: dict[str, Any]) -> dict[str, Any]:
    cal, fo, ov = (r.get(k) or {} for k in ("calibration", "forgetting", "overfitting"))
    return {"ECE after temperature scaling": cal.get("ece_after"),
            "temperature": cal.get("temperature"),
            "general-text perplexity ratio": fo.get("perplexity_ratio"),
            "mean KL from base": fo.get("kl_mean"),
            "best step": ov.get("best_step", r.get("best_step")),
            "overfitting flagged": ov.get("flagged"),
            "test answers (tuned)": (r.get("eval_mode") or {}).get("tuned")}


def compare_runs(run_a_dir: Path, run_b_dir: Path) -> str:
    """Markdown setting two runs' results side by side (``tunesmith eval --compare A B``)."""
    a, b = read_results(run_a_dir), read_results(run_b_dir)
    na, nb = a.get("name") or Path(run_a_dir).name, b.get("name") or Path(run_b_dir).name
    rows = []
    for key in headline_metrics(a["tuned"]) + [k for k in headline_metrics(b["tuned"])
                                               if k not in a["tuned"]]:
        va, vb = a["tuned"].get(key), b["tuned"].get(key)
        both = isinstance(va, float | int) and isinstance(vb, float | int)
        rows.append([key, fmt(va), fmt(vb), signed(vb - va) if both else "-"])
    for run, col in ((a, 1), (b, 2)):
        for key, c in (run.get("comparison") or {}).items():
            change = f"{c['difference']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
            row = [f"{key}: change over base (95% CI)", "-", "-", ""]
            row[col] = change
            rows.append(row)
    ea, eb = _extras(a), _extras(b)
    rows += [[k, fmt(ea[k]), fmt(eb[k]), ""] for k in ea if ea[k] is not None or eb[k] is not None]
    sections = [Section("Tuned model on its test set", [
        Text(f"A = {na} ({Path(run_a_dir)}), B = {nb} ({Path(run_b_dir)}). Metrics compare "
             "directly only when both runs used the same test set."),
        Table(["metric", f"A: {na}", f"B: {nb}", "B - A"], rows)])]
    hp = _hp_differences(a, b)
    sections.append(Section("Hyperparameters that differ", [
        Table(["name", "A", "B"], hp) if hp else Text("None.")]))
    da, db = a.get("data_counts") or {}, b.get("data_counts") or {}
    if da or db:
        sections.append(Section("Data", [Table(["split", "A", "B"], [
            [k, fmt(da.get(k)), fmt(db.get(k))] for k in dict.fromkeys([*da, *db])])]))
    head = [f"# Runs compared: {na} vs {nb}", "",
            f"Base models: `{a.get('model', '?')}` / `{b.get('model', '?')}`", ""]
    return "\n".join(head + sections_markdown(sections))


# ----------------------------------------------------------------------------- the first report


def comparison_rows(base: dict[str, Any] | None, tuned: dict[str, Any]
                    ) -> list[tuple[str, float | None, float, float | None]]:
    rows = []
    for key in headline_metrics(tuned):
        b = base.get(key) if base else None
        rows.append((key, b, tuned[key], tuned[key] - b if b is not None else None))
    return rows
