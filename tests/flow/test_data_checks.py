"""The data's own checks, end to end on the tiny model: the bias report in a run's data section,
suspected wrong labels found, dropped or relabelled only when asked, and the label-issues CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import review_rows, write_jsonl
from tunesmith.config import load_config
from tunesmith.errors import ConfigError

FLIPPED = (3, 10, 41, 66)  # rows whose label is made wrong


def noisy_rows(n: int = 80) -> list[dict]:
    """Reviews with a region (north over-represented, and 'bad' more often there) and four
    labels flipped."""
    rows = review_rows(n)
    for i, row in enumerate(rows):
        row["region"] = "south" if i % 4 == 1 else "north"
        if i in FLIPPED:
            answer = row["messages"][2]
            answer["content"] = {"good": "bad", "bad": "good"}[answer["content"]]
    return rows


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory, tiny_model_dir):
    from typer.testing import CliRunner

    from tunesmith.cli import app

    tmp = tmp_path_factory.mktemp("checks")
    write_jsonl(tmp / "train.jsonl", noisy_rows())
    (tmp / "reference.yaml").write_text(yaml.safe_dump({"region": {"north": 0.5,
                                                                   "south": 0.5}}))
    cfg = {
        "energy": {"enabled": False},  # codecarbon costs seconds per phase
        "name": "checks", "output_dir": str(tmp / "run"), "model": {"base": str(tiny_model_dir)},
        "data": {"train_file": "train.jsonl", "max_length": 128, "group_fields": ["region"],
                 "group_reference": "reference.yaml", "label_issues": "drop",
                 "test_fraction": 0.2},
        "train": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "epochs": 1, "batch_size": 16,
                  "learning_rate": 1e-2, "eval_every": 10, "seed": 7},
        "eval": {"task": "classification", "labels": ["good", "bad"], "positive_label": "bad",
                 "calibration": False},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(tmp / "config.yaml"), "--no-progress"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return tmp / "run", result


def test_the_run_report_has_the_bias_of_its_training_split(checked_run) -> None:
    run_dir, _ = checked_run
    results = json.loads((run_dir / "metrics.json").read_text())
    field = results["data_bias"]["fields"]["region"]
    train = [json.loads(line) for line in (run_dir / "data" / "train.jsonl").open()]
    test = [json.loads(line) for line in (run_dir / "data" / "test.jsonl").open()]
    for group in ("north", "south"):
        assert field["groups"][group]["count"] == sum(r["region"] == group for r in train)
        assert field["groups"][group]["test_count"] == sum(r["region"] == group for r in test)
        assert set(field["groups"][group]["rates"]) == {"bad"}
    assert field["groups"]["north"]["expected_share"] == 0.5
    assert field["representation"]["p_value"] < 0.05  # 3:1 against a 1:1 reference
    assert "south" in field["under_represented"]
    assert sorted(field["small_groups"]) == ["north", "south"]  # well under 385 each
    report = (run_dir / "report.md").read_text()
    assert "| region | examples | share | reference | z |" in report
    assert "under-represented against the reference: south" in report
    assert "group 'south' is under-represented" in report  # among the Warnings too


def test_the_flipped_labels_are_found_and_dropped_with_reasons(checked_run) -> None:
    run_dir, result = checked_run
    found = json.loads((run_dir / "metrics.json").read_text())["label_issues"]
    issues = [json.loads(line) for line in (run_dir / "label_issues.jsonl").open()]
    assert found["found"] == len(issues) and found["action"] == "drop"
    # each review ends with "(#i)", i its row, so line i + 1; the training split held the
    # rows still in data/train.jsonl and the ones dropped
    def line(text: str) -> int:
        return int(text.rsplit("(#", 1)[1].rstrip(")")) + 1

    kept_lines = {line(r["messages"][1]["content"])
                  for r in map(json.loads, (run_dir / "data" / "train.jsonl").open())}
    found_lines = {i["line"] for i in issues}
    assert not found_lines & kept_lines
    flipped_in_train = {i + 1 for i in FLIPPED} & (kept_lines | found_lines)
    assert len(found_lines & flipped_in_train) >= 2
    assert len(found_lines - flipped_in_train) <= 1  # the random tiny model's features
    rejects = [json.loads(line) for line in (run_dir / "rejects.jsonl").open()]
    dropped = [r for r in rejects if r["code"] == "label_issue"]
    assert sorted(r["line"] for r in dropped) == sorted(i["line"] for i in issues)
    assert all(r["stage"] == "label_issues" and r["split"] == "train" for r in dropped)
    kept = {json.dumps(r["messages"]) for r in map(json.loads,
                                                     (run_dir / "data" / "train.jsonl").open())}
    assert not any(json.dumps(r["row"]["messages"]) in kept for r in dropped)
    assert "suspected wrong label" in result.output
    assert "label_issues.jsonl" in (run_dir / "report.md").read_text()


def test_label_issues_need_classification(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "t.jsonl", review_rows(20))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "data": {"train_file": "t.jsonl", "label_issues": "report"},
        "eval": {"task": "generation"}}))
    with pytest.raises(ConfigError, match="data.label_issues 'report' is for classification"):
        load_config(tmp_path / "c.yaml")


# ----------------------------------------------------------------------------- the CLI


def test_cli_finds_exactly_the_flipped_labels_with_the_bundled_model(cli, tmp_path: Path,
                                                                    bundled_dir: Path) -> None:
    data = write_jsonl(tmp_path / "r.jsonl", noisy_rows())
    code, out, err = cli("data", "label-issues", str(data))  # the default model: the bundled
    assert code == 0, out + err
    issues = [json.loads(line) for line in (tmp_path / "r.label_issues.jsonl").open()]
    assert {i["line"] for i in issues} == {i + 1 for i in FLIPPED}
    original = {i + 1: r["messages"][2]["content"] for i, r in enumerate(review_rows(80))}
    assert all(i["suggested"] == original[i["line"]] != i["given"] for i in issues)
    assert all(i["action"] == "none" for i in issues)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "r.label_issues.jsonl"]
    assert "4 suspected label issue(s)" in out and f"line {FLIPPED[0] + 1}" in out


def test_cli_drops_and_relabels_what_it_lists(cli, tmp_path: Path,
                                              tiny_model_dir: Path) -> None:
    data = write_jsonl(tmp_path / "r.jsonl", noisy_rows())
    rows = noisy_rows()
    code, out, err = cli("data", "label-issues", str(data), "--model", str(tiny_model_dir),
                         "--action", "relabel", "-o", str(tmp_path / "fixed.jsonl"), "--json")
    assert code == 0, out + err
    issues = {i["line"]: i for i in map(json.loads, (tmp_path / "r.label_issues.jsonl").open())}
    assert issues and json.loads(out)["found"] == len(issues)
    assert all(i["action"] == "relabelled" for i in issues.values())
    fixed = [json.loads(line) for line in (tmp_path / "fixed.jsonl").open()]
    assert len(fixed) == 80
    for k, (before, after) in enumerate(zip(rows, fixed, strict=True)):
        want = issues[k + 1]["suggested"] if k + 1 in issues else before["messages"][2]["content"]
        assert after["messages"][2]["content"] == want
        assert after["messages"][:2] == before["messages"][:2]
        assert after["region"] == before["region"]  # other fields kept

    code, out, err = cli("data", "label-issues", str(data), "--model", str(tiny_model_dir),
                         "--action", "drop")
    assert code == 0, out + err
    kept = (tmp_path / "r.drop.jsonl").read_text().splitlines()
    rejects = [json.loads(line) for line in (tmp_path / "r.drop.rejects.jsonl").open()]
    assert len(kept) + len(rejects) == 80
    assert sorted(r["line"] for r in rejects) == sorted(issues)  # the same seed, the same list
    assert all(r["code"] == "label_issue" and "looks wrong" in r["reason"] for r in rejects)


@pytest.mark.parametrize(("rows", "args", "message"), [
    ([{"messages": [{"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"a long free answer {i}"}]}
      for i in range(60)], (), "looks like generation data"),
    ([{"text": f"t{i}", "label": "x"} for i in range(10)], (), "at least two classes"),
    (None, ("--action", "fix"), "expected one of"),
    (None, ("-o", "out.jsonl"), "add --action drop or relabel"),
])
def test_cli_bad_input_exits_2(cli, tmp_path: Path, tiny_model_dir: Path, rows, args,
                               message) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows if rows is not None else review_rows(20))
    code, out, err = cli("data", "label-issues", str(data), "--model", str(tiny_model_dir),
                         *args)
    assert code == 2 and message in out + err, out + err


def test_cli_missing_file_and_unknown_model(cli, tmp_path: Path) -> None:
    code, out, err = cli("data", "label-issues", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl" in out + err
    data = write_jsonl(tmp_path / "d.jsonl", review_rows(20))
    code, out, err = cli("data", "label-issues", str(data), "--model", "no-such-model")
    assert code == 2 and "no-such-model" in out + err
