"""The ``federated:`` section: who trains, how their updates are combined, for how many rounds.

``tunesmith federated simulate`` runs it on one machine (a Flower SuperLink and one SuperNode
per client, each its own process); ``federated server`` / ``federated client`` run it across
machines. ``tunesmith run`` ignores it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunesmith.config.base import _Section


class FederatedConfig(_Section):
    clients: list[Path] | None = Field(
        None, description="One data file per client (simulate): each client trains on its own "
        "file and splits its own validation examples off it. Empty: partition data.train_file "
        "(see partition).")
    partition: Literal["iid", "label_skew", "by_column"] = Field(
        "iid", description="Without clients: how the run's training split is dealt to "
        "clients (seeded by train.seed). 'iid': at random, equal sizes, num_clients of them. "
        "'label_skew': each label's examples divided by Dirichlet(alpha) shares per client. "
        "'by_column': one client per distinct value of partition_column (the sites as the "
        "data names them; num_clients is not used).")
    partition_column: str | None = Field(
        None, description="partition: by_column: the top-level field of every training row "
        "that names its site (e.g. 'hospital'); a row without it is an error naming its line.")
    num_clients: int = Field(
        2, ge=1, description="Without clients: how many clients the training split is "
        "partitioned into.")
    alpha: float = Field(
        0.5, gt=0, description="label_skew: Dirichlet concentration; small values give each "
        "client few labels, large values approach iid.")
    rounds: int = Field(3, ge=1, description="Federated rounds.")
    clients_per_round: int | None = Field(
        None, ge=1, description="Clients sampled for training each round. Empty: all connected "
        "clients.")
    min_clients: int = Field(
        1, ge=1, description="A round needs at least this many connected clients to start, and "
        "goes on when a client fails as long as this many answer.")
    local_steps: int | None = Field(
        None, ge=1, description="Optimiser steps each client takes per round, starting from the "
        "global adapter (the same train function and settings as `tunesmith run`). Every "
        "client takes the same number, whatever its data size. Empty: 10, unless local_epochs "
        "is set.")
    local_epochs: float | None = Field(
        None, gt=0, description="Instead of local_steps: each client passes over this share of "
        "its own training examples per round (ceil(local_epochs x examples / batch_size) "
        "steps, at least 1), so a client with more data does more of the work, as in "
        "McMahan et al.'s FedAvg. rounds x local_epochs = 1 gives the federation the steps "
        "of one centralised epoch over the union of the clients' data.")
    strategy: Literal["fedavg", "fedprox"] = Field(
        "fedavg", description="'fedavg': the global adapter is the example-count-weighted mean "
        "of the clients'. 'fedprox': the same mean, and each client adds "
        "proximal_mu/2 * ||w - w_global||^2 to its loss (keeps clients with skewed data close "
        "to the global adapter).")
    proximal_mu: float = Field(0.01, ge=0, description="fedprox: weight of the proximal term.")
    ffa_lora: bool = Field(
        False, description="LoRA: freeze every A matrix at its seeded initialisation and train "
        "only B (FFA-LoRA, Sun et al. 2024). Averaging A and B separately is not averaging "
        "B·A; with A shared and fixed, the mean of the B's gives exactly the mean update.")
    eval_file: Path | None = Field(
        None, description="Data the server scores each round's global adapter on (validation "
        "loss and, for classification, accuracy and macro-F1 as eval.mode computes them; in "
        "rounds.jsonl and the report). Empty: no server-side evaluation.")
    client_eval: bool = Field(
        True, description="After each round every client scores the new global adapter on its "
        "own validation split (loss and, for classification, accuracy and macro-F1 as eval.mode "
        "computes them): the per-site figures, whose spread across sites is a fairness figure, "
        "in rounds.jsonl and the report. Costs each client a model load and one pass over its "
        "validation split per round.")
    secure_aggregation: bool = Field(
        False, description="Flower's SecAgg+ (Bell et al. 2020): each client masks its "
        "example-weighted update with secrets shared among the round's clients, so the server "
        "learns only the round's weighted mean, never one client's tensors (each site keeps "
        "its own last update in its work directory, work/last-update.safetensors). Clients "
        "quantise before masking (2^22 levels over [-8, 8]): the mean differs from the plain "
        "one by up to about 4e-6 x max_client_examples x clients / examples per weight. "
        "Needs 2 or more clients per round; a round survives a "
        "client dropping while 2/3 of the round's clients (at least 2) remain. Per-client "
        "metrics and example counts still arrive in the clear.")
    max_client_examples: int = Field(
        1000, ge=1, description="secure_aggregation: the largest client's number of training "
        "examples (SecAgg+'s max_weight). Weights are scaled by it before quantisation: much "
        "larger than the real counts costs precision, smaller risks overflow (Flower warns).")
    keep_client_updates: bool = Field(
        False, description="Keep each client's update of every round as "
        "rounds/round-N/client-<node>.safetensors (for audits; only tensors ever arrive).")

    @model_validator(mode="after")
    def _enough_clients(self) -> FederatedConfig:
        if self.local_epochs is not None and self.local_steps is not None:
            raise ValueError("set local_steps or local_epochs, not both: one says how long "
                             "each client trains per round")
        if self.local_epochs is None and self.local_steps is None:
            self.local_steps = 10
        by_column = self.partition == "by_column" and not self.clients
        if by_column and not self.partition_column:
            raise ValueError("partition: by_column needs partition_column: the field of each "
                             "row that names its site")
        # by_column: the number of clients is known once the data is read (client_files)
        n = len(self.clients) if self.clients else None if by_column else self.num_clients
        if n is not None and self.min_clients > n:
            raise ValueError(f"min_clients ({self.min_clients}) is more than the {n} "
                             "client(s) configured")
        if self.secure_aggregation:
            if self.keep_client_updates:
                raise ValueError("keep_client_updates cannot go with secure_aggregation: under "
                                 "SecAgg+ the server never holds one client's update (each "
                                 "site keeps its own); set one of them to false")
            if (n is not None and n < 2) or (self.clients_per_round or 2) < 2:
                raise ValueError("secure_aggregation needs at least 2 clients per round (the "
                                 "server learns only their sum); add clients or set "
                                 "secure_aggregation: false")
        if self.clients_per_round is not None and self.clients_per_round < self.min_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) is below "
                             f"min_clients ({self.min_clients})")
        return self
