"""`tunesmith improve`: one gated round of the feedback loop; parse, call the flow, print."""

from __future__ import annotations

from pathlib import Path

import typer

from tunesmith.cli.common import err, friendly, out


@friendly
def improve_cmd(
    current: str = typer.Argument(..., help="The model in use: a run directory, or a "
                                  "fine-tuned model of the service (ft:BASE:ORG:SUFFIX:ID)."),
    feedback: Path | None = typer.Option(None, "--feedback", help="Feedback export directory "
                                         "(feedback_dpo.jsonl, feedback_chat.jsonl) or one "
                                         "file. For an ft: model, default: its org's feedback "
                                         "on its answers in the service."),
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
    data_dir: Path | None = typer.Option(None, "--data-dir", help="For an ft: model: the "
                                         "service's data folder (empty: $TUNESMITH_HOME/"
                                         "service)."),
    database_url: str | None = typer.Option(None, "--database-url", help="For an ft: model: "
                                            "the service's database, if not SQLite."),
    since: str | None = typer.Option(None, "--since", help="For an ft: model: only feedback "
                                     "from this date on (YYYY-MM-DD)."),
    suffix: str | None = typer.Option(None, "--suffix", help="For an ft: model: the promoted "
                                      "model's suffix (default: the current one's)."),
) -> None:
    """Train the next model from the current one on user feedback; promote it only if it is
    not worse on the hold-out set. An ft: model of the service trains on its org's feedback
    and, when promoted, is served under a new ft: id."""
    from tunesmith.errors import ConfigError

    model = None
    if current.startswith("ft:"):
        from tunesmith.cli.data import parse_since
        from tunesmith.models.resolve import default_home
        from tunesmith.service.models import fine_tune_parts
        from tunesmith.service.rounds import improve_model
        from tunesmith.service.settings import ServiceSettings, default_data_dir

        if output_dir is not None or history is not None:
            raise ConfigError("--out and --history are the service's own for an ft: model "
                              "(its runs folder and rounds/ORG.jsonl); leave them out")
        home = default_home()
        settings = ServiceSettings(data_dir=data_dir or default_data_dir(home), home=home,
                                   database_url=database_url)
        done = improve_model(settings, fine_tune_parts(current)[1], current, feedback=feedback,
                             since=parse_since(since), holdout=holdout, margin=margin,
                             metric=metric, config=config, suffix=suffix, console=err,
                             show_progress=progress)
        r, model = done.round, done.model
    else:
        from tunesmith.flows.improve import improve

        if feedback is None:
            raise ConfigError("--feedback DIR is needed to improve a run directory (write it "
                              "with `tunesmith data from-feedback`)")
        r = improve(Path(current), feedback, holdout=holdout, margin=margin, metric=metric,
                    output_dir=output_dir, config=config, history=history, console=err,
                    show_progress=progress)
    out.print(f"round {r.round} ({r.objective} on {r.feedback['pairs']} pair(s), "
              f"{r.feedback['chat']} chat row(s)): {r.metric} {r.previous_value:.4f} -> "
              f"{r.candidate_value:.4f} ({r.difference:+.4f}, 95% CI [{r.ci_low:+.4f}, "
              f"{r.ci_high:+.4f}])", highlight=False)
    out.print(("promoted: " if r.promoted else "not promoted: ") + r.reason, highlight=False)
    out.print(f"model in use: {model or r.current}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("improve")(improve_cmd)
