"""The sections of a study's report (report.html and report.md), from the study and its summary.

``summary`` is ``outputs.study_summary``'s dict (the numbers of study.json), so every number in
the report is also in study.json.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunesmith.evaluation.sections import (
    Bullets,
    Image,
    Section,
    Table,
    Text,
    fmt,
    headline_metrics,
)
from tunesmith.flows.tune.plots import PLOTS, StudyPlots

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

ERROR_CHARS = 120


def state_name(state: Any) -> str:
    """complete, pruned, failed, running or waiting: an Optuna TrialState for people."""
    name = getattr(state, "name", str(state)).lower()
    return "failed" if name == "fail" else name


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best completed trial, or None while no trial has completed."""
    try:
        return study.best_trial
    except (ValueError, RuntimeError):  # no completed trial (or a multi-objective study)
        return None


def one_line(text: Any, limit: int = ERROR_CHARS) -> str:
    """An error message on one line, shortened to ``limit`` characters."""
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def param_names(study: optuna.Study) -> list[str]:
    """Every parameter of the study: the search space's order first, then as trials show them."""
    space = study.user_attrs.get("space")
    names = list(space) if isinstance(space, dict) else []
    for t in study.trials:
        names += [p for p in t.params if p not in names]
    return names


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {fmt(v)}" for k, v in params.items()) or "no parameters"


def _summary(summary: dict[str, Any]) -> Section:
    s = summary
    objective = s.get("objective") or "value"
    better = "lower" if s["direction"] == "minimize" else "higher"
    counts = s["states"]
    shown = [f"{counts.get(k, 0)} {k}" for k in ("complete", "pruned", "failed", "running")]
    shown += [f"{counts['waiting']} waiting"] if counts.get("waiting") else []
    items = [f"objective: {objective}, {s['direction']}d ({better} is better)",
             f"trials: {s['n_trials']} ({', '.join(shown)})"]
    if s.get("best_trial") is not None:
        items.append(f"best trial: #{s['best_trial']} with {objective} = {fmt(s['best_value'])}"
                     f" ({_params(s['best_params'] or {})})")
    else:
        items.append("best trial: none yet (no trial has completed)")
    if s.get("steps_saved_fraction") is not None:
        items.append(f"training steps saved by pruning: {s['steps_saved_fraction']:.1%} "
                     f"({s['steps_saved']} of the {s['steps_without_pruning']} steps the "
                     "finished trials would have trained unpruned)")
    else:
        items.append("training steps saved by pruning: unknown (no trial recorded its steps)")
    items.append(f"steps trained: {s['steps_trained']}, in {s['seconds']:.0f} seconds")
    sampler = s.get("sampler") or "-"
    if s.get("sampler_seed") is not None:
        sampler += f" (seed {s['sampler_seed']})"
    items.append(f"sampler: {sampler}; pruner: {s.get('pruner') or '-'}")
    return Section("Summary", [Bullets(items)])


def _best(summary: dict[str, Any]) -> Section:
    if summary.get("best_trial") is None:
        return Section("Best configuration", [Text("No trial has completed yet.")])
    params = summary.get("best_params") or {}
    return Section("Best configuration", [
        Table(["parameter", "value"], [[k, fmt(v)] for k, v in params.items()]),
        Text(f"These are the values of trial #{summary['best_trial']}; best.yaml in the study "
             "directory holds the complete run config with them filled in.")])


def _steps(attrs: dict[str, Any]) -> str:
    steps, total = attrs.get("steps"), attrs.get("total_steps")
    if steps is None:
        return "-" if total is None else f"-/{total}"
    return str(steps) if total is None else f"{steps}/{total}"


def _trials(study: optuna.Study, summary: dict[str, Any], params: list[str]) -> Section:
    trials = study.trials
    if not trials:
        return Section("Trials", [Text("The study has no trials yet.")])
    errors = any(t.user_attrs.get("error") for t in trials)
    header = ["#", "state", summary.get("objective") or "value", *params, "steps", "seconds"]
    rows = []
    for t in trials:
        a = t.user_attrs
        state = state_name(t.state) + (" (best)" if t.number == summary.get("best_trial")
                                       else "")
        seconds = a.get("seconds")
        value = t.value
        if value is None and state == "pruned" and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        row = [str(t.number), state, fmt(value), *[fmt(t.params.get(p)) for p in params],
               _steps(a), f"{seconds:.1f}" if isinstance(seconds, int | float) else "-"]
        rows.append(row + ([one_line(a.get("error")) or "-"] if errors else []))
    return Section("Trials", [
        Table(header + (["error"] if errors else []), rows),
        Text("steps = optimiser steps trained / steps the trial would have trained unpruned. "
             "A pruned trial shows its last reported (intermediate) value.")])


def _space_row(name: str, d: Any) -> list[str]:
    if not isinstance(d, dict):
        return [name, "-", fmt(d), "-"]
    kind = d.get("type") or d.get("name") or "-"
    rest = {k: v for k, v in d.items() if k not in ("type", "name", "low", "high", "choices")}
    if "choices" in d:
        values = ", ".join(fmt(c) for c in d["choices"])
    elif "low" in d or "high" in d:
        values = f"[{fmt(d.get('low'))}, {fmt(d.get('high'))}]"
    else:
        values = "-"
    other = ", ".join(f"{k} = {fmt(v)}" for k, v in rest.items() if v is not None) or "-"
    return [name, str(kind), values, other]


def _space_from_trials(study: optuna.Study) -> dict[str, Any]:
    """The distributions the trials were sampled from, where the study records no space."""
    space: dict[str, Any] = {}
    for t in study.trials:
        for name, dist in t.distributions.items():
            attrs = {k.lstrip("_"): v for k, v in vars(dist).items()}
            space[name] = {"type": type(dist).__name__, **attrs}
    return space


def _space(study: optuna.Study) -> Section:
    space = study.user_attrs.get("space")
    note = []
    if not isinstance(space, dict) or not space:
        space = _space_from_trials(study)
        note = [Text("The study does not record its search space; these are the "
                     "distributions its trials were sampled from.")] if space else []
    if not space:
        return Section("Search space", [Text("The study records no search space.")])
    return Section("Search space", [
        Table(["parameter", "distribution", "range or choices", "other"],
              [_space_row(k, v) for k, v in space.items()]), *note])


def _plots(plots: StudyPlots) -> Section:
    blocks: list = []
    for spec in PLOTS:
        if spec.name in plots.files:
            blocks.append(Image(spec.title, plots.files[spec.name].name))
        else:
            reason = plots.skipped.get(spec.name, "not drawn")
            blocks.append(Text(f"{spec.title.capitalize()}: not drawn, {reason}."))
    return Section("Plots", blocks)


def _metric_keys(test: dict[str, Any]) -> list[str]:
    merged: dict[str, Any] = {}
    for which in ("final", "default", "base"):
        for k, v in (test.get(which) or {}).items():
            merged.setdefault(k, v)
    keys = headline_metrics(merged)
    return keys + sorted(k for k, v in merged.items() if k not in keys
                         and isinstance(v, int | float) and not isinstance(v, bool))


def _final(final: dict[str, Any]) -> Section:
    test = final.get("test") or {}
    comparison = final.get("comparison") or {}
    level = (f"{next(iter(comparison.values()))['confidence']:.0%}" if comparison else "95%")
    rows = []
    for key in _metric_keys(test):
        base, default, best = ((test.get(w) or {}).get(key) for w in ("base", "default", "final"))
        c = comparison.get(key) or {}
        diff = c.get("difference")
        if diff is None and isinstance(best, int | float) and isinstance(default, int | float):
            diff = best - default
        ci = f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]" if "ci_low" in c else "-"
        rows.append([key, fmt(base), fmt(default), fmt(best),
                     "-" if diff is None else f"{diff:+.4f}", ci])
    blocks: list = [
        Table(["metric", "base model", "default config", "best config",
               "difference (best - default)", f"{level} CI"], rows),
        Text("The test split was evaluated only here, after the search: the trials were "
             "compared on the validation split alone and never saw the test split. Default "
             "config = the run config as written; best config = the run config with the best "
             "trial's values, trained again in full.")]
    if comparison:
        c = next(iter(comparison.values()))
        blocks.append(Text(f"The difference is on the same {c['n']} test items; the interval "
                           f"is a paired bootstrap ({c['n_resamples']} resamples, seed "
                           f"{c['seed']})."))
    runs = final.get("runs") or {}
    if runs:
        blocks.append(Bullets([f"{k} run: {v}" for k, v in runs.items()]))
    return Section("Final run on the test split", blocks)


def study_sections(study: optuna.Study, summary: dict[str, Any], plots: StudyPlots,
                   final: dict[str, Any] | None = None) -> list[Section]:
    """Every section of the study report, in reading order."""
    sections = [_summary(summary), _best(summary), _trials(study, summary, param_names(study)),
                _space(study), _plots(plots)]
    if final:
        sections.append(_final(final))
    return sections
