from collections import Counter

from tunesmith.data.chat import ChatExample
from tunesmith.data.clean import CleanOptions, clean_examples
from tunesmith.data.normalize import TextOptions, clean_text
from tunesmith.data.pii import RedactOptions
from tunesmith.data.rejects import KEYS
from tunesmith.flows.prepare import clean_file

from .helpers import chat_row, distinct_rows, read_jsonl


def test_homoglyphs_fold_into_the_script_of_their_word():
    counts = Counter()
    text = "Imρlications of the Οbservɑtiona; Ελληνικά stays Greek, Kαλημέρα too."
    assert clean_text(text, counts=counts) == (
        "Implications of the Observationa; Ελληνικά stays Greek, Καλημέρα too.")
    assert counts["confusable_chars"] == 4  # ρ, Ο, ɑ, and the Latin K in a Greek word
    assert clean_text("Привeт мир") == "Привет мир"  # a Latin e in a Cyrillic word
    assert clean_text("10 μmol, 5 kΩ, ılık") == "10 μmol, 5 kΩ, ılık"  # real uses stay


def test_markup_unicode_control_and_whitespace():
    counts = Counter()
    raw = ("<p>Pain&nbsp;<b>7/10</b></p><br>HR<60 and BP>140\u200b, AT&T &amp; R&D"
           "<script>x()</script>\r\n\r\n\r\n\r\nＦｕｌｌｗｉｄｔｈ ﬁle\x07  end  ")
    assert clean_text(raw, counts=counts) == (
        "Pain 7/10\n\nHR<60 and BP>140, AT&T & R&D\n\nFullwidth file end")
    assert {"markup", "nfkc", "control", "whitespace"} <= set(counts)
    kept = clean_text(raw, TextOptions(markup=False, nfkc=False, confusables=False,
                                       control=False, whitespace=False))
    assert kept == raw


def _examples(rows):
    return [ChatExample(r["messages"], i + 1, "mem", {}) for i, r in enumerate(rows)]


def test_exact_and_near_duplicates_are_removed_first_kept():
    rows = distinct_rows(6)
    text = " ".join(r["messages"][0]["content"] for r in distinct_rows(3))
    rows[0] = chat_row(text, "spam")
    rows.append(chat_row(text, "spam"))  # exact copy of line 1
    rows.append(chat_row(text.rstrip(".") + "!", "spam"))  # near copy: one character
    rows.append(chat_row("  " + text.upper().lower(), "spam"))  # differs only in case/space
    kept, report = clean_examples(_examples(rows))
    assert [e.line for e in kept] == [1, 2, 3, 4, 5, 6]
    assert report.removed == {"duplicate": 1, "near_duplicate": 2}
    reasons = {r.line: r.to_json() for r in report.left_out}
    assert reasons[7]["code"] == "duplicate" and reasons[7]["stage"] == "dedup"
    assert reasons[7]["reason"] == "same as line 1, which is kept"
    assert reasons[8]["code"] == "near_duplicate" and "similar to line 1" in reasons[8]["reason"]


def test_length_filters_and_empty_after_cleaning():
    rows = [chat_row("ok", "a"), chat_row("x" * 500, "b"), chat_row("<br>", "c"),
            chat_row("a normal question here", "fine")]
    kept, report = clean_examples(_examples(rows), CleanOptions(min_chars=5, max_chars=100))
    assert [e.line for e in kept] == [4]
    assert report.removed == {"too_short": 1, "too_long": 1, "empty": 1}
    empty = next(r for r in report.left_out if r.line == 3)
    assert empty.problems[0].field == "messages[0].content"


def test_clean_can_redact_in_the_same_pass():
    rows = [chat_row("Mail me at jo@example.com or call +44 20 7946 0958", "ok")]
    kept, report = clean_examples(_examples(rows), CleanOptions(redact=RedactOptions()))
    assert kept[0].messages[0]["content"] == "Mail me at [EMAIL] or call [PHONE]"
    assert report.redacted == {"EMAIL": 1, "PHONE": 1}


def test_counts_add_up_and_rejects_hold_every_row_left_out(tmp_path, write_lines):
    rows = distinct_rows(20)
    rows[3] = rows[1]  # duplicate
    rows[7] = "{not json"  # invalid
    rows[9] = {"messages": [{"role": "user", "content": "no answer"}]}  # invalid
    rows[12] = chat_row("<b></b>", "x")  # empty after cleaning
    src = write_lines(rows)
    out = tmp_path / "clean.jsonl"
    report = clean_file(src, out, on_error="skip")
    t = report.tally
    assert t.balanced and t.read == 20
    assert t.written == 16 and sum(t.invalid.values()) == 2 and t.removed == {
        "duplicate": 1, "empty": 1}
    assert "read 20 = written 16 + invalid 2" in t.summary()
    rejects = read_jsonl(report.rejects)
    assert len(read_jsonl(out)) == t.written and len(rejects) == t.left_out
    assert {r["line"]: (r["stage"], r["code"]) for r in rejects} == {
        4: ("dedup", "duplicate"), 8: ("validate", "invalid_json"),
        10: ("validate", "example_missing_assistant_message"), 13: ("clean", "empty")}
    assert all(set(r) == set(KEYS) and r["file"] == str(src) and r["split"] is None
               for r in rejects)
    bad_json = next(r for r in rejects if r["line"] == 8)
    assert bad_json["row"] == "{not json" and "each line must be one JSON object" in \
        bad_json["reason"]
    assert bad_json["problems"] == [{"code": "invalid_json", "line": 8, "field": None,
                                     "message": bad_json["reason"]}]
    assert next(r for r in rejects if r["line"] == 4)["reason"] == "same as line 2, which is kept"


def test_preference_pairs_are_cleaned_and_deduplicated():
    from tunesmith.data.preference import PreferenceExample

    def pair(line, answer):
        return PreferenceExample([{"role": "user", "content": "Is it  cold?"}],
                                 [{"role": "assistant", "content": answer}],
                                 [{"role": "assistant", "content": "No."}], line=line)

    kept, report = clean_examples([pair(1, "<b>Yes</b>, take a cοat."),
                                   pair(2, "Yes, take a coat.")])
    assert [p.line for p in kept] == [1]
    assert kept[0].prompt[0]["content"] == "Is it cold?"
    assert kept[0].chosen[0]["content"] == "Yes, take a coat."  # markup gone, Greek ο folded
    assert report.removed == {"duplicate": 1}
