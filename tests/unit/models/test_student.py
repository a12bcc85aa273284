"""A student keeps evenly spaced blocks of its teacher, with the teacher's weights, and saves,
loads and generates (its KV cache indexed by the renumbered blocks) like any model."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from tunesmith.errors import ConfigError
from tunesmith.models.student import keep_layers, make_student

PAD = 0


def tiny_config(layers: int = 5, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, initializer_range=0.2, pad_token_id=PAD,
                       bos_token_id=1, eos_token_id=2, **extra)


@pytest.fixture
def teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(("n", "keep", "expected"), [
    (5, 1, [0]), (5, 2, [0, 4]), (5, 3, [0, 2, 4]), (5, 4, [0, 1, 3, 4]),
    (6, 3, [0, 3, 5]), (30, 4, [0, 10, 19, 29]), (2, 1, [0])])
def test_kept_layers_are_evenly_spaced_with_the_first_and_last(n, keep, expected):
    assert keep_layers(n, keep) == expected


@pytest.mark.parametrize("keep", [0, -1, 5, 9])
def test_a_depth_the_model_cannot_give_is_refused(teacher, keep):
    with pytest.raises(ConfigError, match="the model has 5, so give between 1 and 4"):
        make_student(teacher, keep)


def test_the_student_holds_the_chosen_teacher_layers_and_everything_else(teacher):
    before = weights(teacher)
    student = make_student(teacher, 3)
    assert len(student.model.layers) == student.config.num_hidden_layers == 3
    assert student.config.tunesmith_student_layers == [0, 2, 4]
    assert teacher.config.num_hidden_layers == 5 and len(teacher.model.layers) == 5
    for mine, theirs in zip(student.model.layers, [0, 2, 4], strict=True):
        assert_same(weights(mine), weights(teacher.model.layers[theirs]))
        assert mine is not teacher.model.layers[theirs]
    for part in ("model.embed_tokens", "model.norm", "lm_head"):
        assert_same(weights(student.get_submodule(part)), weights(teacher.get_submodule(part)))
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1, 2]
    assert [b.self_attn.layer_idx for b in teacher.model.layers] == [0, 1, 2, 3, 4]
    # a copy: training the student cannot touch the teacher
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert_same(weights(teacher), before)


def test_per_layer_config_lists_follow_the_kept_layers(teacher):
    teacher.config.layer_types = [f"type{i}" for i in range(5)]
    student = make_student(teacher, 2)
    assert student.config.layer_types == ["type0", "type4"]
    assert teacher.config.layer_types == [f"type{i}" for i in range(5)]


def test_the_student_saves_reloads_and_generates_with_its_cache(teacher, tmp_path):
    student = make_student(teacher, 3)
    prompt = torch.tensor([[1, 17, 33, 42, 8]])
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": PAD}
    cached = student.generate(prompt, use_cache=True, **kwargs)
    uncached = student.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, 13) and torch.equal(cached, uncached)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 3
    assert loaded.config.tunesmith_student_layers == [0, 2, 4]
    assert_same(weights(loaded), weights(student))
    assert torch.equal(loaded.generate(prompt, use_cache=True, **kwargs), cached)
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompt).logits, student(prompt).logits)


def test_a_student_of_a_student_records_the_first_teachers_layers(teacher):
    grandchild = make_student(make_student(teacher, 4), 2)  # [0, 1, 3, 4] -> [0, 4]
    assert grandchild.config.tunesmith_student_layers == [0, 4]
    assert_same(weights(grandchild.model.layers[1]), weights(teacher.model.layers[4]))


def test_a_student_of_a_classifier_keeps_its_head_and_labels(tmp_path):
    torch.manual_seed(0)
    teacher = LlamaForSequenceClassification(tiny_config(
        4, num_labels=2, id2label={0: "good", 1: "bad"}, label2id={"good": 0, "bad": 1})).eval()
    student = make_student(teacher, 2)
    assert len(student.model.layers) == student.config.num_hidden_layers == 2
    for mine, theirs in zip(student.model.layers, [0, 3], strict=True):
        assert_same(weights(mine), weights(teacher.model.layers[theirs]))
    assert_same(weights(student.score), weights(teacher.score))
    ids = torch.tensor([[1, 5, 9, 14], [1, 7, 3, PAD]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (2, 2)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.id2label == {0: "good", 1: "bad"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, logits)
