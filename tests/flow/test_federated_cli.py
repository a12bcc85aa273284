"""`tunesmith federated` on bad input: a wrong federated section, an unreachable server."""

from __future__ import annotations

import pytest
import yaml


def test_malformed_federated_section_exits_2_naming_the_field(cli, make_config) -> None:
    path = make_config(federated={"rounds": 0, "strategy": "fedsgd"})
    code, _, err = cli("federated", "simulate", str(path))
    assert code == 2
    assert "federated.rounds" in err and "federated.strategy" in err


def test_missing_federated_section_exits_2(cli, make_config) -> None:
    code, _, err = cli("federated", "simulate", str(make_config()))
    assert code == 2 and "federated:" in err


def test_unreachable_server_exits_non_zero_with_the_address(cli, make_config, tmp_path) -> None:
    pytest.importorskip("flwr")
    from tunesmith.flows.federated.launch import free_port

    path = make_config(federated={"rounds": 1})
    data = yaml.safe_load(path.read_text())["data"]["train_file"]
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    code, _, err = cli("federated", "client", "--config", str(path), "--server", address,
                       "--data", str(tmp_path / data), "--retries", "1")
    assert code != 0
    assert address in err


def test_clients_alone_without_an_eval_file_exits_2_naming_it(cli, make_config) -> None:
    pytest.importorskip("flwr")
    code, _, err = cli("federated", "alone", str(make_config(federated={"rounds": 1})))
    assert code == 2 and "federated.eval_file" in err
