"""OpenAI chat JSONL: read, validate line by line, and hold as canonical examples.

The error categories follow OpenAI's fine-tuning data checks (data_type,
missing_messages_list, message_missing_key, message_unrecognized_key, unrecognized_role,
missing_content, example_missing_assistant_message), plus invalid JSON, non-UTF-8 bytes
and empty files. Each finding names the line and the field.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError, Problem

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call"}


@dataclass(frozen=True)
class ChatExample:
    """One training example: a conversation whose assistant turns are the targets."""

    messages: list[dict[str, Any]]
    line: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The last assistant answer, stripped: the class label of a classification example."""
        for m in reversed(self.messages):
            if m["role"] == "assistant" and isinstance(m.get("content"), str):
                return m["content"].strip()
        return ""

    @property
    def prompt(self) -> list[dict[str, Any]]:
        """The conversation up to (not including) the last assistant message."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]


@dataclass(frozen=True)
class Row:
    """A raw line of a JSONL file, decoded, or the problem that stopped decoding it."""

    line: int
    value: Any = None
    problem: Problem | None = None
    raw: str | None = None  # the undecodable line itself, kept so a rejects file can show it


def iter_jsonl(path: Path) -> Iterator[Row]:
    """Yield each non-blank line of a JSONL file as a Row; streams, never loads the file."""
    if not path.exists():
        raise DataError("no such file; check the path (relative paths are relative to the "
                        "config file)", path=path, code="missing_file")
    if path.is_dir():
        raise DataError("is a directory; expected a .jsonl file", path=path)
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Row(number, problem=Problem(
                    "not_utf8", f"not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                    f"{err.start + 1}); re-save the file as UTF-8", number),
                    raw=raw.decode("utf-8", errors="replace").rstrip("\r\n"))
                continue
            if not text.strip():
                continue
            try:
                yield Row(number, value=json.loads(text))
            except json.JSONDecodeError as err:
                yield Row(number, problem=Problem(
                    "invalid_json", f"invalid JSON ({err.msg} at column {err.colno}); each "
                    "line must be one JSON object", number), raw=text.rstrip("\r\n"))


def check_chat_record(value: Any, line: int) -> list[Problem]:
    """Every problem of one decoded line against the OpenAI chat format (empty: it is fine)."""
    if not isinstance(value, dict):
        return [Problem("data_type", f"expected a JSON object, got {type(value).__name__}",
                        line)]
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        return [Problem("missing_messages_list", 'expected "messages": [ {...}, ... ]', line,
                        "messages")]
    return check_messages(messages, line)


def check_messages(messages: list[Any], line: int | None, where: str = "messages", *,
                   require_assistant: bool = True) -> list[Problem]:
    """Every problem of a list of chat messages; ``where`` prefixes the field names.

    Shared by the chat format and the parts of a preference pair (``input.messages``,
    ``preferred_output``), so both report the same categories with the same wording.
    """
    problems: list[Problem] = []
    has_assistant = False
    for i, msg in enumerate(messages, start=1):
        field_name = f"{where}[{i - 1}]"
        if not isinstance(msg, dict):
            problems.append(Problem("data_type", "each message must be an object", line,
                                    field_name))
            continue
        if "role" not in msg:
            problems.append(Problem("message_missing_key", 'add "role"', line, field_name))
            continue
        unknown = sorted(set(msg) - MESSAGE_KEYS)
        if unknown:
            problems.append(Problem(
                "message_unrecognized_key", f"{', '.join(map(repr, unknown))}; allowed keys are "
                + ", ".join(sorted(MESSAGE_KEYS)), line, field_name))
        role = msg["role"]
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            problems.append(Problem(
                "unrecognized_role", f'message {i} has role "{role}"{hint}; expected one of '
                + ", ".join(ROLES), line, f"{field_name}.role"))
            continue
        content = msg.get("content")
        if role == "assistant":
            has_assistant = True
        if role == "assistant" and content is None and msg.get("tool_calls"):
            continue
        if not isinstance(content, str) or not content.strip():
            problems.append(Problem(
                "missing_content", f"message {i} ({role}) has no text content", line,
                f"{field_name}.content"))
        if "weight" in msg and msg["weight"] not in (0, 1):
            problems.append(Problem("invalid_weight", "weight must be 0 or 1", line,
                                    f"{field_name}.weight"))
    if require_assistant and not has_assistant and not problems:
        problems.append(Problem(
            "example_missing_assistant_message",
            "add at least one assistant message to learn from", line, where))
    return problems


def read_chat_jsonl(path: Path | str) -> list[ChatExample]:
    """Read and validate a whole chat JSONL file; raise one DataError listing every problem."""
    path = Path(path)
    examples: list[ChatExample] = []
    problems: list[Problem] = []
    for row in iter_jsonl(path):
        if row.problem is not None:
            problems.append(row.problem)
            continue
        found = check_chat_record(row.value, row.line)
        if found:
            problems.extend(found)
        else:
            extra = {k: v for k, v in row.value.items() if k != "messages"}
            examples.append(ChatExample(row.value["messages"], row.line, str(path), extra))
    if problems:
        raise DataError(
            f"{path}: {len(problems)} problem(s) in the data; fix these lines and run again",
            path=path, problems=problems)
    if not examples:
        raise DataError("the file is empty; expected one JSON object per line like "
                        '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}',
                        path=path, code="empty_file")
    return examples
