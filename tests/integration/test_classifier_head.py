"""The real bundled model with a classification head learns both classes of SMS spam.

240 training rows, 30 steps: enough to see the failure this guards against (the head
collapsing to the majority class and early stopping keeping the untrained start). About 4
minutes on a quiet 2-core AVX2 CPU in fp32, so it is marked slow: `make test-slow` runs it.
"""

import json

import pytest

from tunesmith import run
from tunesmith.config import parse_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_head_is_not_degenerate_and_beats_its_starting_point(tmp_path, test_home):
    from tests.helpers import REPO

    cfg = parse_config({
        "name": "head", "output_dir": str(tmp_path / "run"),
        "data": {"train_file": str(REPO / "examples/sms_spam/sms_spam.jsonl"),
                 "validation_fraction": 0.05, "test_fraction": 0.1,
                 "max_train_examples": 240, "max_validation_examples": 64,
                 "max_test_examples": 160, "max_length": 256},
        "train": {"head": "classifier", "class_weights": "balanced", "epochs": 1,
                  "batch_size": 8, "learning_rate": 3e-4, "eval_every": 10,
                  "early_stopping_patience": 3, "seed": 42,
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.05}},
        "eval": {"task": "classification", "labels": ["spam", "ham"],
                 "positive_label": "spam", "compare_base": False, "forgetting": False},
    })
    result = run(cfg, home=test_home, show_progress=False)
    per_class = result.tuned["per_class"]
    # both classes predicted, most spam found: not the majority-class collapse
    assert per_class["spam"]["recall"] > 0.5 and per_class["ham"]["recall"] > 0.5
    assert result.tuned["f1_spam"] > 0.5
    records = [json.loads(x) for x in
               (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["valid_loss"] for r in records if r["kind"] == "eval"}
    assert result.best_step != 0 and evals[result.best_step] < evals[0]
    assert not result.results["training"]["warnings"]
