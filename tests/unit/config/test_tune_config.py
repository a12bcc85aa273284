"""The tune: section: every wrong search-space entry reported at once, with what to change."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO
from tunesmith.config import load_config, parse_config
from tunesmith.errors import ConfigError
from tunesmith.flows.tune import space as search
from tunesmith.flows.tune.study import _differences, direction_of
from tunesmith.flows.tune.trial import intermediate_value

BASE = {"data": {"train_file": "train.jsonl"},
        "eval": {"task": "classification", "labels": ["spam", "ham"]}}


def problems(tune: dict, **sections) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, **sections, "tune": tune})
    return err.value.problems


def test_every_bad_search_space_entry_is_reported_at_once():
    found = problems({"space": {
        "train.lerning_rate": {"type": "log_uniform", "low": 1e-5, "high": 1e-3},
        "train.lora.r": {"type": "int", "low": 32, "high": 4},
        "train.learning_rate": {"type": "log_uniform", "low": 0, "high": 1e-3},
        "train.epochs": {"type": "choice", "values": []},
        "train.warmup_ratio": {"type": "uniform", "low": 0.1, "high": 0.1},
        "train.weight_decay": {"type": "normal", "low": 0, "high": 1},
    }})
    text = "\n".join(found)
    assert "did you mean 'train.learning_rate'?" in text
    assert "train.lora.r: low (32.0) must be below high (4.0)" in text
    assert "train.learning_rate: a log_uniform distribution needs low > 0" in text
    assert "train.epochs: a choice needs at least one value" in text
    assert "train.warmup_ratio: low (0.1) must be below high (0.1)" in text
    assert "train.weight_decay.type" in text and "log_uniform" in text
    assert len(found) == 6


def test_a_section_or_unknown_name_is_not_a_tunable_field():
    text = "\n".join(problems({"space": {"train.lora": {"type": "choice", "values": [1]},
                                         "lr": {"type": "choice", "values": [1]}}}))
    assert "'train.lora' is not a run setting" in text
    assert "'lr' is not a run setting; use a dotted name" in text


def test_an_empty_space_and_a_metric_the_task_lacks_are_refused():
    assert problems({"space": {}}) == [
        "tune.space: Dictionary should have at least 1 item after validation, not 0 (got {})"]
    found = problems({"space": {"train.epochs": {"type": "int", "low": 1, "high": 3}},
                      "objective": "positive_f1"})
    assert found == ["<top>: tune.objective 'positive_f1' needs eval.positive_label"]
    found = problems({"space": {"train.epochs": {"type": "int", "low": 1, "high": 3}},
                      "objective": "exact_match"})
    assert any("needs eval.task: generation" in p for p in found)


def test_the_example_search_config_is_valid_and_its_run_ignores_the_search():
    cfg = load_config(REPO / "examples" / "sms_spam" / "tune.yaml")
    assert cfg.tune is not None and set(cfg.tune.space) == {
        "train.learning_rate", "train.lora.r", "train.lora.dropout", "train.epochs"}
    assert direction_of(cfg.tune) == "minimize"


def test_a_trials_values_land_in_their_fields_and_are_validated_again(tmp_path: Path):
    cfg = parse_config({**BASE, "tune": {"space": {
        "train.epochs": {"type": "int", "low": 1, "high": 3}}}}, base_dir=tmp_path)
    tried = search.with_values(cfg, {"train.lora.r": 4, "train.learning_rate": 1e-3},
                               source="trial 3", name="t3")
    assert (tried.train.lora.r, tried.train.learning_rate, tried.name) == (4, 1e-3, "t3")
    assert tried.train.lora.alpha == cfg.train.lora.alpha  # the rest untouched
    with pytest.raises(ConfigError) as err:
        search.with_values(cfg, {"train.lora.dropout": 1.5}, source="trial 4")
    assert "trial 4" in str(err.value) and "train.lora.dropout" in str(err.value)
    plain = search.without_search(tried)
    assert plain.tune is None
    assert yaml.safe_dump(plain.model_dump(mode="json"))  # writable as best.yaml


def test_the_pruner_reads_a_lower_loss_as_better_whatever_the_direction():
    assert intermediate_value(0.5, "minimize") < intermediate_value(0.7, "minimize")
    assert intermediate_value(0.5, "maximize") > intermediate_value(0.7, "maximize")


def test_a_studys_configuration_differences_are_named_and_its_size_may_change():
    old = {"train": {"batch_size": 8}, "tune": {"trials": 12, "pruner": "median"}}
    new = {"train": {"batch_size": 4}, "tune": {"trials": 20, "pruner": "median"}}
    assert _differences(old, new) == ["train.batch_size: 8 -> 4"]
