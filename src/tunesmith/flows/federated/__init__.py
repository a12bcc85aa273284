"""Federated fine-tuning on Flower's Deployment Engine.

    from tunesmith.flows.federated import simulate
    result = simulate("examples/sms_spam/federated.yaml")

``simulate`` runs the whole federation on one machine: a SuperLink and one SuperNode per
client, each its own process talking to the others over 127.0.0.1, as on many machines.
``serve`` starts the SuperLink and the run on a server; ``join`` starts one client's SuperNode
on another machine. Each client trains with the same ``fine_tune`` as ``tunesmith run``
(``local``); the server averages with Flower's FedAvg or FedProx (``apps``) and keeps every
round's global adapter, ``rounds.jsonl``, the final adapter, the merged model and a report
(``rounds``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import FederatedConfig, RunConfig, load_config
from tunesmith.data.records import example_label, record_to_json
from tunesmith.errors import ConfigError, DataError, TrainingError, TunesmithError
from tunesmith.flows.federated import launch
from tunesmith.flows.federated.partition import partition
from tunesmith.flows.federated.rounds import read_rounds
from tunesmith.flows.resources import share_of_machine
from tunesmith.flows.steps import load_splits, prepare_run_dir
from tunesmith.models.resolve import default_home, resolve_model

__all__ = ["FederatedResult", "join", "serve", "simulate"]

log = logging.getLogger("tunesmith")


@dataclass
class FederatedResult:
    run_dir: Path
    rounds: list[dict[str, Any]]
    seconds: float


def _config(config: RunConfig | str | Path) -> tuple[RunConfig, FederatedConfig]:
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    if importlib.util.find_spec("flwr") is None:
        raise ConfigError("federated training runs on Flower, which is not installed here: "
                          "pip install 'tunesmith[federated]'")
    if cfg.federated is None:
        raise ConfigError("federated: the section is missing; add one with rounds, "
                          "local_steps and clients (or partition and num_clients)")
    return cfg, cfg.federated


def client_files(cfg: RunConfig, fed: FederatedConfig, folder: Path) -> list[Path]:
    """The clients' data files: ``federated.clients``, or the run's training split dealt to
    ``num_clients`` files (seeded), each holding only its client's examples."""
    if fed.clients:
        missing = [str(p) for p in fed.clients if not p.is_file()]
        if missing:
            raise ConfigError(f"federated.clients: no such file: {', '.join(missing)}")
        return list(fed.clients)
    train = load_splits(cfg, with_test=False).train
    folder.mkdir(parents=True, exist_ok=True)
    if fed.partition == "by_column":
        values, parts = by_column(train, fed)
        # which client is which site, for the report's reader
        (folder / "partition.json").write_text(json.dumps(
            {f"client-{i}": v for i, v in enumerate(values)}, indent=1), encoding="utf-8")
    else:
        labels = [example_label(e) for e in train] if fed.partition == "label_skew" else None
        parts = partition(train, fed.num_clients, seed=cfg.train.seed, labels=labels,
                          alpha=fed.alpha if labels else None)
    files = []
    for i, part in enumerate(parts):
        path = folder / f"client-{i}.jsonl"
        path.write_text("".join(json.dumps(record_to_json(e), ensure_ascii=False) + "\n"
                                for e in part), encoding="utf-8")
        files.append(path)
    return files


def column_value(example: Any, column: str | None) -> str:
    value = example.extra.get(column) if column else None
    return "" if value is None else str(value)


def by_column(train: list[Any], fed: FederatedConfig) -> tuple[list[str], list[list[Any]]]:
    """One client per distinct value of ``partition_column``: (the sorted values, each one's
    examples)."""
    col = fed.partition_column
    missing = [e for e in train if column_value(e, col) == ""]
    if missing:
        raise DataError(f"{len(missing)} training row(s) have no '{col}' (partition: by_column "
                        "gives each value of federated.partition_column to one client, so every "
                        "row needs one)", path=missing[0].source, line=missing[0].line, field=col)
    values = sorted({column_value(e, col) for e in train})
    need = max(fed.min_clients, 2 if fed.secure_aggregation else 1)
    if len(values) < need:
        raise ConfigError(f"federated.partition_column '{col}' has {len(values)} value(s) "
                          f"({', '.join(values[:10])}): fewer clients than the {need} that "
                          "min_clients (and secure_aggregation) need")
    return values, [[e for e in train if column_value(e, col) == v] for v in values]


def _finish(run_dir: Path, code: int, logs: Path, started: float) -> FederatedResult:
    if code != 0 or not (run_dir / "merged").is_dir():
        raise TrainingError(f"the federated run did not finish (flwr run exited {code}); see "
                            f"the logs in {logs}")
    return FederatedResult(run_dir, read_rounds(run_dir), time.perf_counter() - started)


def simulate(config: RunConfig | str | Path, *, overwrite: bool = False, resume: bool = False,
             home: Path | None = None, timeout: float = 3600) -> FederatedResult:
    """Run every round on this machine: a SuperLink and a SuperNode per client, as processes.

    ``resume=True`` continues in the run directory after its last saved round. The child
    processes are stopped however this ends (an error, Ctrl-C, SIGTERM).
    """
    started = time.perf_counter()
    cfg, fed = _config(config)
    home = home or default_home()
    resolve_model(cfg.model.base, home=home)  # an unknown base model fails before anything
    run_dir = prepare_run_dir(cfg, overwrite=overwrite, resume=resume).resolve()
    files = client_files(cfg, fed, run_dir / "clients")
    flower = run_dir / "flower"
    config_file = flower / "config.yaml"
    flower.mkdir(parents=True, exist_ok=True)
    _write_config(cfg, config_file)
    port = launch.free_port()
    launch.write_connection(flower / "home", f"127.0.0.1:{port}")
    app = launch.write_app(flower / "app", {
        "config": str(config_file), "run-dir": str(run_dir), "home": str(home),
        "expected-clients": len(files)}, secure=fed.secure_aggregation)
    env = launch.flower_env(flower / "home")
    logs = flower / "logs"
    with launch.processes(env, logs) as procs:
        link = procs.start("superlink", launch.superlink_args(port))
        launch.wait_for_port("127.0.0.1", port, timeout=120, proc=link,
                             log=logs / "superlink.log")
        for i, data_file in enumerate(files):
            procs.start(f"client-{i}", launch.supernode_args(
                f"127.0.0.1:{port}", {"config": str(config_file), "data-file": str(data_file),
                                      "work-dir": str(run_dir / "clients" / f"work-{i}"),
                                      "home": str(home)},
                runtime_port=launch.free_port()), env=share_of_machine(len(files), i))
        code = launch.flwr_run(app, env, logs / "flwr-run.log")
    return _finish(run_dir, code, logs, started)


def _write_config(cfg: RunConfig, path: Path) -> None:
    """The resolved configuration every process of the federation reads (absolute paths)."""
    import yaml

    from tunesmith.config import dump_config

    path.write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False), encoding="utf-8")


def serve(config: RunConfig | str | Path, *, address: str = "0.0.0.0:9092",
          overwrite: bool = False, resume: bool = False, home: Path | None = None,
          certfile: Path | None = None, keyfile: Path | None = None,
          ca_certfile: Path | None = None) -> FederatedResult:
    """The server of a real deployment: a SuperLink on ``address`` and the run on it.

    Clients join with ``join`` (``tunesmith federated client``). With ``certfile`` and
    ``keyfile`` the SuperLink speaks TLS; without, it is insecure (trusted networks only).
    """
    started = time.perf_counter()
    cfg, fed = _config(config)
    home = home or default_home()
    resolve_model(cfg.model.base, home=home)
    run_dir = prepare_run_dir(cfg, overwrite=overwrite, resume=resume).resolve()
    host, _, port = address.rpartition(":")
    flower = run_dir / "flower"
    flower.mkdir(parents=True, exist_ok=True)
    config_file = flower / "config.yaml"
    _write_config(cfg, config_file)
    local = "127.0.0.1" if host in ("0.0.0.0", "") else host
    launch.write_connection(flower / "home", f"{local}:{port}",
                            root_certificates=ca_certfile if certfile else None)
    n = len(fed.clients) if fed.clients else fed.num_clients
    app = launch.write_app(flower / "app", {"config": str(config_file), "run-dir": str(run_dir),
                                            "home": str(home), "expected-clients": n},
                           secure=fed.secure_aggregation)
    env = launch.flower_env(flower / "home")
    logs = flower / "logs"
    with launch.processes(env, logs) as procs:
        link = procs.start("superlink", launch.superlink_args(
            int(port), host=host or "0.0.0.0", certfile=certfile, keyfile=keyfile,
            ca_certfile=ca_certfile))
        launch.wait_for_port(local, int(port), timeout=120, proc=link,
                             log=logs / "superlink.log")
        log.info("SuperLink on %s; waiting for %d client(s)", address, n)
        code = launch.flwr_run(app, env, logs / "flwr-run.log")
    return _finish(run_dir, code, logs, started)


def join(config: str | Path, *, server: str, data: Path, work_dir: Path | None = None,
         home: Path | None = None, root_certificates: Path | None = None,
         max_retries: int = 5, max_wait_time: float = 60) -> int:
    """One client of a real deployment: a SuperNode that trains on ``data`` for ``server``.

    Flower's SuperNode retries an unreachable server with backoff (``max_retries`` tries,
    ``max_wait_time`` seconds); after that this raises an error naming the address.
    Returns when the SuperNode stops.
    """
    cfg, _ = _config(config)
    data = Path(data).resolve()
    if not data.is_file():
        raise ConfigError(f"--data: no such file: {data}")
    home = home or default_home()
    resolve_model(cfg.model.base, home=home)
    work_dir = (work_dir or data.parent / f"{data.stem}-federated").resolve()
    flower = work_dir / "flower"
    flower.mkdir(parents=True, exist_ok=True)
    config_file = flower / "config.yaml"
    _write_config(cfg, config_file)
    env = launch.flower_env(flower / "home")
    with launch.processes(env, flower / "logs") as procs:
        node = procs.start("supernode", launch.supernode_args(
            server, {"config": str(config_file), "data-file": str(data),
                     "work-dir": str(work_dir), "home": str(home)},
            runtime_port=launch.free_port(), root_certificates=root_certificates,
            max_retries=max_retries, max_wait_time=max_wait_time))
        code = node.wait()
    if code != 0:
        raise TunesmithError(f"the client could not reach the server at {server} (Flower "
                             f"SuperNode exited {code} after {max_retries} tries); check the "
                             f"address and that `tunesmith federated server` runs there; "
                             f"logs in {flower / 'logs'}")
    return code
