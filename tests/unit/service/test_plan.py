"""Planning a job's run: the task, and OpenAI's hyperparameters resolved as the run resolves."""

from __future__ import annotations

from tests.helpers import review_rows, write_jsonl
from tunesmith.config import auto_learning_rate, resolve_hyperparameters
from tunesmith.data.chat import ChatExample
from tunesmith.flows.steps import load_splits
from tunesmith.service.plan import check_job_data, detect_task, plan_run


def examples(rows: list[dict]) -> list[ChatExample]:
    return [ChatExample(r["messages"]) for r in rows]


def plan(tmp_path, requested: dict, *, n: int = 40, validation: bool = False):
    train = write_jsonl(tmp_path / "t.jsonl", review_rows(n))
    valid = write_jsonl(tmp_path / "v.jsonl", review_rows(8)) if validation else None
    return plan_run(job_id="ftjob-x", run_dir=tmp_path / "run", base_ref="tiny",
                    train_path=train, valid_path=valid, requested=requested,
                    task=check_job_data(train, valid), seed=9, max_eval_examples=10)


def test_task_detection() -> None:
    assert detect_task(examples(review_rows(24)), None) == "classification"
    free = [{"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "content": f"answer number {i}"}]}
            for i in range(24)]
    assert detect_task(examples(free), None) == "generation"
    # a validation label the training set never shows cannot be scored as a class
    odd = review_rows(2)
    odd[0]["messages"][-1]["content"] = "neutral"
    assert detect_task(examples(review_rows(24)), examples(odd)) == "generation"


def test_auto_is_resolved_on_the_training_split_the_run_makes(tmp_path) -> None:
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    cfg, reported = plan(tmp_path, auto)
    n_train = len(load_splits(cfg).train)
    # not simply 80% of the 40 examples: the reviews repeat with a counter, and
    # near-duplicates stay together in one split
    assert n_train < 32
    run_hp = resolve_hyperparameters(cfg.train, n_train)  # what the run itself resolves
    assert reported == {"n_epochs": run_hp.epochs, "batch_size": run_hp.batch_size,
                        "learning_rate_multiplier": 1.0}
    assert (cfg.train.epochs, cfg.train.batch_size) == (run_hp.epochs, run_hp.batch_size)
    assert cfg.train.learning_rate == auto_learning_rate("lora", run_hp.batch_size)
    # planning again with the reported numbers (when training starts) gives the same run
    assert plan(tmp_path, reported)[0] == cfg


def test_run_config_of_a_job(tmp_path) -> None:
    cfg, reported = plan(tmp_path, {"n_epochs": 2, "batch_size": 8,
                                    "learning_rate_multiplier": 0.5}, validation=True)
    assert reported == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 0.5}
    assert cfg.train.learning_rate == auto_learning_rate("lora", 8) * 0.5
    assert cfg.train.eval_every == "epoch" and cfg.train.keep_checkpoints == 3
    assert cfg.train.early_stopping_patience is None and cfg.train.seed == 9
    assert cfg.data.test_file == cfg.data.validation_file == tmp_path / "v.jsonl"
    assert cfg.eval.task == "classification" and not cfg.eval.compare_base
    # with a validation file the whole training file is trained on: a batch fits within it
    assert plan(tmp_path, {"batch_size": 64}, n=20, validation=True)[1]["batch_size"] == 20


def test_the_service_energy_settings_reach_every_run(tmp_path) -> None:
    import pytest

    from tunesmith.errors import ConfigError
    from tunesmith.service.settings import energy_section

    train = write_jsonl(tmp_path / "t.jsonl", review_rows(40))
    section = energy_section(country="FRA")
    cfg, _ = plan_run(job_id="ftjob-x", run_dir=tmp_path / "run", base_ref="tiny",
                      train_path=train, valid_path=None, requested={},
                      task=check_job_data(train, None), seed=9, max_eval_examples=10,
                      energy=section)
    assert cfg.energy.enabled and cfg.energy.country_iso_code == "FRA"
    off, _ = plan_run(job_id="ftjob-y", run_dir=tmp_path / "run2", base_ref="tiny",
                      train_path=train, valid_path=None, requested={},
                      task=check_job_data(train, None), seed=9, max_eval_examples=10,
                      energy=energy_section(enabled=False))
    assert not off.energy.enabled
    default, _ = plan(tmp_path, {})
    assert default.energy.enabled and default.energy.country_iso_code == "USA"
    with pytest.raises(ConfigError, match="energy settings are invalid") as err:
        energy_section(country="ATLANTIS")
    assert "country_iso_code" in str(err.value)
