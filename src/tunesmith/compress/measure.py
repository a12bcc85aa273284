"""What a compressed model costs: parameters, non-zero weights, bytes on disk, time per item.

Latency is timed item by item (batch size 1, the case a served model sees) with the models
interleaved: for each item every model runs once, the order alternating from item to item, so
a slow spell of the machine (other work on the same cores) falls on all of them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from torch import nn

from tunesmith.compress.quantize import stored_values

T = TypeVar("T")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters); tied weights count once, a quantised weight's
    non-zeros are its non-zero int8 values."""
    total = nonzero = 0
    for p in model.parameters():  # yields a tied tensor once
        total += p.numel()
        nonzero += int(stored_values(p).count_nonzero())
    return total, nonzero


def weights_size(model_dir: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in a model directory."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def time_items(runs: dict[str, Callable[[T], Any]], items: Sequence[T], *, warmup: int = 1,
               on_item: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds each of ``runs`` takes on each item, interleaved; ``warmup`` items are run
    first untimed (first calls allocate and pick kernels); ``on_item`` after each item."""
    names = list(runs)
    for item in items[:warmup]:
        for name in names:
            runs[name](item)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i, item in enumerate(items):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            runs[name](item)
            seconds[name].append(time.perf_counter() - start)
        if on_item is not None:
            on_item()
    return seconds


def latency_summary(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50 and p95 in milliseconds (None when nothing was timed), and the number of items."""
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "n": 0}
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "n": len(ms)}
