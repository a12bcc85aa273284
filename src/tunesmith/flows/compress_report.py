"""The compression report of a run: ``<run>/compressed/compression.json`` holds one entry per
compressed model (each with the tuned model measured beside it in the same process), and
``compression.md`` shows them as one table."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tunesmith.flows.steps import write_json

log = logging.getLogger("tunesmith")

SCHEMA_VERSION = 1
JSON_NAME, MD_NAME = "compression.json", "compression.md"


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
    """Add (or replace) ``entry`` under its kind; rewrite the JSON and the Markdown table."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / JSON_NAME
    report = read_report(path)
    report.update(schema_version=SCHEMA_VERSION, run=run_name)
    report["models"][entry["kind"]] = entry
    write_json(path, report)
    tmp = folder / (MD_NAME + ".tmp")
    tmp.write_text(markdown(report), encoding="utf-8")
    tmp.replace(folder / MD_NAME)
    return path


def _num(x: float | int | None, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _row(row: dict[str, Any], change: dict[str, Any] | None, speed: float | None) -> str:
    lat = row.get("latency") or {}
    ci = "-" if change is None else (f"{change['difference'] * 100:+.1f} "
                                    f"[{change['ci_low'] * 100:+.1f}, "
                                    f"{change['ci_high'] * 100:+.1f}]")
    cells = [row["model"], f"{row['parameters']:,}", f"{row['nonzero_parameters']:,}",
             _size(row.get("size_bytes")), _num(row.get("accuracy"), ".3f"),
             _num(row.get("f1_positive"), ".3f"), ci, _num(row.get("perplexity"), ".2f"),
             _num(lat.get("p50_ms"), ".0f"), _num(lat.get("p95_ms"), ".0f"),
             "-" if speed is None else f"{speed:.2f}x"]
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict[str, Any]) -> str:
    """The report as a short Markdown table, the tuned model first."""
    entries = list(report["models"].values())
    if not entries:
        return "# Compression\n\nNo compressed models yet.\n"
    latest = max(entries, key=lambda e: e.get("created", ""))
    tuned = latest["tuned"]
    metric, positive = latest.get("primary_metric", "accuracy"), latest.get("positive_label")
    header = ["model", "parameters", "non-zero", "size", metric,
              f"F1 {positive}" if positive else "F1", f"Δ {metric} vs tuned, points [95% CI]",
              "perplexity", "p50 ms", "p95 ms", "speed vs tuned"]
    lines = [f"# Compression of {report.get('run', 'the run')}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             _row(tuned, None, None)]
    lines += [_row(e["compressed"], e["comparison"].get(metric), e.get("speed_p50"))
              for e in sorted(entries, key=lambda e: e["kind"])]
    counts = sorted({e["test_items"] for e in entries})
    lines += ["", f"Test items: {', '.join(map(str, counts))} (the run's test split"
              + (", sampled with --max-test" if any(e.get("max_test") for e in entries)
                 else "") + "). The tuned model's row is from the latest compression; each "
              "compressed model was evaluated beside the tuned model in the same process. "
              "Latency: one test item at a time (batch 1), the models interleaved item by "
              "item; speed = tuned p50 / model p50 from the same session. Size: the weight "
              "files on disk. Perplexity: general English text (the forgetting check's).", ""]
    return "\n".join(lines)
