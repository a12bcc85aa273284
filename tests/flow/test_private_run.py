"""A DP-SGD run end to end on the tiny model, and every bad privacy setting: message + exit 2."""

import json

import pytest

from tests.flow.test_bad_input_cli import assert_clean_failure
from tunesmith.flows.run import run
from tunesmith.training.callbacks import read_metrics

PRIVATE = {"batch_size": 16, "epochs": 2, "eval_every": 2,
           "privacy": {"target_epsilon": 8.0, "max_grad_norm": 1.0, "accountant": "rdp"}}


def test_a_private_run_reports_its_guarantee_everywhere(make_config, tmp_path):
    cfg = make_config(train=PRIVATE, eval={"forgetting": False, "calibration": False})
    result = run(cfg, show_progress=False)
    run_dir = result.run_dir
    card = json.loads((run_dir / "adapter" / "privacy.json").read_text())
    assert card == json.loads((run_dir / "merged" / "privacy.json").read_text())
    assert card == result.results["privacy"]
    assert 0 < card["epsilon"] <= 8.0 + 1e-6  # the target, spent over the planned steps
    assert card["steps"] == card["planned_steps"] == result.hyperparameters.total_steps
    assert card["delta"] < 1 / card["n_examples"] and card["delta_rule"].startswith("auto")
    assert card["noise_multiplier"] > 0 and card["sample_rate"] == pytest.approx(
        16 / card["n_examples"])
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    spent = [r["epsilon"] for r in evals]
    assert spent[0] == 0 and spent == sorted(spent) and spent[-1] == pytest.approx(
        card["epsilon"])
    report = (run_dir / "report.md").read_text()
    assert "## Differential privacy" in report and "noise multiplier" in report
    config = (run_dir / "config.yaml").read_text()
    assert "packing: false" in config  # DP unpacks by itself


@pytest.mark.parametrize(("train", "fragments"), [
    ({**PRIVATE, "packing": True}, ["train.privacy", "packing: false", "packed row"]),
    ({**PRIVATE, "batch_size": 4}, ["train.batch_size 4 is too small"]),
    ({**PRIVATE, "privacy": {"noise_multiplier": 1.0, "delta": 0.05}},
     ["train.privacy.delta 0.05 is not below 1/n"]),
    ({**PRIVATE, "epochs": 25, "privacy": {"target_epsilon": 0.01, "accountant": "rdp"}},
     ["target_epsilon 0.01 cannot be reached", "train.batch_size 16", "25 epoch(s)"]),
    ({**PRIVATE, "privacy": {"target_epsilon": 8, "noise_multiplier": 1.0}},
     ["train.privacy", "exactly one of target_epsilon and noise_multiplier"]),
    ({**PRIVATE, "objective": "dpo"}, ["train.objective 'sft'"]),
])
def test_bad_privacy_settings_fail_cleanly(make_config, cli, train, fragments):
    cfg = make_config(train=train)
    assert_clean_failure(*cli("run", str(cfg)), *fragments)
