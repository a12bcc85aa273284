from pathlib import Path

import pytest

from tests.helpers import REPO
from tunesmith.config import (
    TrainConfig,
    auto_batch_size,
    auto_epochs,
    load_config,
    resolve_hyperparameters,
)
from tunesmith.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_auto_epochs_follows_openai_rule():
    assert auto_epochs(10) == 10          # 3 * 10 < 100 -> ceil(100 / 10)
    assert auto_epochs(2) == 25           # capped at 25
    assert auto_epochs(1000) == 3
    assert auto_epochs(20_000) == 1       # 25000 // 20000
    assert auto_epochs(5_000) == 3


def test_auto_batch_size_grows_with_data():
    assert auto_batch_size(3) == 3
    assert auto_batch_size(100) == 4
    assert auto_batch_size(1000) == 8
    assert auto_batch_size(100_000) == 32


def test_resolved_hyperparameters_are_concrete():
    hp = resolve_hyperparameters(TrainConfig(), 1000)
    assert (hp.epochs, hp.batch_size) == (3, 8)
    assert hp.learning_rate == pytest.approx(2e-4)
    assert hp.total_steps == 3 * 125
    assert hp.eval_every == hp.total_steps // 10
    capped = resolve_hyperparameters(TrainConfig(max_steps=7, epochs=2), 1000)
    assert capped.total_steps == 7


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    p = write(tmp_path, "data:\n  train_file: t.jsonl\ntrain:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "train.lerning_rate: unknown key; did you mean 'learning_rate'?" in str(exc.value)


def test_all_problems_are_reported_at_once(tmp_path):
    p = write(tmp_path, "data:\n  train_file: t.jsonl\n  max_length: -1\n"
                        "train:\n  epochs: zero\n  method: qlora\neval:\n  taks: x\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    text = str(exc.value)
    for fragment in ("data.max_length", "train.epochs", "train.method", "eval.taks"):
        assert fragment in text
    assert len(exc.value.problems) == 4


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="data: required"):
        load_config(write(tmp_path, "train:\n  epochs: 1\n"))
    with pytest.raises(ConfigError, match=r"line \d+: not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_scoring_a_generation_task_is_a_config_error(tmp_path):
    base = "data:\n  train_file: t.jsonl\neval:\n  task: {}\n  mode: {}\n"
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, base.format("generation", "score")))
    assert "eval.mode 'score'" in str(exc.value) and "eval.task: classification" in str(exc.value)
    assert load_config(write(tmp_path, base.format("classification", "score"))).eval.mode == \
        "score"
    assert load_config(write(tmp_path, base.format("generation", "generate"))).eval.mode == \
        "generate"
    assert load_config(write(tmp_path, "data:\n  train_file: t.jsonl\n")).eval.mode == "auto"


def test_paths_are_relative_to_the_config_file(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  train_file: sub/t.jsonl\n"))
    assert cfg.data.train_file == tmp_path / "sub" / "t.jsonl"
    assert cfg.name == "run"


ACCELERATE_CONFIGS = REPO / "examples" / "accelerate"  # launch configs, not run configs


@pytest.mark.parametrize("path", sorted(p for p in REPO.glob("examples/**/*.yaml")
                                        if ACCELERATE_CONFIGS not in p.parents), ids=str)
def test_every_shipped_example_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.train_file.is_file()


@pytest.mark.parametrize("path", sorted(ACCELERATE_CONFIGS.glob("*.yaml")), ids=str)
def test_every_shipped_accelerate_config_loads_as_fsdp2(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    cfg = ClusterConfig.from_yaml_file(path)
    assert cfg.distributed_type == DistributedType.FSDP
    assert cfg.fsdp_config["fsdp_version"] == 2
    assert cfg.mixed_precision == "no"  # tunesmith applies train.precision itself
    assert cfg.num_processes >= cfg.num_machines


def test_best_metric_other_than_loss_needs_a_classification_head():
    from pydantic import ValidationError

    from tunesmith.config.sections import TrainConfig

    assert TrainConfig(head="classifier", best_metric="macro_f1").best_metric == "macro_f1"
    with pytest.raises(ValidationError, match="best_metric: macro_f1.*head: classifier"):
        TrainConfig(best_metric="macro_f1")


def test_sgd_needs_its_own_learning_rate(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "data:\n  train_file: t.jsonl\ntrain:\n  optimizer: sgd\n"))
    assert "train.optimizer: sgd needs an explicit train.learning_rate" in str(exc.value)
    cfg = load_config(write(tmp_path, "data:\n  train_file: t.jsonl\ntrain:\n  optimizer: sgd\n"
                                      "  learning_rate: 0.1\n"))
    assert cfg.train.optimizer == "sgd" and cfg.train.learning_rate == 0.1


def test_a_scaled_head_input_needs_a_classification_head(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "data:\n  train_file: t.jsonl\n"
                                    "train:\n  head_input_scale: public\n"))
    assert "train.head_input_scale: public scales a classification head's input" in \
        str(exc.value)
    cfg = load_config(write(tmp_path, "data:\n  train_file: t.jsonl\ntrain:\n  head: classifier\n"
                                      "  head_input_scale: public\neval:\n  task: classification\n"
                                      "  labels: [a, b]\n"))
    assert cfg.train.head_input_scale == "public"
