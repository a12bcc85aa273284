"""The study's output files, from real in-memory Optuna studies (no model is trained)."""

from __future__ import annotations

import csv
import json
import warnings

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from tunesmith.flows.tune.outputs import steps_saved_fraction, write_study_outputs

PNG = b"\x89PNG\r\n\x1a\n"
DIST = {"train.learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
        "train.lora.r": IntDistribution(4, 32),
        "train.scheduler": CategoricalDistribution(["cosine", "linear"])}
SPACE = {"train.learning_rate": {"type": "log_uniform", "low": 1e-5, "high": 1e-3},
         "train.lora.r": {"type": "int", "low": 4, "high": 32, "step": 4},
         "train.scheduler": {"type": "categorical", "choices": ["cosine", "linear"]}}


@pytest.fixture(autouse=True)
def _quiet_optuna():
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


def _params(i: int) -> dict:
    return {"train.learning_rate": 1e-5 * (3 ** (i % 4)), "train.lora.r": 4 + 4 * (i % 7),
            "train.scheduler": ["cosine", "linear"][i % 2]}


def _curve(total: int, end: int, start: float = 2.0) -> dict[int, float]:
    return {s: start - 0.1 * s for s in range(2, end + 1, 2) if s <= total}


def _trial(i: int, state: TrialState = TrialState.COMPLETE, *, value=None, steps=10,
           total=10, **attrs):
    user_attrs = {"steps": steps, "total_steps": total, "seconds": 12.5 + i,
                  "best_step": steps, "valid_loss": value, "run_dir": f"study/trials/{i:03d}",
                  **attrs}
    inter = _curve(total, steps, start=2.0 + 0.05 * i) if state != TrialState.FAIL else {}
    return create_trial(params=_params(i), distributions=DIST, value=value, state=state,
                        intermediate_values=inter, user_attrs=user_attrs)


def make_study(trials, *, direction="minimize", user_attrs=True) -> optuna.Study:
    study = optuna.create_study(direction=direction, storage=None, study_name="reviews-tune")
    if user_attrs:
        for k, v in {"objective": "valid_loss", "config_name": "reviews",
                     "base_model": "smollm2-135m-instruct", "space": SPACE,
                     "pruner": "median", "sampler_seed": 7}.items():
            study.set_user_attr(k, v)
    for t in trials:
        study.add_trial(t)
    return study


@pytest.fixture
def full_study() -> optuna.Study:
    # values: trial 2 is best (0.8); trial 3 was pruned after 4 of 10 steps; trial 5 failed
    return make_study([
        _trial(0, value=1.2, metrics={"accuracy": 0.7}), _trial(1, value=1.0),
        _trial(2, value=0.8, metrics={"accuracy": 0.9}), _trial(3, TrialState.PRUNED, steps=4),
        _trial(4, value=1.1),
        _trial(5, TrialState.FAIL, steps=0, error="CUDA out of memory.\nTried to allocate 2 GiB"),
    ])


def test_steps_saved_fraction_is_the_pruned_share_of_the_planned_steps():
    # totals 10, 10, 10; the pruned trial ran 4 of its 10 steps: 6 of 30 steps saved
    trials = [_trial(0, value=1.0), _trial(1, value=0.9), _trial(2, TrialState.PRUNED, steps=4)]
    assert steps_saved_fraction(trials) == pytest.approx(0.2)
    # a failed trial counts the steps it trained, 3: 6 / 33; a running one is not finished
    trials += [_trial(3, TrialState.FAIL, steps=3, error="x"),
               _trial(4, TrialState.RUNNING, steps=2)]
    assert steps_saved_fraction(trials) == pytest.approx(6 / 33)
    assert steps_saved_fraction([]) is None
    no_totals = create_trial(params={}, distributions={}, value=1.0)
    assert steps_saved_fraction([no_totals]) is None


def test_writes_csv_plots_reports_and_json(full_study, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        written = write_study_outputs(full_study, tmp_path / "study")
    study_dir = tmp_path / "study"
    for name in ("trials", "history", "importances", "slice", "intermediate", "report_html",
                 "report_md", "study_json"):
        assert written[name].is_file(), name
    for name in ("history", "importances", "slice", "intermediate"):
        assert written[name].read_bytes()[:8] == PNG
        assert written[name].parent == study_dir

    with (study_dir / "trials.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["number"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert [r["state"] for r in rows] == ["complete"] * 3 + ["pruned", "complete", "failed"]
    assert {"train.learning_rate", "train.lora.r", "train.scheduler", "steps", "total_steps",
            "seconds", "best_step", "valid_loss", "error", "started", "completed",
            "metrics.accuracy"} <= set(rows[0])
    assert rows[2]["value"] == "0.8" and rows[2]["train.scheduler"] == "cosine"
    assert rows[3]["steps"] == "4" and rows[3]["value"] == ""
    assert rows[5]["error"] == "CUDA out of memory. Tried to allocate 2 GiB"
    assert rows[0]["metrics.accuracy"] == "0.7" and rows[1]["metrics.accuracy"] == ""

    summary = json.loads((study_dir / "study.json").read_text(encoding="utf-8"))
    assert summary["best_trial"] == 2 and summary["best_value"] == 0.8
    assert summary["best_params"] == _params(2)
    assert summary["states"] == {"complete": 4, "pruned": 1, "failed": 1, "running": 0,
                                 "waiting": 0}
    # 6 steps saved; 5 finished trials planned 10 each, the failed one trained 0
    assert summary["steps_saved_fraction"] == pytest.approx(6 / 50)
    assert summary["skipped_plots"] == {} and summary["final"] is None
    assert summary["direction"] == "minimize" and summary["objective"] == "valid_loss"

    html = (study_dir / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 4
    assert "Study report: reviews" in html and "<code>smollm2-135m-instruct</code>" in html
    for title in ("Summary", "Best configuration", "Trials", "Search space", "Plots"):
        assert f"<h2>{title}</h2>" in html
    assert "Final run on the test split" not in html
    assert "best trial: #2 with valid_loss = 0.8000" in html
    assert "12.0%" in html  # steps saved by pruning: 6 / 50
    assert "<td>train.lora.r</td><td>12</td>" in html  # best r = 4 + 4 * 2
    assert "CUDA out of memory. Tried to allocate 2 GiB" in html
    assert "complete (best)" in html and "4/10" in html
    # a pruned trial shows its last reported value: 2.15 - 0.1 * 4
    assert '<td class="num">3</td><td>pruned</td><td class="num">1.7500</td>' in html
    assert "[1e-05, 0.0010]" in html and "cosine, linear" in html  # the search space
    md = (study_dir / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# Study report: reviews\n")
    assert "![parameter importances](importances.png)" in md
    assert "| train.learning_rate | 9e-05 |" in md


def test_pruned_share_on_a_hand_computed_case(tmp_path):
    study = make_study([_trial(0, value=1.0), _trial(1, value=0.9),
                        _trial(2, TrialState.PRUNED, steps=4)])
    write_study_outputs(study, tmp_path)
    assert json.loads((tmp_path / "study.json").read_text())["steps_saved_fraction"] == 0.2
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "training steps saved by pruning: 20.0% (6 of the 30 steps" in html


def test_one_completed_trial_skips_the_importances_with_its_reason(tmp_path):
    study = make_study([_trial(0, value=1.0), _trial(1, TrialState.PRUNED, steps=2)])
    written = write_study_outputs(study, tmp_path)
    assert "importances" not in written and not (tmp_path / "importances.png").exists()
    assert written["history"].read_bytes()[:8] == PNG
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "parameter importances need at least two completed trials" in html
    assert "parameter importances need at least two completed trials" in (
        tmp_path / "report.md").read_text(encoding="utf-8")
    skipped = json.loads((tmp_path / "study.json").read_text())["skipped_plots"]
    assert skipped == {"importances": "parameter importances need at least two completed trials"}


def test_a_study_without_completed_trials_or_attributes_still_writes_its_reports(tmp_path):
    study = make_study([_trial(0, TrialState.FAIL, steps=0, error="boom"),
                        _trial(1, TrialState.RUNNING, steps=2)], user_attrs=False)
    written = write_study_outputs(study, tmp_path)
    assert {"trials", "report_html", "report_md", "study_json"} <= set(written)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "none yet (no trial has completed)" in html
    assert "optimisation history: not drawn" in html.lower()
    assert "LogUniform" not in html and "FloatDistribution" in html  # space from the trials
    summary = json.loads((tmp_path / "study.json").read_text())
    assert summary["best_trial"] is None and summary["objective"] is None
    # the running trial reported values: its curve is drawn
    assert "intermediate" in written


def test_a_plot_that_fails_inside_optuna_is_skipped(full_study, tmp_path, monkeypatch):
    from optuna.visualization import matplotlib as optuna_plots

    def broken(study):
        raise RuntimeError("no luck\nsecond line")

    monkeypatch.setattr(optuna_plots, "plot_slice", broken)
    written = write_study_outputs(full_study, tmp_path)
    assert "slice" not in written and "history" in written
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Slice plot: not drawn, the slice plot could not be drawn: no luck." in html


def test_final_runs_on_the_test_split_show_with_their_interval(full_study, tmp_path):
    comparison = {"metric": "accuracy", "base": 0.80, "tuned": 0.86, "difference": 0.06,
                  "ci_low": 0.01, "ci_high": 0.11, "confidence": 0.95, "p_not_better": 0.02,
                  "relative_error_reduction": 0.3, "n": 200, "n_resamples": 1000, "seed": 0}
    final = {"best_params": _params(2),
             "runs": {"default": "runs/reviews-default", "final": "runs/reviews-final"},
             "test": {"base": {"accuracy": 0.55, "macro_f1": 0.5},
                      "default": {"accuracy": 0.80, "macro_f1": 0.78},
                      "final": {"accuracy": 0.86, "macro_f1": 0.85}},
             "comparison": {"accuracy": comparison}}
    write_study_outputs(full_study, tmp_path, final=final)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<h2>Final run on the test split</h2>" in html
    assert ("<td>accuracy</td><td class=\"num\">0.5500</td><td class=\"num\">0.8000</td>"
            "<td class=\"num\">0.8600</td><td class=\"num\">+0.0600</td>"
            "<td class=\"num\">[+0.0100, +0.1100]</td>") in html
    assert "<td>macro_f1</td>" in html and "+0.0700" in html  # no comparison: final - default
    assert "difference (best - default)" in html and "95% CI" in html
    assert "never saw the test split" in html and "runs/reviews-final" in html
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| accuracy | 0.5500 | 0.8000 | 0.8600 | +0.0600 | [+0.0100, +0.1100] |" in md
    assert json.loads((tmp_path / "study.json").read_text())["final"]["comparison"][
        "accuracy"]["ci_low"] == 0.01


def test_figures_are_closed_and_the_matplotlib_style_is_left_as_it_was(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    facecolor = matplotlib.rcParams["axes.facecolor"]
    study = make_study([_trial(i, value=1.0 - 0.1 * i) for i in range(3)])
    write_study_outputs(study, tmp_path)
    assert not plt.get_fignums()  # every figure closed
    assert matplotlib.rcParams["axes.facecolor"] == facecolor  # Optuna's ggplot style undone
