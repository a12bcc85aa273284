"""Problems carry their code from where they are made; rows left out have one shape and writer."""

import ast
import json
from pathlib import Path

import pytest

from tunesmith.data.chat import ChatExample
from tunesmith.data.encode import IGNORE_INDEX, Encoded
from tunesmith.data.formats import ReadOptions, iter_records
from tunesmith.data.rejects import KEYS, PROBLEM_CODES, STAGES, Rejected, write_rejects
from tunesmith.errors import DataError, Problem

SRC = Path(__file__).resolve().parents[3] / "src" / "tunesmith"

BAD_ROWS = {
    "chat": [b'{"messages": [', b'{"x": "\xff"}', b"[1, 2]", b'{"messages": []}',
             b'{"messages": [{"content": "x"}]}',
             b'{"messages": [{"role": "user", "content": "x", "foo": 1}, '
             b'{"role": "assistant", "content": "y"}]}',
             b'{"messages": [{"role": "assitant", "content": "x"}]}',
             b'{"messages": [{"role": "user", "content": ""}, '
             b'{"role": "assistant", "content": "y", "weight": 2}]}',
             b'{"messages": [{"role": "user", "content": "x"}]}'],
    "alpaca": [b'{"instruction": "x"}', b'"just text"'],
    "sharegpt": [b'{"conversations": []}', b'{"conversations": [{"value": "x"}]}',
                 b'{"conversations": [{"from": "hooman", "value": "x"}]}'],
    "preference": [b'{"input": {"messages": [{"role": "user", "content": "Q"}, '
                   b'{"role": "assistant", "content": "A"}]}, '
                   b'"preferred_output": [{"role": "assistant", "content": "B"}], '
                   b'"non_preferred_output": [{"role": "user", "content": "C"}]}',
                   b'{"input": {"messages": [{"role": "user", "content": "Q"}]}, '
                   b'"preferred_output": [{"role": "assistant", "content": "B"}], '
                   b'"non_preferred_output": [{"role": "assistant", "content": "B"}]}',
                   b'{"input": {}}'],
}


@pytest.mark.parametrize("format", sorted(BAD_ROWS))
def test_every_problem_of_a_bad_row_is_made_with_a_known_code(tmp_path, format):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(BAD_ROWS[format]) + b"\n")
    items = list(iter_records(path, ReadOptions(format=format)))
    assert len(items) == len(BAD_ROWS[format])
    for item in items:
        assert isinstance(item, Rejected) and item.stage == "validate" and item.invalid
        for p in item.problems:
            assert p.code in PROBLEM_CODES, p
            # the code is data: the message is the sentence for a person, not "code: ..."
            assert not p.message.startswith(p.code), p
            assert p.line == item.line


def test_table_rows_get_codes_too(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\n,spam\nhello,\na,b,c\n\xff\xfe,ham\n")
    codes = [[p.code for p in item.problems] for item in iter_records(path)]
    assert codes == [["missing_content"], ["missing_label"], ["data_type"], ["not_utf8"]]


def _problem_codes_in_source() -> list[tuple[str, int, str | None]]:
    """(file, line, code) of every Problem(...) and DataError(code=...) made in the package;
    code is None where it is not a string literal."""
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            arg = None
            if node.func.id == "Problem" and node.args:
                arg = node.args[0]
            elif node.func.id == "DataError":
                arg = next((k.value for k in node.keywords if k.arg == "code"), None)
                if arg is None:
                    continue
            else:
                continue
            code = arg.value if isinstance(arg, ast.Constant) else None
            found.append((path.name, node.lineno, code))
    return found


def test_every_code_made_in_the_source_is_documented():
    found = _problem_codes_in_source()
    assert len(found) > 40  # the walk really finds them
    literal = [(f, n, c) for f, n, c in found if c is not None]
    assert [x for x in literal if x[2] not in PROBLEM_CODES] == []
    # the only Problem made from a variable is DataError's own (from its code= argument)
    assert [(f, c) for f, _, c in found if c is None] == [("errors.py", None)]


def test_no_code_is_parsed_back_out_of_a_message():
    import tunesmith.data.records as records

    assert not hasattr(records, "problem_code")
    text = "\n".join(p.read_text(encoding="utf-8") for p in (SRC / "data").glob("*.py"))
    assert "problem_code" not in text and "_UNPREFIXED" not in text


def test_a_data_error_keeps_its_problems_and_codes():
    problems = [Problem("invalid_json", "invalid JSON (x)", 2),
                Problem("unrecognized_role", 'role "bot"', 3, "messages[1].role")]
    err = DataError("2 problem(s)", path="d.jsonl", problems=problems)
    assert "d.jsonl line 2: invalid_json: invalid JSON (x)" in str(err)
    assert 'd.jsonl line 3: messages[1].role: unrecognized_role: role "bot"' in str(err)
    plain = DataError("no such file", path="d.jsonl")
    assert str(plain) == "d.jsonl: no such file"  # a file-level error shows no code
    assert [p.code for p in plain.problems] == ["data_error"]
    assert DataError("empty", path="d.jsonl", code="empty_file").problems[0].code == "empty_file"


def test_rejected_has_one_shape():
    row = Rejected("d.jsonl", 4, "validate", (
        Problem("missing_content", "output is missing", 4, "output"),
        Problem("data_type", "expected text", 4)), {"instruction": "x"})
    out = row.to_json()
    assert tuple(out) == KEYS
    assert out["code"] == "missing_content" and out["split"] is None
    assert out["reason"] == "output: output is missing; expected text"
    assert out["problems"][0] == {"code": "missing_content", "message": "output is missing",
                                  "line": 4, "field": "output"}
    with pytest.raises(ValueError, match="at least one problem"):
        Rejected("d.jsonl", 4, "validate", ())
    with pytest.raises(ValueError, match="unknown stage"):
        Rejected("d.jsonl", 4, "tokenise", (Problem("too_long", "x"),))
    assert set(STAGES) == {"validate", "clean", "dedup", "encode", "label_issues"}


def test_write_rejects_is_atomic_and_removes_a_stale_file(tmp_path):
    path = tmp_path / "rejects.jsonl"
    row = Rejected("d.jsonl", 1, "dedup", (Problem("duplicate", "same as line 0", 1),),
                   {"messages": []})
    assert write_rejects(path, [row, row]) == path
    assert [json.loads(x)["code"] for x in path.read_text().splitlines()] == ["duplicate"] * 2
    assert write_rejects(path, []) is None and not path.exists()

    def broken():
        yield row
        raise DataError("stop")

    with pytest.raises(DataError):
        write_rejects(path, broken())
    assert list(tmp_path.iterdir()) == []


def test_encode_rejects_too_long_and_untrainable_examples_with_codes():
    from tunesmith.flows.steps import encode_examples

    examples = [ChatExample([{"role": "user", "content": str(i)},
                             {"role": "assistant", "content": "y"}], line=i + 1, source="t.jsonl")
                for i in range(3)]
    rows = {1: Encoded([1] * 4, [IGNORE_INDEX] * 3 + [1]),
            2: Encoded([1] * 50, [IGNORE_INDEX] * 49 + [1]),
            3: Encoded([1] * 4, [IGNORE_INDEX] * 4)}
    kept, rejects = encode_examples(lambda ex: rows[ex.line], examples, max_length=16,
                                    split="train")
    assert len(kept) == 1
    too_long, untrainable = (r.to_json() for r in rejects)
    assert (too_long["line"], too_long["stage"], too_long["code"], too_long["split"]) == (
        2, "encode", "too_long", "train")
    assert "50 tokens" in too_long["reason"] and "data.max_length=16" in too_long["reason"]
    assert too_long["row"] == {"messages": examples[1].messages}
    assert (untrainable["line"], untrainable["code"]) == (3, "no_trainable_tokens")
