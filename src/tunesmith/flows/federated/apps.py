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
from dataclasses import dataclass
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
from tunesmith.flows.federated.local import (
    LocalUpdate,
    evaluate_locally,
    freeze_lora_a,
    train_locally,
)
from tunesmith.flows.federated.scoring import RoundScorer
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


def work_dir_of(context: Context) -> Path:
    """Where a client trains (its node config's work-dir, else beside its data file)."""
    node = context.node_config
    return Path(str(node.get("work-dir", Path(str(node["data-file"])).parent / "work")))


def client_setup(sent: Any, context: Context) -> tuple[RunConfig, Path, Path]:
    """(run config, home, work dir) of a client, after checking that what the server sent
    (``sent``: its round settings) is for this client's base model and adapter shape."""
    node = context.node_config
    cfg = load_config(str(node["config"]))
    home = Path(str(node["home"])) if "home" in node else default_home()
    check_same_setup(cfg, resolve_model(cfg.model.base, home=home), sent)
    return cfg, home, work_dir_of(context)


def train_round(sent: Any, context: Context, state: dict[str, torch.Tensor]) -> LocalUpdate:
    """This client's round from the global adapter ``state`` with the server's settings."""
    cfg, home, work_dir = client_setup(sent, context)
    return train_locally(
        cfg, Path(str(context.node_config["data-file"])), work_dir, state, home=home,
        local_steps=int(sent["local-steps"]), round_number=int(sent["server-round"]),
        proximal_mu=float(sent.get("proximal-mu", 0.0)), ffa=bool(sent["ffa-lora"]),
        local_epochs=float(sent.get("local-epochs", 0.0)) or None)


def evaluate_round(sent: Any, context: Context, state: dict[str, torch.Tensor]
                   ) -> tuple[int, dict[str, float]]:
    """The global adapter ``state`` on this client's validation split: (size, metrics)."""
    cfg, home, work_dir = client_setup(sent, context)
    return evaluate_locally(cfg, Path(str(context.node_config["data-file"])), work_dir, state,
                            home=home, ffa=bool(sent["ffa-lora"]))


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    sent = msg.content["config"]
    update = train_round(sent, context, _tensors(msg.content["arrays"]))
    # only tensors, the example count and numbers leave the client
    metrics = MetricRecord({"num-examples": update.num_examples, **update.metrics})
    return Message(RecordDict({"arrays": ArrayRecord(update.state), "metrics": metrics}),
                   reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """The round's new global adapter on this client's own validation split: numbers only."""
    n, metrics = evaluate_round(msg.content["config"], context, _tensors(msg.content["arrays"]))
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
            self.updates = {str(m.metadata.src_node_id): _tensors(m.content["arrays"])
                            for m in ok} if keep_updates else {}
            self.pending = round_record(server_round + first_round, clients, failures)
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


def round_record(round_number: int, clients: dict[str, dict[str, Any]],
                 failures: list[dict[str, str]]) -> dict[str, Any]:
    """A round's line in rounds.jsonl as the training replies make it: each client's count,
    metrics and what arrived from it, the failures (logged), the example-weighted means."""
    for f in failures:
        log.warning("round %s: client %s failed: %s", round_number, f["node"], f["reason"])

    def weighted(key: str) -> float | None:
        vals = [(c["metrics"][key], c["num_examples"]) for c in clients.values()
                if key in c["metrics"]]
        return sum(v * n for v, n in vals) / max(1, sum(n for _, n in vals)) if vals else None

    return {"round": round_number, "clients": clients, "failures": failures,
            "examples": sum(c["num_examples"] for c in clients.values()),
            "train_loss": weighted("train_loss"), "valid_loss": weighted("valid_loss")}


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


@dataclass
class ServerRun:
    """What every server (plain or secure aggregation) starts from: the config, the global
    model, and the round to continue after (a restarted server resumes from its last saved
    round)."""

    cfg: RunConfig
    fed: Any
    run_dir: Path
    glob: GlobalModel
    done: int
    state: dict[str, torch.Tensor]
    expected: int
    scorer: RoundScorer

    @classmethod
    def start(cls, context: Context) -> ServerRun:
        run_cfg = context.run_config
        cfg = load_config(str(run_cfg["config"]))
        fed = _federated(cfg, str(run_cfg["config"]))
        run_dir = Path(str(run_cfg["run-dir"]))
        home = Path(str(run_cfg["home"])) if run_cfg.get("home") else default_home()
        glob = GlobalModel(cfg, home)
        scorer = RoundScorer(run_dir, server_evaluator(cfg, glob) if fed.eval_file else None)
        state, done = glob.initial_state(), 0
        found = rounds.last_round(run_dir)
        if found is not None:
            done, state = found
            log.info("continuing after round %d from %s", done, run_dir / rounds.ROUNDS_DIR)
            unscored = rounds.saved_record(run_dir, done)
            if unscored is not None:  # killed while it scored that round
                glob.load(state)
                scorer.score(unscored, background=False)
        if done >= fed.rounds:
            log.info("all %d rounds are done", fed.rounds)
        return cls(cfg, fed, run_dir, glob, done, state,
                   int(run_cfg.get("expected-clients", fed.min_clients)), scorer)

    def settings(self) -> dict[str, Any]:
        """What each client is sent with the global adapter (a client refuses another base
        model or adapter shape); 0 stands for "not set" (a ConfigRecord holds no None)."""
        cfg, fed = self.cfg, self.fed
        return {"local-steps": fed.local_steps or 0, "local-epochs": fed.local_epochs or 0.0,
                "ffa-lora": fed.ffa_lora, "base-model": cfg.model.base,
                "base-fingerprint": model_fingerprint(self.glob.model_dir),
                "lora": f"method={cfg.train.method}, r={cfg.train.lora.r}, "
                        f"targets={cfg.train.lora.target_modules}"}

    def keep_round(self, record: dict[str, Any], tensors: dict[str, torch.Tensor],
                   updates: dict[str, dict[str, torch.Tensor]]) -> None:
        """A finished round: the global adapter saved atomically (the restart point), then
        scored on eval_file (if any) and recorded; rounds before the last are scored while
        the next one runs (``scoring``)."""
        self.scorer.wait()  # the previous round's scoring uses the model
        self.glob.load(tensors)
        rounds.save_round(self.run_dir, record["round"], tensors, self.glob.save_adapter,
                          updates, record)
        self.scorer.score(record, background=record["round"] < self.fed.rounds)

    def finish(self, state: dict[str, torch.Tensor]) -> None:
        """The final adapter, the merged model and the report."""
        self.scorer.wait()
        self.glob.load(state)
        self.glob.save_adapter(self.run_dir / "adapter")
        save_merged(self.glob.model, self.glob.tokenizer, self.run_dir / "merged")
        rounds.write_report(self.run_dir, self.cfg.name or self.run_dir.name,
                            self.cfg.model.base, rounds.federation_settings(self.fed))


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run = ServerRun.start(context)
    fed, state = run.fed, run.state
    if run.done < fed.rounds:
        base = FedProx if fed.strategy == "fedprox" else FedAvg
        kwargs: dict[str, Any] = {"proximal_mu": fed.proximal_mu} \
            if fed.strategy == "fedprox" else {}
        per_round = fed.clients_per_round or run.expected
        # Flower samples max(int(connected * fraction_train), min_train_nodes) clients; with
        # clients_per_round a tiny fraction leaves exactly min_train_nodes (0.0 would switch
        # training off)
        strategy = recording(base, run.run_dir, run.done, fed.min_clients,
                             fed.keep_client_updates)(
            fraction_train=1e-9 if fed.clients_per_round else 1.0,
            # every connected client scores each round's global adapter on its own data
            fraction_evaluate=1.0 if fed.client_eval else 0.0,
            min_train_nodes=per_round, min_evaluate_nodes=fed.min_clients if fed.client_eval
            else 0,
            min_available_nodes=max(run.expected, fed.min_clients), **kwargs)
        sent = ConfigRecord(run.settings())

        def after_round(server_round: int, arrays: ArrayRecord) -> None:
            if server_round > 0:  # 0: Flower's call before round 1, nothing trained yet
                run.keep_round(strategy.pending, _tensors(arrays), strategy.updates)

        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(state),
                                num_rounds=fed.rounds - run.done, train_config=sent,
                                evaluate_config=sent, evaluate_fn=after_round)
        state = _tensors(result.arrays)
    run.finish(state)


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
