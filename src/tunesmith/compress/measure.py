"""What a compressed model costs: parameters, non-zero weights, bytes on disk, time per item,
generated tokens per second.

Latency is timed item by item (batch size 1, the case a served model sees) with the models
interleaved: for each item every model runs once, the order alternating from item to item, so
a slow spell of the machine (other work on the same cores) falls on all of them alike.

Each item's wall-clock time is the latency; its process CPU time (all threads) is kept beside
it. On a shared machine the wall clock also counts time the process waited for a core (or was
paused), which the CPU time does not, so the CPU-time ratio is the steadier speed comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


@dataclass
class Timings:
    """Per item: wall-clock seconds, and process CPU seconds over all threads."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def time_items(runs: dict[str, Callable[[T], Any]], items: Sequence[T], *, warmup: int = 1,
               on_item: Callable[[], None] | None = None) -> dict[str, Timings]:
    """How long each of ``runs`` takes on each item, interleaved; ``warmup`` items are run
    first untimed (first calls allocate and pick kernels); ``on_item`` after each item."""
    names = list(runs)
    for item in items[:warmup]:
        for name in names:
            runs[name](item)
    found = {name: Timings() for name in names}
    for i, item in enumerate(items):
        for name in (names if i % 2 == 0 else names[::-1]):
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name](item)
            found[name].cpu.append(time.process_time() - cpu)
            found[name].wall.append(time.perf_counter() - wall)
        if on_item is not None:
            on_item()
    return found


def latency_summary(timings: Timings) -> dict[str, float | int | None]:
    """p50 and p95 of the wall-clock and the CPU time per item in milliseconds (None when
    nothing was timed), and the number of items."""
    out: dict[str, float | int | None] = {"n": len(timings.wall)}
    for prefix, seconds in (("", timings.wall), ("cpu_", timings.cpu)):
        ms = np.asarray(seconds) * 1000
        for q in (50, 95):
            out[f"{prefix}p{q}_ms"] = float(np.percentile(ms, q)) if len(ms) else None
    return out


def generation_speeds(runs: dict[str, Callable[[T], int]], prompts: Sequence[T], *,
                      warmup: int = 1, on_item: Callable[[], None] | None = None
                      ) -> dict[str, dict[str, float | int | None]]:
    """Generated tokens per second of each of ``runs`` on ``prompts``, the models interleaved
    prompt by prompt as ``time_items`` does.

    Each run generates for one prompt and returns how many new tokens it generated. Per run:
    ``prompts`` timed, ``new_tokens`` generated in all, ``seconds`` and ``cpu_seconds`` (wall
    and process CPU time over all threads), and ``tokens_per_s`` / ``cpu_tokens_per_s`` (None
    when nothing was timed). The rate includes each prompt's prefill, so compare models only
    on the same prompts with the same number of new tokens.

    How ``flows/compress_compare.py`` calls it, beside ``time_items``, for the tuned and the
    compressed model alike::

        params = GenerationParams(max_new_tokens=32)  # greedy; models.generation
        def run(model):
            return lambda prompt: generate(model, tokenizer, [encode_prompt(tokenizer, prompt)],
                                           params, batch_size=1)[0].completion_tokens
        speeds = measure.generation_speeds({name: run(m) for name, (m, _) in models.items()},
                                           prompts)
        rows[name]["generation"] = speeds[name]  # the report reads ["tokens_per_s"]

    For every model to generate the same count the generation must not stop at the end token
    before 32 (``min_new_tokens`` in ``transformers``' ``generate``).
    """
    counts = {name: 0 for name in runs}

    def counted(name: str) -> Callable[[T], None]:
        def run(item: T) -> None:
            counts[name] += int(runs[name](item))
        return run

    for item in prompts[:warmup]:
        for name in runs:
            runs[name](item)
    timings = time_items({name: counted(name) for name in runs}, prompts, warmup=0,
                         on_item=on_item)
    return {name: _rates(counts[name], timings[name]) for name in runs}


def generation_speed(generate_fn: Callable[[T], int], prompts: Sequence[T], *,
                     warmup: int = 1) -> dict[str, float | int | None]:
    """``generation_speeds`` of one model: ``generate_fn`` generates for one prompt (greedy,
    batch size 1, a fixed number of new tokens) and returns how many new tokens it made."""
    return generation_speeds({"model": generate_fn}, prompts, warmup=warmup)["model"]


def _rates(tokens: int, timings: Timings) -> dict[str, float | int | None]:
    wall, cpu = sum(timings.wall), sum(timings.cpu)
    return {"prompts": len(timings.wall), "new_tokens": tokens, "seconds": wall,
            "cpu_seconds": cpu,
            "tokens_per_s": tokens / wall if timings.wall and wall > 0 else None,
            "cpu_tokens_per_s": tokens / cpu if timings.cpu and cpu > 0 else None}
