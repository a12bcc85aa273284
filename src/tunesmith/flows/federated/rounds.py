"""The server's record of a federated run: the global adapter of every round (written whole,
then renamed), ``rounds.jsonl``, and the report with per-round curves and per-client metrics.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunesmith.evaluation.blocks import Image, Section, Table, Text, fmt
from tunesmith.evaluation.report import sections_markdown

ROUNDS_DIR, ROUNDS_LOG, GLOBAL_FILE = "rounds", "rounds.jsonl", "global.safetensors"
RECORD_FILE = "record.json"  # the round's record as saved, before the server's scores
ALONE_DIR, ALONE_FILE = "alone", "alone.json"  # the clients-alone baseline (``alone``)
_ROUND = re.compile(r"^round-(\d+)$")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling to write into, renamed to ``final`` when the block ends without an
    error (as checkpoints are written): a killed server never leaves half a round behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_round(run_dir: Path, round_number: int, state: dict[str, torch.Tensor],
               adapter_saver: Any = None,
               client_updates: dict[str, dict[str, torch.Tensor]] | None = None,
               record: dict[str, Any] | None = None) -> Path:
    """``rounds/round-N``: the global trainable tensors (what a restart continues from), the
    PEFT adapter directory when ``adapter_saver(dir)`` is given, optionally each client's
    update, and the round's record as it stands (``saved_record``)."""
    final = run_dir / ROUNDS_DIR / f"round-{round_number}"
    with atomic_dir(final) as tmp:
        if record is not None:
            (tmp / RECORD_FILE).write_text(json.dumps(record), encoding="utf-8")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / GLOBAL_FILE)
        if adapter_saver is not None:
            adapter_saver(tmp / "adapter")
        for node, update in (client_updates or {}).items():
            save_file({k: v.contiguous() for k, v in update.items()},
                      tmp / f"client-{node}.safetensors")
    return final


def last_round(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]] | None:
    """The newest complete round's number and global tensors, for a restarted server."""
    root = run_dir / ROUNDS_DIR
    found = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if (m := _ROUND.match(p.name)) and (p / GLOBAL_FILE).is_file()) \
        if root.is_dir() else []
    if not found:
        return None
    number, path = found[-1]
    return number, load_file(path / GLOBAL_FILE)


def saved_record(run_dir: Path, round_number: int) -> dict[str, Any] | None:
    """Round N's record as ``save_round`` wrote it, if rounds.jsonl does not hold it yet (a
    server killed while it scored the round)."""
    if any(r.get("round") == round_number for r in read_rounds(run_dir)):
        return None
    path = run_dir / ROUNDS_DIR / f"round-{round_number}" / RECORD_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def append_round(run_dir: Path, record: dict[str, Any]) -> None:
    with (run_dir / ROUNDS_LOG).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_alone(run_dir: Path) -> list[dict[str, Any]] | None:
    """What ``federated alone`` recorded for a federated run directory, if it ran."""
    path = Path(run_dir) / ALONE_DIR / ALONE_FILE
    if not path.is_file():
        return None
    return list(json.loads(path.read_text(encoding="utf-8"))["clients"])


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / ROUNDS_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ----------------------------------------------------------------------------- report


def plot_rounds(records: list[dict[str, Any]], path: Path) -> Path:
    """Per round: the clients' example-weighted training and validation loss, each client's
    validation loss, and the server's loss on eval_file when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    rounds = [r["round"] for r in records]
    for key, label in (("train_loss", "clients: train loss"),
                       ("valid_loss", "clients: validation loss"),
                       ("global_valid_loss", "server: loss on eval_file")):
        points = [(r["round"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    nodes = sorted({c for r in records for c in r.get("clients", {})})
    for node in nodes:
        points = [(r["round"], r["clients"][node]["metrics"].get("valid_loss"))
                  for r in records if node in r.get("clients", {})]
        points = [p for p in points if p[1] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), alpha=0.35, linestyle="--",
                    label=f"client {node[-6:]}")
    return _save_by_round(fig, ax, rounds, "loss (target tokens)", "Federated rounds", path)


def plot_sites(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy per round: the server's on eval_file and each client's on its own validation
    split (``federated.client_eval``); None where neither was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    server = [(r["round"], r["global_accuracy"]) for r in records
              if r.get("global_accuracy") is not None]
    nodes = sorted({n for r in records for n in r.get("sites", {})})
    if not server and not nodes:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if server:
        ax.plot(*zip(*server, strict=True), marker="o", linewidth=2, label="server: eval_file")
    for node in nodes:
        points = [(r["round"], r["sites"][node]["accuracy"]) for r in records
                  if "accuracy" in r.get("sites", {}).get(node, {})]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", linestyle="--", alpha=0.6,
                    label=f"client {node[-6:]}: own validation")
    return _save_by_round(fig, ax, [r["round"] for r in records],
                          "accuracy of the global model", "Accuracy per round and per site", path)


def _save_by_round(fig: Any, ax: Any, rounds: list[int], ylabel: str, title: str,
                   path: Path) -> Path:
    """Label a per-round plot, write it to ``path`` and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _spread(r: dict[str, Any], key: str) -> str:
    if r.get(f"site_{key}_mean") is None:
        return "-"
    return f"{fmt(r[f'site_{key}_mean'])} ({fmt(r[f'site_{key}_min'])}-{fmt(r[f'site_{key}_max'])})"


def federated_sections(records: list[dict[str, Any]], settings: dict[str, Any],
                       sites_plot: bool = False,
                       clients_alone: list[dict[str, Any]] | None = None) -> list[Section]:
    """The report's sections: settings, per-round curves and table, per-client metrics."""
    per_round = Table(["round", "answered", "failed", "examples", "train loss",
                       "validation loss", "server eval loss", "server accuracy",
                       "server macro-F1", "site accuracy: mean (lowest-highest)"],
                      [[str(r["round"]), str(len(r["clients"])), str(len(r["failures"])),
                        str(r["examples"]), fmt(r.get("train_loss")), fmt(r.get("valid_loss")),
                        fmt(r.get("global_valid_loss")), fmt(r.get("global_accuracy")),
                        fmt(r.get("global_macro_f1")), _spread(r, "accuracy")]
                       for r in records])
    metric_names = sorted({k for r in records for c in r["clients"].values()
                           for k in c["metrics"]})
    per_client = Table(["round", "client", "examples", *metric_names],
                       [[str(r["round"]), node, str(c["num_examples"]),
                         *[fmt(c["metrics"].get(k)) for k in metric_names]]
                        for r in records for node, c in sorted(r["clients"].items())])
    failures = [f"round {r['round']}: client {f['node']}: {f['reason']}"
                for r in records for f in r["failures"]]
    sections = [
        Section("Federation", [Table(["setting", "value"],
                                     [[k, str(v)] for k, v in settings.items()])]),
        Section("Rounds", [Image("per-round losses", "rounds.png"), per_round]),
        Section("Clients", [per_client]),
    ]
    site_metrics = [k for k in ("accuracy", "macro_f1", "valid_loss")
                    if any(k in m for r in records for m in r.get("sites", {}).values())]
    if site_metrics:
        per_site = Table(["round", "client", "validation examples", *site_metrics],
                         [[str(r["round"]), node, str(m["num_examples"]),
                           *[fmt(m.get(k)) for k in site_metrics]]
                          for r in records for node, m in sorted(r.get("sites", {}).items())])
        blocks: list[Any] = [Text(
            "Each round's global model scored by every client on its own validation split: "
            "how well the one model serves each site. The gap between the lowest and the "
            "highest site is the federation's fairness figure.")]
        if sites_plot:
            blocks.append(Image("accuracy per round and per site", "sites.png"))
        sections.insert(2, Section("Sites", [*blocks, per_site]))
    if clients_alone:
        sections.append(alone_section(records, clients_alone))
    if failures:
        sections.append(Section("Failures", [Text("\n\n".join(failures))]))
    return sections


def federation_settings(fed: Any) -> dict[str, Any]:
    """The settings table of the report, from a ``FederatedConfig``."""
    found: dict[str, Any] = {"rounds": fed.rounds, "strategy": fed.strategy}
    if fed.strategy == "fedprox":
        found["proximal_mu"] = fed.proximal_mu
    if fed.local_epochs is None:
        found["local_steps"] = fed.local_steps
    else:
        found["local_epochs"] = fed.local_epochs
    if fed.secure_aggregation:
        found["secure_aggregation"] = "SecAgg+ (the server saw only each round's sum)"
    return {**found, "ffa_lora": fed.ffa_lora, "min_clients": fed.min_clients,
            "clients_per_round": fed.clients_per_round or "all"}


def alone_section(records: list[dict[str, Any]], clients: list[dict[str, Any]]) -> Section:
    """Each client trained alone (``federated alone``) next to the last round's global model,
    both scored on the server's eval_file."""
    table = Table(["client", "training examples", "steps", "accuracy", "macro-F1",
                   "loss on eval_file"],
                  [[str(c["client"]), str(c["num_examples"]), str(c["steps"]),
                    fmt(c.get("accuracy")), fmt(c.get("macro_f1")), fmt(c.get("valid_loss"))]
                   for c in clients])
    accs = [c["accuracy"] for c in clients if c.get("accuracy") is not None]
    last = records[-1] if records else {}
    words = ("Each client trained alone on its own data, from the same initial adapter, for "
             "as many steps as in the whole federation, and scored on the server's eval_file.")
    if accs and last.get("global_accuracy") is not None:
        mean, glob = sum(accs) / len(accs), last["global_accuracy"]
        words += (f" Mean accuracy of the clients alone {mean:.4f} (best {max(accs):.4f}); "
                  f"the global model after round {last['round']} {glob:.4f} "
                  f"({100 * (glob - mean):+.1f} points over the mean).")
    return Section("Clients alone", [Text(words), table])


def write_report(run_dir: Path, name: str, model: str, settings: dict[str, Any]) -> Path:
    """``report.md``, ``report.html`` and ``rounds.png`` from rounds.jsonl, rendered by the
    renderers of every run report."""
    from tunesmith.evaluation.html import render_page

    records = read_rounds(run_dir)
    plot_rounds(records, run_dir / "rounds.png")
    sites = plot_sites(records, run_dir / "sites.png")
    sections = federated_sections(records, settings, sites_plot=sites is not None,
                                  clients_alone=read_alone(run_dir))
    title, meta = f"Federated run report: {name}", f"Base model: `{model}`"
    lines = [f"# {title}", "", meta, "", *sections_markdown(sections)]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    (run_dir / "report.html").write_text(render_page(title, meta, sections, run_dir),
                                         encoding="utf-8")
    return path
