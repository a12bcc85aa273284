"""`tunesmith improve`: one gated round of the feedback loop; parse, call the flow, print."""

from __future__ import annotations

from pathlib import Path

import typer

from tunesmith.cli.common import err, friendly, out


@friendly
def improve_cmd(
    current: Path = typer.Argument(..., help="Run directory of the model in use."),
    feedback: Path = typer.Option(..., "--feedback", help="Feedback export directory "
                                  "(feedback_dpo.jsonl, feedback_chat.jsonl) or one file."),
    holdout: Path | None = typer.Option(None, "--holdout", help="Chat JSONL both models are "
                                        "compared on (default: the current run's test split)."),
    margin: float = typer.Option(0.02, "--margin", help="Promote when the 95% CI of (new - "
                                 "current) on the metric starts at or above -margin."),
    metric: str | None = typer.Option(None, "--metric", help="Gate metric (default: accuracy "
                                      "for classification, exact_match otherwise)."),
    output_dir: Path | None = typer.Option(None, "--out", help="The new run's directory "
                                           "(default: round-N beside the current run)."),
    config: Path | None = typer.Option(None, "--config", help="Train/eval settings for the "
                                       "round (default: the current run's)."),
    history: Path | None = typer.Option(None, "--history", help="Rounds file (default: "
                                        "rounds.jsonl beside the current run)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Train the next model from the current one on user feedback; promote it only if it is
    not worse on the hold-out set."""
    from tunesmith.flows.improve import improve

    r = improve(current, feedback, holdout=holdout, margin=margin, metric=metric,
                output_dir=output_dir, config=config, history=history, console=err,
                show_progress=progress)
    out.print(f"round {r.round} ({r.objective} on {r.feedback['pairs']} pair(s), "
              f"{r.feedback['chat']} chat row(s)): {r.metric} {r.previous_value:.4f} -> "
              f"{r.candidate_value:.4f} ({r.difference:+.4f}, 95% CI [{r.ci_low:+.4f}, "
              f"{r.ci_high:+.4f}])", highlight=False)
    out.print(("promoted: " if r.promoted else "not promoted: ") + r.reason, highlight=False)
    out.print(f"model in use: {r.current}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("improve")(improve_cmd)
