"""`tunesmith improve`: a round of feedback trains the next model from the current one, both
are compared on the same hold-out set, and the gate decides what is in use."""

import json

import pytest
import yaml

from tests.helpers import review_pairs, review_rows, write_jsonl
from tunesmith import improve, run
from tunesmith.flows.improve import gate
from tunesmith.flows.run import RunResult

QUICK = {"forgetting": False, "calibration": False}


def _holdout(tmp_path):
    rows = review_rows(40)[20:]  # the same kind of reviews, other numbers
    for i, r in enumerate(rows):
        r["messages"][1]["content"] = r["messages"][1]["content"].replace("(#", f"(held {i} #")
    return write_jsonl(tmp_path / "holdout.jsonl", rows)


def test_a_round_trains_from_the_current_model_and_writes_its_history(make_config, tmp_path,
                                                                      cli):
    first = run(make_config(review_rows(60), train={"epochs": 1}, eval=QUICK),
                show_progress=False)
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    write_jsonl(feedback / "feedback_dpo.jsonl", review_pairs(30))
    write_jsonl(feedback / "feedback_chat.jsonl", review_rows(12))
    holdout = _holdout(tmp_path)

    r = improve(first.run_dir, feedback, holdout=holdout, margin=1.0, show_progress=False)
    assert r.round == 1 and r.objective == "dpo" and r.feedback == {"pairs": 30, "chat": 12}
    assert r.promoted and r.current == r.candidate  # a margin of 1 accepts any accuracy drop
    cfg = yaml.safe_load((tmp_path / "round-1" / "config.yaml").read_text())
    assert cfg["model"]["base"] == str(first.run_dir)
    assert cfg["data"]["train_file"].endswith("feedback_dpo.jsonl")
    assert cfg["train"]["preference"]["sft_weight"] == 1.0
    history = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["promoted"] is True
    # the comparison is previous round vs this round on the same hold-out items
    results = json.loads((tmp_path / "round-1" / "metrics.json").read_text())
    assert results["comparison"]["accuracy"]["n"] == 20
    assert r.previous_value == results["comparison"]["accuracy"]["base"]

    # the CLI: a second round from the promoted model, with a gate that cannot be met
    code, out, err = cli("improve", r.current, "--feedback", str(feedback), "--holdout",
                         str(holdout), "--margin", "0", "--metric", "accuracy",
                         "--no-progress", "--history", str(tmp_path / "rounds.jsonl"),
                         "--out", str(tmp_path / "round-2"))
    assert code == 0, err
    history = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    second = history[-1]
    assert second["round"] == 2 and second["previous"] == r.current
    assert second["promoted"] == (second["ci_low"] >= 0)
    assert ("promoted: " if second["promoted"] else "not promoted: ") in out
    assert second["current"] == (second["candidate"] if second["promoted"] else r.current)


def _result(ci_low):
    comparison = {"accuracy": {"base": 0.9, "tuned": 0.91, "difference": 0.01,
                               "ci_low": ci_low, "ci_high": 0.05}}
    return RunResult(run_dir=None, base=None, tuned={}, hyperparameters=None, best_step=None,
                     seconds=0.0, results={"comparison": comparison})


def test_the_gate_is_a_non_inferiority_test():
    assert gate(_result(-0.01), "accuracy", 0.02)[1] is True
    assert gate(_result(-0.03), "accuracy", 0.02)[1] is False
    assert "may be worse" in gate(_result(-0.03), "accuracy", 0.02)[2]
    with pytest.raises(Exception, match="choose --metric"):
        gate(_result(0.0), "bleu", 0.02)


def test_bad_input_is_refused_with_the_reason(cli, tmp_path):
    code, out, err = cli("improve", str(tmp_path / "nope"), "--feedback", str(tmp_path))
    assert code == 2 and "not a tunesmith run directory" in out + err
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("data: {train_file: x.jsonl}\n")
    write_jsonl(run_dir / "data" / "test.jsonl", review_rows(4))
    empty = tmp_path / "feedback"
    empty.mkdir()
    code, out, err = cli("improve", str(run_dir), "--feedback", str(empty))
    assert code == 2 and "feedback_dpo.jsonl" in out + err
    write_jsonl(empty / "feedback_dpo.jsonl", review_pairs(3))
    code, out, err = cli("improve", str(run_dir), "--feedback", str(empty))
    assert code == 2 and "at least 10" in out + err
