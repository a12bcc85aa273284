"""Preference pairs (for DPO) in OpenAI's format, and their canonical record.

One line is::

    {"input": {"messages": [{"role": "user", "content": "..."}], "tools": [], ...},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

The canonical record keeps the prompt and the two answers as message lists, so the chat
template renders a pair exactly as it renders a chat example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.chat import check_messages
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


def _check_output(value: Any, key: str, line: int | None) -> list[Problem]:
    if not isinstance(value, list) or not value:
        return [Problem("missing_messages_list", f'expected "{key}": [{{"role": "assistant", '
                        '"content": "..."}]', line, key)]
    problems = check_messages(value, line, key)
    for i, msg in enumerate(value):
        if isinstance(msg, dict) and msg.get("role") not in (None, "assistant"):
            problems.append(Problem("unrecognized_role", f'{key} holds the answer, so its '
                                    f'role must be "assistant", not "{msg.get("role")}"', line,
                                    f"{key}[{i}].role"))
    return problems


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
        problems += check_messages(messages, line, "input.messages", require_assistant=False)
        last = messages[-1]
        if not problems and isinstance(last, dict) and last.get("role") == "assistant":
            problems.append(Problem(
                "input_ends_with_assistant", "the input must end with the turn the answers "
                "reply to (user or tool); move the last assistant message into the outputs",
                line, f"input.messages[{len(messages) - 1}].role"))
    for key in OUTPUT_KEYS:
        problems += _check_output(value.get(key), key, line)
    if not problems and value["preferred_output"] == value["non_preferred_output"]:
        problems.append(Problem("identical_outputs", "preferred and non-preferred answers are "
                                "the same, so the pair teaches nothing; fix or drop it", line,
                                "non_preferred_output"))
    return problems


def preference_from_json(value: dict[str, Any], line: int, source: str) -> PreferenceExample:
    """The canonical record of a line that ``check_preference_record`` accepted."""
    inp = value["input"]
    return PreferenceExample(
        prompt=inp["messages"], chosen=value["preferred_output"],
        rejected=value["non_preferred_output"], line=line, source=source,
        extra={k: v for k, v in value.items() if k not in ("input", *OUTPUT_KEYS)},
        input_options={k: v for k, v in inp.items() if k != "messages"})
