"""A trial's end, told to the study: a process killed from outside (as the kernel's
out-of-memory killer does) is a failed trial with the signal named; the study goes on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import optuna

from tunesmith.flows.tune.launch import Running, collect
from tunesmith.flows.tune.study import Opened


def _opened() -> Opened:
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="tunesmith", storage=storage)
    return Opened(study, storage, "memory")


def _running(opened: Opened, tmp_path, code: str) -> Running:
    trial = opened.study.ask()
    trial.suggest_float("train.learning_rate", 1e-5, 1e-3, log=True)
    directory = tmp_path / str(trial.number)
    (directory / "checkpoints").mkdir(parents=True)
    process = subprocess.Popen([sys.executable, "-c", code])
    return Running(trial.number, trial, trial.params, directory, process, 0)


def test_a_trial_killed_from_outside_is_failed_with_the_signal_named(tmp_path):
    opened = _opened()
    running = _running(opened, tmp_path, "import time; time.sleep(60)")
    running.process.send_signal(signal.SIGKILL)
    running.process.wait()
    outcome = collect(opened, running)
    assert outcome.state == "failed"
    assert outcome.attrs["error"] == "killed by SIGKILL (out of memory?)"
    (frozen,) = opened.study.trials
    assert frozen.state == optuna.trial.TrialState.FAIL
    assert frozen.user_attrs["error"].startswith("killed by SIGKILL")
    assert not (running.directory / "checkpoints").exists()  # a trial's weights are not kept


def test_a_finished_trial_tells_its_value_and_what_it_trained(tmp_path):
    opened = _opened()
    running = _running(opened, tmp_path, "pass")
    running.process.wait()
    (running.directory / "result.json").write_text(json.dumps(
        {"state": "complete", "value": 0.25, "steps": 10, "total_steps": 10, "best_step": 10,
         "valid_loss": 0.25, "metrics": {}, "seconds": 3.0, "peak_rss_mb": 900.0}))
    outcome = collect(opened, running)
    (frozen,) = opened.study.trials
    assert outcome.state == "complete" and frozen.value == 0.25
    assert frozen.user_attrs["steps"] == 10 and frozen.user_attrs["peak_rss_mb"] == 900.0
    assert frozen.user_attrs["parent_peak_rss_mb"] > 0
