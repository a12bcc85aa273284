import pytest

from tunesmith.flows.prepare import validate_file

from .helpers import chat_row, distinct_rows

OK = chat_row("hi", "hello")


def found(report):
    """(code, line, field) of every finding."""
    return {(f.code, f.line, f.field) for f in report.findings}


@pytest.mark.parametrize("bad, code, field", [
    ([1, 2], "data_type", None),
    ({"msgs": []}, "missing_messages_list", "messages"),
    ({"messages": [{"content": "x"}]}, "message_missing_key", "messages[0]"),
    ({"messages": [{"role": "user", "content": "x", "lang": "en"},
                   {"role": "assistant", "content": "y"}]}, "message_unrecognized_key",
     "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
     "unrecognized_role", "messages[1].role"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]},
     "missing_content", "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "example_missing_assistant_message",
     "messages"),
])
def test_openai_categories_name_line_and_field(write_lines, bad, code, field):
    rows = distinct_rows(12)
    rows.insert(6, bad)
    report = validate_file(write_lines(rows))
    assert (code, 7, field) in found(report)
    assert not report.ok and report.n_errors == 1 and report.examples == 12


def test_invalid_json_and_non_utf8_lines(write_lines):
    rows = [*distinct_rows(11), '{"messages": [', b'{"messages": "\xe9"}']
    report = validate_file(write_lines(rows))
    assert ("invalid_json", 12, None) in found(report)
    assert ("not_utf8", 13, None) in found(report)
    assert "line 13: not_utf8: not UTF-8 (byte 0xe9" in "\n".join(report.lines())


def test_empty_file_and_too_few_examples(write_lines):
    empty = validate_file(write_lines(["", "   "]))
    assert found(empty) == {("empty_file", None, None)}
    few = validate_file(write_lines(distinct_rows(9)))
    assert found(few) == {("too_few_examples", None, None)}
    assert validate_file(write_lines(distinct_rows(10))).ok


def test_duplicates_are_warnings_with_the_first_line(write_lines):
    rows = distinct_rows(10)
    rows.append(rows[2])
    report = validate_file(write_lines(rows))
    assert report.ok  # duplicates do not fail a file
    assert [(w.code, w.line) for w in report.warnings] == [("duplicate", 11)]
    assert "same messages as line 3" in report.warnings[0].message


def test_labels_outside_the_declared_set_and_conflicts(write_lines):
    rows = distinct_rows(10, label=True)
    rows.append({**chat_row("win a prize", "spma"), "label": "spma"})
    rows.append({**rows[0], "messages": rows[0]["messages"][:-1]
                 + [{"role": "assistant", "content": "ham"}], "label": "ham"})
    report = validate_file(write_lines(rows), labels=["spam", "ham"])
    assert ("label_not_allowed", 11, "label") in found(report)
    assert "did you mean 'spam'" in report.errors[0].message
    assert ("conflicting_labels", 12, "label") in found(report)


def test_too_long_uses_the_chat_template_tokens(write_lines, tokenizer):
    from tunesmith.data.encode import encode_chat

    rows = distinct_rows(10)
    long = chat_row("word " * 200, "ok")
    rows.insert(3, long)
    n_tokens = len(encode_chat(tokenizer, long["messages"]))
    report = validate_file(write_lines(rows), tokenizer=tokenizer, max_tokens=n_tokens - 1)
    assert found(report) == {("too_long", 4, "messages")}
    assert f"{n_tokens} tokens" in report.errors[0].message
    assert validate_file(write_lines(rows), tokenizer=tokenizer, max_tokens=n_tokens).ok


def test_all_weights_zero_leaves_nothing_to_train(write_lines, tokenizer):
    rows = distinct_rows(10)
    rows[5]["messages"][-1]["weight"] = 0
    report = validate_file(write_lines(rows), tokenizer=tokenizer, max_tokens=4096)
    assert found(report) == {("no_trainable_tokens", 6, "messages")}


def test_report_json_and_counts_beyond_the_kept_findings(write_lines):
    rows = distinct_rows(10) + ["{oops"] * 300
    report = validate_file(write_lines(rows))
    data = report.to_json()
    assert data["errors"] == 300 and data["counts"] == {"invalid_json": 300}
    assert len(data["findings"]) == 200  # memory stays bounded; the count stays exact
    assert data["ok"] is False


def test_batched_encoding_matches_the_tokenizer_call(tokenizer):
    from tunesmith.data.encode import encode_chats

    conversations = [r["messages"] for r in distinct_rows(5)]
    conversations.append([{"role": "user", "content": "héllo 👋 \n\n  tabs\tand ünïcode"},
                          {"role": "assistant", "content": "a", "weight": 0},
                          {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "ok"}])
    for enc, messages in zip(encode_chats(tokenizer, conversations), conversations, strict=True):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert enc.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encode_chats(tokenizer, conversations)[-1].n_targets < len(
        tokenizer(text, add_special_tokens=False)["input_ids"])
