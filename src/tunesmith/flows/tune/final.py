"""``tune --final``: the best configuration and the untuned one, trained as normal runs and
compared on the test split with the paired bootstrap.

This is the only place a study touches the test split, after the search has chosen: the
selection never saw it, so the test figures are an honest estimate. Both runs go through
``tunesmith.run`` unchanged (same data, same seed), so the only difference between them is
the searched values; the base model is evaluated once, in the default run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith.config import RunConfig
from tunesmith.evaluation.stats import compare_classification, compare_generation
from tunesmith.flows import assess
from tunesmith.flows.run import run
from tunesmith.flows.tune import space as search


def final_runs(cfg: RunConfig, best_params: dict[str, Any], study_dir: Path, *, home: Path,
               console: Console, show_progress: bool) -> dict[str, Any]:
    default_cfg = search.without_search(cfg, name=f"{cfg.name}-default",
                                        output_dir=study_dir / "default")
    best_cfg = search.without_search(
        search.with_values(cfg, best_params, source="best trial"), name=f"{cfg.name}-best",
        output_dir=study_dir / "final")
    best_cfg = best_cfg.model_copy(update={
        "eval": best_cfg.eval.model_copy(update={"compare_base": False})})
    console.print("final: training the default configuration")
    default = run(default_cfg, overwrite=True, home=home, console=console,
                  show_progress=show_progress)
    console.print(f"final: training the best configuration {best_params}")
    best = run(best_cfg, overwrite=True, home=home, console=console,
               show_progress=show_progress)
    d = assess.load_model_eval(default.run_dir / "tuned_eval.json")
    b = assess.load_model_eval(best.run_dir / "tuned_eval.json")
    assert d is not None and b is not None
    ev = cfg.eval
    if ev.task == "classification":
        labels = default.results.get("labels") or sorted(set(d.predictions.expected))
        comparison = compare_classification(
            d.predictions.predicted, b.predictions.predicted, d.predictions.expected, labels,
            positive=ev.positive_label, n_resamples=ev.bootstrap_resamples, seed=cfg.train.seed)
    else:
        comparison = compare_generation(
            d.predictions.predicted, b.predictions.predicted, d.predictions.expected,
            n_resamples=ev.bootstrap_resamples, seed=cfg.train.seed)
    return {"best_params": best_params,
            "runs": {"default": str(default.run_dir), "final": str(best.run_dir)},
            "test": {"base": default.base, "default": default.tuned, "final": best.tuned},
            "comparison": {k: c.to_dict() for k, c in comparison.items()}}
