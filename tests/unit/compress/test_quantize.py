"""Weight-only int8: what is quantised, how close it stays to fp32, and that it reloads."""

from __future__ import annotations

import pytest
import torch

from tunesmith.compress import quantize
from tunesmith.compress.prune import prunable_linears

pytestmark = pytest.mark.skipif(quantize.int8_support() is not None,
                                reason=f"int8 cannot run here: {quantize.int8_support()}")

# Per-row symmetric int8 rounds each weight by at most half a step (max|row| / 254). The tiny
# model's random weights are wide (init range 0.2), which makes that error larger than in a
# trained model; measured: max |change| 1.6% of the logits' range, mean |change| 1.8% of their
# standard deviation. The tolerance is 3% on both.
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from tunesmith.models.load import load_model

    return load_model(tiny_model_dir).eval(), quantize.load_int8(tiny_model_dir).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 500, 2000, 33, 4000, 12, 9, 77]])


def test_the_decoder_linear_layers_and_only_they_are_int8(models):
    fp32, int8 = models
    assert set(quantize.quantized_layers(int8)) == set(prunable_linears(fp32))
    assert not quantize.is_quantized(int8.lm_head.weight)
    assert int8.lm_head.weight is int8.model.embed_tokens.weight  # still tied
    q = int8.model.layers[0].self_attn.q_proj.weight
    assert q.qdata.dtype == torch.int8 and q.scale.numel() == q.shape[0]  # a scale per row


def test_outputs_stay_close_to_fp32(models):
    fp32, int8 = models
    ref, got = logits(fp32, IDS), logits(int8, IDS)
    assert not torch.equal(ref, got)  # it really is quantised
    change = (got - ref).abs()
    assert change.max() <= TOLERANCE * (ref.max() - ref.min())
    assert change.mean() <= TOLERANCE * ref.std()


def test_a_saved_int8_model_reloads_with_the_same_outputs(models, tmp_path):
    from safetensors import safe_open

    from tunesmith.models.load import load_model

    _, int8 = models
    int8.save_pretrained(tmp_path)
    # only safetensors: reloading never unpickles anything
    assert sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name or
                  p.suffix in (".bin", ".pt", ".pth")) == ["model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.down_proj._weight_qdata")
    assert q.dtype == torch.int8
    again = load_model(tmp_path).eval()  # tunesmith's own loader, nothing special
    assert set(quantize.quantized_layers(again)) == set(quantize.quantized_layers(int8))
    assert torch.equal(logits(again, IDS), logits(int8, IDS))
