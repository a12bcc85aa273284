"""The training memory estimate: trainable counts equal the real model's, and it moves the
right way with batch size, sequence length, checkpointing and method. (Its accuracy against
a measured peak: tests/integration/test_memory_estimate.py.)"""

import pytest

from tunesmith.config import load_config
from tunesmith.flows.memory import training_memory
from tunesmith.flows.steps import prepare_model_for_training
from tunesmith.models.load import load_model
from tunesmith.models.sizing import load_model_config, model_shape
from tunesmith.training.memory import MemoryEstimate, estimate_training_memory


@pytest.fixture(scope="module")
def tiny_shape(tiny_model_dir):
    return model_shape(load_model_config(tiny_model_dir))


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_trainable_parameters_are_the_real_models(make_config, tiny_model_dir, test_home,
                                                  method):
    cfg = load_config(make_config(train={"method": method}))
    model = prepare_model_for_training(load_model(tiny_model_dir), cfg)
    estimate = training_memory(cfg, home=test_home)
    assert estimate.n_trainable == _trainable(model)
    assert estimate.n_params == sum(p.numel() for p in load_model(tiny_model_dir).parameters())
    assert estimate.optimizer == 2 * 4 * estimate.n_trainable  # two fp32 AdamW moments


def test_an_auto_batch_size_is_assumed_at_its_largest(make_config, test_home):
    estimate = training_memory(load_config(make_config(train={"batch_size": "auto"})),
                               home=test_home)
    assert estimate.tokens == 32 * 128  # max_length 128
    assert any("assumed 32" in note for note in estimate.notes)


def _estimate(shape, **kw) -> MemoryEstimate:
    settings = dict(method="lora", rows=4, max_length=256, lora_r=8, lora_dropout=0.05)
    return estimate_training_memory(shape, **{**settings, **kw})


def test_it_grows_with_the_batch_and_the_length(tiny_shape):
    base = _estimate(tiny_shape)
    assert _estimate(tiny_shape, rows=8).total > base.total
    assert _estimate(tiny_shape, max_length=512).total > base.total
    # only activations depend on the tokens
    assert _estimate(tiny_shape, rows=8).activations > base.activations
    assert _estimate(tiny_shape, rows=8).weights == base.weights


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpointing_shrinks_the_activations(tiny_shape, method):
    plain = _estimate(tiny_shape, method=method, rows=8, max_length=1024)
    checkpointed = _estimate(tiny_shape, method=method, rows=8, max_length=1024,
                             gradient_checkpointing=True)
    assert checkpointed.activations < plain.activations
    assert checkpointed.total < plain.total


def test_full_needs_more_than_lora_and_the_parts_add_up(tiny_shape):
    lora, full = _estimate(tiny_shape), _estimate(tiny_shape, method="full")
    assert full.gradients + full.optimizer > lora.gradients + lora.optimizer
    assert full.total > lora.total
    assert lora.parts()[-1] == ("total", lora.total)
    assert sum(size for _, size in lora.parts()[:-1]) == lora.total
    # bf16 halves the frozen weights and shrinks the layers' activations (the logits stay fp32)
    bf16 = _estimate(tiny_shape, precision="bf16", lm_head=False)
    assert bf16.weights == lora.weights // 2
    assert bf16.activations < _estimate(tiny_shape, lm_head=False).activations


def test_gradients_are_those_held_at_the_peak(tiny_shape):
    # backward starts at the LM head: only its (tied) gradient exists then
    full = _estimate(tiny_shape, method="full")
    assert full.peak_at == "start of backward" and full.gradients == tiny_shape.vocab * 64 * 4
    assert _estimate(tiny_shape).gradients == 0  # LoRA: the head is frozen
    # earlier micro-batches left all theirs
    assert _estimate(tiny_shape, method="full", accumulating=True).gradients == \
        4 * tiny_shape.n_params
    # little to keep for backward: the optimizer step, holding every gradient, is the peak
    small = _estimate(tiny_shape, method="full", rows=1, max_length=16, lm_head=False)
    assert small.peak_at == "optimizer step"
    assert (small.gradients, small.activations) == (4 * tiny_shape.n_params, 0)


def test_a_4bit_base_holds_its_linear_weights_in_about_an_eighth_of_fp32():
    from tunesmith.models.sizing import Linear, ModelShape
    from tunesmith.training.memory import estimate_training_memory

    linears = tuple(Linear(f"model.layers.{i}.mlp.up_proj", 1000, 1000) for i in range(4))
    shape = ModelShape(n_params=4_000_000 + 500_000, layers=4, hidden=1000, intermediate=1000,
                       heads=8, kv_heads=8, head_dim=125, vocab=500, linears=linears)
    common = dict(method="lora", rows=1, max_length=8, lora_r=4, device="cuda")
    plain = estimate_training_memory(shape, **common)
    nf4 = estimate_training_memory(shape, **common, quantize_base="nf4")
    assert plain.weights == 4_500_000 * 4
    assert nf4.weights == int(4_000_000 * 4.127 / 8 + 500_000 * 2)
    assert nf4.adapters == plain.adapters and nf4.total < plain.total


def test_adapters_on_the_top_layers_keep_only_those_layers_activations(tiny_shape):
    # without the LM head's logits (a classification head), which dominate for this tiny model
    everywhere = _estimate(tiny_shape, lora_dropout=0.0, rows=8, lm_head=False)
    top = _estimate(tiny_shape, lora_dropout=0.0, rows=8, lm_head=False, lora_layers=[-1])
    # the tiny model has 2 layers: backward from the top one keeps about half
    assert 0.3 * everywhere.activations < top.activations < 0.75 * everywhere.activations
    assert top.n_trainable == everywhere.n_trainable // 2
    sgd = _estimate(tiny_shape, optimizer="sgd")
    assert sgd.optimizer == 4 * sgd.n_trainable  # one fp32 momentum buffer


def test_a_run_with_adapters_on_some_layers_is_estimated_as_it_trains(make_config,
                                                                      tiny_model_dir, test_home):
    cfg = load_config(make_config(train={"lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                  "layers": [-1]}, "optimizer": "sgd",
                                         "learning_rate": 0.1}))
    model = prepare_model_for_training(load_model(tiny_model_dir), cfg)
    estimate = training_memory(cfg, home=test_home)
    assert estimate.n_trainable == _trainable(model)
    assert estimate.optimizer == 4 * estimate.n_trainable


def test_packed_rows_on_cpu_keep_the_attention_tensors_in_fp32(tiny_shape):
    """Packed rows attend through models.packed_attention on CPU, whose q, k, v and output
    are fp32 even under bf16 autocast: 2 more bytes each per token and layer."""
    common = dict(precision="bf16", base_dtype="bfloat16")
    plain = _estimate(tiny_shape, **common)
    packed = _estimate(tiny_shape, **common, packing=True)
    s = tiny_shape
    qkv_out = (2 * s.heads + 2 * s.kv_heads) * s.head_dim
    assert packed.activations - plain.activations == qkv_out * 2 * s.layers * 4 * 256
    # in fp32 they were fp32 already; CUDA keeps transformers' own kernels
    assert _estimate(tiny_shape, packing=True).activations == _estimate(tiny_shape).activations
    assert _estimate(tiny_shape, **common, packing=True, device="cuda").activations \
        == _estimate(tiny_shape, **common, device="cuda").activations
