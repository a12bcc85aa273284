"""Preference pairs (for DPO) in OpenAI's format, and their canonical record.

One line is::

    {"input": {"messages": [{"role": "user", "content": "..."}], "tools": [], ...},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

Each output is exactly one assistant message, and the input ends with the turn it replies to
(user or tool). The canonical record keeps the prompt and the two answers as message lists,
so the chat template renders a pair exactly as it renders a chat example. The checks of the
parts (``check_turns``, ``check_prompt_end``, ``check_answer``) are shared with TRL's format
(``tunesmith.data.preference_trl``), so both report the same codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.chat import ROLES, check_messages
from tunesmith.errors import Problem

OUTPUT_KEYS = ("preferred_output", "non_preferred_output")


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a preferred and a non-preferred assistant answer."""

    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    line: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # keys of "input" besides "messages" (tools, parallel_tool_calls), written back unchanged
    input_options: dict[str, Any] = field(default_factory=dict)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The prompt and the preferred answer: the conversation a model should produce."""
        return self.prompt + self.chosen

    def to_json(self) -> dict[str, Any]:
        return {"input": {"messages": self.prompt, **self.input_options},
                "preferred_output": self.chosen, "non_preferred_output": self.rejected,
                **self.extra}


def check_turns(messages: list[Any], line: int | None, where: str) -> list[Problem]:
    """``check_messages`` for one part of a pair (no assistant required), where content that
    is not a string (content parts, numbers) is named as the wrong type, not as missing."""
    typed: dict[str, Problem] = {}
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if content is not None and not isinstance(content, str):
            hint = "; join the text of the parts into one string" if isinstance(
                content, list) else ""
            field_name = f"{where}[{i}].content"
            typed[field_name] = Problem(
                "data_type", f"content is {type(content).__name__}; it must be the text as "
                f"one string{hint}", line, field_name)
    return [typed.get(p.field or "", p) if p.code == "missing_content" else p
            for p in check_messages(messages, line, where, require_assistant=False)]


def check_prompt_end(prompt: list[dict[str, Any]], line: int | None, name: str,
                     field_name: str, fix: str) -> list[Problem]:
    """The prompt must end with the turn the answers reply to: a user or tool message."""
    if prompt and prompt[-1].get("role") == "assistant":
        return [Problem("input_ends_with_assistant", f"{name} must end with the turn the "
                        f"answers reply to (user or tool), not an assistant message; {fix}",
                        line, field_name)]
    return []


def check_answer(answer: list[dict[str, Any]], line: int | None, key: str, prompt_name: str,
                 *, first: int = 0) -> list[Problem]:
    """An answer of a pair is exactly one assistant message; ``first``: the index of its
    first message in the list ``key`` names (for whole conversations, its prompt's length)."""
    problems = []
    if len(answer) > 1:
        problems.append(Problem(
            "multiple_output_messages", f"{key} holds {len(answer)} messages, but an answer "
            f"of a preference pair is exactly one assistant message; keep only the answer and "
            f"move the turns before it into {prompt_name}", line, key))
    for i, msg in enumerate(answer, start=first):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role in ROLES and role != "assistant":
            problems.append(Problem(
                "output_role_not_assistant", f'{key} holds the answer, so its role must be '
                f'"assistant", not "{role}"', line, f"{key}[{i}].role"))
    return problems


def _check_output(value: Any, key: str, line: int | None) -> list[Problem]:
    if not isinstance(value, list) or not value:
        what = "missing" if value is None else ("empty" if value == [] else
                                                f"a {type(value).__name__}")
        return [Problem("missing_messages_list", f'{key} is {what}; expected "{key}": '
                        '[{"role": "assistant", "content": "..."}]', line, key)]
    return check_turns(value, line, key) + check_answer(value, line, key, "input.messages")


def check_preference_record(value: Any, line: int | None) -> list[Problem]:
    """Every problem of one decoded line against OpenAI's preference (DPO) format."""
    if not isinstance(value, dict):
        return [Problem("data_type", f"expected a JSON object, got {type(value).__name__}",
                        line)]
    problems: list[Problem] = []
    inp = value.get("input")
    messages = inp.get("messages") if isinstance(inp, dict) else None
    if not isinstance(messages, list) or not messages:
        problems.append(Problem("missing_messages_list", 'expected "input": {"messages": '
                                '[{"role": "user", ...}]}', line, "input.messages"))
    else:
        problems += check_turns(messages, line, "input.messages") or check_prompt_end(
            messages, line, "the input", f"input.messages[{len(messages) - 1}].role",
            "move the last assistant message into the outputs")
    for key in OUTPUT_KEYS:
        problems += _check_output(value.get(key), key, line)
    if not problems and value["preferred_output"] == value["non_preferred_output"]:
        problems.append(identical(line, "non_preferred_output", "preferred and non-preferred"))
    return problems


def identical(line: int | None, field_name: str, names: str) -> Problem:
    return Problem("identical_outputs", f"{names} answers are the same, so the pair teaches "
                   "nothing; fix or drop it", line, field_name)


def preference_from_json(value: dict[str, Any], line: int, source: str) -> PreferenceExample:
    """The canonical record of a line that ``check_preference_record`` accepted."""
    inp = value["input"]
    return PreferenceExample(
        prompt=inp["messages"], chosen=value["preferred_output"],
        rejected=value["non_preferred_output"], line=line, source=source,
        extra={k: v for k, v in value.items() if k not in ("input", *OUTPUT_KEYS)},
        input_options={k: v for k, v in inp.items() if k != "messages"})
