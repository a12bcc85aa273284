"""One trial of a study, in its own process: ``python -m tunesmith.flows.tune TRIAL_DIR``.

The study (``study.py``) writes ``TRIAL_DIR/trial.json`` (the trial's complete run
configuration, its number and the study's storage) and starts this module. A process per trial
is what keeps the memory of one trial from carrying into the next (Hugging Face's
``hyperparameter_search`` runs every trial in one process, and its users report the memory
growing until the machine runs out), and what lets a trial that crashes or is killed end as a
failed trial while the study goes on.

The trial runs the same steps as ``tunesmith run`` (``flows.steps``, ``fine_tune``) on the
training and validation splits only: the test split is never read here (``with_test=False``),
so the search cannot select on it. At each evaluation the validation loss is reported to the
study's Optuna storage, and the study's pruner decides there, in this process, whether to go
on: the way Optuna's own multi-process optimisation works. The outcome goes to
``result.json`` (written whole, then renamed); an error to ``error.txt``, with exit code 1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
import traceback
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig, TuneConfig, parse_config
from tunesmith.data.split import sample
from tunesmith.errors import TunesmithError
from tunesmith.flows import assess
from tunesmith.flows.finetune import fine_tune
from tunesmith.flows.logs import (
    attach_log_file,
    detach_log_file,
    keep_library_output_off_screen,
)
from tunesmith.flows.run import prepare_headless
from tunesmith.flows.steps import write_json
from tunesmith.training.callbacks import MetricsLog

log = logging.getLogger("tunesmith")

SPEC_FILE, RESULT_FILE, ERROR_FILE = "trial.json", "result.json", "error.txt"
PRUNED = "pruned"


def intermediate_value(valid_loss: float, direction: str) -> float:
    """What the pruner sees at an evaluation: the validation loss, negated when the study
    maximises a task metric (Optuna's pruners compare intermediate values in the study's
    direction; a lower loss must read as better there too)."""
    return -valid_loss if direction == "maximize" else valid_loss


def metric_key(objective: str, cfg: RunConfig) -> str:
    """The key of the evaluation metrics a task objective reads."""
    return f"f1_{cfg.eval.positive_label}" if objective == "positive_f1" else objective


class ReportToStudy:
    """A loop callback: report each evaluation's validation loss to the trial, stop the loop
    when the pruner says so, and stop when the study's process is gone (an orphaned trial
    must not hold the machine)."""

    def __init__(self, trial: Any, direction: str, parent_pid: int) -> None:
        self.trial, self.direction, self.parent_pid = trial, direction, parent_pid

    def _study_gone(self, loop: Any) -> bool:
        if os.getppid() != self.parent_pid:
            loop.control.stop("study gone")
            return True
        return False

    def on_step(self, loop: Any, metrics: dict[str, Any]) -> None:
        self._study_gone(loop)

    def on_evaluate(self, loop: Any, metrics: dict[str, Any]) -> None:
        if self._study_gone(loop):
            return
        step, loss = metrics["step"], metrics["valid_loss"]
        if step == 0 or not math.isfinite(loss):
            return  # step 0 is the base model, the same for every trial
        self.trial.report(intermediate_value(loss, self.direction), step)
        if self.trial.should_prune():
            loop.control.stop(PRUNED)


def make_pruner(t: TuneConfig) -> Any:
    """The study's pruner. Optuna keeps no pruner in its storage: the study and every trial
    process build the same one from the configuration."""
    import optuna

    if t.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=t.startup_trials)
    if t.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_trial(spec: dict[str, Any], t: TuneConfig) -> Any:
    """The study's trial this process runs, through the study's own storage."""
    import optuna

    storage = optuna.storages.RDBStorage(spec["storage"],
                                         engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.load_study(study_name=spec["study_name"], storage=storage,
                              pruner=make_pruner(t))
    study_id = storage.get_study_id_from_name(spec["study_name"])
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, spec["number"])
    return optuna.trial.Trial(study, trial_id)


def run_trial(trial_dir: Path) -> dict[str, Any]:
    """Train one configuration and judge it on the validation split; return the outcome."""
    started = time.perf_counter()
    spec = json.loads((trial_dir / SPEC_FILE).read_text(encoding="utf-8"))
    cfg = parse_config(spec["config"], source=f"trial {spec['number']}")
    objective, direction = spec["objective"], spec["direction"]
    ready = prepare_headless(cfg, trial_dir, Path(spec["home"]))
    model, model_dir, tokenizer = ready.model, ready.model_dir, ready.tokenizer
    splits, labels, prepared = ready.splits, ready.labels, ready.prepared
    assert cfg.tune is not None
    reporter = ReportToStudy(open_trial(spec, cfg.tune), direction, spec["parent_pid"])
    tuned = fine_tune(cfg, trial_dir, model, model_dir, tokenizer, train_rows=prepared.train,
                      valid_rows=prepared.valid, hp=prepared.hp, labels=labels,
                      callbacks=[MetricsLog(trial_dir / "metrics.jsonl"), reporter], save=False)
    state = tuned.result.state
    outcome: dict[str, Any] = {
        "state": "complete", "steps": state.step, "total_steps": prepared.hp.total_steps,
        "best_step": state.best_step, "valid_loss": state.best_valid_loss, "metrics": {},
        "hyperparameters": prepared.hp.model_dump()}
    if tuned.result.stop_reason == PRUNED:
        outcome["state"] = PRUNED
    elif not tuned.finished:
        raise TunesmithError(f"the trial stopped at step {state.step} "
                             f"({tuned.result.stop_reason})")
    elif objective == "valid_loss":
        outcome["value"] = state.best_valid_loss
    else:
        # the same validation sample the loss was computed on, scored like the test set
        valid = sample(splits.validation, cfg.data.max_validation_examples, seed=cfg.train.seed,
                       labels=[e.label for e in splits.validation] if labels else None)
        model = tuned.model.eval()
        scored = (assess.evaluate_head(model, tokenizer, valid, cfg.eval, labels)
                  if cfg.train.head == "classifier" and labels else
                  assess.evaluate_lm(model, tokenizer, valid, cfg.eval, labels,
                                     score_labels=False))
        metrics = {k: v for k, v in scored.metrics.items() if isinstance(v, int | float)}
        outcome["metrics"] = metrics
        outcome["value"] = metrics[metric_key(objective, cfg)]
    outcome["seconds"] = round(time.perf_counter() - started, 1)
    outcome["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return outcome


def main(argv: list[str]) -> int:
    trial_dir = Path(argv[0])
    keep_library_output_off_screen()  # the run.log keeps them; output.log is for crashes
    handler = attach_log_file(trial_dir)
    try:
        outcome = run_trial(trial_dir)
    except BaseException as err:  # any failure ends the trial, never the study
        text = str(err) if isinstance(err, TunesmithError) else (
            f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        (trial_dir / ERROR_FILE).write_text(text, encoding="utf-8")
        log.error("trial failed: %s", text)
        return 1
    finally:
        detach_log_file(handler)
    write_json(trial_dir / RESULT_FILE, outcome)
    return 0
