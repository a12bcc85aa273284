"""A study's output files: trials.csv, the plots, report.html and report.md, study.json.

Everything is read from the Optuna study itself (its trials and the user attributes that
``tunesmith tune`` sets), so the outputs can be written again at any time from the SQLite
storage, also for a study that is still running or was interrupted. Missing attributes are
tolerated: their cells show '-' and their lines are left out.

The study report is built from the run report's blocks (``evaluation.sections``) and rendered
by the same renderers (``evaluation.html.render_page``, ``evaluation.report.sections_markdown``),
so both reports look alike and report.md says what report.html says.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.evaluation.html import render_page
from tunesmith.evaluation.report import json_safe, sections_markdown
from tunesmith.flows.tune.plots import StudyPlots, write_plots
from tunesmith.flows.tune.study_report import (
    best_trial,
    param_names,
    state_name,
    study_sections,
)

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = ["state_counts", "steps_saved", "steps_saved_fraction", "study_summary",
           "write_study_outputs", "write_trials_csv"]

SCHEMA_VERSION = 1
STATES = ("complete", "pruned", "failed", "running", "waiting")
ATTR_COLUMNS = ("steps", "total_steps", "seconds", "best_step", "valid_loss")


def _int(x: Any) -> int | None:
    return int(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def steps_saved(trials: Iterable[FrozenTrial]) -> tuple[int, int]:
    """(steps the pruner saved, steps the finished trials would have trained without it).

    A pruned trial saves ``total_steps - steps``. The denominator counts ``total_steps`` for
    complete and pruned trials, and the steps a failed trial trained (it would have failed
    there without a pruner too). Trials without ``total_steps`` are left out; a pruned trial
    without ``steps`` counts up to its last reported intermediate step.
    """
    saved = total = 0
    for t in trials:
        state = state_name(t.state)
        attrs = t.user_attrs
        if state == "failed":
            total += _int(attrs.get("steps")) or 0
            continue
        planned = _int(attrs.get("total_steps"))
        if state not in ("complete", "pruned") or planned is None:
            continue
        total += planned
        if state == "pruned":
            ran = _int(attrs.get("steps"))
            if ran is None:
                ran = max(t.intermediate_values, default=None)
            if ran is not None:
                saved += max(planned - ran, 0)
    return saved, total


def steps_saved_fraction(trials: Iterable[FrozenTrial]) -> float | None:
    """The share of training steps the pruner saved (see ``steps_saved``); None if unknown."""
    saved, total = steps_saved(trials)
    return saved / total if total > 0 else None


def state_counts(trials: Iterable[FrozenTrial]) -> dict[str, int]:
    """Trials per state: complete, pruned, failed, running, waiting (all keys present)."""
    counts = dict.fromkeys(STATES, 0)
    for t in trials:
        name = state_name(t.state)
        counts[name] = counts.get(name, 0) + 1
    return counts


def _cell(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "" if x is None else str(x)
    return str(x)


def write_trials_csv(study: optuna.Study, path: Path) -> Path:
    """trials.csv: one row per trial; each parameter and each scalar validation metric a column."""
    trials = study.trials
    params = param_names(study)
    metrics: list[str] = []
    for t in trials:
        m = t.user_attrs.get("metrics")
        if isinstance(m, dict):
            metrics += [k for k, v in m.items() if isinstance(v, int | float)
                        and not isinstance(v, bool) and k not in metrics]
    header = ["number", "state", "value", *params, *ATTR_COLUMNS,
              *[f"metrics.{k}" for k in metrics], "run_dir", "error", "started", "completed"]
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for t in trials:
            attrs = t.user_attrs
            m = attrs.get("metrics") if isinstance(attrs.get("metrics"), dict) else {}
            error = " ".join(str(attrs.get("error") or "").split())
            writer.writerow([
                t.number, state_name(t.state), _cell(t.value),
                *[_cell(t.params.get(p)) for p in params],
                *[_cell(attrs.get(k)) for k in ATTR_COLUMNS],
                *[_cell(m.get(k)) for k in metrics],
                _cell(attrs.get("run_dir")), error,
                t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "",
                t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else ""])
    return Path(path)


def study_summary(study: optuna.Study, plots: StudyPlots | None = None,
                  final: dict[str, Any] | None = None) -> dict[str, Any]:
    """The numbers of the study report, for machines (``study.json``)."""
    attrs = study.user_attrs
    best = best_trial(study)
    saved, total = steps_saved(study.trials)
    sampler = getattr(study, "sampler", None)
    pruner = getattr(study, "pruner", None)
    return json_safe({
        "schema_version": SCHEMA_VERSION,
        "study_name": study.study_name,
        "config_name": attrs.get("config_name"),
        "base_model": attrs.get("base_model"),
        "objective": attrs.get("objective"),
        "direction": study.direction.name.lower(),
        "n_trials": len(study.trials),
        "states": state_counts(study.trials),
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else None,
        "steps_saved_fraction": saved / total if total > 0 else None,
        "steps_saved": saved,
        "steps_without_pruning": total,
        "steps_trained": sum(_int(t.user_attrs.get("steps")) or 0 for t in study.trials),
        "seconds": sum(float(s) for t in study.trials
                       if isinstance(s := t.user_attrs.get("seconds"), int | float)),
        "sampler": type(sampler).__name__ if sampler is not None else None,
        "sampler_seed": attrs.get("sampler_seed"),
        "pruner": attrs.get("pruner") or (type(pruner).__name__ if pruner is not None else None),
        "space": attrs.get("space"),
        "plots": {k: p.name for k, p in plots.files.items()} if plots else {},
        "skipped_plots": dict(plots.skipped) if plots else {},
        "final": final,
    })


def _title_and_meta(study: optuna.Study, summary: dict[str, Any]) -> tuple[str, str]:
    meta = []
    if summary.get("base_model"):
        meta.append(f"Base model: `{summary['base_model']}`")
    meta.append(f"objective: {summary.get('objective') or 'value'} ({summary['direction']})")
    return f"Study report: {summary.get('config_name') or study.study_name}", " · ".join(meta)


def write_study_outputs(study: optuna.Study, study_dir: Path, *,
                        final: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write trials.csv, the plots (PNG) and report.html (+ report.md) for a study; return
    name -> path of what was written.

    Names: trials, the drawn plots (history, importances, slice, intermediate), study_json,
    report_md, report_html. A plot that cannot be drawn is skipped, with its reason in the
    reports and in study.json's ``skipped_plots``; it never makes this call fail.
    """
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {"trials": write_trials_csv(study, study_dir / "trials.csv")}
    plots = write_plots(study, study_dir)
    written.update(plots.files)
    summary = study_summary(study, plots, final)
    json_path = study_dir / "study.json"
    json_path.write_text(json.dumps(summary, indent=2, allow_nan=False), encoding="utf-8")
    written["study_json"] = json_path

    sections = study_sections(study, summary, plots, final)
    title, meta = _title_and_meta(study, summary)
    md = study_dir / "report.md"
    md.write_text("\n".join([f"# {title}", "", meta, "", *sections_markdown(sections)]),
                  encoding="utf-8")
    written["report_md"] = md
    html = study_dir / "report.html"
    html.write_text(render_page(title, meta, sections, study_dir), encoding="utf-8")
    written["report_html"] = html
    return written
