"""Preference pairs (for DPO) in TRL's format, read into the same canonical record as OpenAI's.

One row is one of::

    {"prompt": "Is it cold?", "chosen": "About 12 C.", "rejected": "Yes."}     standard
    {"prompt": [{"role": "user", "content": "Is it cold?"}],                    conversational
     "chosen": [{"role": "assistant", "content": "About 12 C."}],
     "rejected": [{"role": "assistant", "content": "Yes."}]}
    {"chosen": [{"role": "user", "content": "Is it cold?"},                     implicit prompt
                {"role": "assistant", "content": "About 12 C."}],
     "rejected": [{"role": "user", "content": "Is it cold?"},
                  {"role": "assistant", "content": "Yes."}]}

A text prompt is one user message and a text answer one assistant message (both stripped, as
for prompt/completion rows). Without a ``prompt``, ``chosen`` and ``rejected`` are whole
conversations: the messages they share from the start are the prompt, and each must go on
with exactly one assistant message. Other keys are kept in ``extra``. The checks are those of
OpenAI's format (``tunesmith.data.preference``), with TRL's field names.
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.preference import (
    PreferenceExample,
    check_answer,
    check_prompt_end,
    check_turns,
    identical,
)
from tunesmith.errors import Problem

TRL_KEYS = ("prompt", "chosen", "rejected")
ROLE_OF = {"prompt": "user", "chosen": "assistant", "rejected": "assistant"}
WHAT = {"prompt": "the user message the answers reply to",
        "chosen": "the preferred assistant answer", "rejected": "the rejected assistant answer"}
PROMPT_FIX = "move the last assistant message into chosen and rejected"
SHARED = ('without a "prompt" key, chosen and rejected must each be the whole conversation, '
          "the same up to a final assistant answer that differs")


def read_trl_preference(value: Any, line: int, source: str
                        ) -> PreferenceExample | list[Problem]:
    """The canonical record of one TRL preference row, or every problem it has."""
    if not isinstance(value, dict):
        return [Problem("data_type", f"expected a JSON object, got {type(value).__name__}",
                        line)]
    if value.get("prompt") is None and isinstance(value.get("chosen"), list) \
            and isinstance(value.get("rejected"), list):
        parts = _implicit(value["chosen"], value["rejected"], line)
    else:
        parts = _explicit(value, line)
    if isinstance(parts, list):
        return parts
    prompt, chosen, rejected = parts
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, line=line,
                             source=source,
                             extra={k: v for k, v in value.items() if k not in TRL_KEYS})


def check_trl_record(value: Any, line: int) -> list[Problem]:
    """Every problem of one decoded row against TRL's preference format (empty: it is fine)."""
    found = read_trl_preference(value, line, "")
    return found if isinstance(found, list) else []


Parts = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]


def _part(value: dict[str, Any], key: str, line: int
          ) -> tuple[list[dict[str, Any]], list[Problem]]:
    """One of prompt, chosen, rejected as messages: text, or a list of messages."""
    got = value.get(key)
    if isinstance(got, str):
        if not got.strip():
            return [], [Problem("missing_content", f"{key} is empty; expected {WHAT[key]}",
                                line, key)]
        return [{"role": ROLE_OF[key], "content": got.strip()}], []
    if isinstance(got, list):
        if not got:
            return [], [Problem("missing_messages_list", f"{key} is an empty list; expected "
                                f"{WHAT[key]}, as text or as a list of messages", line, key)]
        return got, check_turns(got, line, key)
    if got is None:
        hint = (' (or leave "prompt" out and give chosen and rejected as whole conversations '
                "that share it)") if key == "prompt" else ""
        return [], [Problem("missing_content", f'add "{key}": {WHAT[key]}, as text or as a '
                            f"list of messages{hint}", line, key)]
    return [], [Problem("data_type", f"{key} is {type(got).__name__}; expected {WHAT[key]}, "
                        "as text or as a list of messages", line, key)]


def _explicit(value: dict[str, Any], line: int) -> Parts | list[Problem]:
    prompt, problems = _part(value, "prompt", line)
    if prompt and not problems:
        problems += check_prompt_end(prompt, line, "the prompt", f"prompt[{len(prompt) - 1}]"
                                     ".role", PROMPT_FIX)
    answers = []
    for key in ("chosen", "rejected"):
        answer, found = _part(value, key, line)
        problems += found + check_answer(answer, line, key, "prompt")
        answers.append(answer)
    if not problems and answers[0] == answers[1]:
        problems.append(identical(line, "rejected", "chosen and rejected"))
    return problems or (prompt, answers[0], answers[1])


def _implicit(chosen: list[Any], rejected: list[Any], line: int) -> Parts | list[Problem]:
    """Split two whole conversations into their shared prompt and their final answers."""
    problems: list[Problem] = []
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages:
            problems.append(Problem("missing_messages_list", f"{key} is an empty list; "
                                    f"{SHARED}", line, key))
        else:
            problems += check_turns(messages, line, key)
    if problems:
        return problems
    if chosen == rejected:
        return [identical(line, "rejected", "chosen and rejected")]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 and len(chosen) == len(rejected) == 1:
        return [Problem("no_shared_prompt", f"chosen and rejected have no prompt; {SHARED} "
                        '(or give the prompt as "prompt")', line, "chosen")]
    if len(chosen) - shared != 1 or len(rejected) - shared != 1:
        where = f"rejected[{shared}]" if shared < len(rejected) else f"chosen[{shared}]"
        return [Problem("no_shared_prompt", f"chosen and rejected differ at message "
                        f"{shared + 1}, not only in their last one; {SHARED} (or give the "
                        'prompt as "prompt" and only the answers as chosen and rejected)',
                        line, where)]
    prompt = chosen[:shared]
    problems = check_prompt_end(prompt, line, "the prompt (the messages chosen and rejected "
                                "share)", f"chosen[{shared - 1}].role", "make the message "
                                "before the answers a user or tool turn")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        problems += check_answer(messages[shared:], line, key, "the shared prompt",
                                 first=shared)
    return problems or (prompt, chosen[shared:], rejected[shared:])
