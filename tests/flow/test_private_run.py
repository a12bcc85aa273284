"""A DP-SGD run end to end on the tiny model, and every bad privacy setting: message + exit 2."""

import json

import pytest
import torch

from tests.flow.test_bad_input_cli import assert_clean_failure
from tunesmith.flows.run import run
from tunesmith.training.callbacks import read_metrics

PRIVATE = {"batch_size": 16, "epochs": 2, "eval_every": 2,
           "privacy": {"target_epsilon": 8.0, "max_grad_norm": 1.0, "accountant": "rdp"}}


def test_a_private_run_reports_its_guarantee_everywhere(make_config, tmp_path):
    cfg = make_config(train=PRIVATE, eval={"forgetting": False, "calibration": False})
    result = run(cfg, show_progress=False)
    run_dir = result.run_dir
    card = json.loads((run_dir / "adapter" / "privacy.json").read_text())
    assert card == json.loads((run_dir / "merged" / "privacy.json").read_text())
    assert card == result.results["privacy"]
    assert 0 < card["epsilon"] <= 8.0 + 1e-6  # the target, spent over the planned steps
    assert card["steps"] == card["planned_steps"] == result.hyperparameters.total_steps
    assert card["delta"] < 1 / card["n_examples"] and card["delta_rule"].startswith("auto")
    assert card["noise_multiplier"] > 0 and card["sample_rate"] == pytest.approx(
        16 / card["n_examples"])
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    spent = [r["epsilon"] for r in evals]
    assert spent[0] == 0 and spent == sorted(spent) and spent[-1] == pytest.approx(
        card["epsilon"])
    report = (run_dir / "report.md").read_text()
    assert "## Differential privacy" in report and "noise multiplier" in report
    config = (run_dir / "config.yaml").read_text()
    assert "packing: false" in config  # DP unpacks by itself


@pytest.mark.parametrize(("train", "fragments"), [
    ({**PRIVATE, "packing": True}, ["train.privacy", "packing: false", "packed row"]),
    ({**PRIVATE, "batch_size": 4}, ["train.batch_size 4 is too small"]),
    ({**PRIVATE, "privacy": {"noise_multiplier": 1.0, "delta": 0.05}},
     ["train.privacy.delta 0.05 is not below 1/n"]),
    ({**PRIVATE, "epochs": 25, "privacy": {"target_epsilon": 0.01, "accountant": "rdp"}},
     ["target_epsilon 0.01 cannot be reached", "train.batch_size 16", "25 epoch(s)"]),
    ({**PRIVATE, "privacy": {"target_epsilon": 8, "noise_multiplier": 1.0}},
     ["train.privacy", "exactly one of target_epsilon and noise_multiplier"]),
    ({**PRIVATE, "objective": "dpo"}, ["train.objective 'sft'"]),
    ({**PRIVATE, "head": "classifier", "class_weights": "balanced"},
     ["train.class_weights: none", "a statistic of the private data"]),
])
def test_bad_privacy_settings_fail_cleanly(make_config, cli, train, fragments):
    cfg = make_config(train=train)
    assert_clean_failure(*cli("run", str(cfg)), *fragments)


def test_a_private_classifier_head_folds_its_input_scale_into_the_saved_weights(
        make_config, tokenizer, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    from tunesmith.config import load_config
    from tunesmith.data.encode import encode_prompt
    from tunesmith.flows.finetune import public_scale
    from tunesmith.flows.steps import base_dtype, prepare_model_for_training
    from tunesmith.models.classifier import class_logits, load_classifier, load_trained_classifier

    cfg = make_config(train={**PRIVATE, "head": "classifier", "optimizer": "sgd",
                             "learning_rate": 0.05, "head_learning_rate": 0.5},
                      eval={"forgetting": False, "calibration": False})
    result = run(cfg, show_progress=False)
    run_dir = result.run_dir
    assert result.results["privacy"]["epsilon"] <= 8.0 + 1e-6
    assert "optimizer: sgd" in (run_dir / "config.yaml").read_text()
    assert "head_input_scale: auto" in (run_dir / "config.yaml").read_text()
    merged = load_trained_classifier(run_dir / "merged").eval()
    base = load_classifier(tiny_model_dir, ["good", "bad"],
                           pad_token_id=tokenizer.pad_token_id)
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": "Great value."}])])
    with torch.no_grad():
        expected = class_logits(adapted, ids, None)
        # a plain head (no scaling left anywhere) gives what the adapters and head give
        torch.testing.assert_close(class_logits(merged, ids, None), expected,
                                   rtol=1e-4, atol=1e-4)
    assert not merged.score._forward_pre_hooks
    # the head trained on scaled input (the best checkpoint holds it so); what was saved is
    # that head with the public prompts' feature RMS folded in
    # on the base as the run loaded it (bf16 where the CPU computes it natively), with its
    # fresh adapters (zero updates, fp32)
    loaded = load_config(cfg)
    fresh = prepare_model_for_training(load_classifier(
        tiny_model_dir, ["good", "bad"], pad_token_id=tokenizer.pad_token_id,
        dtype=base_dtype(loaded)), loaded)
    scale = public_scale(fresh, tokenizer)
    trained = load_file(run_dir / "checkpoints" / f"step-{result.best_step}" /
                        "trainable.safetensors")
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    (trained_head,) = [v for k, v in trained.items() if "score" in k]
    (saved_head,) = [v for k, v in saved.items() if "score" in k]
    assert (scale - 1).abs().max() > 0.1  # a scale that does something
    torch.testing.assert_close(saved_head, trained_head / scale)
