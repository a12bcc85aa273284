"""train.head: classifier — a new classification head trained with LoRA, through the CLI."""

import json

from safetensors.torch import load_file


def test_classifier_head_run(make_config, cli, tmp_path):
    cfg = make_config(train={"head": "classifier", "learning_rate": 1e-2, "epochs": 4})
    code, out, err = cli("run", str(cfg), "--no-progress")
    assert code == 0, err
    run = tmp_path / "run"
    results = json.loads((run / "metrics.json").read_text())
    n_test = len((run / "data" / "test.jsonl").read_text().splitlines())
    assert results["tuned"]["n"] == n_test > 0
    assert results["calibration"]["temperature"] > 0
    # the tuned model answers with its head; the base model (no head) scores the labels
    assert results["eval_mode"] == {"base": "score", "tuned": "head"}
    assert "the classification head's logits (tuned)" in (run / "report.md").read_text()
    merged = json.loads((run / "merged" / "config.json").read_text())
    assert merged["architectures"] == ["LlamaForSequenceClassification"]
    assert merged["id2label"] == {"0": "good", "1": "bad"}
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any("score" in k for k in adapter)  # the head is saved with the adapters
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    # the head and adapters learn the training rows: on a random 2-layer model, the few
    # validation rows move with the precision (bf16 where native) and say little
    losses = [json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text()
              .splitlines() if '"train"' in x]
    assert len(losses) == 32 and len(evals) >= 7
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:4]) / 4, losses
    code, out, err = cli("chat", str(run), "--prompt", "hi")
    assert code == 2 and "classification head" in err


def test_classifier_head_needs_classification_task(make_config, cli):
    cfg = make_config(train={"head": "classifier"}, eval={"task": "generation",
                                                        "labels": None, "positive_label": None})
    code, out, err = cli("run", str(cfg))
    assert code == 2 and "needs eval.task: classification" in err
