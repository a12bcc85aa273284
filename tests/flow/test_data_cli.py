"""`tunesmith data ...` end to end: exit codes, messages, files written."""

import json
from pathlib import Path

from tests.unit.data.helpers import chat_row, distinct_rows, read_jsonl

REPO = Path(__file__).resolve().parents[2]
SMS = REPO / "examples" / "sms_spam" / "sms_spam.tsv"


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_validate_ok_bad_and_json(cli, tmp_path, bundled_dir):
    good = write(tmp_path / "good.jsonl", distinct_rows(12))
    code, out, _ = cli("data", "validate", str(good), "--model", str(bundled_dir))
    assert code == 0 and "OK: 12 valid examples in 12 rows; 0 error(s)" in out

    bad_row = {"messages": [{"role": "user", "content": "hi"},
                            {"role": "assitant", "content": "hello"}]}
    bad = write(tmp_path / "bad.jsonl", distinct_rows(12) + [bad_row, "{oops"])
    code, out, _ = cli("data", "validate", str(bad), "--no-tokens")
    assert code == 1
    assert (f'error: {bad} line 13: messages[1].role: unrecognized_role: message 2 has role '
            '"assitant" (did you mean "assistant"?)') in out
    assert f"error: {bad} line 14: invalid_json: invalid JSON" in out
    assert "FAILED: 12 valid examples in 14 rows; 2 error(s)" in out

    code, out, _ = cli("data", "validate", str(bad), "--no-tokens", "--json")
    data = json.loads(out)
    assert code == 1 and data["counts"] == {"unrecognized_role": 1, "invalid_json": 1}
    assert {(f["line"], f["field"]) for f in data["findings"]} == {
        (13, "messages[1].role"), (14, None)}


def test_validate_real_tsv_with_labels_and_token_limit(cli, bundled_dir):
    code, out, _ = cli("data", "validate", str(SMS), "--model", str(bundled_dir),
                       "--labels", "spam,ham", "--max-tokens", "128", "--system-prompt",
                       "Classify the SMS as spam or ham.")
    assert code == 1  # some messages are longer than 128 tokens
    assert "too_long:" in out and "tokens with the chat template, over max_tokens=128" in out
    assert "duplicate: same messages as line" in out  # the corpus has repeats


def test_missing_file_and_bad_option_exit_2_with_a_message(cli, tmp_path):
    code, _, err = cli("data", "validate", str(tmp_path / "nope.jsonl"), "--no-tokens")
    assert code == 2 and "no such file" in err
    code, _, err = cli("data", "convert", str(SMS), str(tmp_path / "o.jsonl"),
                       "--format", "alpacca")
    assert code == 2 and "did you mean 'alpaca'" in err


def test_convert_raise_and_skip(cli, tmp_path):
    src = write(tmp_path / "alpaca.jsonl", [{"instruction": "Add 2+2", "output": "4"},
                                            {"instruction": "Say hi"}, "{bad"])
    out = tmp_path / "chat.jsonl"
    code, _, err = cli("data", "convert", str(src), str(out))
    assert code == 2 and "2 invalid row(s)" in err and "line 2: output" in err
    assert not out.exists()  # nothing half-written

    code, stdout, _ = cli("data", "convert", str(src), str(out), "--on-error", "skip")
    assert code == 0 and "read 3 = written 1 + invalid 2" in stdout
    assert read_jsonl(out)[0]["messages"][1] == {"role": "assistant", "content": "4"}
    rejects = read_jsonl(tmp_path / "chat.rejects.jsonl")
    assert [(r["line"], r["code"]) for r in rejects] == [(2, "missing_content"),
                                                          (3, "invalid_json")]


def test_clean_with_redaction(cli, tmp_path):
    rows = distinct_rows(10) + [chat_row("Imρlications: mail jo@example.com, <b>now</b>", "ok")]
    rows.append(rows[0])
    src = write(tmp_path / "d.jsonl", rows)
    out = tmp_path / "clean.jsonl"
    code, stdout, _ = cli("data", "clean", str(src), str(out), "--redact")
    assert code == 0
    assert "read 12 = written 11 + invalid 0 + removed 1 (duplicate 1)" in stdout
    assert "1 look-alike letters folded" in stdout and "1 [EMAIL] placeholders" in stdout
    assert read_jsonl(out)[-1]["messages"][0]["content"] == "Implications: mail [EMAIL], now"


def test_redact_command(cli, tmp_path):
    src = write(tmp_path / "d.jsonl", [chat_row("My SSN is 123-45-6789, see www.x.org/a", "ok")])
    out = tmp_path / "r.jsonl"
    code, stdout, _ = cli("data", "redact", str(src), str(out), "--urls", "--json")
    assert code == 0 and json.loads(stdout)["redacted"] == {"US_SSN": 1, "URL": 1}
    assert read_jsonl(out)[0]["messages"][0]["content"] == "My SSN is [US_SSN], see [URL]"
    code, _, err = cli("data", "redact", str(src), str(out), "--entities", "EMAILS")
    assert code == 2 and "unknown entity" in err


def test_split_and_inspect_the_real_sms_data(cli, tmp_path, bundled_dir):
    code, out, _ = cli("data", "split", str(SMS), str(tmp_path / "splits"), "--system-prompt",
                       "Classify the SMS as spam or ham.")
    assert code == 0 and "read 4459 = written 4459" in out
    counts = {n: len(read_jsonl(tmp_path / "splits" / f"{n}.jsonl"))
              for n in ("train", "validation", "test")}
    assert sum(counts.values()) == 4459 and 400 <= counts["test"] <= 480
    assert "near-duplicate group(s), each kept in one split" in out

    plot = tmp_path / "lengths.png"
    code, out, _ = cli("data", "inspect", str(tmp_path / "splits" / "test.jsonl"), "--model",
                       str(bundled_dir), "--max-length", "64", "--epochs", "2", "--plot",
                       str(plot))
    assert code == 0 and "labels: ham" in out and "estimated trained tokens" in out
    assert "labels are imbalanced" in out and plot.stat().st_size > 1000
