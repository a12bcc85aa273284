"""The real bundled SmolLM2-135M-Instruct: it answers, and a few training steps run end to end."""

import json

import pytest

from tunesmith import chat, run
from tunesmith.config import parse_config

pytestmark = pytest.mark.integration


def test_bundled_model_answers_sensibly(test_home):
    reply = chat("smollm2-135m-instruct",
                 [{"role": "user", "content": "What is the capital of France?"}],
                 max_new_tokens=20, home=test_home)
    assert "Paris" in reply


def test_a_few_training_steps_on_the_bundled_model(tmp_path, test_home):
    from tests.helpers import REPO

    cfg = parse_config({
        "name": "integration", "output_dir": str(tmp_path / "run"),
        # a validation split of ~45 messages: calibration scores all of it
        "data": {"train_file": str(REPO / "examples/sms_spam/sms_spam.jsonl"),
                 "validation_fraction": 0.01, "max_train_examples": 24,
                 "max_validation_examples": 8,
                 "max_test_examples": 16, "max_length": 256},
        "train": {"epochs": 1, "batch_size": 4, "max_steps": 3, "eval_every": 3},
        "eval": {"task": "classification", "labels": ["spam", "ham"],
                 "positive_label": "spam"},
    })
    result = run(cfg, home=test_home, show_progress=False)
    assert result.best_step in (0, 3)
    assert result.tuned["n"] == 16 and 0 <= result.tuned["accuracy"] <= 1
    assert (result.run_dir / "merged" / "model.safetensors").is_file()
    metrics = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2, 3]
