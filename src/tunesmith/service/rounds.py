"""A feedback round for one of the service's fine-tuned models, promoted as a new ``ft:`` model.

    from tunesmith.service.rounds import improve_model
    r = improve_model(settings, "acme", "ft:smollm2:acme:spam:ab12cd34")
    print(r.round.promoted, r.model)  # the new ft: id when promoted, else None

The round is ``tunesmith improve`` (``flows.improve``) with the service's parts filled in: the
current model is the fine-tune's run directory, the feedback is the org's feedback on that
model's answers (``export_feedback``), the new run goes where the service keeps job runs, and
the history is one ``rounds/{org}.jsonl`` per org. A promoted model is registered as a
succeeded job of the org, so ``/v1/models``, chat completions, feedback, deletion and the next
round treat it like any fine-tune; a model the gate refused is not registered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tunesmith.config import RunConfig
from tunesmith.config.hyper import auto_learning_rate
from tunesmith.errors import ConfigError, DataError
from tunesmith.flows.improve import CHAT_FILE, PAIRS_FILE, Round, feedback_files, improve
from tunesmith.flows.steps import run_config
from tunesmith.service.audit import export_feedback
from tunesmith.service.files import add_file
from tunesmith.service.jobs import add_event
from tunesmith.service.models import fine_tune_job, fine_tune_name, fine_tune_parts
from tunesmith.service.settings import ServiceSettings
from tunesmith.service.store import Store
from tunesmith.service.tables import Job, new_id, now
from tunesmith.service.worker import add_results_files


@dataclass
class ServiceRound:
    round: Round
    job_id: str  # the round's job id (its run directory's name), registered only if promoted
    model: str | None  # the promoted model's ft: id; None when the gate refused it


def history_file(settings: ServiceSettings, org: str) -> Path:
    return settings.data_dir / "rounds" / f"{org}.jsonl"


def improve_model(settings: ServiceSettings, org: str, model_id: str, *,
                  feedback: Path | None = None, since: int | None = None,
                  holdout: Path | None = None, margin: float = 0.02, metric: str | None = None,
                  config: Path | None = None, suffix: str | None = None,
                  console: Console | None = None, show_progress: bool = True) -> ServiceRound:
    """One gated round from the fine-tuned model ``model_id`` of ``org``.

    ``feedback``: a feedback directory or file; default: the org's feedback on ``model_id``'s
    answers (since ``since``, Unix time). ``suffix``: the new model's suffix (default: the
    current model's). The other arguments are ``improve``'s.
    """
    store = Store(settings.url)
    try:
        with store.begin() as s:
            current = fine_tune_job(s, org, model_id)
        if current is None:
            raise ConfigError(f"{model_id}: no fine-tuned model of org '{org}' by that name in "
                              f"{settings.url} (list them with GET /v1/models); improve "
                              "continues from a succeeded fine-tuning job's model")
        job_id = new_id("ftjob-")
        if feedback is None:
            feedback = settings.data_dir / "feedback" / job_id
            got = export_feedback(settings.url, org=org, out_dir=feedback, since=since,
                                  model=model_id)
            if got.chat_examples + got.dpo_pairs == 0:
                raise DataError(f"no feedback on {model_id}'s answers from org '{org}' yet: "
                                "users rate or correct its chat completions with POST "
                                "/v1/feedback (the server needs --audit-log), or pass "
                                "--feedback DIR", path=feedback, code="empty_file")
        r = improve(settings.runs_dir / current.id, feedback, holdout=holdout, margin=margin,
                    metric=metric, output_dir=settings.runs_dir / job_id, config=config,
                    history=history_file(settings, org), home=settings.home, console=console,
                    show_progress=show_progress)
        name = None
        if r.promoted:
            name = _register(store, settings, current, job_id, r, Path(feedback),
                             suffix if suffix is not None else current.suffix)
        return ServiceRound(round=r, job_id=job_id, model=name)
    finally:
        store.close()


def _hyperparameters(cfg: RunConfig, results: dict[str, Any]) -> dict[str, Any]:
    """The round's resolved values in OpenAI's shape (``beta`` only for a DPO round)."""
    hp = results["hyperparameters"]
    base_lr = auto_learning_rate(cfg.train.method, hp["batch_size"])
    values = {"n_epochs": hp["epochs"], "batch_size": hp["batch_size"],
              "learning_rate_multiplier": round(hp["learning_rate"] / base_lr, 6)}
    if hp.get("beta") is not None:
        values["beta"] = hp["beta"]
    return values


def _register(store: Store, settings: ServiceSettings, current: Job, job_id: str, r: Round,
              feedback: Path, suffix: str | None) -> str:
    """Record the promoted round as a succeeded job of the org; its model's ft: id."""
    run_dir = settings.runs_dir / job_id
    results = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    cfg = run_config(run_dir)
    assert cfg is not None  # improve wrote it
    pairs, chat = feedback_files(feedback)
    trained_on = pairs if r.objective != "sft" else chat
    assert trained_on is not None  # improve trained on it
    name = PAIRS_FILE if trained_on == pairs else CHAT_FILE
    data = add_file(store, settings.files_dir, current.org, filename=name,
                    purpose="fine-tune", content=trained_on.read_bytes())
    outputs = add_results_files(store, settings.files_dir, current.org, run_dir)
    output_model = fine_tune_name(fine_tune_parts(current.output_model)[0], current.org,
                                  suffix, job_id)
    finished = now()
    job = Job(id=job_id, org=current.org, model=current.output_model,
              base_ref=str(settings.runs_dir / current.id), training_file=data.id,
              validation_file=None, suffix=suffix, seed=cfg.train.seed,
              metadata_={"feedback_round": str(r.round)},
              hyperparameters=_hyperparameters(cfg, results), status="succeeded",
              output_model=output_model, result_files=[f.id for f in outputs],
              trained_tokens=results["training"]["tokens_seen"],
              step=results["hyperparameters"]["total_steps"],
              total_steps=results["hyperparameters"]["total_steps"], created_at=finished,
              finished_at=finished)
    with store.begin() as s:
        s.add(job)
        add_event(s, job_id, f"Created by feedback round {r.round} from {current.output_model} "
                  f"on {r.feedback['pairs']} preference pair(s) and {r.feedback['chat']} chat "
                  "row(s)", data={"feedback": r.feedback})
        add_event(s, job_id, f"Promoted: {r.reason}", data={"round": r.to_json()})
        add_event(s, job_id, f"New fine-tuned model created: {output_model}")
        add_event(s, job_id, "The job has successfully completed")
    return output_model
