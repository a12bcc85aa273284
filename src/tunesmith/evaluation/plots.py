"""The report's plots, each a function from plain numbers to a PNG file (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tunesmith.evaluation.calibration import ReliabilityBins  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_loss_curves(records: Sequence[dict[str, Any]], path: Path, *,
                     best_step: int | None = None) -> Path:
    """Train loss per step and validation loss per evaluation, in one PNG."""
    train = [(r["step"], r["train_loss"]) for r in records if r.get("kind") == "train"]
    valid = [(r["step"], r["valid_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", alpha=0.6)
    if valid:
        ax.plot(*zip(*valid, strict=True), marker="o", label="validation loss")
    if best_step is not None:
        ax.axvline(best_step, color="grey", linestyle="--", label=f"best step {best_step}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_rewards(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """A preference run's implicit rewards: chosen, rejected and their margin, per step (train)
    and per evaluation (validation)."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for kind, prefix, style in (("train", "train_", "-"), ("eval", "valid_", "o-")):
        rows = [r for r in records if r.get("kind") == kind and f"{prefix}reward_margin" in r]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        for name, colour in (("reward_chosen", "tab:green"), ("reward_rejected", "tab:red"),
                             ("reward_margin", "tab:blue")):
            ax.plot(steps, [r[f"{prefix}{name}"] for r in rows], style, color=colour,
                    alpha=0.5 if kind == "train" else 1.0, markersize=4,
                    label=f"{'validation' if kind == 'eval' else 'train'} {name[7:]}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("implicit reward")
    ax.set_title("Preference rewards (the margin is what is optimised)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion_matrix(confusion: Mapping[str, Any], path: Path, *,
                          title: str = "Confusion matrix") -> Path:
    """Counts from ``metrics.confusion``: expected labels down, predicted labels across."""
    m = np.asarray(confusion["matrix"], dtype=int)
    rows, cols = confusion["rows"], confusion["columns"]
    size = max(3.5, 0.6 * len(cols) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=110)
    im = ax.imshow(m, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    threshold = m.max() / 2 if m.size else 0
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center",
                color="white" if v > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("expected")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_reliability(bins: ReliabilityBins | Mapping[str, Any], path: Path, *,
                     after: ReliabilityBins | Mapping[str, Any] | None = None,
                     title: str = "Reliability diagram") -> Path:
    """Accuracy against confidence per bin; the diagonal is perfect calibration.

    ``after`` overlays the same bins after temperature scaling. Accepts the dataclass or its
    ``to_dict()`` form (as stored in metrics.json).
    """
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for b, name, marker in ((bins, "before scaling", "o"), (after, "after scaling", "s")):
        if b is None:
            continue
        d = b.to_dict() if isinstance(b, ReliabilityBins) else b
        pts = [(c, a, k) for c, a, k in zip(d["confidence"], d["accuracy"], d["count"],
                                            strict=True) if k]
        if pts:
            c, a, k = zip(*pts, strict=True)
            line = ax.plot(c, a, alpha=0.5, linewidth=1)[0]
            # marker area grows with the bin's item count: a lone item should not look decisive
            ax.scatter(c, a, s=[20 + 200 * n / max(k) for n in k], marker=marker,
                       color=line.get_color(), label=f"{name} ({sum(k)} items)")
    ax.set_xlim(-0.02, 1.02)  # room for the markers of bins at exactly 0 or 1
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("confidence (probability of the predicted label)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_token_lengths(lengths: Mapping[str, Sequence[int]], path: Path, *,
                       max_length: int | None = None, bins: int = 40) -> Path:
    """Histogram of tokens per example for each split, with the length limit marked."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    everything = [x for v in lengths.values() for x in v]
    edges = np.histogram_bin_edges(everything or [0], bins=bins)
    for split, values in lengths.items():
        if len(values):
            ax.hist(values, bins=edges, alpha=0.5, label=f"{split} ({len(values)})")
    if max_length is not None:
        ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
