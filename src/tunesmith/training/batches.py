"""Batches of encoded examples: a seeded order per epoch, padding, micro-batches.

The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, so the data position
of a run is just (epoch, step in epoch): resuming needs no loader state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tunesmith.data.encode import IGNORE_INDEX, Encoded


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def collate(examples: Sequence[Encoded], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def epoch_batches(data: Sequence[Encoded], *, batch_size: int, seed: int, epoch: int,
                  start_step: int = 0) -> Iterator[list[Encoded]]:
    """The batches of one epoch, from step ``start_step`` on."""
    order = epoch_order(len(data), seed=seed, epoch=epoch)
    for step in range(start_step, steps_per_epoch(len(data), batch_size)):
        yield [data[i] for i in order[step * batch_size:(step + 1) * batch_size]]


def micro_batches(batch: Sequence[Encoded], size: int | None) -> list[list[Encoded]]:
    """Split one optimiser step's examples into micro-batches of at most ``size``."""
    if not size or size >= len(batch):
        return [list(batch)]
    return [list(batch[i:i + size]) for i in range(0, len(batch), size)]


def eval_batches(data: Sequence[Encoded], batch_size: int) -> Iterator[list[Encoded]]:
    # Sorted by length so each batch pads little; evaluation order does not matter.
    ordered = sorted(data, key=len)
    for i in range(0, len(ordered), batch_size):
        yield ordered[i:i + batch_size]
