"""`tunesmith tune` on the tiny model: real Optuna studies in SQLite, each trial its own process.

The search space is a choice of three learning rates: a good one, one so small the model does
not learn (the median pruner must stop it), and one so large the loss turns non-finite (the
trial must fail and the study go on). The sampler seed is fixed so the four trials draw all
three; the assertions hold for any draw that contains them.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tunesmith.config import load_config
from tunesmith.flows.tune import tune

GOOD, TOO_SMALL, DIVERGES = 3e-2, 1e-7, 1e30


@pytest.fixture
def study_config(make_config, tmp_path: Path):
    def make(trials: int = 4, **tune_overrides) -> Path:
        # the test split comes from a file that cannot be read: a search that opened it fails
        bad_test = tmp_path / "test.jsonl"
        bad_test.write_bytes(b"\xff\xfe not json, not utf-8\n")
        space = {"train.learning_rate": {"type": "choice",
                                         "values": [GOOD, TOO_SMALL, DIVERGES]}}
        return make_config(
            data={"test_file": str(bad_test)},
            train={"eval_every": 4, "max_grad_norm": None},
            tune={"space": space, "trials": trials, "startup_trials": 1, "seed": 32,
                  **tune_overrides})

    return make


def _trials(study_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="tunesmith",
                             storage=f"sqlite:///{study_dir / 'study.db'}").trials


def test_a_study_prunes_fails_and_picks_the_best_without_reading_the_test_split(
        study_config, tmp_path):
    cfg = study_config()
    result = tune(cfg, study_dir=tmp_path / "study", show_progress=False)
    trials = _trials(result.study_dir)
    by_lr = {}
    for t in trials:
        by_lr.setdefault(t.params["train.learning_rate"], []).append(t)
    assert {GOOD, TOO_SMALL, DIVERGES} <= set(by_lr)
    # the learning rate that does not learn is pruned at its first evaluations
    for t in by_lr[TOO_SMALL]:
        assert t.state == optuna.trial.TrialState.PRUNED
        assert t.user_attrs["steps"] < t.user_attrs["total_steps"]
    # the one whose loss turns non-finite fails with the reason; the study went on after it
    for t in by_lr[DIVERGES]:
        assert t.state == optuna.trial.TrialState.FAIL
        assert "training loss became" in t.user_attrs["error"]
    assert len(trials) == 4 and result.counts["complete"] >= 1
    assert result.best_params == {"train.learning_rate": GOOD}
    assert result.steps_saved and result.steps_saved > 0
    # best.yaml is a complete run configuration: no search, the best value in place
    best = load_config(result.best_config)
    assert best.tune is None and best.train.learning_rate == GOOD
    # outputs a reader and a machine can use
    rows = list(csv.DictReader((result.study_dir / "trials.csv").open()))
    names = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}
    assert [r["state"] for r in rows] == [names[t.state.name] for t in trials]
    html = (result.study_dir / "report.html").read_text()
    assert "train.learning_rate" in html and "data:image/png;base64" in html
    assert json.loads((result.study_dir / "study.json").read_text())
    # the search only trained: no weights, no merged model, no test split written anywhere
    assert not list(result.study_dir.rglob("*.safetensors"))
    assert not list(result.study_dir.rglob("test.jsonl"))
    # each trial ran in its own process; the study's own peak memory was recorded per trial
    assert all("parent_peak_rss_mb" in t.user_attrs for t in trials)


# slow: keeps `make test` under 25 minutes; `make test-slow` runs it
@pytest.mark.slow
def test_a_killed_study_resumes_without_rerunning_finished_trials(study_config, tmp_path):
    cfg = study_config(trials=2, space={"train.learning_rate": {"type": "choice",
                                                               "values": [GOOD]}})
    study_dir = tmp_path / "study"
    args = [sys.executable, "-m", "tunesmith.cli", "tune", str(cfg), "--study-dir",
            str(study_dir), "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first_result = study_dir / "trials" / "0" / "result.json"
    second = study_dir / "trials" / "1" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (first_result.exists() and second.exists()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-trial: trial 1 is training
    proc.wait()
    finished_at = first_result.stat().st_mtime
    # the orphaned trial process notices and stops by itself
    pid = int((study_dir / "trials" / "1" / "pid").read_text())
    deadline = time.time() + 60
    while time.time() < deadline and Path(f"/proc/{pid}").exists() \
            and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"

    refused = subprocess.run(args, capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "interrupted" in resumed.stderr
    trials = _trials(study_dir)
    states = [t.state for t in trials]
    assert states[0] == optuna.trial.TrialState.COMPLETE
    assert first_result.stat().st_mtime == finished_at  # trial 0 was not rerun
    assert states[1] == optuna.trial.TrialState.FAIL and trials[1].user_attrs["interrupted"]
    counted = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE
                                     for t in counted)


# slow: keeps `make test` under 25 minutes; `make test-slow` runs it
@pytest.mark.slow
def test_final_trains_the_best_and_the_default_and_compares_them_on_test(make_config,
                                                                         tmp_path, cli):
    cfg = make_config(tune={"space": {"train.learning_rate": {"type": "choice",
                                                              "values": [GOOD]}},
                            "trials": 2, "objective": "macro_f1"})
    study_dir = tmp_path / "study"
    code, out, err = cli("tune", str(cfg), "--study-dir", str(study_dir), "--no-progress",
                         "--final", "--jobs", "2")
    assert code == 0, err
    assert "test accuracy: default" in out and "95% CI" in out
    summary = json.loads((study_dir / "study.json").read_text())
    final = summary["final"]
    assert set(final["test"]) == {"base", "default", "final"}
    assert final["test"]["base"] is not None  # the base model, evaluated once
    for name in ("default", "final"):
        assert (study_dir / name / "report.html").is_file()
        assert (study_dir / name / "tuned_eval.json").is_file()
    # the trials were judged by a task metric on the validation split, and ran at once
    first, second = _trials(study_dir)
    for trial in (first, second):
        assert trial.value == trial.user_attrs["metrics"]["macro_f1"]
    assert second.datetime_start < first.datetime_complete
    assert "Final run on the test split" in (study_dir / "report.html").read_text()

    # the same study directory, another configuration: refused, the difference named
    data = yaml.safe_load(cfg.read_text())
    data["train"]["batch_size"] = 4
    cfg.write_text(yaml.safe_dump(data))
    code, _, err = cli("tune", str(cfg), "--study-dir", str(study_dir), "--resume")
    assert code == 2 and "train.batch_size: 8 -> 4" in err and "--new" in err
    code, _, err = cli("tune", str(cfg), "--study-dir", str(study_dir), "--new", "--trials",
                       "0", "--no-progress")
    assert code == 0, err
    assert not (study_dir / "final").exists()  # --new started again


def test_bad_search_input_is_one_message_with_every_problem_and_exit_2(make_config, cli,
                                                                        tmp_path):
    cfg = make_config(tune={"space": {
        "train.lerning_rate": {"type": "log_uniform", "low": 1e-5, "high": 1e-3},
        "train.lora.r": {"type": "int", "low": 16, "high": 4},
        "train.learning_rate": {"type": "log_uniform", "low": 0.0, "high": 1e-3},
        "train.epochs": {"type": "choice", "values": []}}})
    code, _, err = cli("tune", str(cfg))
    assert code == 2 and "Traceback" not in err
    for text in ("did you mean 'train.learning_rate'?", "low (16.0) must be below high (4.0)",
                 "needs low > 0", "a choice needs at least one value"):
        assert text in err
    no_search = make_config()
    code, _, err = cli("tune", str(no_search))
    assert code == 2 and "no tune: section" in err
    not_a_study = tmp_path / "elsewhere"
    (not_a_study / "something").mkdir(parents=True)
    good = make_config(tune={"space": {"train.epochs": {"type": "int", "low": 1, "high": 2}}})
    code, _, err = cli("tune", str(good), "--study-dir", str(not_a_study))
    assert code == 2 and "is not a study directory" in err


def test_no_trial_starts_after_the_timeout(make_config, tmp_path):
    cfg = make_config(tune={"space": {"train.epochs": {"type": "int", "low": 1, "high": 2}}})
    result = tune(cfg, study_dir=tmp_path / "study", timeout_minutes=1e-6, show_progress=False)
    assert result.best_trial is None and sum(result.counts.values()) == 0
    assert (result.study_dir / "report.html").is_file()
