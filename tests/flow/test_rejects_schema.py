"""`tunesmith run` and `tunesmith data clean` write rows left out in one and the same shape."""

import json

from tests.helpers import review_rows, write_jsonl
from tunesmith.data.rejects import KEYS, PROBLEM_CODES, STAGES


def _read(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _check_codes(rows):
    for r in rows:
        assert r["stage"] in STAGES and r["code"] in PROBLEM_CODES, r
        assert r["problems"] and r["problems"][0]["code"] == r["code"], r
        assert all(p["code"] in PROBLEM_CODES for p in r["problems"]), r
        assert r["reason"] and isinstance(r["line"], int), r


def test_run_and_data_clean_write_the_same_reject_schema(make_config, cli, tmp_path):
    # tunesmith run: a broken line in train and in validation, one example over max_length
    rows = review_rows(40)
    long_text = " ".join(f"word{i}" for i in range(300))
    rows.insert(5, {"messages": [{"role": "user", "content": long_text},
                                 {"role": "assistant", "content": "good"}]})
    cfg = make_config(rows, data={"on_error": "skip", "max_length": 128,
                                  "validation_file": "valid.jsonl", "test_file": "test.jsonl"},
                      train={"epochs": 1}, eval={"forgetting": False, "compare_base": False})
    with (tmp_path / "train.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"messages": [\n')  # line 42
    write_jsonl(tmp_path / "valid.jsonl", [*review_rows(8), {"messages": "nope"}])
    write_jsonl(tmp_path / "test.jsonl", review_rows(8))
    code, _, err = cli("run", str(cfg), "--no-progress")
    assert code == 0, err
    run_rejects = _read(tmp_path / "run" / "rejects.jsonl")
    found = {(r["file"].rsplit("/", 1)[-1], r["line"], r["split"], r["stage"], r["code"])
             for r in run_rejects}
    assert found == {("train.jsonl", 42, None, "validate", "invalid_json"),
                     ("valid.jsonl", 9, "validation", "validate", "missing_messages_list"),
                     ("train.jsonl", 6, "train", "encode", "too_long")}
    too_long = next(r for r in run_rejects if r["code"] == "too_long")
    assert "tokens with the chat template, over data.max_length=128" in too_long["reason"]
    assert too_long["row"]["messages"][0]["content"] == long_text
    assert next(r for r in run_rejects if r["line"] == 42)["row"] == '{"messages": ['

    # tunesmith data clean: a duplicate and a bad row
    data = write_jsonl(tmp_path / "data.jsonl", [*review_rows(6), review_rows(1)[0],
                                                 {"messages": [{"role": "user",
                                                                "content": "no answer"}]}])
    code, out, err = cli("data", "clean", str(data), str(tmp_path / "clean.jsonl"),
                         "--on-error", "skip", "--no-near-dedup")
    assert code == 0, err
    clean_rejects = _read(tmp_path / "clean.rejects.jsonl")
    assert {(r["line"], r["stage"], r["code"]) for r in clean_rejects} == {
        (7, "dedup", "duplicate"), (8, "validate", "example_missing_assistant_message")}

    # one shape: exactly the same keys on every line of both files, and known codes
    assert {tuple(sorted(r)) for r in run_rejects + clean_rejects} == {tuple(sorted(KEYS))}
    _check_codes(run_rejects + clean_rejects)
