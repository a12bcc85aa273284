"""`tunesmith compress` on a finished tiny run, through the CLI: pruned and int8 models beside
the run, one report with both, and every bad input refused with exit 2 and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tunesmith.compress import quantize
from tunesmith.compress.prune import prunable_linears

needs_int8 = pytest.mark.skipif(quantize.int8_support() is not None,
                                reason=f"int8 cannot run here: {quantize.int8_support()}")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> Path:
    """One finished tiny run (LoRA, one epoch), run once for the module."""
    from tests.helpers import finish_tiny_run

    return finish_tiny_run(tmp_path_factory.mktemp("compress"), tiny_model_dir)


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_pruning_through_the_cli(finished, cli):
    from tunesmith.models.load import load_model

    code, stdout, stderr = cli("compress", str(finished), "--prune", "0.5", "--method",
                               "wanda", "--calibration-examples", "16", "--no-progress",
                               "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    out = finished / "compressed" / "wanda-50-unstructured"
    assert result["output_dir"] == str(out) and (out / "model.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    model = load_model(out)  # a plain Hugging Face model
    for name, layer in prunable_linears(model).items():
        assert float((layer.weight == 0).float().mean()) == 0.5, name
    row, tuned = result["compressed"], result["tuned"]
    assert row["parameters"] == tuned["parameters"]
    assert row["nonzero_parameters"] < tuned["nonzero_parameters"]
    assert result["compression"]["calibration_examples"] == 16
    assert set(result["comparison"]) >= {"accuracy", "f1_bad"}
    c = result["comparison"]["accuracy"]
    assert c["ci_low"] <= c["difference"] <= c["ci_high"]
    assert row["perplexity"] > 0 and row["latency"]["n"] == result["test_items"]


def test_recovery_fine_tune_keeps_the_mask(finished, cli):
    from tunesmith.models.load import load_model

    code, stdout, stderr = cli("compress", str(finished), "--prune", "0.5", "--method",
                               "magnitude", "--steps", "4", "--learning-rate", "1e-4",
                               "--max-test", "4", "--latency-items", "0", "--no-progress",
                               "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    out = finished / "compressed" / "magnitude-50-unstructured-ft"
    assert result["kind"] == out.name and result["output_dir"] == str(out)
    recovery = result["compression"]["recovery"]
    assert recovery["steps"] == 4 and recovery["learning_rate"] == 1e-4
    assert recovery["train_examples"] > 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [1, 2, 3, 4]
    assert not (out / "checkpoints").exists()
    tuned = load_model(finished / "merged")
    model = load_model(out)
    for name, layer in prunable_linears(model).items():
        assert float((layer.weight == 0).float().mean()) == 0.5, name
    # the weights kept are the best step's by validation loss: the trained ones, or the
    # pruned start when no step beat it (training all weights is shown to move them, mask
    # held, in tests/unit/training/test_sparsity.py)
    evals = {r["step"]: r["valid_loss"] for r in log if r["kind"] == "eval"}
    assert recovery["best_step"] == min(evals, key=evals.get)
    before = dict(prunable_linears(tuned))
    same_as_pruned = all(
        torch.equal(layer.weight[layer.weight != 0], before[name].weight[layer.weight != 0])
        for name, layer in prunable_linears(model).items())
    assert same_as_pruned == (recovery["best_step"] == 0)
    assert result["settings"] == {"prune": 0.5, "method": "magnitude",
                                  "pattern": "unstructured", "steps": 4,
                                  "learning_rate": 1e-4}


def test_distillation_through_the_cli(finished, cli):
    from tunesmith.models.load import load_model

    code, stdout, stderr = cli("compress", str(finished), "--distil", "--layers", "1",
                               "--steps", "3", "--max-test", "4", "--latency-items", "2",
                               "--no-progress", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    out = finished / "compressed" / "distil-1"
    assert result["kind"] == "distil-1" and result["output_dir"] == str(out)
    student = load_model(out)
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    distil = result["compression"]["distil"]
    assert distil["layers"] == 1 and distil["teacher_layers"] == 2 and distil["steps"] == 3
    assert distil["held_out_kl_before"] > 0 and distil["held_out_kl_after"] is not None
    row, tuned = result["compressed"], result["tuned"]
    assert row["parameters"] < tuned["parameters"]
    # generation speed: the same 32 new tokens from each model on the timed prompts
    for r in (row, tuned):
        assert r["generation"]["prompts"] == 2 and r["generation"]["new_tokens"] == 64
        assert r["generation"]["tokens_per_s"] > 0
    assert (finished / "compressed" / "compression.png").is_file()
    assert "| distil-1 |" in (finished / "compressed" / "compression.md").read_text()
    assert "distil-1" in (finished / "compressed" / "compression.html").read_text()


@needs_int8
def test_int8_through_the_cli_and_one_report_holds_both(finished, cli):
    from tunesmith.models.load import load_model

    code, stdout, stderr = cli("compress", str(finished), "--quantize", "int8",
                               "--no-progress")
    assert code == 0, stderr
    assert "accuracy change" in stdout
    out = finished / "compressed" / "int8"
    assert quantize.quantized_layers(load_model(out))
    assert (out / "model.safetensors").stat().st_size < \
        (finished / "merged" / "model.safetensors").stat().st_size
    report = json.loads((finished / "compressed" / "compression.json").read_text())
    assert set(report["models"]) == {"wanda-50-unstructured", "int8"}
    for entry in report["models"].values():
        assert {"tuned", "compressed", "comparison"} <= set(entry)
        assert entry["tuned"]["accuracy"] is not None
    table = (finished / "compressed" / "compression.md").read_text()
    assert "| tuned |" in table and "| int8 |" in table and "| wanda-50-unstructured |" in table


@pytest.fixture(scope="module")
def odd_run(finished, tmp_path_factory, tokenizer) -> Path:
    """A copy of the finished run whose model has input sizes not divisible by 4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    run = tmp_path_factory.mktemp("odd") / "run"
    run.mkdir()
    for name in ("config.yaml", "metrics.json"):
        shutil.copy(finished / name, run / name)
    shutil.copytree(finished / "data", run / "data")
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=66, intermediate_size=130, num_hidden_layers=1,
        num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=True))
    model.save_pretrained(run / "merged")
    tokenizer.save_pretrained(run / "merged")
    return run


BAD = {
    "not a finished run": (None, ["--prune", "0.5"]),
    "sparsity 0": ("run", ["--prune", "0"]),
    "sparsity 1": ("run", ["--prune", "1"]),
    "sparsity above 1": ("run", ["--prune", "1.5"]),
    "negative sparsity": ("run", ["--prune", "-0.1"]),
    "2:4 needs 0.5": ("run", ["--prune", "0.3", "--pattern", "2:4"]),
    "unknown method": ("run", ["--prune", "0.5", "--method", "random"]),
    "2:4 on odd input sizes": ("odd", ["--prune", "0.5", "--pattern", "2:4"]),
    "both": ("run", ["--prune", "0.5", "--quantize", "int8"]),
    "neither": ("run", []),
    "unknown quantisation": ("run", ["--quantize", "int4"]),
    "int8 not runnable here": ("run", ["--quantize", "int8"]),
    "distil without --layers": ("run", ["--distil"]),
    "--layers without --distil": ("run", ["--prune", "0.5", "--layers", "1"]),
    "student as deep as the model": ("run", ["--distil", "--layers", "2"]),
    "student deeper than the model": ("run", ["--distil", "--layers", "9"]),
    "student of no layers": ("run", ["--distil", "--layers", "0"]),
    "distil and prune": ("run", ["--distil", "--layers", "1", "--prune", "0.5"]),
    "distil with 0 steps": ("run", ["--distil", "--layers", "1", "--steps", "0"]),
    "negative recovery steps": ("run", ["--prune", "0.5", "--steps", "-1"]),
    "steps with int8": ("run", ["--quantize", "int8", "--steps", "5"]),
    "zero temperature": ("run", ["--distil", "--layers", "1", "--temperature", "0"]),
    "distil weight above 1": ("run", ["--distil", "--layers", "1", "--distil-weight", "1.5"]),
    "learning rate 0": ("run", ["--prune", "0.5", "--steps", "2", "--learning-rate", "0"]),
    "output over the tuned model": ("run", ["--prune", "0.5", "-o", "{run}/merged",
                                            "--overwrite"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_and_writes_nothing(case, finished, odd_run, cli, tmp_path,
                                              monkeypatch):
    target, args = BAD[case]
    if case == "int8 not runnable here":
        monkeypatch.setattr(quantize, "int8_support", lambda: "no int8 kernel (test)")
    run = {"run": finished, "odd": odd_run, None: tmp_path / "not-a-run"}[target]
    if target is None:
        run.mkdir()
        (run / "config.yaml").write_text("name: x\n")
    watched = run.parent
    before = listing(watched)
    args = [a.replace("{run}", str(run)) for a in args]
    code, stdout, stderr = cli("compress", str(run), *args, "--no-progress")
    assert code == 2, (case, stdout, stderr)
    assert "error:" in stderr and "Traceback" not in stderr + stdout
    assert listing(watched) == before, case
