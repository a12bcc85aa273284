"""The federated rounds under secure aggregation (``federated.secure_aggregation``): Flower's
SecAgg+ protocol, so the server learns each round's weighted mean and never one client's
update.

Flower (1.42) runs SecAgg+ in its workflow API only: ``SecAggPlusWorkflow`` inside a
``DefaultWorkflow`` with a ``LegacyContext`` and a ``flwr.server.strategy`` strategy on the
server, and the ``secaggplus_mod`` client mod, which masks the ``FitRes`` a ClientApp
returns. Both speak the FitIns/FitRes records, not the Message-API records the plain pair in
``apps`` uses; this module is the same rounds in that dialect. What a client trains and
evaluates, what the server saves and scores, are ``apps``'s; key agreement, secret sharing,
masking, dropout recovery and the sum are Flower's.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_evaluate_workflow
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from tunesmith.flows.federated.apps import (
    ServerRun,
    evaluate_round,
    round_record,
    site_spread,
    train_round,
    work_dir_of,
)

log = logging.getLogger("tunesmith")

# each client's private key is split among all the round's clients; 2/3 of them (at least
# 2) reconstruct a dropped client's masks, fewer than that learn nothing
RECONSTRUCTION_THRESHOLD = 2 / 3
OWN_UPDATE = "last-update.safetensors"


def _named(parameters: Parameters, names: list[str]) -> dict[str, torch.Tensor]:
    arrays = parameters_to_ndarrays(parameters)
    return {n: torch.from_numpy(a.copy()) for n, a in zip(names, arrays, strict=True)}


def _parameters(state: dict[str, torch.Tensor], names: list[str]) -> Parameters:
    return ndarrays_to_parameters([state[n].detach().float().cpu().numpy() for n in names])


def _names(config: dict[str, Any]) -> list[str]:
    # the tensor names travel as one string: a FitIns config holds scalars
    return str(config["tensor-names"]).split("\n")


# ----------------------------------------------------------------------------- client

client_app = ClientApp(mods=[secaggplus_mod])


def keep_own_update(work_dir: Path, state: dict[str, torch.Tensor], round_number: int,
                    num_examples: int) -> Path:
    """What this site contributed to the round (its update and the example count that weighs
    it), kept at the site, since the server never sees it: written atomically, replacing the
    previous round's."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path, tmp = work_dir / OWN_UPDATE, work_dir / f".{OWN_UPDATE}.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
              metadata={"round": str(round_number), "num_examples": str(num_examples)})
    os.replace(tmp, path)
    return path


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """A round's training; ``secaggplus_mod`` masks the reply's tensors before they leave."""
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    sent, names = dict(ins.config), _names(ins.config)
    update = train_round(sent, context, _named(ins.parameters, names))
    keep_own_update(work_dir_of(context), update.state, int(sent["server-round"]),
                    update.num_examples)
    res = FitRes(Status(Code.OK, "ok"), _parameters(update.state, names), update.num_examples,
                 dict(update.metrics))
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """The round's global adapter on this client's validation split: numbers only."""
    ins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    n, metrics = evaluate_round(dict(ins.config), context,
                                _named(ins.parameters, _names(ins.config)))
    res = EvaluateRes(Status(Code.OK, "ok"), float(metrics.get("valid_loss", 0.0)), n,
                      dict(metrics))
    return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)


# ----------------------------------------------------------------------------- server

server_app = ServerApp()


class SecureRounds(FedAvg):
    """Flower's FedAvg for the SecAgg+ workflow, recording each round as ``apps`` does.

    Under SecAgg+ every ``FitRes`` handed to ``aggregate_fit`` already carries the unmasked
    weighted mean (Flower's workflow replaces each client's parameters with it); what is per
    client is only its example count and metrics.
    """

    def __init__(self, run: ServerRun, names: list[str]) -> None:
        fed = run.fed
        settings = {**run.settings(), "tensor-names": "\n".join(names)}
        if fed.strategy == "fedprox":
            # FedProx aggregates as FedAvg does; the proximal term is the clients'
            settings["proximal-mu"] = fed.proximal_mu

        def config(server_round: int) -> dict[str, Any]:
            return {**settings, "server-round": server_round}

        super().__init__(
            fraction_fit=1e-9 if fed.clients_per_round else 1.0,
            fraction_evaluate=1.0 if fed.client_eval else 0.0,
            min_fit_clients=fed.clients_per_round or run.expected,
            min_evaluate_clients=fed.min_clients,
            min_available_clients=max(run.expected, fed.min_clients),
            initial_parameters=_parameters(run.state, names),
            on_fit_config_fn=config, on_evaluate_config_fn=config)
        self.run, self.names = run, names
        self.pending: dict[str, Any] = {}

    def _round(self, server_round: int) -> int:
        return server_round + self.run.done

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        # as in ``apps``: the first round waits for every expected client; later rounds go on
        # with min_clients, so a client that died is not waited for
        if server_round > 1:
            self.min_available_clients = self.run.fed.min_clients
            self.min_fit_clients = min(self.min_fit_clients, max(
                self.run.fed.min_clients, client_manager.num_available()))
        return super().configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(self, server_round: int, parameters: Any,
                           client_manager: Any) -> Any:
        self.min_available_clients = self.run.fed.min_clients
        return super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        clients = {str(proxy.node_id): {
            "num_examples": int(res.num_examples), "metrics": dict(res.metrics),
            # per client the server holds a masked vector and these numbers, nothing else
            "received": {"masked_vector": [], "metrics": sorted(res.metrics)}}
            for proxy, res in results}
        lost = [{"node": "?", "reason": str(f)} for f in failures]
        self.pending = round_record(self._round(server_round), clients, lost)
        if len(results) < self.run.fed.min_clients:
            log.warning("round %s: %d client(s) answered, fewer than min_clients (%d); the "
                        "global adapter is kept", self._round(server_round), len(results),
                        self.run.fed.min_clients)
            self.pending["skipped"] = True
            return None, {}
        return results[0][1].parameters, {}

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        for f in failures:
            log.warning("round %s: a client failed to evaluate: %s", self._round(server_round),
                        f)
        sites = {str(proxy.node_id): {"num_examples": int(res.num_examples),
                                      **{k: v for k, v in res.metrics.items()
                                         if isinstance(v, int | float) and math.isfinite(v)}}
                 for proxy, res in results}
        self.pending["sites"] = sites
        self.pending.update(site_spread(sites))
        return super().aggregate_evaluate(server_round, results, failures) if results \
            else (None, {})

    def global_state(self, context: LegacyContext) -> dict[str, torch.Tensor]:
        record = context.state.array_records[MAIN_PARAMS_RECORD]
        found = _named(compat.arrayrecord_to_parameters(record, keep_input=True), self.names)
        # SecAgg+ dequantises in float64; the adapter keeps the model's dtypes
        return {n: t.to(self.run.state[n].dtype) for n, t in found.items()}

    def evaluate_and_keep(self, grid: Grid, context: LegacyContext) -> None:
        """The workflow's evaluation step, then the round saved as ``apps`` saves it."""
        default_evaluate_workflow(grid, context)
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        record = self.pending
        if record.get("round") != self._round(server_round):
            # the protocol halted (too few clients for the reconstruction threshold)
            log.warning("round %s: secure aggregation did not complete; the global adapter "
                        "is kept", self._round(server_round))
            record = {"round": self._round(server_round), "clients": {}, "failures": [],
                      "examples": 0, "skipped": True}
        self.run.keep_round(record, self.global_state(context), {})


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run = ServerRun.start(context)
    state = run.state
    if run.done < run.fed.rounds:
        names = sorted(state)
        strategy = SecureRounds(run, names)
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=run.fed.rounds - run.done),
                               strategy=strategy)
        DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(num_shares=1.0,
                                            reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
                                            max_weight=float(run.fed.max_client_examples)),
            evaluate_workflow=strategy.evaluate_and_keep)(grid, legacy)
        state = strategy.global_state(legacy)
    run.finish(state)
