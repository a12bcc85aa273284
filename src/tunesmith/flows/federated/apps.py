"""The Flower apps: ``server_app`` (runs in the SuperLink's ServerApp process) and
``client_app`` (runs in a SuperNode's ClientApp process), on Flower's Message API.

Flower's generated ``pyproject.toml`` (``launch.write_app``) points at these two objects; the
SuperLink and SuperNodes run them. Aggregation is Flower's own ``FedAvg`` / ``FedProx``; what
is ours is what a round trains (``local.train_locally``) and what the server keeps
(``rounds``). Settings reach the server as the run config (``config``: the tunesmith YAML,
``run-dir``) and a client as its node config (``config``, ``data-file``, ``work-dir``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from tunesmith.config import RunConfig, load_config
from tunesmith.errors import ConfigError, ModelError
from tunesmith.flows.federated import rounds
from tunesmith.flows.federated.local import evaluate_locally, freeze_lora_a, train_locally
from tunesmith.flows.steps import base_dtype, prepare_model_for_training
from tunesmith.models.adapters import load_trainable_state, trainable_state_copy
from tunesmith.models.load import load, save_merged
from tunesmith.models.resolve import default_home, resolve_model

log = logging.getLogger("tunesmith")


def model_fingerprint(model_dir: Path) -> str:
    """What must match between server and client: architecture and sizes of the base."""
    c = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return ",".join(f"{k}={c.get(k)}" for k in keys)


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in record.items()}


def _federated(cfg: RunConfig, source: str) -> Any:
    if cfg.federated is None:
        raise ConfigError(f"{source}: add a federated: section (rounds, local_steps, ...)")
    return cfg.federated


# ----------------------------------------------------------------------------- client

client_app = ClientApp()


def check_same_setup(cfg: RunConfig, model_dir: Path, sent: ConfigRecord) -> None:
    """Refuse a global adapter made for another base model or LoRA shape, naming both."""
    mine = model_fingerprint(model_dir)
    if sent["base-fingerprint"] != mine:
        raise ModelError(f"the server trains base model '{sent['base-model']}' "
                         f"({sent['base-fingerprint']}); this client has '{cfg.model.base}' "
                         f"({mine}); use the same model.base as the server")
    lora = f"method={cfg.train.method}, r={cfg.train.lora.r}, " \
           f"targets={cfg.train.lora.target_modules}"
    if sent["lora"] != lora:
        raise ModelError(f"the server's adapters are {sent['lora']}; this client's are {lora}; "
                         "use the server's train.method and train.lora")


def _client_setup(msg: Message, context: Context) -> tuple[RunConfig, ConfigRecord, Path, Path]:
    """(run config, what the server sent, home, work dir) of a client's message."""
    node = context.node_config
    cfg = load_config(str(node["config"]))
    sent = msg.content["config"]
    home = Path(str(node["home"])) if "home" in node else default_home()
    check_same_setup(cfg, resolve_model(cfg.model.base, home=home), sent)
    work_dir = Path(str(node.get("work-dir", Path(str(node["data-file"])).parent / "work")))
    return cfg, sent, home, work_dir


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    node = context.node_config
    cfg, sent, home, work_dir = _client_setup(msg, context)
    update = train_locally(
        cfg, Path(str(node["data-file"])), work_dir, _tensors(msg.content["arrays"]), home=home,
        local_steps=int(sent["local-steps"]), round_number=int(sent["server-round"]),
        proximal_mu=float(sent.get("proximal-mu", 0.0)), ffa=bool(sent["ffa-lora"]),
        local_epochs=float(sent.get("local-epochs", 0.0)) or None)
    # only tensors, the example count and numbers leave the client
    metrics = MetricRecord({"num-examples": update.num_examples, **update.metrics})
    return Message(RecordDict({"arrays": ArrayRecord(update.state), "metrics": metrics}),
                   reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """The round's new global adapter on this client's own validation split: numbers only."""
    cfg, sent, home, work_dir = _client_setup(msg, context)
    n, metrics = evaluate_locally(cfg, Path(str(context.node_config["data-file"])), work_dir,
                                  _tensors(msg.content["arrays"]), home=home,
                                  ffa=bool(sent["ffa-lora"]))
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, **metrics})}),
                   reply_to=msg)


# ----------------------------------------------------------------------------- server

server_app = ServerApp()


class GlobalModel:
    """The server's copy of the base model with the run's adapters: saves each round's global
    adapter and, at the end, the merged model."""

    def __init__(self, cfg: RunConfig, home: Path) -> None:
        self.cfg = cfg
        self.model_dir = resolve_model(cfg.model.base, home=home)
        model, self.tokenizer = load(self.model_dir, dtype=base_dtype(cfg))
        self.model = prepare_model_for_training(model, cfg)
        if _federated(cfg, "config").ffa_lora:
            freeze_lora_a(self.model)

    def initial_state(self) -> dict[str, torch.Tensor]:
        return trainable_state_copy(self.model)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.model, state)

    def save_adapter(self, directory: Path) -> None:
        if self.cfg.train.method == "lora":
            self.model.save_pretrained(directory)


def recording(base: type, run_dir: Path, first_round: int, min_clients: int,
              keep_updates: bool) -> Any:
    """``base`` (Flower's FedAvg or FedProx) that also writes what each round received.

    Subclassing is how Flower's strategies are customised; aggregation stays Flower's.
    """

    class Recording(base):  # type: ignore[misc, valid-type]
        pending: dict[str, Any] = {}
        updates: dict[str, dict[str, torch.Tensor]] = {}

        def configure_train(self, server_round: int, arrays: Any, config: Any,
                            grid: Any) -> Any:
            # The first round waits until every expected client has connected; later rounds
            # go on with min_clients, so a client that died (Flower answers for it with an
            # error once its heartbeats stop) is not waited for until the end of time.
            if server_round > 1:
                self.min_available_nodes = min_clients
                self.min_train_nodes = min(self.min_train_nodes, max(
                    min_clients, len(list(grid.get_node_ids()))))
            return super().configure_train(server_round, arrays, config, grid)

        def configure_evaluate(self, server_round: int, arrays: Any, config: Any,
                               grid: Any) -> Any:
            # whoever is still connected scores the new global adapter: a client that died
            # during the round is not waited for
            self.min_available_nodes = min_clients
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            ok = [m for m in replies if not m.has_error()]
            clients = {}
            for m in ok:
                metrics = dict(next(iter(m.content.metric_records.values())))
                clients[str(m.metadata.src_node_id)] = {
                    "num_examples": int(metrics.pop("num-examples")), "metrics": metrics,
                    "received": {name: sorted(rec.keys()) if hasattr(rec, "keys") else []
                                 for name, rec in m.content.items()}}
            failures = [{"node": str(m.metadata.src_node_id), "reason": m.error.reason}
                        for m in replies if m.has_error()]
            for f in failures:
                log.warning("round %s: client %s failed: %s", server_round + first_round,
                            f["node"], f["reason"])
            self.updates = {str(m.metadata.src_node_id): _tensors(m.content["arrays"])
                            for m in ok} if keep_updates else {}
            total = sum(c["num_examples"] for c in clients.values())

            def weighted(key: str) -> float | None:
                vals = [(c["metrics"][key], c["num_examples"]) for c in clients.values()
                        if key in c["metrics"]]
                return sum(v * n for v, n in vals) / max(1, sum(n for _, n in vals)) \
                    if vals else None

            self.pending = {"round": server_round + first_round, "clients": clients,
                            "failures": failures, "examples": total,
                            "train_loss": weighted("train_loss"),
                            "valid_loss": weighted("valid_loss")}
            if len(ok) < min_clients:
                log.warning("round %s: %d client(s) answered, fewer than min_clients (%d); the "
                            "global adapter is kept", server_round + first_round, len(ok),
                            min_clients)
                self.pending["skipped"] = True
                return None, None
            return super().aggregate_train(server_round, ok)

        def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
            """Each client's score of the new global adapter on its own validation split,
            kept per client (``sites``) with the spread across them; a client that failed to
            evaluate is logged and left out."""
            replies = list(replies)
            sites = {}
            for m in replies:
                if m.has_error():
                    log.warning("round %s: client %s failed to evaluate: %s",
                                server_round + first_round, m.metadata.src_node_id,
                                m.error.reason)
                    continue
                metrics = dict(next(iter(m.content.metric_records.values())))
                sites[str(m.metadata.src_node_id)] = {
                    "num_examples": int(metrics.pop("num-examples")), **metrics}
            self.pending["sites"] = sites
            self.pending.update(site_spread(sites))
            ok = [m for m in replies if not m.has_error()]
            return super().aggregate_evaluate(server_round, ok) if ok else None

    return Recording


def site_spread(sites: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per metric over the clients' own validation splits: the example-weighted mean, and the
    lowest and highest site (the gap between them is the fairness figure)."""
    found: dict[str, float] = {}
    for key in ("accuracy", "macro_f1", "valid_loss"):
        vals = [(s[key], s["num_examples"]) for s in sites.values() if key in s]
        if not vals:
            continue
        total = sum(n for _, n in vals)
        found[f"site_{key}_mean"] = sum(v * n for v, n in vals) / max(1, total)
        found[f"site_{key}_min"] = min(v for v, _ in vals)
        found[f"site_{key}_max"] = max(v for v, _ in vals)
    return found


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run_cfg = context.run_config
    cfg = load_config(str(run_cfg["config"]))
    fed = _federated(cfg, str(run_cfg["config"]))
    run_dir = Path(str(run_cfg["run-dir"]))
    home = Path(str(run_cfg["home"])) if run_cfg.get("home") else default_home()
    glob = GlobalModel(cfg, home)
    state, done = glob.initial_state(), 0
    found = rounds.last_round(run_dir)
    if found is not None:  # a restarted server continues from its last saved round
        done, state = found
        log.info("continuing after round %d from %s", done, run_dir / rounds.ROUNDS_DIR)
    if done >= fed.rounds:
        log.info("all %d rounds are done", fed.rounds)
    else:
        n_expected = int(run_cfg.get("expected-clients", fed.min_clients))
        base = FedProx if fed.strategy == "fedprox" else FedAvg
        kwargs: dict[str, Any] = {"proximal_mu": fed.proximal_mu} \
            if fed.strategy == "fedprox" else {}
        per_round = fed.clients_per_round or n_expected
        # Flower samples max(int(connected * fraction_train), min_train_nodes) clients; with
        # clients_per_round a tiny fraction leaves exactly min_train_nodes (0.0 would switch
        # training off)
        strategy = recording(base, run_dir, done, fed.min_clients, fed.keep_client_updates)(
            fraction_train=1e-9 if fed.clients_per_round else 1.0,
            # every connected client scores each round's global adapter on its own data
            fraction_evaluate=1.0 if fed.client_eval else 0.0,
            min_train_nodes=per_round, min_evaluate_nodes=fed.min_clients if fed.client_eval
            else 0,
            min_available_nodes=max(n_expected, fed.min_clients), **kwargs)
        sent = ConfigRecord({
            # 0 stands for "not set" (a ConfigRecord holds no None)
            "local-steps": fed.local_steps or 0, "local-epochs": fed.local_epochs or 0.0,
            "ffa-lora": fed.ffa_lora,
            "base-model": cfg.model.base, "base-fingerprint": model_fingerprint(glob.model_dir),
            "lora": f"method={cfg.train.method}, r={cfg.train.lora.r}, "
                    f"targets={cfg.train.lora.target_modules}"})
        evaluator = server_evaluator(cfg, glob) if fed.eval_file else None

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None  # Flower's call before round 1: nothing trained yet
            tensors = _tensors(arrays)
            glob.load(tensors)
            record = strategy.pending
            if evaluator is not None:
                record.update(evaluator())
            rounds.save_round(run_dir, record["round"], tensors, glob.save_adapter,
                              strategy.updates)
            rounds.append_round(run_dir, record)
            found = {k: record[k] for k in SERVER_METRICS if record.get(k) is not None}
            return MetricRecord(found) if found else None

        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(state),
                                num_rounds=fed.rounds - done, train_config=sent,
                                evaluate_config=sent, evaluate_fn=after_round)
        state = _tensors(result.arrays)
    glob.load(state)
    glob.save_adapter(run_dir / "adapter")
    save_merged(glob.model, glob.tokenizer, run_dir / "merged")
    rounds.write_report(run_dir, cfg.name or run_dir.name, cfg.model.base,
                        rounds.federation_settings(fed))


# what the server measures each round on federated.eval_file
SERVER_METRICS = ("global_valid_loss", "global_accuracy", "global_macro_f1")


def server_evaluator(cfg: RunConfig, glob: GlobalModel) -> Any:
    """The global model each round on ``federated.eval_file``: validation loss as the loop
    computes it (same encoding, same objective) and, for classification, accuracy and
    macro-F1 as the run's evaluation computes them (``eval.mode``, by scoring by default)."""
    from tunesmith.flows.assess import evaluate_lm
    from tunesmith.flows.steps import encode_examples, read_examples, training_encoder
    from tunesmith.training.loop import evaluate_objective
    from tunesmith.training.objectives import LMObjective

    assert cfg.federated is not None and cfg.federated.eval_file is not None
    examples = read_examples(cfg.federated.eval_file, cfg.data, [])
    classify = cfg.eval.task == "classification"
    labels = (cfg.eval.labels or sorted({ex.label for ex in examples})) if classify else None
    rows, _ = encode_examples(training_encoder(glob.tokenizer, cfg, labels), examples,
                              max_length=cfg.data.max_length, split="eval")
    objective = LMObjective(glob.model, pad_id=glob.tokenizer.pad_token_id)

    def evaluate() -> dict[str, float]:
        glob.model.eval()
        loss = evaluate_objective(objective, rows, batch_size=cfg.eval.batch_size,
                                  device=torch.device("cpu"))["valid_loss"]
        found = {"global_valid_loss": loss} if math.isfinite(loss) else {}
        if classify:
            metrics = evaluate_lm(glob.model, glob.tokenizer, examples, cfg.eval, labels,
                                  score_labels=False).metrics
            found.update({f"global_{k}": float(metrics[k]) for k in ("accuracy", "macro_f1")
                          if metrics.get(k) is not None})
        return found

    return evaluate
