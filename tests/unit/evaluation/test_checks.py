import json

import pytest
import torch

from tunesmith.data.chat import ChatExample
from tunesmith.errors import DataError, ModelError
from tunesmith.evaluation.checks import (
    check_adapter,
    check_labels,
    check_model_tokenizer,
    check_references,
)


def small_llama(vocab: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2))


def test_matching_model_and_tokenizer_pass(tiny_model, tokenizer):
    check_model_tokenizer(tiny_model, tokenizer)


def test_a_tokenizer_bigger_than_the_embedding_is_a_model_error(tokenizer):
    with pytest.raises(ModelError, match="do not belong together"):
        check_model_tokenizer(small_llama(vocab=1000, hidden=32), tokenizer)


@pytest.fixture
def adapter_dir(tiny_model, tiny_model_dir, tmp_path):
    from tunesmith.models.load import add_lora

    wrapped = add_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    wrapped.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_an_adapter_fits_its_own_base(adapter_dir, tiny_model_dir):
    from tunesmith.models.load import load_model

    assert check_adapter(adapter_dir, load_model(tiny_model_dir)) == []


def test_an_adapter_for_another_shape_is_a_model_error(adapter_dir, tokenizer):
    other = small_llama(vocab=len(tokenizer), hidden=32)
    with pytest.raises(ModelError, match="input size 32 in this model but 64 in the adapter"):
        check_adapter(adapter_dir, other)


def test_an_adapter_for_missing_modules_is_a_model_error(adapter_dir, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=64, n_layer=1, n_head=4))
    with pytest.raises(ModelError, match="does not have"):
        check_adapter(adapter_dir, gpt2)


def test_another_base_name_warns_or_fails_when_strict(adapter_dir, tiny_model_dir):
    from tunesmith.models.load import load_model

    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-360M-Instruct"
    cfg_path.write_text(json.dumps(cfg))
    model = load_model(tiny_model_dir)
    warnings = check_adapter(adapter_dir, model)
    assert len(warnings) == 1 and "SmolLM2-360M-Instruct" in warnings[0]
    with pytest.raises(ModelError, match="load the base model it was trained on"):
        check_adapter(adapter_dir, model, strict_name=True)


def test_not_an_adapter(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="no adapter_config.json"):
        check_adapter(tmp_path, tiny_model)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="no adapter_model.safetensors"):
        check_adapter(tmp_path, tiny_model)


def test_labels_the_model_was_not_trained_on():
    ex = ChatExample([{"role": "user", "content": "x"}, {"role": "assistant", "content": "maybe"}],
                     line=3, source="test.jsonl")
    with pytest.raises(DataError, match=r"label\(s\) \['maybe'\] the model is not trained on"):
        check_labels([ex], ["good", "bad"], "test")


def test_empty_references():
    with pytest.raises(DataError, match="no reference answers"):
        check_references([], [])


def test_training_warnings_flag_a_best_step_of_zero_and_a_one_class_predictor():
    from tunesmith.evaluation.checks import training_warnings

    assert training_warnings(best_step=5, last_step=10, predicted=["a", "b"],
                             labels=["a", "b"]) == []
    never = training_warnings(best_step=0, last_step=10)
    assert len(never) == 1 and "never improved on the starting point" in never[0]
    assert training_warnings(best_step=0, last_step=0) == []  # nothing trained yet
    one = training_warnings(best_step=5, last_step=10, predicted=["ham"] * 7 + ["garbled"],
                            labels=["spam", "ham"])
    assert len(one) == 1 and "degenerate classifier" in one[0] and "'ham'" in one[0]


def test_training_warnings_lead_the_report(tmp_path):
    from tunesmith.evaluation.report import write_reports

    results = {"name": "r", "model": "m", "task": "generation", "data_counts": {"test": 1},
               "hyperparameters": {}, "base": None, "tuned": {"n": 1, "exact_match": 0.0},
               "training": {"best_step": 0, "warnings": ["training never improved on the "
                                                         "starting point"]}}
    md, _ = write_reports(tmp_path, results)
    text = md.read_text()
    assert text.index("## Warnings") < text.index("## Training")
    assert "training never improved on the starting point" in text
    assert "warnings:" not in text  # not repeated as a plain training fact
