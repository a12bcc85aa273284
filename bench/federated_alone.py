"""Each client of a federated run trained alone: the baseline a federation has to beat.

    .venv/bin/python bench/federated_alone.py [--run runs/sms-spam-federated] [--out alone.json]

For every client data file of a finished ``tunesmith federated simulate`` run
(``RUN/clients/client-*.jsonl``), one ordinary ``tunesmith run`` (``flows.run.run``, the path
the CLI takes) with the federated run's configuration (``RUN/flower/config.yaml``: model, LoRA,
batch, learning rate, seed), on that file alone: the same validation share split off it as the
client validates on, as many optimiser steps as the client took in the federation
(``rounds x local_steps``), plain LoRA (A trains too: FFA-LoRA only matters for averaging), and
the test set the server scored the global model on (``federated.eval_file``). Prints and writes
each client's test accuracy and macro-F1, their example-weighted and plain means, and the
global model's figures from ``RUN/rounds.jsonl`` beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def alone_config(fed_cfg: dict, client_file: Path, out_dir: Path) -> dict:
    """The federated configuration as one ordinary run on ``client_file``."""
    fed = fed_cfg["federated"]
    cfg = {k: v for k, v in fed_cfg.items() if k != "federated"}
    data = {**cfg["data"], "train_file": str(client_file), "validation_file": None,
            "test_file": str(fed["eval_file"]), "max_train_examples": None}
    train = {**cfg["train"], "max_steps": fed["rounds"] * fed["local_steps"],
             "epochs": 1000, "early_stopping_patience": None, "eval_every": "auto"}
    ev = {**cfg.get("eval", {}), "compare_base": False, "calibration": False,
          "forgetting": False}
    return {**cfg, "name": client_file.stem, "output_dir": str(out_dir), "data": data,
            "train": train, "eval": ev, "energy": {"enabled": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "sms-spam-federated")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None,
                        help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()

    import yaml

    from tunesmith.config import parse_config
    from tunesmith.flows.run import run

    fed_cfg = yaml.safe_load((args.run / "flower" / "config.yaml").read_text(encoding="utf-8"))
    if not fed_cfg.get("federated", {}).get("eval_file"):
        sys.exit(f"{args.run}: the federated run has no federated.eval_file to test on")
    files = sorted((args.run / "clients").glob("client-*.jsonl"))
    if not files:
        sys.exit(f"{args.run}/clients: no client-*.jsonl files")
    work = args.work or Path(tempfile.mkdtemp(prefix="federated-alone-"))
    clients = []
    for f in files:
        raw = alone_config(fed_cfg, f, work / f.stem)
        result = run(parse_config(raw, base_dir=args.run), overwrite=True, show_progress=False)
        n = sum(1 for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
        clients.append({"client": f.stem, "messages": n,
                        "accuracy": result.tuned.get("accuracy"),
                        "macro_f1": result.tuned.get("macro_f1"),
                        "seconds": round(result.seconds, 1)})
        print(json.dumps(clients[-1]), flush=True)
    total = sum(c["messages"] for c in clients)
    summary: dict = {"clients": clients}
    for key in ("accuracy", "macro_f1"):
        summary[f"mean_{key}"] = sum(c[key] for c in clients) / len(clients)
        summary[f"weighted_mean_{key}"] = sum(c[key] * c["messages"] for c in clients) / total
        summary[f"best_client_{key}"] = max(c[key] for c in clients)
    rounds_file = args.run / "rounds.jsonl"
    if rounds_file.is_file():
        last = [json.loads(x) for x in rounds_file.read_text().splitlines() if x.strip()][-1]
        summary["federated"] = {k: last.get(f"global_{k}") for k in ("accuracy", "macro_f1")}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
