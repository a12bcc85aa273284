import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data.chat import read_chat_jsonl
from tunesmith.data.formats import ReadOptions, detect_format, iter_records
from tunesmith.data.preference import PreferenceExample
from tunesmith.data.records import Rejected
from tunesmith.errors import DataError
from tunesmith.flows.prepare import convert_file

from .helpers import read_jsonl


def convert(tmp_path, src, **read):
    out = tmp_path / "out.jsonl"
    report = convert_file(src, out, read=ReadOptions(**read) if read else None)
    return report, read_jsonl(out)


def test_chat_with_weights_and_tool_messages_round_trips(tmp_path, write_lines):
    row = {"messages": [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "Where is order 7?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "lookup", "arguments": "{\"order\": 7}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"status\": \"shipped\"}"},
        {"role": "assistant", "content": "Draft", "weight": 0},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "It shipped yesterday.", "weight": 1}],
        "ticket": "T-1"}
    src = write_lines([row])
    report, out = convert(tmp_path, src)
    assert report.format == "chat"
    assert out == [row]  # canonical chat is the input, metadata included
    again = read_chat_jsonl(tmp_path / "out.jsonl")
    assert again[0].messages == row["messages"] and again[0].extra == {"ticket": "T-1"}


def test_prompt_completion_becomes_user_and_assistant(tmp_path, write_lines):
    src = write_lines([{"prompt": "Summarise: the cat sat.\n\n", "completion": " A cat sat.",
                        "id": 3}])
    report, out = convert(tmp_path, src)
    assert report.format == "prompt_completion"
    assert out == [{"messages": [{"role": "user", "content": "Summarise: the cat sat."},
                                 {"role": "assistant", "content": "A cat sat."}], "id": 3}]


def test_alpaca_joins_instruction_and_input(tmp_path, write_lines):
    src = write_lines([{"instruction": "Translate to French.", "input": "Good morning",
                        "output": "Bonjour"},
                       {"instruction": "Name a colour.", "input": "", "output": "Blue"}])
    report, out = convert(tmp_path, src)
    assert report.format == "alpaca"
    assert out[0]["messages"][0] == {"role": "user",
                                     "content": "Translate to French.\n\nGood morning"}
    assert out[1]["messages"] == [{"role": "user", "content": "Name a colour."},
                                  {"role": "assistant", "content": "Blue"}]


def test_alpaca_json_array_is_streamed_item_by_item(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"instruction": f"Say {i}", "output": str(i)}
                               for i in range(3)]), encoding="utf-8")
    records = list(iter_records(src))
    assert [r.line for r in records] == [1, 2, 3]
    assert records[2].messages[-1]["content"] == "2"


def test_sharegpt_maps_speakers_and_names_its_own_fields(tmp_path, write_lines):
    good = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye"}]}
    bad = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gtp", "value": "x"}]}
    empty = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]}
    items = list(iter_records(write_lines([good, bad, empty])))
    assert items[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in items[0].messages[1:]] == ["user", "assistant"] * 2
    assert isinstance(items[1], Rejected) and items[1].line == 2
    assert items[1].problems[0].field == "conversations[1].from"
    assert 'did you mean "gpt"' in items[1].problems[0].message
    assert items[2].problems[0].field == "conversations[1].value"


@pytest.mark.parametrize("container", ["csv", "tsv", "jsonl", "parquet"])
def test_classification_from_every_container_keeps_label_and_columns(tmp_path, container):
    rows = [{"body": 'He said "win, now"', "category": "spam", "site": "A"},
            {"body": "See you at 5", "category": "ham", "site": "B"}]
    src = tmp_path / f"data.{container}"
    if container == "csv":
        with src.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, ["body", "category", "site"])
            writer.writeheader()
            writer.writerows(rows)
    elif container == "tsv":  # TSV has no quoting: quotes are plain characters
        src.write_text("body\tcategory\tsite\n" + "".join(
            f"{r['body']}\t{r['category']}\t{r['site']}\n" for r in rows), encoding="utf-8")
    elif container == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), src)
    read = ReadOptions(text_column="body", label_column="category", system_prompt="Spam?")
    assert detect_format(src, read) == "classification"
    report, out = convert(tmp_path, src, text_column="body", label_column="category",
                          system_prompt="Spam?")
    assert out[0] == {"messages": [{"role": "system", "content": "Spam?"},
                                   {"role": "user", "content": 'He said "win, now"'},
                                   {"role": "assistant", "content": "spam"}],
                      "label": "spam", "site": "A"}
    assert out[1]["label"] == "ham" and report.tally.balanced


def test_table_without_the_columns_says_which_exist(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("message,class\nhi,ham\n", encoding="utf-8")
    expected = r"text, label are not there \(columns: message, class\).*--text-column"
    with pytest.raises(DataError, match=expected):
        detect_format(src)


def test_csv_rows_with_bad_bytes_or_fields_are_rejected_by_line(tmp_path):
    src = tmp_path / "d.csv"
    src.write_bytes(b'text,label\n"multi\nline",ham\nbad \xff byte,spam\na,b,c\nok,ham\n')
    items = list(iter_records(src))
    assert items[0].line == 2 and items[0].messages[0]["content"] == "multi\nline"
    assert isinstance(items[1], Rejected) and items[1].line == 4
    assert "not UTF-8" in items[1].problems[0].message
    assert isinstance(items[2], Rejected) and items[2].line == 5
    assert "3 fields but the header has 2" in items[2].problems[0].message
    assert items[3].line == 6


def test_preference_pairs_round_trip(tmp_path, write_lines):
    row = {"input": {"messages": [{"role": "user", "content": "Is it cold?"}], "tools": []},
           "preferred_output": [{"role": "assistant", "content": "About 12 C, take a coat."}],
           "non_preferred_output": [{"role": "assistant", "content": "Yes."}]}
    report, out = convert(tmp_path, write_lines([row]))
    assert report.format == "preference" and out == [row]
    record = next(iter_records(tmp_path / "out.jsonl"))
    assert isinstance(record, PreferenceExample)
    assert record.prompt == row["input"]["messages"]
    assert record.input_options == {"tools": []}


def test_preference_problems_name_their_fields(write_lines):
    same = {"role": "assistant", "content": "Yes."}
    rows = [{"input": {"messages": [{"role": "user", "content": "Q"}]},
             "preferred_output": [same], "non_preferred_output": [same]},
            {"input": {"messages": [{"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}]},
             "preferred_output": [same], "non_preferred_output": [{"role": "user",
                                                                   "content": "B"}]}]
    first, second = iter_records(write_lines(rows))
    assert first.code == "identical_outputs" and "teaches nothing" in first.reason
    fields = {p.field for p in second.problems}
    assert "input.messages[1].role" in fields and "non_preferred_output[0].role" in fields


def test_unknown_keys_and_formats_explain_what_to_do(write_lines):
    with pytest.raises(DataError, match="cannot tell the format.*--format"):
        detect_format(write_lines([{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match="did you mean 'alpaca'"):
        detect_format(write_lines([{"x": 1}]), ReadOptions(format="alpacca"))
