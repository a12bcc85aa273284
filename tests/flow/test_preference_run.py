"""`tunesmith run` with a preference objective: pairs in, rewards monitored, base vs tuned on
held-out pairs and on the task, the reference kept with the run; wrong data refused."""

import json

import pytest

from tests.helpers import review_pairs, review_rows
from tunesmith import run
from tunesmith.evaluation.sections import REWARDS_NOTE
from tunesmith.training.callbacks import read_metrics

TRAIN = {"objective": "dpo", "preference": {"beta": 0.5, "sft_weight": 0.2}, "epochs": 2,
         "learning_rate": 1e-2, "eval_every": 4, "precision": "fp32"}


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_a_preference_run_reports_rewards_and_pairs(make_config, tmp_path, objective):
    cfg = make_config(review_pairs(80), train={**TRAIN, "objective": objective},
                      eval={"forgetting": False})
    result = run(cfg, show_progress=False)
    run_dir = result.run_dir
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert {"train_reward_margin", "train_pair_accuracy", "train_reward_chosen",
            "train_reward_rejected"} <= set(steps[0])
    pref = result.results["preference"]
    assert pref["objective"] == objective and pref["split"] == "test"  # pairs carved off
    assert pref["pairs"] == pref["tuned"]["pairs"] == result.results["data_counts"]["test"] > 0
    assert pref["tuned"]["pair_accuracy"] > 0.5
    assert 0 <= pref["base"]["likelihood_accuracy"] <= 1
    if objective == "dpo":
        assert pref["base"]["reward_margin"] == 0 and pref["base"]["pair_accuracy"] is None
        assert pref["tuned"]["reward_margin"] > 0
        stored = json.loads((run_dir / "reference_logps.json").read_text())
        assert {"train", "validation", "held-out test"} <= set(stored)
    else:  # reference-free: nothing to store
        assert not (run_dir / "reference_logps.json").exists()
    # the usual task metrics, on the test split as the chat example of the preferred answer
    assert "accuracy" in result.tuned
    report = (run_dir / "report.md").read_text()
    assert "Preference pairs: base vs tuned" in report and REWARDS_NOTE in report
    assert (run_dir / "rewards.png").stat().st_size > 1000
    first = json.loads((run_dir / "data" / "train.jsonl").read_text().splitlines()[0])
    assert "preferred_output" in first  # the split files keep the pairs


def test_pairs_need_a_preference_objective_and_back(make_config, cli, tmp_path):
    code, out, err = cli("run", str(make_config(review_pairs(40))), "--no-progress")
    assert code == 2 and "train.objective: dpo" in out + err and "train.jsonl" in out + err
    cfg = make_config(review_rows(40), train={"objective": "dpo"},
                      output_dir=str(tmp_path / "second"))
    code, out, err = cli("run", str(cfg), "--no-progress")
    assert code == 2 and "needs preference pairs" in out + err and "line 1" in out + err


def test_a_prompt_too_long_for_max_length_is_left_out_with_the_reason(make_config, tmp_path):
    pairs = review_pairs(60)
    pairs[3]["input"]["messages"][1]["content"] = "long " * 400
    cfg = make_config(pairs, train={**TRAIN, "epochs": 1}, data={"max_length": 128},
                      eval={"forgetting": False, "compare_base": False})
    result = run(cfg, show_progress=False)
    rejects = [json.loads(x) for x in (result.run_dir / "rejects.jsonl").read_text().splitlines()]
    assert any(r["code"] == "too_long" and r["line"] == 4 for r in rejects), rejects
    assert "max_length" in next(r for r in rejects if r["code"] == "too_long")["reason"]


def test_continue_from_a_finished_run(make_config, tmp_path):
    """A run directory is a base model: the next round starts from its merged weights."""
    first = run(make_config(review_rows(60), train={"epochs": 1},
                            eval={"forgetting": False, "compare_base": False}),
                show_progress=False)
    cfg = make_config(review_pairs(60), model={"base": str(first.run_dir)},
                      train={**TRAIN, "epochs": 1}, output_dir=str(tmp_path / "round2"),
                      eval={"forgetting": False})
    second = run(cfg, show_progress=False)
    assert second.base is not None  # base = the previous round, evaluated on the same test
    assert second.base["accuracy"] == pytest.approx(first.tuned["accuracy"], abs=0.15)
