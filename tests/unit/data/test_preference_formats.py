"""Preference pairs in OpenAI's and TRL's formats: detected, read into one canonical record,
and every bad row rejected with its code, line and field."""

import json

import pytest

from tunesmith.data.formats import ReadOptions, detect_format, iter_records
from tunesmith.data.preference import PreferenceExample
from tunesmith.data.records import Rejected, record_to_json
from tunesmith.data.rejects import PROBLEM_CODES


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
PROMPT = [SYSTEM, user("Is it cold out?")]

# one pair (with a ticket id kept as metadata), in every format
SAME_PAIR = {
    "openai": {"input": {"messages": PROMPT}, "preferred_output": [bot("About 12 C; a coat.")],
               "non_preferred_output": [bot("Yes.")], "ticket": "T-1"},
    "trl_conversational": {"prompt": PROMPT, "chosen": [bot("About 12 C; a coat.")],
                           "rejected": [bot("Yes.")], "ticket": "T-1"},
    "trl_implicit": {"chosen": [*PROMPT, bot("About 12 C; a coat.")],
                     "rejected": [*PROMPT, bot("Yes.")], "ticket": "T-1"},
}
FORMAT_OF = {"openai": "preference", "trl_conversational": "trl_preference",
             "trl_implicit": "trl_preference"}


def canonical(record):
    assert isinstance(record, PreferenceExample), record
    return record.prompt, record.chosen, record.rejected, record.extra, record.input_options


@pytest.mark.parametrize("kind", sorted(SAME_PAIR))
def test_each_format_is_detected_and_read_into_the_same_record(write_lines, kind):
    path = write_lines([SAME_PAIR[kind]])
    assert detect_format(path) == FORMAT_OF[kind]
    (record,) = iter_records(path)
    assert canonical(record) == canonical(next(iter_records(write_lines([SAME_PAIR["openai"]],
                                                                        "openai.jsonl"))))
    assert record.line == 1 and record.source == str(path)
    # written back as OpenAI's format, whatever it was read from
    assert record_to_json(record) == SAME_PAIR["openai"]


def test_trl_standard_text_is_one_user_and_one_assistant_message(write_lines):
    path = write_lines([{"prompt": "Is it cold out?\n", "chosen": " About 12 C; a coat.",
                         "rejected": "Yes.", "id": 7}])
    assert detect_format(path) == "trl_preference"
    (record,) = iter_records(path)
    openai = {"input": {"messages": [user("Is it cold out?")]},
              "preferred_output": [bot("About 12 C; a coat.")],
              "non_preferred_output": [bot("Yes.")], "id": 7}
    (expected,) = iter_records(write_lines([openai], "openai.jsonl"))
    assert canonical(record) == canonical(expected)
    assert record.messages == [user("Is it cold out?"), bot("About 12 C; a coat.")]


def test_implicit_prompt_splits_off_the_whole_shared_conversation(write_lines):
    history = [user("Hi"), bot("Hello! How can I help?"), user("Is it cold out?")]
    path = write_lines([{"chosen": [*history, bot("About 12 C.")],
                         "rejected": [*history, bot("Yes.")]}])
    (record,) = iter_records(path)
    assert record.prompt == history
    assert record.chosen == [bot("About 12 C.")] and record.rejected == [bot("Yes.")]


def test_the_format_can_be_forced(write_lines):
    path = write_lines([SAME_PAIR["trl_conversational"]])
    assert detect_format(path, ReadOptions(format="trl_preference")) == "trl_preference"
    assert isinstance(next(iter_records(path, ReadOptions(format="trl_preference"))),
                      PreferenceExample)


Q, A, B = "Is it cold out?", "About 12 C.", "Yes."
# (row, code, field) for every kind of bad row; the format is told by the keys
BAD_ROWS = {
    # missing or empty answers
    "openai output missing": ({"input": {"messages": [user(Q)]},
                               "preferred_output": [bot(A)]},
                              "missing_messages_list", "non_preferred_output"),
    "openai output empty list": ({"input": {"messages": [user(Q)]}, "preferred_output": [],
                                  "non_preferred_output": [bot(B)]},
                                 "missing_messages_list", "preferred_output"),
    "openai whitespace answer": ({"input": {"messages": [user(Q)]},
                                  "preferred_output": [bot(" \n")],
                                  "non_preferred_output": [bot(B)]},
                                 "missing_content", "preferred_output[0].content"),
    "trl missing chosen": ({"prompt": Q, "rejected": B, "chosen": None},
                           "missing_content", "chosen"),
    "trl empty text": ({"prompt": Q, "chosen": A, "rejected": ""}, "missing_content",
                       "rejected"),
    "trl whitespace text": ({"prompt": Q, "chosen": "  \t", "rejected": B},
                            "missing_content", "chosen"),
    "trl empty list": ({"prompt": [user(Q)], "chosen": [], "rejected": [bot(B)]},
                       "missing_messages_list", "chosen"),
    "trl whitespace content": ({"prompt": [user(Q)], "chosen": [bot(A)],
                                "rejected": [bot("   ")]},
                               "missing_content", "rejected[0].content"),
    "trl implicit empty": ({"chosen": [user(Q), bot(A)], "rejected": []},
                           "missing_messages_list", "rejected"),
    # identical answers
    "openai identical": ({"input": {"messages": [user(Q)]}, "preferred_output": [bot(A)],
                          "non_preferred_output": [bot(A)]},
                         "identical_outputs", "non_preferred_output"),
    "trl identical text": ({"prompt": Q, "chosen": A, "rejected": A}, "identical_outputs",
                           "rejected"),
    "trl identical text after stripping": ({"prompt": Q, "chosen": A, "rejected": f" {A}\n"},
                                           "identical_outputs", "rejected"),
    "trl identical messages": ({"prompt": [user(Q)], "chosen": [bot(A)],
                                "rejected": [bot(A)]}, "identical_outputs", "rejected"),
    "trl implicit identical": ({"chosen": [user(Q), bot(A)], "rejected": [user(Q), bot(A)]},
                               "identical_outputs", "rejected"),
    # more than one message in an answer
    "openai two messages": ({"input": {"messages": [user(Q)]},
                             "preferred_output": [bot(A), bot("And sunny.")],
                             "non_preferred_output": [bot(B)]},
                            "multiple_output_messages", "preferred_output"),
    "trl two messages": ({"prompt": [user(Q)], "chosen": [bot(A)],
                          "rejected": [bot(B), bot("Really.")]},
                         "multiple_output_messages", "rejected"),
    # an answer that is not the assistant's
    "openai user answer": ({"input": {"messages": [user(Q)]}, "preferred_output": [bot(A)],
                            "non_preferred_output": [user(B)]},
                           "output_role_not_assistant", "non_preferred_output[0].role"),
    "trl user answer": ({"prompt": [user(Q)], "chosen": [user(A)], "rejected": [bot(B)]},
                        "output_role_not_assistant", "chosen[0].role"),
    "trl implicit user answer": ({"chosen": [user(Q), bot(A)], "rejected": [user(Q), user(B)]},
                                 "output_role_not_assistant", "rejected[1].role"),
    # empty prompts, and prompts ending with an assistant turn
    "openai empty input": ({"input": {"messages": []}, "preferred_output": [bot(A)],
                            "non_preferred_output": [bot(B)]},
                           "missing_messages_list", "input.messages"),
    "openai input ends with assistant": ({"input": {"messages": [user(Q), bot("Hm.")]},
                                          "preferred_output": [bot(A)],
                                          "non_preferred_output": [bot(B)]},
                                         "input_ends_with_assistant",
                                         "input.messages[1].role"),
    "trl empty prompt text": ({"prompt": " ", "chosen": A, "rejected": B}, "missing_content",
                              "prompt"),
    "trl no prompt for text answers": ({"chosen": A, "rejected": B}, "missing_content",
                                       "prompt"),
    "trl empty prompt list": ({"prompt": [], "chosen": A, "rejected": B},
                              "missing_messages_list", "prompt"),
    "trl prompt ends with assistant": ({"prompt": [user(Q), bot("Hm.")], "chosen": [bot(A)],
                                        "rejected": [bot(B)]},
                                       "input_ends_with_assistant", "prompt[1].role"),
    "trl implicit prompt ends with assistant": (
        {"chosen": [user(Q), bot("Hm."), bot(A)], "rejected": [user(Q), bot("Hm."), bot(B)]},
        "input_ends_with_assistant", "chosen[1].role"),
    "trl implicit without a prompt": ({"chosen": [bot(A)], "rejected": [bot(B)]},
                                      "no_shared_prompt", "chosen"),
    "trl implicit prompts differ": ({"chosen": [user(Q), bot(A)],
                                     "rejected": [user("Is it hot out?"), bot(B)]},
                                    "no_shared_prompt", "rejected[0]"),
    # text needed, something else given
    "openai content parts": ({"input": {"messages": [user(Q)]},
                              "preferred_output": [{"role": "assistant", "content": [
                                  {"type": "text", "text": A}]}],
                              "non_preferred_output": [bot(B)]},
                             "data_type", "preferred_output[0].content"),
    "trl number answer": ({"prompt": Q, "chosen": 12, "rejected": B}, "data_type", "chosen"),
    "trl object prompt": ({"prompt": user(Q), "chosen": A, "rejected": B}, "data_type",
                          "prompt"),
    "trl number content": ({"prompt": [{"role": "user", "content": 3}], "chosen": [bot(A)],
                            "rejected": [bot(B)]}, "data_type", "prompt[0].content"),
    "trl implicit number content": ({"chosen": [user(Q), bot(A)],
                                     "rejected": [user(Q), {"role": "assistant",
                                                            "content": 1.5}]},
                                    "data_type", "rejected[1].content"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_every_bad_row_names_its_code_line_and_field(write_lines, name):
    row, code, field = BAD_ROWS[name]
    good = (SAME_PAIR["openai"] if name.startswith("openai")
            else {"prompt": "Q?", "chosen": "A.", "rejected": "B."})
    fmt = "preference" if name.startswith("openai") else "trl_preference"
    path = write_lines([good, row])
    assert detect_format(path) == fmt
    first, second = iter_records(path)
    assert isinstance(first, PreferenceExample)
    assert isinstance(second, Rejected) and second.stage == "validate"
    assert (second.code, second.line, second.problems[0].field) == (code, 2, field), \
        second.problems
    for p in second.problems:
        assert p.code in PROBLEM_CODES and p.line == 2
        assert len(p.message) > 20  # says what is wrong and what to do, not just the code


def test_messages_say_what_to_do(write_lines):
    rows = [BAD_ROWS[n][0] for n in ("trl two messages", "openai two messages",
                                     "trl implicit prompts differ", "trl no prompt for text "
                                     "answers", "trl identical text")]
    fmts = ["trl_preference", "preference", "trl_preference", "trl_preference",
            "trl_preference"]
    reasons = []
    for i, (row, fmt) in enumerate(zip(rows, fmts, strict=True)):
        (item,) = iter_records(write_lines([row], f"{i}.jsonl"), ReadOptions(format=fmt))
        reasons.append(item.reason)
    assert "exactly one assistant message" in reasons[0] and "into prompt" in reasons[0]
    assert "exactly one assistant message" in reasons[1] and "input.messages" in reasons[1]
    assert "differ at message 1" in reasons[2] and '"prompt"' in reasons[2]
    assert 'add "prompt"' in reasons[3]
    assert "teaches nothing" in reasons[4]


def test_a_mixed_file_yields_the_good_pairs_and_rejects_the_bad(tmp_path):
    good = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No idea."}
            for i in range(3)]
    lines = [json.dumps(good[0]), json.dumps(BAD_ROWS["trl identical text"][0]),
             json.dumps(good[1]), "{broken", "",
             json.dumps(BAD_ROWS["trl user answer"][0]),
             json.dumps(good[2]), json.dumps(["not", "an", "object"])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = list(iter_records(path))
    kept = [i for i in items if isinstance(i, PreferenceExample)]
    rejected = [(i.line, i.code) for i in items if isinstance(i, Rejected)]
    assert [(r.line, r.prompt[0]["content"]) for r in kept] == [
        (1, "Question 0?"), (3, "Question 1?"), (7, "Question 2?")]
    assert rejected == [(2, "identical_outputs"), (4, "invalid_json"),
                        (6, "output_role_not_assistant"), (8, "data_type")]


def test_data_validate_names_the_line_and_field_of_a_bad_trl_row(cli, tmp_path):
    rows = [{"prompt": [user(f"Question {i}?")], "chosen": [bot(f"Answer {i}.")],
             "rejected": [bot("No idea.")]} for i in range(12)]
    rows.insert(4, {"prompt": [user("Is it cold?")], "chosen": [bot("About 12 C.")],
                    "rejected": [bot("Yes."), bot("Really.")]})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, out, _ = cli("data", "validate", str(path), "--no-tokens")
    assert code == 1
    assert (f"error: {path} line 5: rejected: multiple_output_messages: rejected holds 2 "
            "messages") in out
    assert "FAILED: 12 valid examples in 13 rows; 1 error(s)" in out

    code, out, _ = cli("data", "validate", str(path), "--no-tokens", "--json",
                       "--format", "trl_preference")
    data = json.loads(out)
    assert code == 1 and data["counts"] == {"multiple_output_messages": 1}
    assert [(f["line"], f["field"]) for f in data["findings"]] == [(5, "rejected")]

    del rows[4]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, out, _ = cli("data", "validate", str(path), "--no-tokens")
    assert code == 0 and "OK: 12 valid examples in 12 rows; 0 error(s)" in out
