"""`partition: by_column`: the sites as the data names them, one client per value of a field."""

from __future__ import annotations

import json

import pytest

from tests.helpers import review_rows, write_jsonl
from tunesmith.config import parse_config
from tunesmith.errors import ConfigError, DataError
from tunesmith.flows.federated import client_files

SITES = ["north", "south", "east"]


def _cfg(tmp_path, rows, **federated):
    write_jsonl(tmp_path / "all.jsonl", rows)
    return parse_config({"model": {"base": "tiny"},
                         "data": {"train_file": "all.jsonl", "validation_fraction": 0.1,
                                  "test_fraction": 0.1},
                         "federated": {"partition": "by_column", "partition_column": "site",
                                       **federated}}, base_dir=tmp_path)


def test_each_value_of_the_column_is_one_client(tmp_path) -> None:
    rows = [{**r, "site": SITES[i % 3]} for i, r in enumerate(review_rows(60))]
    cfg = _cfg(tmp_path, rows, min_clients=3)
    files = client_files(cfg, cfg.federated, tmp_path / "clients")
    names = json.loads((tmp_path / "clients" / "partition.json").read_text(encoding="utf-8"))
    assert sorted(names.values()) == sorted(SITES) and len(files) == 3
    seen = 0
    for f in files:
        lines = [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines()]
        assert {x["site"] for x in lines} == {names[f.stem]}
        seen += len(lines)
    assert 40 <= seen < 60  # the training split: validation and test rows stay out


def test_a_row_without_the_field_is_named_by_file_and_line(tmp_path) -> None:
    rows = [{**r, "site": SITES[i % 3]} for i, r in enumerate(review_rows(60))]
    for r in rows[::7]:
        del r["site"]
    cfg = _cfg(tmp_path, rows)
    with pytest.raises(DataError, match=r"all.jsonl.*line \d+.*site.*no 'site'") as err:
        client_files(cfg, cfg.federated, tmp_path / "clients")
    assert "partition_column" in str(err.value)


def test_too_few_values_and_a_missing_column_are_refused(tmp_path) -> None:
    rows = [{**r, "site": "only"} for r in review_rows(30)]
    cfg = _cfg(tmp_path, rows, secure_aggregation=True)
    with pytest.raises(ConfigError, match="'site' has 1 value.*only"):
        client_files(cfg, cfg.federated, tmp_path / "clients")
    with pytest.raises(ConfigError, match="by_column needs partition_column"):
        parse_config({"model": {"base": "tiny"}, "data": {"train_file": "a.jsonl"},
                      "federated": {"partition": "by_column"}})
