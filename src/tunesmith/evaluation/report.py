"""The run report: a base-vs-tuned table and the loss curves, as Markdown and PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def headline_metrics(metrics: dict[str, Any]) -> list[str]:
    """The scalar metrics worth a row in the comparison table, in display order."""
    preferred = ["accuracy", "macro_f1", "exact_match", "invalid_rate"]
    keys = [k for k in preferred if k in metrics]
    keys += sorted(k for k, v in metrics.items() if k.startswith("f1_") and isinstance(v, float))
    return keys


def comparison_rows(base: dict[str, Any] | None, tuned: dict[str, Any]
                    ) -> list[tuple[str, float | None, float, float | None]]:
    rows = []
    for key in headline_metrics(tuned):
        b = base.get(key) if base else None
        rows.append((key, b, tuned[key], tuned[key] - b if b is not None else None))
    return rows


def format_table(rows: Sequence[tuple[str, float | None, float, float | None]]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = ["| metric | base | tuned | change |", "| --- | ---: | ---: | ---: |"]
    for key, b, t, d in rows:
        lines.append(f"| {key} | {f(b)} | {f(t)} | {'-' if d is None else f'{d:+.4f}'} |")
    return "\n".join(lines)


def plot_loss_curves(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Train loss per step and validation loss per evaluation, in one PNG."""
    train = [(r["step"], r["train_loss"]) for r in records if r.get("kind") == "train"]
    valid = [(r["step"], r["valid_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", alpha=0.6)
    if valid:
        ax.plot(*zip(*valid, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (target tokens)")
    ax.set_title("Loss curves")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(path: Path, *, name: str, model: str, hyperparameters: dict[str, Any],
                 data_counts: dict[str, int], training: dict[str, Any],
                 base: dict[str, Any] | None, tuned: dict[str, Any], loss_plot: str,
                 samples: Sequence[dict[str, str]] = ()) -> Path:
    lines = [
        f"# Run report: {name}", "",
        f"Base model: `{model}`", "",
        "## Data", "",
        "| split | examples |", "| --- | ---: |",
        *[f"| {k} | {v} |" for k, v in data_counts.items()], "",
        "## Hyperparameters", "",
        "| name | value |", "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in hyperparameters.items()], "",
        "## Training", "",
        *[f"- {k}: {v}" for k, v in training.items()], "",
        f"![loss curves]({loss_plot})", "",
        "## Test set: base vs tuned", "",
        format_table(comparison_rows(base, tuned)), "",
    ]
    if samples:
        lines += ["## Sample predictions (tuned)", "",
                  "| expected | predicted | reply |", "| --- | --- | --- |"]
        for s in samples:
            reply = s["reply"].replace("|", "\\|").replace("\n", " ")[:80]
            lines.append(f"| {s['expected']} | {s['predicted']} | {reply} |")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
