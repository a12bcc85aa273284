"""Sequence packing: several encoded examples in one row, each attending only to itself.

A packed row carries ``position_ids`` that restart at 0 for each sequence and no attention
mask; transformers then builds a block-diagonal causal mask from the position restarts
(``masking_utils.find_packed_sequence_indices``), so no token sees another example.

tunesmith packs *within* an optimiser step's batch: the same examples are seen in the same
steps as without packing, so packing changes the compute layout (less padding), never the
optimisation. Packing across the whole dataset would change which examples share a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunesmith.data.encode import IGNORE_INDEX, Encoded


@dataclass(frozen=True)
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_plan(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of the sequences each row holds, longest first.

    A sequence longer than ``capacity`` gets a row of its own.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k], reverse=True):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max(0, capacity - lengths[i]))
    return bins


def pack_rows(examples: Sequence[Encoded], capacity: int) -> list[PackedRow]:
    """The examples packed into rows of at most ``capacity`` tokens (see ``pack_plan``)."""
    rows = []
    for group in pack_plan([len(e) for e in examples], capacity):
        ids, labels, pos = [], [], []
        for ex in (examples[i] for i in group):
            ids += ex.input_ids
            # The first token of a sequence is never a target: it must not be predicted from
            # the end of the previous sequence in the row.
            labels += [IGNORE_INDEX] + ex.labels[1:]
            pos += list(range(len(ex)))
        rows.append(PackedRow(ids, labels, pos))
    return rows


def padded_width(tokens: int, multiple: int) -> int:
    """``tokens`` rounded up to a multiple of ``multiple`` (the width a row pads to)."""
    return -(-tokens // multiple) * multiple


def collate_packed(rows: Sequence[PackedRow], *, pad_id: int, multiple: int = 1
                   ) -> dict[str, torch.Tensor]:
    """Right-pad packed rows; the padding is one more sequence (positions from 0), never a target.

    ``multiple`` rounds the width up, so batches come in few distinct shapes: CPU kernels
    (oneDNN) cache a primitive per shape, and many shapes cost memory and set-up time.
    No attention mask is returned on purpose: it is what lets transformers see the packing.
    """
    width = max(len(r) for r in rows)
    width = padded_width(width, multiple)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        pos[i, :n] = torch.tensor(r.position_ids)
        pos[i, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}
