import json

import pytest

from tunesmith.evaluation.overfitting import loss_gap, overfitting_check
from tunesmith.training.callbacks import read_metrics


def records(train_losses, evals):
    """metrics.jsonl records: a train record per step, evals as (step, valid_loss, best_step)."""
    out = [{"kind": "train", "step": i + 1, "train_loss": v} for i, v in enumerate(train_losses)]
    out += [{"kind": "eval", "step": s, "valid_loss": v, "best_step": b} for s, v, b in evals]
    return sorted(out, key=lambda r: (r["step"], r["kind"] == "eval"))


def test_gap_uses_train_loss_since_the_previous_evaluation():
    recs = records([2.0, 1.0, 0.8, 0.6], [(0, 2.5, 0), (2, 1.4, 2), (4, 1.0, 4)])
    points = loss_gap(recs)
    assert [p.step for p in points] == [0, 2, 4]
    assert points[0].train_loss is None and points[0].gap is None
    assert points[1].train_loss == pytest.approx(1.5) and points[1].gap == pytest.approx(-0.1)
    assert points[2].train_loss == pytest.approx(0.7) and points[2].gap == pytest.approx(0.3)


def test_validation_rising_while_train_falls_is_flagged():
    train = [1.0 - 0.05 * i for i in range(12)]
    evals = [(2, 1.0, 2), (4, 0.9, 4), (6, 0.95, 4), (8, 1.0, 4), (10, 1.1, 4), (12, 1.2, 4)]
    result = overfitting_check(records(train, evals), patience=3, max_gap=10.0)
    assert result.flagged
    assert "4 evaluations in a row from step 4" in result.reasons[0]
    assert result.best_step == 4 and result.best_valid_loss == 0.9
    assert result.last_step == 12
    assert result.to_dict()["flagged"] is True


def test_healthy_training_is_not_flagged():
    train = [1.0 - 0.05 * i for i in range(12)]
    evals = [(s, 1.1 - 0.04 * s, s) for s in (3, 6, 9, 12)]
    result = overfitting_check(records(train, evals))
    assert not result.flagged and result.reasons == []
    assert result.best_step == 12


def test_a_wide_final_gap_is_flagged():
    train = [0.5, 0.1, 0.05, 0.01]
    result = overfitting_check(records(train, [(2, 0.9, 2), (4, 0.8, 4)]), max_gap=0.5)
    assert result.flagged
    assert "exceeds train loss by 0.770 at step 4" in result.reasons[0]


def test_best_step_falls_back_to_the_lowest_validation_loss():
    recs = [{"kind": "eval", "step": 5, "valid_loss": 0.7},
            {"kind": "eval", "step": 10, "valid_loss": 0.6},
            {"kind": "eval", "step": 15, "valid_loss": 0.65}]
    assert overfitting_check(recs).best_step == 10


def test_reads_the_loop_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = records([1.0, 0.9], [(0, 1.2, 0), (2, 1.0, 2)])
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    result = overfitting_check(read_metrics(path))
    assert [p.step for p in result.points] == [0, 2] and result.best_step == 2


def test_no_records():
    result = overfitting_check([])
    assert result.points == [] and result.best_step is None and not result.flagged
