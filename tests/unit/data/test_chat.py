import json

import pytest

from tunesmith.data.chat import check_chat_record, read_chat_jsonl
from tunesmith.errors import DataError

OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_lines(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return p


def test_reads_valid_file_and_keeps_line_numbers(tmp_path):
    p = write_lines(tmp_path, [json.dumps(OK), "", json.dumps(OK)])
    examples = read_chat_jsonl(p)
    assert [e.line for e in examples] == [1, 3]
    assert examples[0].label == "hello"
    assert examples[0].prompt == [{"role": "user", "content": "hi"}]


def test_wrong_role_names_line_field_and_fix(tmp_path):
    bad = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assitant", "content": "hello"}]}
    p = write_lines(tmp_path, [json.dumps(OK)] * 40 + [json.dumps(bad)])
    with pytest.raises(DataError) as exc:
        read_chat_jsonl(p)
    assert (f'{p} line 41: messages[1].role: unrecognized_role: message 2 has role "assitant" '
            '(did you mean "assistant"?); expected one of system, user, assistant, tool'
            ) in str(exc.value)


def test_invalid_json_and_non_utf8_are_reported_by_line(tmp_path):
    p = write_lines(tmp_path, [json.dumps(OK), '{"messages": [', b'{"x": "\xff"}'])
    with pytest.raises(DataError) as exc:
        read_chat_jsonl(p)
    text = str(exc.value)
    assert "line 2: invalid_json: invalid JSON" in text
    assert "line 3: not_utf8: not UTF-8 (byte 0xff" in text
    assert [p.code for p in exc.value.problems] == ["invalid_json", "not_utf8"]


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="the file is empty"):
        read_chat_jsonl(write_lines(tmp_path, ["", "  "]))
    with pytest.raises(DataError, match="no such file"):
        read_chat_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("record, category", [
    ([1, 2], "data_type"),
    ({"prompt": "x"}, "missing_messages_list"),
    ({"messages": [{"content": "x"}]}, "message_missing_key"),
    ({"messages": [{"role": "user", "content": "x", "foo": 1},
                   {"role": "assistant", "content": "y"}]}, "message_unrecognized_key"),
    ({"messages": [{"role": "user", "content": ""},
                   {"role": "assistant", "content": "y"}]}, "missing_content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "example_missing_assistant_message"),
])
def test_openai_error_categories(record, category):
    problems = check_chat_record(record, 5)
    assert problems and problems[0].code == category
    assert problems[0].line == 5
    assert not problems[0].message.startswith(category)  # the code is data, not in the text


def test_tool_call_message_without_content_is_fine():
    rec = {"messages": [{"role": "user", "content": "weather?"},
                        {"role": "assistant", "content": None,
                         "tool_calls": [{"id": "1", "type": "function",
                                         "function": {"name": "w", "arguments": "{}"}}]},
                        {"role": "tool", "tool_call_id": "1", "content": "sunny"},
                        {"role": "assistant", "content": "It is sunny."}]}
    assert check_chat_record(rec, 1) == []
