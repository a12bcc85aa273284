"""Replies to test conversations for evaluation, through the one generation path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tunesmith.data.encode import encode_prompt
from tunesmith.models.generation import GenerationParams
from tunesmith.models.generation import generate as generate_replies


def generate(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict]], *,
             max_new_tokens: int, batch_size: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None,
             on_batch: Callable[[int], None] | None = None) -> list[str]:
    """The assistant's reply to each conversation (greedy when ``temperature`` is 0).

    Replies are stripped of surrounding whitespace: metrics compare them with the expected
    answers, which are stored stripped.
    """
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed)
    prompts = [encode_prompt(tokenizer, conv) for conv in conversations]
    replies = generate_replies(model, tokenizer, prompts, params, batch_size=batch_size,
                               on_batch=on_batch)
    return [r.text.strip() for r in replies]
