"""The opt-in audit log of chat completions, feedback on them, and the next round's data.

Everything is redacted *before* it is stored (``redact``), so neither the database nor the
datasets exported from it hold the personal data that was sent to the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tunesmith.data.chat import check_chat_record
from tunesmith.data.pii import redact_text
from tunesmith.data.preference import check_preference_record
from tunesmith.service.http_errors import bad_request, not_found
from tunesmith.service.schemas import FeedbackCreate
from tunesmith.service.store import Store
from tunesmith.service.tables import Completion, Feedback, new_id, now


def redact(text: str) -> str:
    """``text`` without personal data: the one redaction step of the service, everything
    stored goes through it. tunesmith's recognisers with their default entities."""
    return redact_text(text)


def record_completion(store: Store, *, completion_id: str, org: str, model: str,
                      messages: list[dict[str, str]], choices: list[str],
                      params: dict[str, Any]) -> None:
    clean = [{"role": m["role"], "content": redact(m["content"])} for m in messages]
    with store.begin() as s:
        s.add(Completion(id=completion_id, org=org, model=model, messages=clean,
                         choices=[redact(c) for c in choices], params=params,
                         created_at=now()))


def add_feedback(store: Store, org: str, req: FeedbackCreate) -> dict[str, Any]:
    """Store a rating and/or a corrected answer for one choice of a logged completion."""
    if req.rating is None and req.correction is None:
        raise bad_request("give a rating ('good' or 'bad'), a correction, or both",
                          param="rating")
    with store.begin() as s:
        completion = s.get(Completion, req.completion_id)
        if completion is None or completion.org != org:
            raise not_found("completion", req.completion_id + " (feedback needs the server "
                            "to run with --audit-log when the completion is made)",
                            "completion_id")
        if req.choice_index >= len(completion.choices):
            raise bad_request(f"the completion has {len(completion.choices)} choice(s)",
                              param="choice_index")
        row = Feedback(id=new_id("feedback-"), org=org, completion_id=completion.id,
                       choice_index=req.choice_index, rating=req.rating,
                       correction=redact(req.correction) if req.correction else None,
                       created_at=now())
        s.add(row)
    return {"id": row.id, "object": "feedback", "completion_id": row.completion_id,
            "choice_index": row.choice_index, "rating": row.rating,
            "correction": row.correction, "created_at": row.created_at}


@dataclass(frozen=True)
class FeedbackExport:
    chat_file: Path
    dpo_file: Path
    chat_examples: int
    dpo_pairs: int


def _latest_feedback(store: Store, org: str, since: int | None, model: str | None = None
                     ) -> list[tuple[Feedback, Completion]]:
    with store.begin() as s:
        query = (select(Feedback, Completion)
                 .join(Completion, Completion.id == Feedback.completion_id)
                 .where(Feedback.org == org).order_by(Feedback.seq))
        if since is not None:
            query = query.where(Feedback.created_at >= since)
        if model is not None:
            query = query.where(Completion.model == model)
        latest: dict[tuple[str, int], tuple[Feedback, Completion]] = {}
        for fb, comp in s.execute(query).tuples():
            latest[(fb.completion_id, fb.choice_index)] = (fb, comp)  # later feedback wins
    return list(latest.values())


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def feedback_records(pairs: list[tuple[Feedback, Completion]]
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(chat examples from corrections, DPO pairs in OpenAI's preference format)."""
    chat, dpo, seen = [], [], set()
    by_prompt: dict[str, tuple[list[dict[str, str]], set[str], set[str]]] = {}
    for fb, comp in pairs:
        original = comp.choices[fb.choice_index]
        key = json.dumps(comp.messages, sort_keys=True)
        _, good, bad = by_prompt.setdefault(key, (comp.messages, set(), set()))
        if fb.correction:
            record = {"messages": [*comp.messages, *_answer(fb.correction)]}
            if not check_chat_record(record, 0):
                chat.append(record)
            good.add(fb.correction)
            bad.add(original)
        elif fb.rating == "good":
            good.add(original)
        elif fb.rating == "bad":
            bad.add(original)
    for messages, good, bad in by_prompt.values():
        for preferred, other in product(sorted(good), sorted(bad)):
            pair = (json.dumps(messages), preferred.strip(), other.strip())
            record = {"input": {"messages": messages}, "preferred_output": _answer(preferred),
                      "non_preferred_output": _answer(other)}
            # the same validator as uploads: e.g. an empty answer makes no usable pair
            if preferred.strip() != other.strip() and pair not in seen \
                    and not check_preference_record(record, 0):
                seen.add(pair)
                dpo.append(record)
    return chat, dpo


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    os.replace(tmp, path)


def export_feedback(database_url: str, *, org: str, out_dir: Path, since: int | None = None,
                    model: str | None = None) -> FeedbackExport:
    """Write the next round's data from ``org``'s feedback.

    ``feedback_chat.jsonl``: each corrected answer as a chat training example.
    ``feedback_dpo.jsonl``: preference pairs (input / preferred_output / non_preferred_output)
    from corrections (the correction over the original answer) and from ratings (a 'good'
    answer over a 'bad' one to the same messages). ``since``: Unix time of the oldest feedback.
    ``model``: only feedback on this model's answers.
    """
    store = Store(database_url)
    try:
        chat, dpo = feedback_records(_latest_feedback(store, org, since, model))
    finally:
        store.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    export = FeedbackExport(out_dir / "feedback_chat.jsonl", out_dir / "feedback_dpo.jsonl",
                            len(chat), len(dpo))
    _write_jsonl(export.chat_file, chat)
    _write_jsonl(export.dpo_file, dpo)
    return export
