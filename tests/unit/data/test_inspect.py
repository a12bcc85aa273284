import json

from tunesmith.data.encode import encode_chat
from tunesmith.flows.prepare import inspect_file

from .helpers import chat_row, distinct_rows


def test_statistics_with_the_model_tokenizer(tmp_path, write_lines, tokenizer):
    rows = [{**chat_row(f"message number {i} " * (1 + i % 7), "spam" if i < 8 else "ham"),
             "label": "spam" if i < 8 else "ham",
             "site": "east" if i < 20 else "south" if i >= 96 else "north"}
            for i in range(100)]
    rows[0]["messages"] += [{"role": "user", "content": "and?"},
                            {"role": "assistant", "content": "spam"}]
    lengths = [len(encode_chat(tokenizer, r["messages"])) for r in rows]
    max_length = sorted(lengths)[90]
    report = inspect_file(write_lines(rows + ["{bad"]), tokenizer=tokenizer,
                          max_length=max_length, epochs=2, group_column="site",
                          plot=tmp_path / "hist.png")
    assert report.examples == 100 and report.rejected == 1
    assert report.tokens["max"] == max(lengths) and report.tokens["min"] == min(lengths)
    assert report.over_max_length == sum(n > max_length for n in lengths)
    assert report.trained_tokens == 2 * sum(n for n in lengths if n <= max_length)
    assert report.turns == {1: 99, 2: 1}
    assert report.labels == {"ham": 92, "spam": 8}
    assert any("imbalanced" in w for w in report.warnings)
    assert report.groups["east"] == {"count": 20, "share": 0.2,
                                     "labels": {"spam": 8, "ham": 12}}
    assert any("group 'east': 40% 'spam' vs 8% overall" in w for w in report.warnings)
    assert any("group 'south' has 4 examples (4.0%)" in w for w in report.warnings)
    png = (tmp_path / "hist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report.to_json())  # serialisable for --json


def test_free_text_answers_give_no_label_statistics(write_lines):
    rows = [chat_row(r["messages"][0]["content"], f"answer {i}")
            for i, r in enumerate(distinct_rows(80))]
    report = inspect_file(write_lines(rows))
    assert report.labels == {} and report.tokens == {} and report.examples == 80
