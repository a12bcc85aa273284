"""`tunesmith run` end to end on the tiny model, through the CLI."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunesmith.config import load_config
from tunesmith.training.callbacks import read_metrics


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """One tiny run shared by the assertions below (training takes the time)."""
    from typer.testing import CliRunner

    from tests.helpers import review_rows, write_jsonl
    from tunesmith.cli import app

    tmp = tmp_path_factory.mktemp("flow")
    write_jsonl(tmp / "train.jsonl", review_rows(80))
    cfg = {
        "name": "tiny", "output_dir": str(tmp / "run"), "model": {"base": str(tiny_model_dir)},
        "data": {"train_file": "train.jsonl", "max_length": 128},
        "train": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "epochs": 3, "batch_size": 8,
                  "learning_rate": 2e-2, "eval_every": 5, "early_stopping_patience": None,
                  "seed": 7},
        "eval": {"task": "classification", "labels": ["good", "bad"], "positive_label": "bad"},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["run", str(tmp / "config.yaml"), "--no-progress"],
                                env={"COLUMNS": "200"})
    return tmp, result


def test_run_succeeds_and_prints_the_comparison(finished_run):
    _, result = finished_run
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "base vs tuned" in result.stdout
    assert "accuracy" in result.stdout and "f1_bad" in result.stdout


def test_validation_loss_fell(finished_run):
    tmp, _ = finished_run
    evals = [r for r in read_metrics(tmp / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and len(evals) >= 3
    assert min(r["valid_loss"] for r in evals[1:]) < 0.7 * evals[0]["valid_loss"]
    train = [r for r in read_metrics(tmp / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert all({"train_loss", "learning_rate", "tokens_per_s"} <= set(r) for r in train)


def test_every_lora_parameter_changed(finished_run, tiny_model_dir):
    from peft import get_peft_model_state_dict

    from tunesmith.flows.steps import prepare_model_for_training
    from tunesmith.models.load import load

    tmp, _ = finished_run
    cfg = load_config(tmp / "config.yaml")
    model, _ = load(tiny_model_dir)
    initial = get_peft_model_state_dict(prepare_model_for_training(model, cfg))
    trained = load_file(tmp / "run" / "adapter" / "adapter_model.safetensors")
    assert set(initial) == set(trained) and len(trained) == 2 * 7 * 2  # A,B x 7 linears x 2 layers
    unchanged = [k for k in trained if torch.equal(trained[k], initial[k])]
    assert unchanged == []


def test_run_directory_holds_every_artefact(finished_run):
    tmp, _ = finished_run
    run = tmp / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json",
                 "config.yaml", "metrics.jsonl", "report.md", "report.html", "loss_curve.png",
                 "run.log", "metrics.json", "merged/calibration.json", "confusion_tuned.png",
                 "reliability.png", "token_lengths.png"):
        assert (run / name).is_file(), name
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["resolved"]["epochs"] == 3 and resolved["resolved"]["batch_size"] == 8
    report = (run / "report.md").read_text()
    assert "| metric | base | tuned | change |" in report and "loss_curve.png" in report
    results = json.loads((run / "metrics.json").read_text())
    assert f"| accuracy | {results['base']['accuracy']:.4f} | {results['tuned']['accuracy']:.4f}" \
        in report
    html = (run / "report.html").read_text()
    assert f"{results['tuned']['accuracy']:.4f}" in html and "data:image/png;base64," in html
    # every section the run could measure is in metrics.json
    for key in ("comparison", "calibration", "forgetting", "overfitting", "confusion"):
        assert results[key], key
    assert results["comparison"]["accuracy"]["ci_low"] <= results["comparison"]["accuracy"][
        "difference"] <= results["comparison"]["accuracy"]["ci_high"]
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    # classification by default scores the labels (eval.mode: auto), and the report says so
    assert results["eval_mode"] == {"base": "score", "tuned": "score"}
    assert results["tuned"]["invalid_rate"] == 0 == results["base"]["invalid_rate"]
    for text in (report, html):
        assert "Test answers: scored label log-probabilities (base and tuned)" in text
        assert "invalid_rate is 0 by construction" in text
    assert "base model:" in (run / "run.log").read_text()
    assert list((run / "checkpoints").glob("step-*"))


def test_the_run_measured_its_energy(finished_run):
    from pathlib import Path

    tmp, _ = finished_run
    energy = json.loads((tmp / "run" / "metrics.json").read_text())["energy"]
    for phase in ("training", "evaluation", "total"):
        assert energy[phase]["kwh"] > 0 and energy[phase]["kg_co2e"] > 0, energy[phase]
        assert energy[phase]["seconds"] > 0 and energy[phase]["error"] is None
    assert energy["method"] and energy["country_iso_code"] == "USA"
    report = (tmp / "run" / "report.md").read_text()
    assert "## Energy and emissions" in report and energy["method"] in report
    # codecarbon wrote nothing of its own, here or in the run directory
    for where in (Path.cwd(), tmp, tmp / "run"):
        assert not (where / "emissions.csv").exists() and not (where / ".codecarbon.config"
                                                               ).exists()


def test_chat_with_the_run_directory(finished_run, cli):
    tmp, _ = finished_run
    code, out, err = cli("chat", str(tmp / "run"), "--prompt", "I love it",
                         "--system", "Label the review as good or bad.", "--max-new-tokens", "4")
    assert code == 0, err
    assert out.strip()
