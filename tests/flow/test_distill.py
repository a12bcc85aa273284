"""Distilling a finished tiny run's tuned model into a student with fewer layers: the student
gets closer to the teacher on held-out data, and the teacher is never changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import finish_tiny_run
from tunesmith.errors import ConfigError
from tunesmith.flows.distill import distil
from tunesmith.flows.finished import open_run
from tunesmith.models.classifier import load_trained_classifier
from tunesmith.models.load import load_model

STEPS = 30


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory, tokenizer) -> Path:
    """A random Llama like the tiny model of conftest, with 4 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    path = tmp_path_factory.mktemp("four-layers")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, four_layers) -> Path:
    return finish_tiny_run(tmp_path_factory.mktemp("distil"), four_layers)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_student_learns_the_teacher_and_the_teacher_stays_as_it_was(finished, tokenizer,
                                                                        tmp_path):
    done = open_run(finished)
    tuned = load_model(done.merged).eval()
    before = snapshot(tuned)
    student, built = distil(done, tuned, tokenizer, tmp_path / "student", layers=2,
                            steps=STEPS, learning_rate=1e-3, show_progress=False)
    report = built["distil"]
    assert report["layers"] == 2 and report["teacher_layers"] == 4
    assert report["kept"] == [0, 3] == student.config.tunesmith_student_layers
    assert len(student.model.layers) == student.config.num_hidden_layers == 2
    assert report["held_out_kl_after"] < report["held_out_kl_before"]
    assert report["steps"] > 0 and report["temperature"] == 2.0 and report["weight"] == 0.5
    json.dumps(built)  # goes into a report as it is
    after = snapshot(tuned)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in tuned.parameters())
    # the layers the student kept were trained away from the teacher's
    assert not torch.equal(student.model.layers[1].mlp.up_proj.weight,
                           tuned.model.layers[3].mlp.up_proj.weight)
    lines = (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
    assert any("train_kl" in line for line in lines)
    assert not (tmp_path / "student" / "checkpoints").exists()


def test_mixed_precision_leaves_the_teachers_weights_in_full_precision(finished, tokenizer,
                                                                       tmp_path):
    done = open_run(finished)
    done.config.train.precision = "bf16"
    tuned = load_model(done.merged).eval()
    before = snapshot(tuned)
    distil(done, tuned, tokenizer, tmp_path, layers=1, steps=2, show_progress=False)
    after = snapshot(tuned)
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k])
               for k in before)


def test_a_classifier_run_distils_into_a_classifier(tmp_path_factory, four_layers, tokenizer,
                                                    tmp_path):
    run = finish_tiny_run(tmp_path_factory.mktemp("distil-head"), four_layers, head="classifier",
                 learning_rate=1e-2)
    done = open_run(run)
    tuned = load_trained_classifier(done.merged).eval()
    before = snapshot(tuned)
    # a small rate: 60 examples and a 2-class head overfit the training split at 1e-3
    student, built = distil(done, tuned, tokenizer, tmp_path, layers=2, steps=STEPS,
                            learning_rate=1e-4, temperature=1.0, show_progress=False)
    assert type(student).__name__ == "LlamaForSequenceClassification"
    assert len(student.model.layers) == 2
    assert built["distil"]["held_out_kl_after"] < built["distil"]["held_out_kl_before"]
    assert all(torch.equal(v, before[k]) for k, v in tuned.state_dict().items())


@pytest.mark.parametrize(("layers", "steps", "temperature", "weight", "wrong"), [
    (4, 5, 2.0, 0.5, "the model has 4"), (0, 5, 2.0, 0.5, "the model has 4"),
    (2, 5, 0.0, 0.5, "temperature 0.0"), (2, 5, 2.0, 2.0, "weight 2.0"),
    (2, 0, 2.0, 0.5, "0 training steps")])
def test_bad_settings_are_refused_before_anything_is_written(finished, tokenizer, tmp_path,
                                                             layers, steps, temperature,
                                                             weight, wrong):
    done = open_run(finished)
    with pytest.raises(ConfigError) as err:
        distil(done, load_model(done.merged), tokenizer, tmp_path / "out", layers=layers,
               steps=steps, temperature=temperature, weight=weight, show_progress=False)
    assert wrong in str(err.value)
    assert not (tmp_path / "out").exists()
