"""Fixtures of the evaluation tests: the tiny model loaded, and trained to label reviews."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import review_rows, train_tiny


@pytest.fixture
def tiny_model(tiny_model_dir: Path):
    from tunesmith.models.load import load_model

    return load_model(tiny_model_dir).eval()


@pytest.fixture(scope="session")
def trained_reviewer(tiny_model_dir: Path, tokenizer):
    """The tiny model fine-tuned to answer good/bad on 16 reviews, and those reviews."""
    from tunesmith.data.encode import encode_chat
    from tunesmith.models.load import load_model

    rows = review_rows(16)
    encoded = [encode_chat(tokenizer, r["messages"]) for r in rows]
    model = train_tiny(load_model(tiny_model_dir), tokenizer, encoded, steps=15, lr=5e-3,
                       batch_size=16)
    return model, rows
