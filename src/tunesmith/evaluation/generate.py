"""Batched generation for evaluation and chat: left padding, KV cache, greedy or seeded sampling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tunesmith.data.encode import encode_prompt


@torch.no_grad()
def generate(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict]], *,
             max_new_tokens: int, batch_size: int = 16, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None,
             on_batch: Callable[[int], None] | None = None) -> list[str]:
    """The assistant's reply to each conversation (greedy when ``temperature`` is 0)."""
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    prompts = [encode_prompt(tokenizer, conv) for conv in conversations]
    # longest first so the first batch shows the peak memory, and batches pad little
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            ids[row, width - n:] = torch.tensor(prompts[i])
            mask[row, width - n:] = 1
        sampling = temperature > 0
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None, top_k=None,
            pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True)
        for row, i in enumerate(idx):
            replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(len(idx))
    model.train(was_training)
    return replies
