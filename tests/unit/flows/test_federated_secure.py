"""Secure aggregation's pieces without Flower's processes: the config's refusals, the app the
SuperNodes are told to run, what a site keeps, and how the server records a SecAgg+ round
(only counts and metrics per client; the aggregate is Flower's). The real protocol between
processes: tests/flow/test_federated_secure.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flwr.common import Code, FitRes, Status  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tunesmith.config import FederatedConfig, parse_config  # noqa: E402
from tunesmith.errors import ConfigError  # noqa: E402
from tunesmith.flows.federated import launch  # noqa: E402
from tunesmith.flows.federated.rounds import federation_settings  # noqa: E402
from tunesmith.flows.federated.secure import (  # noqa: E402
    SecureRounds,
    _named,
    _parameters,
    keep_own_update,
)


def _cfg(**federated):
    return parse_config({"model": {"base": "tiny"}, "data": {"train_file": "a.jsonl"},
                         "federated": {"clients": ["a.jsonl", "b.jsonl", "c.jsonl"],
                                       **federated}}, base_dir=Path("/tmp"))


def test_secure_aggregation_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ConfigError, match="keep_client_updates cannot go with secure_agg"):
        _cfg(secure_aggregation=True, keep_client_updates=True)
    with pytest.raises(ConfigError, match="at least 2 clients per round"):
        _cfg(secure_aggregation=True, clients_per_round=1)
    with pytest.raises(ConfigError, match="at least 2 clients per round"):
        parse_config({"model": {"base": "tiny"}, "data": {"train_file": "a.jsonl"},
                      "federated": {"num_clients": 1, "secure_aggregation": True}})
    fed = _cfg(secure_aggregation=True).federated
    assert isinstance(fed, FederatedConfig) and fed.max_client_examples == 1000
    assert "SecAgg+" in federation_settings(fed)["secure_aggregation"]
    assert "secure_aggregation" not in federation_settings(_cfg().federated)


def test_the_server_names_the_secure_apps_for_every_supernode(tmp_path) -> None:
    plain = launch.write_app(tmp_path / "plain", {"config": "c.yaml"})
    secure = launch.write_app(tmp_path / "secure", {"config": "c.yaml"}, secure=True)
    text = (secure / "pyproject.toml").read_text(encoding="utf-8")
    assert 'clientapp = "tunesmith.flows.federated.secure:client_app"' in text
    assert 'serverapp = "tunesmith.flows.federated.secure:server_app"' in text
    assert "federated.apps:client_app" in (plain / "pyproject.toml").read_text(encoding="utf-8")


def test_a_site_keeps_its_own_update_atomically_with_its_weight(tmp_path) -> None:
    state = {"x.lora_B.weight": torch.randn(3, 2), "x.lora_A.weight": torch.randn(2, 3)}
    keep_own_update(tmp_path, state, 1, 10)
    path = keep_own_update(tmp_path, {k: v + 1 for k, v in state.items()}, 2, 12)
    assert [p.name for p in tmp_path.iterdir()] == ["last-update.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"round": "2", "num_examples": "12"}
    torch.testing.assert_close(load_file(path)["x.lora_A.weight"], state["x.lora_A.weight"] + 1)


def test_tensors_travel_by_name_in_a_fixed_order() -> None:
    state = {"b.lora_B.weight": torch.randn(2, 2), "a.lora_A.weight": torch.randn(3)}
    names = sorted(state)
    back = _named(_parameters(state, names), names)
    assert list(back) == names
    for k in names:
        torch.testing.assert_close(back[k], state[k])


def _run(min_clients: int = 2):
    fed = _cfg(min_clients=min_clients).federated
    state = {"l.lora_B.weight": torch.zeros(2, 2)}
    return SimpleNamespace(fed=fed, state=state, expected=3, done=1, cfg=None, glob=None,
                           settings=lambda: {"local-steps": 2, "ffa-lora": False})


def _fit(aggregate: dict[str, torch.Tensor], n: int, loss: float):
    return (SimpleNamespace(node_id=n), FitRes(Status(Code.OK, "ok"),
                                               _parameters(aggregate, sorted(aggregate)), n,
                                               {"train_loss": loss}))


def test_a_secure_round_records_counts_and_metrics_and_keeps_flowers_aggregate() -> None:
    run = _run()
    rounds = SecureRounds(run, sorted(run.state))  # type: ignore[arg-type]
    # what Flower's SecAgg+ workflow hands over: every FitRes carries the unmasked mean
    mean = {"l.lora_B.weight": torch.full((2, 2), 0.25)}
    params, _ = rounds.aggregate_fit(1, [_fit(mean, 10, 2.0), _fit(mean, 30, 1.0)], [])
    torch.testing.assert_close(_named(params, sorted(mean))["l.lora_B.weight"],
                               mean["l.lora_B.weight"])
    record = rounds.pending
    assert record["round"] == 2  # the second round of a run that had done one
    assert record["examples"] == 40 and record["train_loss"] == pytest.approx(1.25)
    assert record["clients"]["10"]["received"] == {"masked_vector": [],
                                                   "metrics": ["train_loss"]}
    # fewer answers than min_clients: the global adapter is kept
    assert rounds.aggregate_fit(2, [_fit(mean, 10, 2.0)], [RuntimeError("gone")]) == (None, {})
    assert rounds.pending["skipped"] and rounds.pending["failures"][0]["reason"] == "gone"
