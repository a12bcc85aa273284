"""Dealing one training split to simulated clients: iid, or label-skewed by Dirichlet shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def partition_indices(n: int, num_clients: int, *, seed: int, labels: Sequence[str] | None = None,
                      alpha: float | None = None) -> list[list[int]]:
    """Each client's example indices; every index in exactly one client.

    Without ``alpha``: a seeded shuffle cut into near-equal parts (iid). With ``alpha`` and
    ``labels``: each label's examples are cut by shares drawn from Dirichlet(alpha) per label
    (the label-skew partition of Hsu et al. 2019), so small alpha gives each client few labels.
    A client left empty by the draw gets one example from the largest client: every client
    must have data to train on.
    """
    if num_clients > n:
        raise ValueError(f"{n} examples cannot be dealt to {num_clients} clients")
    rng = np.random.default_rng(seed)
    if alpha is None or labels is None:
        order = rng.permutation(n)
        return [sorted(int(i) for i in part) for part in np.array_split(order, num_clients)]
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in sorted(set(labels)):
        members = rng.permutation([i for i, y in enumerate(labels) if y == label])
        shares = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client] += [int(i) for i in chunk]
    for part in parts:
        if not part:
            largest = max(parts, key=len)
            part.append(largest.pop())
    return [sorted(p) for p in parts]


def partition(items: Sequence[T], num_clients: int, *, seed: int,
              labels: Sequence[str] | None = None, alpha: float | None = None) -> list[list[T]]:
    """``items`` dealt to ``num_clients`` clients (see ``partition_indices``)."""
    return [[items[i] for i in part]
            for part in partition_indices(len(items), num_clients, seed=seed, labels=labels,
                                          alpha=alpha)]
