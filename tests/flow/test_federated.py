"""`tunesmith federated simulate` on the tiny model: a real Flower SuperLink and three
SuperNodes (each its own process on 127.0.0.1), two rounds of a few local steps.

Marked slow: Flower's Deployment Engine starts a ServerApp process and, per client and round,
a ClientApp process (each importing torch and transformers), and its SuperNodes poll every
3 s; the module takes about 5 minutes on 2 cores, most of it waiting.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import federated_config, review_rows, write_jsonl
from tunesmith.flows.federated import simulate

pytest.importorskip("flwr", reason="federated training needs `pip install -e '.[federated]'`")
N_CLIENTS, ROUNDS = 3, 2
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                  test_home: Path):
    root = tmp_path_factory.mktemp("federated")
    rows = review_rows(72)
    files = [write_jsonl(root / f"client-{i}.jsonl", rows[:60][i::N_CLIENTS][: 12 + 4 * i])
             for i in range(N_CLIENTS)]
    held_out = write_jsonl(root / "server-eval.jsonl", rows[60:])
    path = federated_config(root, tiny_model_dir, files, rounds=ROUNDS,
                            keep_client_updates=True, eval_file=held_out.name)
    return simulate(path, home=test_home), rows


def test_rounds_average_what_clients_sent(federated_run) -> None:
    result, _ = federated_run
    run_dir = result.run_dir
    assert [r["round"] for r in result.rounds] == list(range(1, ROUNDS + 1))
    last = result.rounds[-1]
    assert len(last["clients"]) == N_CLIENTS and not last["failures"]
    # the final global adapter is the example-count-weighted mean of the last round's updates
    final = load_file(run_dir / "rounds" / f"round-{ROUNDS}" / "global.safetensors")
    total = sum(c["num_examples"] for c in last["clients"].values())
    sent = {node: load_file(run_dir / "rounds" / f"round-{ROUNDS}" / f"client-{node}.safetensors")
            for node in last["clients"]}
    for name, tensor in final.items():
        mean = sum(sent[n][name] * (c["num_examples"] / total)
                   for n, c in last["clients"].items())
        torch.testing.assert_close(tensor, mean, rtol=1e-5, atol=1e-6)
    # the clients trained: their updates differ from each other and B left zero
    nodes = list(sent)
    name = next(k for k in final if "lora_B" in k)
    assert not torch.equal(sent[nodes[0]][name], sent[nodes[1]][name])
    assert final[name].abs().sum() > 0
    for f in ("adapter/adapter_config.json", "merged/config.json", "report.md", "report.html",
              "rounds.png", "rounds.jsonl"):
        assert (run_dir / f).is_file(), f
    # the server scored each round's global model on its held-out file
    for record in result.rounds:
        assert record["global_valid_loss"] > 0 and 0 <= record["global_accuracy"] <= 1
    assert "server accuracy" in (run_dir / "report.html").read_text(encoding="utf-8")
    # and every client scored it on its own validation split: accuracy per round and per site
    for record in result.rounds:
        assert set(record["sites"]) == set(record["clients"])
        for site in record["sites"].values():
            assert site["num_examples"] > 0 and 0 <= site["accuracy"] <= 1
            assert all(isinstance(v, int | float) for v in site.values())
        assert record["site_accuracy_min"] <= record["site_accuracy_mean"] \
            <= record["site_accuracy_max"]
    assert (run_dir / "sites.png").is_file()
    assert "## Sites" in (run_dir / "report.md").read_text(encoding="utf-8")


def test_server_received_only_tensors_counts_and_numbers(federated_run) -> None:
    result, rows = federated_run
    texts = [m["content"] for r in rows for m in r["messages"]]
    raw = (result.run_dir / "rounds.jsonl").read_text(encoding="utf-8")
    for record in map(json.loads, raw.splitlines()):
        for client in record["clients"].values():
            assert set(client["received"]) == {"arrays", "metrics"}
            assert all(isinstance(v, int | float) for v in client["metrics"].values())
            assert isinstance(client["num_examples"], int) and client["num_examples"] > 0
            assert all("lora_" in k for k in client["received"]["arrays"])
    assert not any(t in raw for t in texts if len(t) > 3)
