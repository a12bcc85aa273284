"""Fixtures of the evaluation tests: the tiny model loaded, and trained to label reviews."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import review_rows


def train_tiny(model, tokenizer, encoded, *, steps: int, lr: float, batch_size: int = 16):
    """Full fine-tuning of the tiny model with the training loss (no checkpoints, no logs)."""
    from tunesmith.training.batches import collate
    from tunesmith.training.loss import TargetLoss

    torch.manual_seed(0)
    loss_module = TargetLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        start = (step * batch_size) % len(encoded)
        batch = (encoded + encoded)[start:start + batch_size]
        out = loss_module(**collate(batch, pad_id=tokenizer.pad_token_id))
        (out.loss_sum / out.n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


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
