"""The compression report of a run: ``<run>/compressed/compression.json`` holds one entry per
compressed model (each with the tuned model measured beside it in the same process), and
``compression.md``, ``compression.html`` and ``compression.png`` show them.

The Markdown and the HTML are rendered from the same sections (``evaluation.blocks``) by the
run report's renderers, so both say the same. The plot is size on disk against the primary
metric, one point per model. Any kind of entry is shown (pruned, int8, a distilled
``distil-N`` student), sorted by kind; a field an entry lacks shows as '-'.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tunesmith.evaluation import plots
from tunesmith.evaluation.blocks import Bullets, Image, Section, Table, Text
from tunesmith.evaluation.html import render_page
from tunesmith.evaluation.report import sections_markdown
from tunesmith.flows.steps import write_json

log = logging.getLogger("tunesmith")

SCHEMA_VERSION = 1
JSON_NAME, MD_NAME = "compression.json", "compression.md"
HTML_NAME, PNG_NAME = "compression.html", "compression.png"


def read_report(path: Path) -> dict[str, Any]:
    """The report so far, or an empty one (a broken file is replaced, with a warning)."""
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(found, dict) and isinstance(found.get("models"), dict):
                return found
        except json.JSONDecodeError:
            pass
        log.warning("%s is not a compression report; starting a new one", path)
    return {"schema_version": SCHEMA_VERSION, "models": {}}


def record(folder: Path, run_name: str, entry: dict[str, Any]) -> Path:
    """Add (or replace) ``entry`` under its kind; rewrite the JSON, the plot, the Markdown and
    the HTML page, each whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / JSON_NAME
    report = read_report(path)
    report.update(schema_version=SCHEMA_VERSION, run=run_name)
    report["models"][entry["kind"]] = entry
    write_json(path, report)
    plotted = plot(report, folder / PNG_NAME)
    sections = report_sections(report, plotted=plotted is not None)
    _write_text(folder / MD_NAME, markdown(report, sections))
    _write_text(folder / HTML_NAME, render_page(_title(report), _meta(report), sections, folder))
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------- reading entries


def _entries(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(kind, entry) sorted by kind; an entry that is not a mapping counts as an empty one."""
    models = report.get("models") or {}
    return [(str(kind), e if isinstance(e, dict) else {})
            for kind, e in sorted(models.items(), key=lambda kv: str(kv[0]))]


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _latest(entries: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The most recent entry that measured the tuned model (its row heads the table)."""
    with_tuned = [e for _, e in entries if isinstance(e.get("tuned"), dict)]
    return max(with_tuned, key=lambda e: str(e.get("created", "")), default={})


def _metric(report: dict[str, Any]) -> str:
    return str(_latest(_entries(report)).get("primary_metric") or "accuracy")


def _value(row: dict[str, Any], metric: str) -> float | None:
    """The primary metric of a model's row (``accuracy`` holds exact match too)."""
    x = row.get(metric, row.get("accuracy"))
    if x is None:
        x = _dict(row.get("metrics")).get(metric)
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _tokens_per_s(row: dict[str, Any]) -> float | None:
    x = _dict(row.get("generation")).get("tokens_per_s")
    return float(x) if isinstance(x, int | float) else None


def _points(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per model for the plot: name, size in MB, metric, and the CI of the
    difference from the tuned model (None for the tuned model or where not measured)."""
    entries, metric = _entries(report), _metric(report)
    rows: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = []
    tuned = _dict(_latest(entries).get("tuned"))
    if tuned:
        rows.append((str(tuned.get("model") or "tuned"), tuned, None))
    for kind, e in entries:
        change = _dict(_dict(e.get("comparison")).get(metric))
        rows.append((kind, _dict(e.get("compressed")), change or None))
    out = []
    for name, row, change in rows:
        size, y = row.get("size_bytes"), _value(row, metric)
        if not isinstance(size, int | float) or y is None:
            continue
        ci = None
        if change and all(isinstance(change.get(k), int | float)
                          for k in ("difference", "ci_low", "ci_high")):
            ci = (change["difference"] - change["ci_low"], change["ci_high"] - change["difference"],
                  change.get("confidence", 0.95))
        out.append({"name": name, "mb": size / 1e6, "value": y, "ci": ci})
    return out


# ----------------------------------------------------------------------------- the plot


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Size on disk against the primary metric, one labelled point per model; the compressed
    models' error bars are the confidence interval of their difference from the tuned model.
    None (and no file) when no model has both numbers."""
    points, metric = _points(report), _metric(report)
    if not points:
        path.unlink(missing_ok=True)
        return None
    fig, ax = plots.plt.subplots(figsize=(7, 4.5), dpi=110)
    for p in points:
        colour = "tab:blue" if p["ci"] is None else "tab:orange"
        if p["ci"] is None:
            ax.scatter([p["mb"]], [p["value"]], color=colour, zorder=3)
        else:
            ax.errorbar([p["mb"]], [p["value"]], yerr=[[p["ci"][0]], [p["ci"][1]]], fmt="o",
                        color=colour, capsize=4, zorder=3)
        ax.annotate(p["name"], (p["mb"], p["value"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    level = next((p["ci"][2] for p in points if p["ci"]), None)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(metric)
    ax.set_title(f"Size and {metric}" + (f" (bars: {level:.0%} CI of the change vs tuned)"
                                         if level else ""), fontsize=10)
    ax.margins(x=0.2, y=0.1)  # room for the labels of the outermost points
    ax.grid(alpha=0.3)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)  # savefig picks PNG by suffix
    plots._save(fig, tmp)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- the table


def _num(x: Any, fmt: str) -> str:
    if not isinstance(x, int | float) or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


def _size(n: Any) -> str:
    return "-" if not isinstance(n, int | float) else f"{n / 1e6:.1f} MB"


def _speed(entry: dict[str, Any]) -> str:
    wall, cpu = entry.get("speed_p50"), entry.get("speed_cpu_p50")
    if not isinstance(wall, int | float):
        return "-"
    return f"{wall:.2f}x" + ("" if not isinstance(cpu, int | float) else f" / {cpu:.2f}x")


def _ci(change: dict[str, Any]) -> str:
    try:
        return (f"{change['difference'] * 100:+.1f} [{change['ci_low'] * 100:+.1f}, "
                f"{change['ci_high'] * 100:+.1f}]")
    except (KeyError, TypeError):
        return "-"


def _row(name: str, row: dict[str, Any], change: dict[str, Any], speed: str,
         metric: str) -> list[str]:
    lat = _dict(row.get("latency"))
    return [str(row.get("model") or name), _num(row.get("parameters"), ","),
            _num(row.get("nonzero_parameters"), ","), _size(row.get("size_bytes")),
            _num(_value(row, metric), ".3f"), _num(row.get("f1_positive"), ".3f"),
            _ci(change), _num(row.get("perplexity"), ",.2f"), _num(lat.get("p50_ms"), ".0f"),
            _num(lat.get("p95_ms"), ".0f"), speed, _num(_tokens_per_s(row), ".1f")]


def table(report: dict[str, Any]) -> Table:
    """A row for the tuned model (from the latest entry), then one per compressed model."""
    entries = _entries(report)
    latest = _latest(entries)
    metric, positive = _metric(report), latest.get("positive_label")
    header = ["model", "parameters", "non-zero", "size", metric,
              f"F1 {positive}" if positive else "F1", f"Δ {metric} vs tuned, points [95% CI]",
              "perplexity", "p50 ms", "p95 ms", "speed vs tuned (wall / CPU)", "tokens/s"]
    rows = []
    if latest:
        rows.append(_row("tuned", _dict(latest.get("tuned")), {}, "-", metric))
    for kind, e in entries:
        rows.append(_row(kind, _dict(e.get("compressed")),
                         _dict(_dict(e.get("comparison")).get(metric)), _speed(e), metric))
    return Table(header, rows)


def _settings(kind: str, entry: dict[str, Any]) -> str | None:
    parts = {**_dict(entry.get("settings")), **_dict(_dict(entry.get("compression"))
                                                       .get("distil"))}
    if not parts:
        return None
    return f"{kind}: " + ", ".join(f"{k} {v}" for k, v in parts.items())


def _notes(entries: list[tuple[str, dict[str, Any]]]) -> str:
    counts = sorted({str(e["test_items"]) for _, e in entries if "test_items" in e})
    sampled = any(e.get("max_test") for _, e in entries)
    return (f"Test items: {', '.join(counts) or '-'} (the run's test split"
            + (", sampled with --max-test" if sampled else "") + "). The tuned model's row is "
            "from the latest compression; each compressed model was evaluated beside the tuned "
            "model in the same process. Latency: one test item at a time (batch 1), answered as "
            "the evaluation answers it (eval.mode: scoring the labels or generating), the models "
            "interleaved item by item; speed = tuned p50 / model p50 from the same session, of "
            "the wall-clock time and of the process CPU time (which leaves out waiting for a "
            "core on a shared machine). Tokens/s: greedy generation of a fixed number of new "
            "tokens per prompt at batch size 1, prefill included, on this machine. Size: the "
            "weight files on disk. Perplexity: general English text (the forgetting check's).")


def report_sections(report: dict[str, Any], *, plotted: bool = True) -> list[Section]:
    """The report's sections: the table and the plot, how the numbers were measured."""
    entries = _entries(report)
    if not entries:
        return [Section("Models", [Text("No compressed models yet.")])]
    models = Section("Models", [table(report)])
    if plotted:
        models.blocks.append(Image(f"size on disk against {_metric(report)}", PNG_NAME))
    notes = Section("Notes", [Text(_notes(entries))])
    settings = [s for kind, e in entries if (s := _settings(kind, e))]
    if settings:
        notes.blocks.append(Bullets(settings))
    return [models, notes]


def _title(report: dict[str, Any]) -> str:
    return f"Compression of {report.get('run') or 'the run'}"


def _meta(report: dict[str, Any]) -> str:
    n = len(report.get("models") or {})
    return f"{n} compressed model{'s' if n != 1 else ''} · primary metric: {_metric(report)}"


def markdown(report: dict[str, Any], sections: list[Section] | None = None) -> str:
    """The report as Markdown (the plot linked by file name)."""
    sections = report_sections(report) if sections is None else sections
    return "\n".join([f"# {_title(report)}", "", _meta(report), "",
                      *sections_markdown(sections)])
