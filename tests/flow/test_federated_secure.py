"""`tunesmith federated simulate` with `secure_aggregation: true`: Flower's SecAgg+ between a
real SuperLink and three SuperNodes on 127.0.0.1, two rounds on the tiny model.

The server never holds one client's update, so the check runs the other way round: each site
keeps what it contributed (work/last-update.safetensors), and the global adapter must be
their example-weighted mean, up to SecAgg+'s quantisation. Marked slow (about 3 minutes on 2
cores, most of it Flower's processes starting and polling).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import federated_config, review_rows, write_jsonl
from tunesmith.flows.federated import simulate

pytest.importorskip("flwr", reason="federated training needs `pip install -e '.[federated]'`")
N_CLIENTS, ROUNDS = 3, 2
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory, tiny_model_dir, test_home):
    root = tmp_path_factory.mktemp("secure")
    rows = review_rows(72)
    files = [write_jsonl(root / f"client-{i}.jsonl", rows[:60][i::N_CLIENTS][: 12 + 4 * i])
             for i in range(N_CLIENTS)]
    held_out = write_jsonl(root / "server-eval.jsonl", rows[60:])
    # max_client_examples near the largest client's count (20 messages, 18 of them trained
    # on): SecAgg+'s quantisation error grows with max_weight / total examples
    path = federated_config(root, tiny_model_dir, files, rounds=ROUNDS, secure_aggregation=True,
                            max_client_examples=20, eval_file=held_out.name)
    return simulate(path, home=test_home), rows


def _kept(run_dir, i: int) -> tuple[dict[str, torch.Tensor], int, int]:
    path = run_dir / "clients" / f"work-{i}" / "last-update.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return load_file(path), int(meta["num_examples"]), int(meta["round"])


def test_the_global_adapter_is_the_weighted_mean_of_what_the_sites_kept(secure_run) -> None:
    result, _ = secure_run
    run_dir = result.run_dir
    assert [r["round"] for r in result.rounds] == list(range(1, ROUNDS + 1))
    last = result.rounds[-1]
    assert len(last["clients"]) == N_CLIENTS and not last["failures"]
    assert not last.get("skipped")
    kept = [_kept(run_dir, i) for i in range(N_CLIENTS)]
    assert {r for _, _, r in kept} == {ROUNDS}
    assert sorted(n for _, n, _ in kept) == sorted(c["num_examples"]
                                                   for c in last["clients"].values())
    total = sum(n for _, n, _ in kept)
    final = load_file(run_dir / "rounds" / f"round-{ROUNDS}" / "global.safetensors")
    worst = 0.0
    for name, tensor in final.items():
        mean = sum(state[name] * (n / total) for state, n, _ in kept)
        # SecAgg+ quantises each weighted update to 2^22 levels over [-8, 8] before masking:
        # about 4e-6 x 20 / 43 per client and weight here
        torch.testing.assert_close(tensor, mean, rtol=0, atol=2e-5)
        worst = max(worst, float((tensor - mean).abs().max()))
    b = next(k for k in final if "lora_B" in k)
    assert final[b].abs().sum() > 0, "the clients trained"
    assert not torch.equal(kept[0][0][b], kept[1][0][b])
    print(f"largest difference from the plain weighted mean: {worst:.2e}")


def test_the_server_held_no_client_update_and_no_text(secure_run) -> None:
    result, rows = secure_run
    run_dir = result.run_dir
    assert not list((run_dir / "rounds").glob("round-*/client-*"))
    raw = (run_dir / "rounds.jsonl").read_text(encoding="utf-8")
    for record in map(json.loads, raw.splitlines()):
        for client in record["clients"].values():
            assert set(client["received"]) == {"masked_vector", "metrics"}
            assert all(isinstance(v, int | float) for v in client["metrics"].values())
        # the server-side evaluation and the sites' own scores still run
        assert record["global_valid_loss"] > 0 and 0 <= record["global_accuracy"] <= 1
        assert set(record["sites"]) == set(record["clients"])
    texts = [m["content"] for r in rows for m in r["messages"]]
    assert not any(t in raw for t in texts if len(t) > 3)
    assert "SecAgg+" in (run_dir / "report.md").read_text(encoding="utf-8")
    for f in ("adapter/adapter_config.json", "merged/config.json"):
        assert (run_dir / f).is_file(), f
