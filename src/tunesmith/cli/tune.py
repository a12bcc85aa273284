"""`tunesmith tune`: parse, call the search flow, print."""

from __future__ import annotations

from pathlib import Path

import typer

from tunesmith.cli.common import err, friendly, out


@friendly
def tune_cmd(
    config: Path = typer.Argument(..., help="Run configuration (YAML) with a tune: section."),
    trials: int | None = typer.Option(None, "--trials", "-n", min=0,
                                      help="Trials in the study (default: tune.trials)."),
    timeout: float | None = typer.Option(None, "--timeout", min=0,
                                         help="Start no new trial after this many minutes."),
    study_dir: Path | None = typer.Option(None, "--study-dir",
                                          help="Where the study lives (default: "
                                          "runs/<name>-tune)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the study in --study-dir."),
    new: bool = typer.Option(False, "--new", help="Delete the study in --study-dir, start "
                             "again."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Trials run at once."),
    final: bool = typer.Option(False, "--final", help="Then train the best configuration "
                               "and the untuned one, and compare them on the test split."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Search hyperparameters on the validation split (Optuna); --final tests the best."""
    from tunesmith.flows.tune import tune

    result = tune(config, trials=trials, timeout_minutes=timeout, study_dir=study_dir,
                  resume=resume, new=new, jobs=jobs, final=final, console=err,
                  show_progress=progress)
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n)
    out.print(f"trials: {counts or 'none'}", highlight=False)
    if result.steps_saved is not None:
        out.print(f"the pruner saved {result.steps_saved:.0%} of the training steps")
    if result.best_trial is None:
        out.print("no trial completed; see trials.csv for the errors")
    else:
        out.print(f"best: trial {result.best_trial}, {result.objective} "
                  f"{result.best_value:.4f}, {result.best_params}", highlight=False)
        out.print(f"best configuration: {result.best_config}  (tunesmith run it)")
    if result.final:
        for metric, c in result.final["comparison"].items():
            out.print(f"test {metric}: default {c['base']:.4f} -> best {c['tuned']:.4f} "
                      f"({c['difference']:+.4f}, 95% CI [{c['ci_low']:+.4f}, "
                      f"{c['ci_high']:+.4f}])")
    out.print(f"study: {result.study_dir}  ({result.seconds:.0f} s); "
              f"optuna-dashboard sqlite:///{result.study_dir.resolve()}/study.db")


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_cmd)
