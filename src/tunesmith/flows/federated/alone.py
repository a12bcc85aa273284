"""The baseline a federation has to beat: each client trained alone on its own data.

    from tunesmith.flows.federated.alone import alone
    result = alone("examples/sms_spam/federated.yaml")

Each client's file gets the training a federated client does, with the same function
(``local.train_locally``: the same adapters, FFA-LoRA when configured, the same learning
rate and batch), for as many steps as it takes in the whole federation (``rounds`` times
its steps per round: ``local_steps``, or ``local_epochs`` of its data), from the same initial
adapter, but nothing is averaged. Each resulting model is
scored on the server's ``federated.eval_file`` by the evaluation the server applies to every
round's global model (``apps.server_evaluator``), so the two are compared on the same test set
by the same code. What a client alone reaches is what a site gets without the federation
(OpenFedLLM's comparison: every federated algorithm should beat it).

Writes ``<run dir>/alone/alone.json`` (written whole, then renamed), each client's trained
tensors beside it, and, when the federated run's ``rounds.jsonl`` is there, the run's report
again with a "Clients alone" section.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tunesmith.flows.federated.rounds import ALONE_DIR, ALONE_FILE
from tunesmith.models.resolve import default_home, resolve_model

__all__ = ["AloneResult", "alone"]

log = logging.getLogger("tunesmith")


@dataclass
class AloneResult:
    run_dir: Path
    clients: list[dict[str, Any]]
    seconds: float

    @property
    def mean_accuracy(self) -> float | None:
        found = [c["accuracy"] for c in self.clients if c.get("accuracy") is not None]
        return sum(found) / len(found) if found else None


def alone(config: RunConfig | str | Path, *, overwrite: bool = False,
          home: Path | None = None) -> AloneResult:
    """Train every client of the federation alone and score each on ``federated.eval_file``."""
    from tunesmith.flows.federated import _config, client_files, rounds
    from tunesmith.flows.federated.apps import GlobalModel, server_evaluator
    from tunesmith.flows.federated.local import train_locally

    started = time.perf_counter()
    cfg, fed = _config(config)
    if fed.eval_file is None:
        raise ConfigError("federated.eval_file: clients trained alone are scored on the "
                          "server's evaluation file, as the federation's global model is; set "
                          "it to a held-out file (the same one the federated run uses)")
    if not fed.eval_file.is_file():
        raise ConfigError(f"federated.eval_file: no such file: {fed.eval_file}")
    home = home or default_home()
    resolve_model(cfg.model.base, home=home)
    run_dir = (cfg.output_dir or Path("runs") / (cfg.name or "run")).resolve()
    out = run_dir / ALONE_DIR
    if (out / ALONE_FILE).is_file() and not overwrite:
        raise ConfigError(f"{out / ALONE_FILE}: the clients-alone baseline exists; pass "
                          "--overwrite to train it again")
    # the same seeded partition the federation deals (or the same client files)
    files = client_files(cfg, fed, run_dir / "clients")
    glob = GlobalModel(cfg, home)
    initial = glob.initial_state()
    evaluate = server_evaluator(cfg, glob)
    out.mkdir(parents=True, exist_ok=True)
    found: list[dict[str, Any]] = []
    for i, data_file in enumerate(files):
        log.info("client %d of %d alone: %d rounds' steps on %s", i + 1, len(files),
                 fed.rounds, data_file)
        t0 = time.perf_counter()
        update = train_locally(cfg, data_file, out / f"work-{i}", initial, home=home,
                               local_steps=fed.local_steps, local_epochs=fed.local_epochs,
                               rounds=fed.rounds, round_number=0, ffa=fed.ffa_lora)
        save_file({k: v.contiguous() for k, v in update.state.items()},
                  out / f"client-{i}.safetensors")
        glob.load(update.state)
        scores = {k.removeprefix("global_"): v for k, v in evaluate().items()}
        found.append({"client": i, "data_file": str(data_file),
                      "num_examples": update.num_examples, "steps": update.steps,
                      "train_loss": update.metrics.get("train_loss"), **scores,
                      "seconds": round(time.perf_counter() - t0, 1)})
    tmp = out / f".{ALONE_FILE}.tmp"
    tmp.write_text(json.dumps({"eval_file": str(fed.eval_file), "clients": found}, indent=2),
                   encoding="utf-8")
    os.replace(tmp, out / ALONE_FILE)
    if rounds.read_rounds(run_dir):
        rounds.write_report(run_dir, cfg.name or run_dir.name, cfg.model.base,
                            rounds.federation_settings(fed))
    return AloneResult(run_dir, found, time.perf_counter() - started)
