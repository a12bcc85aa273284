"""Training-data formats, detected from the file and normalised to canonical records.

========================  =====================================================  ==========
format                    one row                                                record
========================  =====================================================  ==========
``chat``                  ``{"messages": [{"role", "content", "weight"?}...]}``    ChatExample
``prompt_completion``     ``{"prompt": ..., "completion": ...}`` (OpenAI legacy)  ChatExample
``alpaca``                ``{"instruction", "input"?, "output", "system"?}``     ChatExample
``sharegpt``              ``{"conversations": [{"from", "value"}...]}``          ChatExample
``classification``        a text column and a label column (CSV, TSV, JSONL,    ChatExample
                          Parquet): system prompt?, text as user, label as
                          assistant; ``extra["label"]`` keeps the label
``preference``            ``{"input": {"messages"}, "preferred_output",``        Preference
                          ``"non_preferred_output"}`` (OpenAI DPO)               Example
``trl_preference``        ``{"prompt"?, "chosen", "rejected"}`` (TRL DPO: text,  Preference
                          messages, or whole conversations sharing the prompt)   Example
========================  =====================================================  ==========

``iter_records`` streams ``Record | Rejected``: a row that does not fit its format is a
``Rejected`` naming the line and field, never an exception, so a stage can skip it or report
every problem at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunesmith.data.chat import ChatExample, check_chat_record
from tunesmith.data.preference import check_preference_record, preference_from_json
from tunesmith.data.preference_trl import read_trl_preference
from tunesmith.data.records import Record
from tunesmith.data.rejects import Rejected
from tunesmith.data.sources import container_of, first_objects, iter_rows, table_columns
from tunesmith.errors import DataError, Problem

FORMATS = ("chat", "prompt_completion", "alpaca", "sharegpt", "classification", "preference",
           "trl_preference")

# ShareGPT speaker names seen in the wild, mapped to OpenAI roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "model": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool", "tool": "tool", "function": "tool"}


@dataclass(frozen=True)
class ReadOptions:
    """How to read a data file. Only ``classification`` uses the column names and prompt."""

    format: str | None = None  # one of FORMATS; None: detect it from the file
    text_column: str = "text"
    label_column: str = "label"
    system_prompt: str | None = None  # classification: the system message of every example


Builder = Callable[[Any, int, str, ReadOptions], "Record | list[Problem]"]


def _expect_object(value: Any, line: int) -> list[Problem]:
    if isinstance(value, dict):
        return []
    return [Problem("data_type", f"expected a JSON object, got {type(value).__name__}", line)]


def _text(value: dict[str, Any], key: str, line: int, *, required: bool = True
          ) -> tuple[str, list[Problem]]:
    got = value.get(key)
    if got is None and not required:
        return "", []
    if not isinstance(got, str) or not got.strip():
        what = "missing" if got is None else f"empty or not text ({type(got).__name__})"
        return "", [Problem("missing_content", f"{key} is {what}", line, key)]
    return got, []


def _chat(value: Any, line: int, source: str, _: ReadOptions) -> Record | list[Problem]:
    problems = check_chat_record(value, line)
    if problems:
        return problems
    return ChatExample(value["messages"], line, source,
                       {k: v for k, v in value.items() if k != "messages"})


def _prompt_completion(value: Any, line: int, source: str, _: ReadOptions
                       ) -> Record | list[Problem]:
    if problems := _expect_object(value, line):
        return problems
    prompt, p1 = _text(value, "prompt", line)
    completion, p2 = _text(value, "completion", line)
    if p1 or p2:
        return p1 + p2
    messages = [{"role": "user", "content": prompt.strip()},
                {"role": "assistant", "content": completion.strip()}]
    extra = {k: v for k, v in value.items() if k not in ("prompt", "completion")}
    return ChatExample(messages, line, source, extra)


def _alpaca(value: Any, line: int, source: str, _: ReadOptions) -> Record | list[Problem]:
    if problems := _expect_object(value, line):
        return problems
    instruction, p1 = _text(value, "instruction", line)
    output, p2 = _text(value, "output", line)
    extra_input, p3 = _text(value, "input", line, required=False)
    system, p4 = _text(value, "system", line, required=False)
    if p1 or p2:
        return p1 + p2
    user = instruction.strip() + (f"\n\n{extra_input.strip()}" if extra_input.strip() else "")
    messages = [{"role": "system", "content": system}] if system.strip() and not p4 else []
    messages += [{"role": "user", "content": user},
                 {"role": "assistant", "content": output.strip()}]
    extra = {k: v for k, v in value.items()
             if k not in ("instruction", "input", "output", "system")}
    return ChatExample(messages, line, source, extra)


def _sharegpt(value: Any, line: int, source: str, _: ReadOptions) -> Record | list[Problem]:
    if problems := _expect_object(value, line):
        return problems
    turns = value.get("conversations")
    if not isinstance(turns, list) or not turns:
        return [Problem("missing_messages_list", 'expected "conversations": [{"from": '
                        '"human", "value": "..."}, ...]', line, "conversations")]
    messages: list[dict[str, Any]] = []
    system = value.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    problems = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn:
            problems.append(Problem("message_missing_key", 'each turn needs "from" and "value"',
                                    line, where))
            continue
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            close = difflib.get_close_matches(str(turn["from"]).lower(), SHAREGPT_ROLES, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            problems.append(Problem("unrecognized_role", f'"{turn["from"]}"{hint}; expected '
                                    "one of " + ", ".join(SHAREGPT_ROLES), line,
                                    f"{where}.from"))
            continue
        messages.append({"role": role, "content": turn.get("value")})
    if problems:
        return problems
    # the shared chat checks, reported with ShareGPT's field names
    found = check_chat_record({"messages": messages}, line)
    if found:
        offset = len(messages) - len(turns)
        return [replace(p, field=_sharegpt_field(p.field, offset)) for p in found]
    return ChatExample(messages, line, source,
                       {k: v for k, v in value.items() if k not in ("conversations", "system")})


def _sharegpt_field(field: str | None, offset: int) -> str | None:
    if not field or not field.startswith("messages["):
        return "conversations" if field == "messages" else field
    index, rest = field[len("messages["):].split("]", 1)
    rest = rest.replace(".role", ".from").replace(".content", ".value")
    return f"conversations[{int(index) - offset}]{rest}" if int(index) >= offset else "system"


def _classification(value: Any, line: int, source: str, opts: ReadOptions
                    ) -> Record | list[Problem]:
    if problems := _expect_object(value, line):
        return problems
    text = value.get(opts.text_column)
    label = value.get(opts.label_column)
    problems = []
    if not isinstance(text, str) or not text.strip():
        problems.append(Problem("missing_content", "the text is empty or missing",
                                line, opts.text_column))
    if label is None or isinstance(label, (dict, list)) or not str(label).strip():
        problems.append(Problem("missing_label", "the label is empty or missing", line,
                                opts.label_column))
    if problems:
        return problems
    label_text = str(label).strip()
    messages = [{"role": "system", "content": opts.system_prompt}] if opts.system_prompt else []
    messages += [{"role": "user", "content": text},
                 {"role": "assistant", "content": label_text}]
    extra = {k: v for k, v in value.items() if k not in (opts.text_column, opts.label_column)}
    return ChatExample(messages, line, source, {"label": label_text, **extra})


def _preference(value: Any, line: int, source: str, _: ReadOptions) -> Record | list[Problem]:
    return check_preference_record(value, line) or preference_from_json(value, line, source)


def _trl_preference(value: Any, line: int, source: str, _: ReadOptions
                    ) -> Record | list[Problem]:
    return read_trl_preference(value, line, source)


BUILDERS: dict[str, Builder] = {
    "chat": _chat, "prompt_completion": _prompt_completion, "alpaca": _alpaca,
    "sharegpt": _sharegpt, "classification": _classification, "preference": _preference,
    "trl_preference": _trl_preference}


def _format_from_keys(keys: set[str], opts: ReadOptions) -> str | None:
    if "messages" in keys:
        return "chat"
    if "input" in keys and "preferred_output" in keys:
        return "preference"
    if "chosen" in keys and "rejected" in keys:
        return "trl_preference"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if opts.text_column in keys and opts.label_column in keys:
        return "classification"
    return None


def detect_format(path: Path | str, options: ReadOptions | None = None) -> str:
    """The format of a data file, from its type and the keys of its first rows."""
    path, opts = Path(path), options or ReadOptions()
    if opts.format is not None:
        if opts.format not in FORMATS:
            close = difflib.get_close_matches(opts.format, FORMATS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"unknown format {opts.format!r}{hint}; expected one of "
                            + ", ".join(FORMATS))
        return opts.format
    container = container_of(path)
    if container in ("csv", "tsv", "parquet"):
        columns = table_columns(path, container)
        missing = [c for c in (opts.text_column, opts.label_column) if c not in columns]
        if missing:
            raise DataError(f"a table is read as classification data, but the column(s) "
                            f"{', '.join(missing)} are not there (columns: "
                            f"{', '.join(columns) or 'none'}); name them with --text-column "
                            "and --label-column", path=path)
        return "classification"
    rows = first_objects(path, container)
    for row in rows:
        found = _format_from_keys(set(row), opts)
        if found:
            return found
    if not rows:
        return "chat"  # nothing to go by: report the file's problems as chat data
    raise DataError(f"cannot tell the format from the keys {sorted(rows[0])}; expected one of "
                    f"{', '.join(FORMATS)} (see `tunesmith data convert --help`), or pass "
                    "--format", path=path)


def iter_records(path: Path | str, options: ReadOptions | None = None
                 ) -> Iterator[Record | Rejected]:
    """Every row of the file as a canonical record, or as a ``Rejected`` saying what is wrong."""
    path, opts = Path(path), options or ReadOptions()
    build = BUILDERS[detect_format(path, opts)]
    source = str(path)
    for row in iter_rows(path, container_of(path)):
        if row.problem is not None:
            yield Rejected(source, row.line, "validate", (row.problem,), row.raw)
            continue
        built = build(row.value, row.line, source, opts)
        if isinstance(built, list):
            yield Rejected(source, row.line, "validate", tuple(built), row.value)
        else:
            yield built
