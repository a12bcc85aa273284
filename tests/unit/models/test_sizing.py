"""Model sizes from the configuration alone equal the loaded model's, LoRA adapters included."""

import pytest

from tunesmith.errors import ModelError
from tunesmith.models.load import add_lora, load_model
from tunesmith.models.sizing import (
    layer_index,
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


def _adapted_modules(model) -> set[str]:
    return {n.split(".lora_A")[0].removeprefix("base_model.model.")
            for n, _ in model.named_parameters() if ".lora_A." in n}


@pytest.mark.parametrize(("targets", "layers"), [
    ("all-linear", [-1]), (["q_proj", "v_proj"], [0]), (["down_proj"], [-2, 1]),
])
def test_adapters_on_some_layers_only_match_the_estimate(tiny_model_dir, tiny_shape, targets,
                                                        layers):
    peft_model = add_lora(load_model(tiny_model_dir), r=8, alpha=16, dropout=0.0,
                          target_modules=targets, layers=layers)
    expected = {lin.name for lin in lora_targets(tiny_shape, targets, layers)}
    adapted = _adapted_modules(peft_model)
    assert adapted == expected and adapted
    assert {layer_index(name) for name in adapted} == {i % 2 for i in layers}
    assert lora_parameters(lora_targets(tiny_shape, targets, layers), 8) == \
        _trainable(peft_model)


@pytest.mark.parametrize("layers", [[2], [-3], []])
def test_layers_the_model_does_not_have_are_refused(tiny_model_dir, layers):
    with pytest.raises(ModelError, match=r"train.lora.layers .*this model has 2 decoder layers"):
        add_lora(load_model(tiny_model_dir), r=8, alpha=16, dropout=0.0,
                 target_modules="all-linear", layers=layers)
