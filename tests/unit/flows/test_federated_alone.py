"""`tunesmith federated alone`: each client trained alone on its own file, scored on the
server's eval_file by the server's own evaluation (tiny model, no Flower processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr", reason="federated training needs `pip install -e '.[federated]'`")

from tests.helpers import federated_config, review_rows, write_jsonl  # noqa: E402
from tunesmith.config import load_config  # noqa: E402
from tunesmith.errors import ConfigError  # noqa: E402
from tunesmith.flows.federated import rounds  # noqa: E402
from tunesmith.flows.federated.alone import alone  # noqa: E402
from tunesmith.flows.federated.apps import GlobalModel, server_evaluator  # noqa: E402

ROUNDS, LOCAL_STEPS = 2, 2


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
             test_home: Path):
    root = tmp_path_factory.mktemp("alone")
    rows = review_rows(56)
    files = [write_jsonl(root / f"client-{i}.jsonl", rows[:40][i::2][: 12 + 8 * i])
             for i in range(2)]
    held_out = write_jsonl(root / "server-eval.jsonl", rows[40:])
    path = federated_config(root, tiny_model_dir, files, rounds=ROUNDS,
                            local_steps=LOCAL_STEPS, eval_file=held_out.name,
                            ffa_lora=True)
    # a finished federated run's record, so the report gains the comparison
    run_dir = root / "run"
    run_dir.mkdir()
    rounds.append_round(run_dir, {"round": ROUNDS, "clients": {}, "failures": [],
                                  "examples": 30, "train_loss": 1.0, "global_accuracy": 0.75})
    return path, alone(path, home=test_home), test_home


def test_each_client_trains_alone_for_the_whole_federations_steps(baseline) -> None:
    path, result, home = baseline
    assert [c["client"] for c in result.clients] == [0, 1]
    # every row a client does not validate on, rounds * local_steps steps, as in the federation
    assert result.clients[0]["num_examples"] < result.clients[1]["num_examples"]
    for c in result.clients:
        assert c["steps"] == ROUNDS * LOCAL_STEPS
        assert 0.0 <= c["accuracy"] <= 1.0 and c["valid_loss"] > 0
    assert result.mean_accuracy == pytest.approx(
        sum(c["accuracy"] for c in result.clients) / 2)
    assert rounds.read_alone(result.run_dir) == result.clients
    saved = json.loads((result.run_dir / "alone" / "alone.json").read_text())
    assert [c["steps"] for c in saved["clients"]] == [ROUNDS * LOCAL_STEPS] * 2


def test_the_recorded_scores_are_the_saved_models_on_eval_file(baseline) -> None:
    """Scoring each saved model again with the server's evaluator gives what was recorded,
    and the two clients' models differ from each other and from the initial adapter."""
    path, result, home = baseline
    cfg = load_config(path)
    glob = GlobalModel(cfg, home)
    initial = glob.initial_state()
    evaluate = server_evaluator(cfg, glob)
    states = [load_file(result.run_dir / "alone" / f"client-{i}.safetensors") for i in (0, 1)]
    name = next(k for k in initial if "lora_B" in k)
    assert not torch.equal(states[0][name], states[1][name])
    assert not torch.equal(states[0][name], initial[name])
    # FFA-LoRA as configured: A stays frozen, so only the B matrices were trained and kept
    assert set(states[0]) == set(initial) and not any("lora_A" in k for k in initial)
    for c, state in zip(result.clients, states, strict=True):
        glob.load(state)
        again = evaluate()
        assert again["global_valid_loss"] == pytest.approx(c["valid_loss"], rel=1e-5)
        assert again["global_accuracy"] == pytest.approx(c["accuracy"])


def test_the_report_compares_the_global_model_with_the_clients_alone(baseline) -> None:
    path, result, home = baseline
    report = (result.run_dir / "report.md").read_text(encoding="utf-8")
    assert "## Clients alone" in report
    mean = result.mean_accuracy
    assert f"Mean accuracy of the clients alone {mean:.4f}" in report
    assert f"the global model after round {ROUNDS} 0.7500" in report
    assert f"({100 * (0.75 - mean):+.1f} points over the mean)" in report


def test_a_second_baseline_needs_overwrite_and_eval_file_is_required(baseline, tmp_path,
                                                                     tiny_model_dir) -> None:
    path, result, home = baseline
    with pytest.raises(ConfigError, match="--overwrite"):
        alone(path, home=home)
    files = [write_jsonl(tmp_path / f"c{i}.jsonl", review_rows(12)) for i in (0, 1)]
    no_eval = federated_config(tmp_path, tiny_model_dir, files)
    with pytest.raises(ConfigError, match="federated.eval_file"):
        alone(no_eval, home=home)
