"""The blocks a report is made of (plain text, bullet lists, tables, images, sections) and
the one way a number becomes a table cell (``fmt``).

``sections`` builds the run report from them; modules that build one section on their own
(e.g. ``energy_section``) import them from here, so ``sections`` can call those modules
without an import cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    alt: str
    file: str


@dataclass
class Section:
    title: str
    blocks: list[Text | Bullets | Table | Image] = field(default_factory=list)


def fmt(x: Any, digits: int = 4) -> str:
    """A cell: 4 decimals for fractions, 4 significant digits for big numbers, '-' for none."""
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, float):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    # significant digits where fixed decimals would hide the value (1e-05 is not 0.0000)
    tiny_or_big = x != 0 and (abs(x) >= 1000 or abs(x) < 1e-3)
    return f"{x:.{digits}g}" if tiny_or_big else f"{x:.{digits}f}"
