"""Start a trial's process and turn its end into the study's record of it.

A trial is asked of the study here (TPE draws its values, or an enqueued trial brings them),
its complete run configuration written to ``trials/<number>/trial.json`` and
``python -m tunesmith.flows.tune`` (``trial.main``) started on it. When the process ends, its
``result.json`` (or its error, or the signal that killed it) is told to the study.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig, dump_config
from tunesmith.errors import ConfigError
from tunesmith.flows.resources import share_of_machine
from tunesmith.flows.tune import space as search
from tunesmith.flows.tune.trial import ERROR_FILE, PRUNED, RESULT_FILE, SPEC_FILE


@dataclass
class Running:
    number: int
    trial: Any  # optuna.Trial from study.ask()
    params: dict[str, Any]
    directory: Path
    process: subprocess.Popen
    slot: int


@dataclass
class Outcome:
    number: int
    state: str  # complete | pruned | failed
    value: float | None
    params: dict[str, Any]
    attrs: dict[str, Any]


def launch(opened: Any, cfg: RunConfig, study_dir: Path, *, objective: str, direction: str,
           home: Path, jobs: int, slot: int = 0) -> Running | Outcome:
    """Ask the study for a trial and start its process (or fail it at once when its values
    make an invalid configuration)."""
    trial = opened.study.ask()
    assert cfg.tune is not None
    params = search.suggest(trial, cfg.tune.space)
    directory = study_dir / "trials" / str(trial.number)
    if directory.exists():
        shutil.rmtree(directory)  # a number is used once; leftovers are of a deleted study
    directory.mkdir(parents=True)
    try:
        trial_cfg = search.with_values(cfg, params, source=f"trial {trial.number}",
                                       output_dir=str(directory),
                                       name=f"{cfg.name}-trial-{trial.number}")
    except ConfigError as err:
        return tell(opened, trial, Outcome(trial.number, "failed", None, params,
                                           {"error": str(err)}))
    spec = {"config": dump_config(trial_cfg), "number": trial.number, "objective": objective,
            "direction": direction, "storage": opened.url, "study_name": opened.study.study_name,
            "parent_pid": os.getpid(), "home": str(home)}
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1), encoding="utf-8")
    with (directory / "output.log").open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "tunesmith.flows.tune", str(directory)],
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **share_of_machine(jobs, slot)})
    (directory / "pid").write_text(str(process.pid))
    return Running(trial.number, trial, params, directory, process, slot)


def collect(opened: Any, running: Running) -> Outcome:
    """The finished process's outcome, told to the study; checkpoints are deleted (a trial's
    weights are not kept: ``--final`` retrains the best configuration as a normal run)."""
    code = running.process.returncode
    result_file, error_file = running.directory / RESULT_FILE, running.directory / ERROR_FILE
    if code == 0 and result_file.is_file():
        result = json.loads(result_file.read_text(encoding="utf-8"))
        state = PRUNED if result["state"] == PRUNED else "complete"
        attrs = {k: result.get(k) for k in ("steps", "total_steps", "best_step", "valid_loss",
                                            "metrics", "seconds", "peak_rss_mb")}
        outcome = Outcome(running.number, state, result.get("value"), running.params, attrs)
    else:
        if error_file.is_file():
            error = error_file.read_text(encoding="utf-8").strip()
        elif code is not None and code < 0:
            name = signal.Signals(-code).name
            error = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        else:
            error = f"the trial's process exited with code {code}; see " \
                    f"{running.directory / 'output.log'}"
        outcome = Outcome(running.number, "failed", None, running.params, {"error": error})
    outcome.attrs["run_dir"] = str(running.directory)
    shutil.rmtree(running.directory / "checkpoints", ignore_errors=True)
    return tell(opened, running.trial, outcome)


def tell(opened: Any, trial: Any, outcome: Outcome) -> Outcome:
    from optuna.trial import TrialState

    # the study's process: its peak memory must stay flat from trial to trial
    outcome.attrs["parent_peak_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    for key, value in outcome.attrs.items():
        if value is not None:
            trial.set_user_attr(key, value)
    if outcome.state == "complete":
        opened.study.tell(trial, outcome.value)
    else:
        opened.study.tell(trial, state=TrialState.PRUNED if outcome.state == PRUNED
                          else TrialState.FAIL)
    return outcome
