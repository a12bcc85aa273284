"""`tunesmith audit privacy` on a tiny DP run: twins trained, both audited, report updated."""

import json

import yaml

from tests.flow.test_bad_input_cli import assert_clean_failure
from tunesmith.flows.privacy_audit import audit_privacy
from tunesmith.flows.run import run

PRIVATE = {"batch_size": 16, "epochs": 1, "eval_every": 4,
           "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "rdp"}}
EVAL = {"forgetting": False, "calibration": False, "compare_base": False}


def test_the_audit_trains_both_twins_and_reports_side_by_side(make_config, cli):
    cfg = make_config(train=PRIVATE, eval=EVAL)
    run_dir = run(cfg, show_progress=False).run_dir
    code, out, err = cli("audit", "privacy", str(run_dir), "--canaries", "2", "--repeats", "5",
                         "--candidates", "40", "--members", "10", "--no-progress")
    assert code == 0, err
    assert "membership-inference AUC" in out and "with DP" in out
    found = json.loads((run_dir / "privacy_audit.json").read_text())
    for arm in ("dp", "no_dp"):
        a = found[arm]
        assert 0 <= a["membership_auc"] <= 1 and a["n_members"] == a["n_nonmembers"] == 10
        assert 0 <= a["mean_exposure"] <= a["max_exposure"] <= a["exposure_ceiling"]
        assert len(a["canaries"]) == 2 and a["n_candidates"] == 40
        assert a["test"]["n"] > 0  # each twin is evaluated on the run's test split
    assert found["dp"]["privacy"]["epsilon"] > 0 and found["no_dp"]["privacy"] is None
    twin_rows = (run_dir / "privacy_audit" / "train.jsonl").read_text().splitlines()
    own_rows = (run_dir / "data" / "train.jsonl").read_text().splitlines()
    assert len(twin_rows) == len(own_rows) + 2 * 5
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["privacy"]["audit"]["dp"]["membership_auc"] == found["dp"]["membership_auc"]
    assert "membership inference AUC" in (run_dir / "report.md").read_text()
    # the twins are kept: auditing again reuses them and gives the same figures
    again = audit_privacy(run_dir, canaries=2, repeats=5, n_candidates=40, members=10,
                          show_progress=False, say=lambda m: None)
    assert again["no_dp"]["membership_auc"] == found["no_dp"]["membership_auc"]


def test_auditing_a_run_without_privacy_fails_cleanly(make_config, cli, tmp_path):
    # a finished run as the audit reads it (its config and results), trained without DP
    run_dir = tmp_path / "plain"
    run_dir.mkdir()
    spec = yaml.safe_load(make_config(train={"epochs": 1}, eval=EVAL).read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(spec))
    (run_dir / "metrics.json").write_text("{}")
    assert_clean_failure(*cli("audit", "privacy", str(run_dir)), "trained without train.privacy")
    assert_clean_failure(*cli("audit", "privacy", str(tmp_path / "nothing")),
                         "is not a finished run")
