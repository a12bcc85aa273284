"""Model sizes from the configuration alone equal the loaded model's, LoRA adapters included."""

import pytest

from tunesmith.models.load import add_lora, load_model
from tunesmith.models.sizing import (
    load_model_config,
    lora_parameters,
    lora_targets,
    model_shape,
)


@pytest.fixture(scope="module")
def tiny_shape(tiny_model_dir):
    return model_shape(load_model_config(tiny_model_dir))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_count_and_shape_match_the_model(tiny_model_dir, tiny_shape):
    model = load_model(tiny_model_dir)
    assert tiny_shape.n_params == sum(p.numel() for p in model.parameters())  # tied: once
    assert (tiny_shape.layers, tiny_shape.hidden, tiny_shape.intermediate) == (2, 64, 128)
    assert (tiny_shape.heads, tiny_shape.kv_heads, tiny_shape.head_dim) == (4, 2, 16)
    assert not any("lm_head" in lin.name for lin in tiny_shape.linears)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj"]])
def test_lora_parameters_match_peft(tiny_model_dir, tiny_shape, targets):
    peft_model = add_lora(load_model(tiny_model_dir), r=8, alpha=16, dropout=0.0,
                          target_modules=targets)
    expected = _trainable(peft_model)
    assert lora_parameters(lora_targets(tiny_shape, targets), 8) == expected
    # all-linear: 7 projections in each of the 2 layers
    assert len(lora_targets(tiny_shape, "all-linear")) == 14
