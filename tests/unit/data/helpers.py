"""Rows and files for the data tests."""

from __future__ import annotations

import json
from pathlib import Path


def chat_row(user: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": user},
                                    {"role": "assistant", "content": answer}]}


def distinct_rows(n: int, label: bool = False, sentences: int = 3) -> list[dict]:
    """``n`` chat rows with different texts (seeded Faker sentences), labelled spam or ham."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(n)
    rows = []
    for i in range(n):
        text = fake.paragraph(nb_sentences=sentences)
        row = chat_row(text, "spam" if i % 3 == 0 else "ham")
        if label:
            row["label"] = row["messages"][-1]["content"]
        rows.append(row)
    return rows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
