"""Seeded train/validation/test splits, stratified by label when there are labels.

With ``groups`` (for instance near-duplicate groups from ``dedup.near_duplicate_groups``),
whole groups go to one split, so no near-copy of a test example is trained on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sklearn.model_selection import train_test_split

T = TypeVar("T")


@dataclass(frozen=True)
class Splits:
    train: list
    validation: list
    test: list


def _stratify(labels: Sequence[str] | None, n_out: int) -> Sequence[str] | None:
    """Labels to stratify on, or None where stratification is impossible (a class too rare)."""
    if labels is None:
        return None
    counts = Counter(labels)
    if min(counts.values()) < 2 or len(counts) > n_out or len(counts) < 2:
        return None
    return labels


def split_examples(
    items: Sequence[T],
    *,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    labels: Sequence[str] | None = None,
    need_validation: bool = True,
    need_test: bool = True,
    groups: Sequence[Hashable] | None = None,
) -> Splits:
    """Split ``items`` into train/validation/test, stratified by ``labels`` where possible.

    ``groups``: items with the same group value land in the same split; fractions then count
    groups, and a group is stratified by the label of its first item.
    """
    items = list(items)
    if groups is not None:
        return _split_groups(items, list(groups), validation_fraction=validation_fraction,
                             test_fraction=test_fraction, seed=seed, labels=labels,
                             need_validation=need_validation, need_test=need_test)
    rest, rest_labels = items, list(labels) if labels is not None else None
    test: list = []
    validation: list = []
    if need_test:
        n_test = max(1, round(len(items) * test_fraction))
        idx = list(range(len(rest)))
        keep, take = train_test_split(
            idx, test_size=n_test, random_state=seed, stratify=_stratify(rest_labels, n_test))
        test = [rest[i] for i in take]
        rest_labels = [rest_labels[i] for i in keep] if rest_labels is not None else None
        rest = [rest[i] for i in keep]
    if need_validation:
        n_val = max(1, round(len(items) * validation_fraction))
        idx = list(range(len(rest)))
        keep, take = train_test_split(
            idx, test_size=n_val, random_state=seed + 1, stratify=_stratify(rest_labels, n_val))
        validation = [rest[i] for i in take]
        rest = [rest[i] for i in keep]
    return Splits(train=rest, validation=validation, test=test)


def _split_groups(items: list, groups: list, *, validation_fraction: float,
                  test_fraction: float, seed: int, labels: Sequence[str] | None,
                  need_validation: bool, need_test: bool) -> Splits:
    if len(groups) != len(items):
        raise ValueError("groups must have one value per item")
    first: dict[Hashable, int] = {}
    for i, g in enumerate(groups):
        first.setdefault(g, i)
    units = list(first)
    unit_labels = [labels[first[g]] for g in units] if labels is not None else None
    parts = split_examples(units, validation_fraction=validation_fraction,
                           test_fraction=test_fraction, seed=seed, labels=unit_labels,
                           need_validation=need_validation, need_test=need_test)
    where = {g: name for name in ("train", "validation", "test") for g in getattr(parts, name)}
    out: dict[str, list] = {"train": [], "validation": [], "test": []}
    for item, g in zip(items, groups, strict=True):
        out[where[g]].append(item)
    return Splits(**out)


def sample(items: Sequence[T], n: int | None, *, seed: int,
           labels: Sequence[str] | None = None) -> list[T]:
    """At most ``n`` items, a seeded sample stratified by ``labels`` where possible."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    idx = list(range(len(items)))
    _, take = train_test_split(idx, test_size=n, random_state=seed,
                               stratify=_stratify(labels, n))
    return [items[i] for i in sorted(take)]
