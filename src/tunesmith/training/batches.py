"""Batch sources: which examples each optimiser step sees; padding; shares and micro-batches.

A batch source yields the *global* batches of an epoch. Its order for epoch ``e`` is drawn
from ``seed + e`` alone, so the data position of a run is just (epoch, step in epoch):
resuming needs no loader state. Every process draws the same global batch and takes its own
share of it, so the global batch is the same whatever the number of processes.

Two sources: ``ShuffledBatches`` (a seeded permutation, optionally grouped by length) and
``PoissonBatches`` (each example joins each step independently with probability
batch/n, the sampling differential privacy's accounting assumes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tunesmith.data.encode import IGNORE_INDEX, Encoded
from tunesmith.data.packing import padded_width

# Length grouping sorts within windows of this many batches, as HF's group_by_length does:
# batches of similar lengths, still a random mix across the epoch.
GROUP_WINDOW = 50


class BatchSource(Protocol):
    def steps_per_epoch(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[Any]]:
        """The global batches of ``epoch`` from step ``start_step`` on."""
        ...


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def _grouped(order: list[int], sizes: Sequence[int], batch_size: int, seed: int) -> list[int]:
    window = batch_size * GROUP_WINDOW
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: sizes[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    g = torch.Generator().manual_seed(seed)
    return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]


@dataclass
class ShuffledBatches:
    """Each epoch a seeded permutation cut into batches of ``batch_size`` (the last smaller)."""

    data: Sequence[Any]
    batch_size: int
    seed: int
    group_by_length: bool = False
    size: Callable[[Any], int] = len

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.data), self.batch_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[Any]]:
        order = epoch_order(len(self.data), seed=self.seed, epoch=epoch)
        if self.group_by_length:
            sizes = [self.size(x) for x in self.data]
            order = _grouped(order, sizes, self.batch_size, self.seed + epoch)
        for step in range(start_step, self.steps_per_epoch()):
            b = self.batch_size
            yield [self.data[i] for i in order[step * b:(step + 1) * b]]


@dataclass
class PoissonBatches:
    """Each step, every example is included independently with probability batch/n.

    Batches vary in size (and may be empty); an epoch is n/batch steps, so each example is
    seen once per epoch on average. Step ``k`` of epoch ``e`` draws from ``seed + e`` and
    ``k`` alone, so resume is exact here too.
    """

    data: Sequence[Any]
    expected_batch_size: int
    seed: int

    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.data), self.expected_batch_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[list[Any]]:
        rate = min(1.0, self.expected_batch_size / max(1, len(self.data)))
        for step in range(start_step, self.steps_per_epoch()):
            g = torch.Generator().manual_seed((self.seed + epoch) * 1_000_003 + step)
            keep = torch.rand(len(self.data), generator=g) < rate
            yield [self.data[i] for i in keep.nonzero().flatten().tolist()]


# Unpacked training rows are padded to a multiple of this many tokens (see ``collate``).
PAD_MULTIPLE = 16


def collate(examples: Sequence[Encoded], *, pad_id: int,
            multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples to the longest of them, rounded up to ``multiple`` tokens.

    Training pads unpacked rows to a multiple (``PAD_MULTIPLE``): every new width is a new
    set of matrix shapes, and on CPU the memory in use grew with each shape met (oneDNN keeps
    its primitives per shape): over DP-SGD's Poisson batches ~37 MB a step at any width,
    ~13 MB padded to 16 (docs/benchmarks.md, "Resident memory across DP steps")."""
    width = padded_width(max(len(e) for e in examples), multiple)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def local_share(batch: Sequence[Any], *, rank: int, world_size: int) -> list[Any]:
    """This process's examples of a global batch (may be empty when the batch is small)."""
    return list(batch[rank::world_size])


def micro_batches(batch: Sequence[Any], size: int | None) -> list[list[Any]]:
    """Split one optimiser step's examples into micro-batches of at most ``size``."""
    if not size or size >= len(batch):
        return [list(batch)]
    return [list(batch[i:i + size]) for i in range(0, len(batch), size)]


def eval_batches(data: Sequence[Any], batch_size: int,
                 size: Callable[[Any], int] = len) -> Iterator[list[Any]]:
    # Sorted by length so each batch pads little; evaluation order does not matter.
    ordered = sorted(data, key=size)
    for i in range(0, len(ordered), batch_size):
        yield ordered[i:i + batch_size]
