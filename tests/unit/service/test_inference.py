"""The model cache of the chat completions API: least recently used models go first."""

import torch

from tunesmith.service.inference import ModelCache


def test_model_cache_evicts_least_recently_used() -> None:
    def linear(n: int):  # n*n float32 weights
        return lambda: (torch.nn.Linear(n, n, bias=False), object())

    cache = ModelCache(budget_bytes=3 * 64 * 64 * 4)
    loads = []
    for name in ("a", "b", "a", "c", "d"):
        cache.get(name, lambda name=name: (loads.append(name), linear(64)())[1])
    assert loads == ["a", "b", "c", "d"]
    assert cache.names() == ["a", "c", "d"]  # b was the least recently used
    cache.get("big", linear(128))  # larger than the budget: served alone
    assert cache.names() == ["big"]
    cache.forget("big")
    assert cache.names() == []
