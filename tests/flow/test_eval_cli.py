"""`tunesmith eval`: a run on a new test file against its base, and two runs side by side."""

import json

from tests.helpers import review_rows, write_jsonl


def test_eval_a_run_on_a_test_file_and_compare_runs(make_config, cli, tmp_path):
    cfg = make_config(train={"epochs": 2}, eval={"forgetting": False})
    code, out, err = cli("run", str(cfg), "--no-progress")
    assert code == 0, err
    test_file = write_jsonl(tmp_path / "fresh.jsonl", review_rows(120)[100:])
    code, out, err = cli("eval", str(tmp_path / "run"), "--test-file", str(test_file),
                         "--no-progress")
    assert code == 0, err
    report = tmp_path / "run" / "eval-fresh"
    results = json.loads((report / "metrics.json").read_text())
    assert results["tuned"]["n"] == 20 and results["base"]["n"] == 20
    assert results["eval_mode"] == {"base": "score", "tuned": "score"}  # the run's eval.mode
    assert (report / "report.html").is_file()
    assert "base vs tuned" in out

    code, out, err = cli("eval", "--compare", str(tmp_path / "run"), str(tmp_path / "run"))
    assert code == 0, err
    assert "accuracy" in out


def test_eval_rejects_unknown_labels(make_config, cli, tmp_path):
    cfg = make_config(train={"epochs": 1}, eval={"forgetting": False, "calibration": False})
    assert cli("run", str(cfg), "--no-progress")[0] == 0
    rows = review_rows(12)
    rows[5]["messages"][2]["content"] = "meh"
    test_file = write_jsonl(tmp_path / "odd.jsonl", rows)
    code, out, err = cli("eval", str(tmp_path / "run"), "--test-file", str(test_file))
    assert code == 2 and "['meh']" in err and "line 6" in err
