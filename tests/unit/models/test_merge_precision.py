"""LoRA adapters trained over a bf16 copy of an fp32 base are merged into the base as stored."""

import copy

import torch
from peft import PeftModel

from tunesmith.models.classifier import load_classifier
from tunesmith.models.load import add_lora, load_model, onto_stored_base, save_merged, stored_dtype
from tunesmith.training.precision import cast_frozen


def _trained(model):
    """LoRA adapters with small, nonzero updates (B starts at zero: give it values)."""
    torch.manual_seed(3)
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    return model


def test_stored_dtype_reads_the_weights(tiny_model_dir, tmp_path):
    assert stored_dtype(tiny_model_dir) == "float32"
    load_model(tiny_model_dir, dtype="bfloat16").save_pretrained(tmp_path)
    assert stored_dtype(tmp_path) == "bfloat16"
    assert stored_dtype(tmp_path / "nowhere") == "float32"


def test_merge_goes_onto_the_fp32_base_not_its_bf16_copy(tiny_model_dir, tokenizer, tmp_path):
    model = _trained(load_model(tiny_model_dir))
    model.save_pretrained(tmp_path / "adapter")
    cast_frozen(model, torch.bfloat16)  # what bf16 training does to the frozen base
    ids = torch.tensor([tokenizer("great product, works well")["input_ids"]])
    reference = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "adapter")
    with torch.no_grad():
        expected = reference.eval()(ids).logits
        # merged into the bf16 copy, the update is rounded: the outputs move visibly
        rounded = save_merged(copy.deepcopy(model), tokenizer, tmp_path / "rounded")
        rounded = rounded.eval()(ids).logits
        assert (rounded - expected).abs().max() > 1e-3
        on_stored = onto_stored_base(model, tiny_model_dir,
                                     lambda dtype: load_model(tiny_model_dir, dtype=dtype))
        merged = save_merged(on_stored, tokenizer, tmp_path / "merged")
        assert stored_dtype(tmp_path / "merged") == "float32"
        torch.testing.assert_close(merged.eval()(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_a_base_already_in_its_stored_dtype_is_kept(tiny_model_dir):
    model = _trained(load_model(tiny_model_dir))
    assert onto_stored_base(model, tiny_model_dir, _never) is model


def test_the_classifier_head_goes_along(tiny_model_dir, tokenizer):
    def reload(dtype):
        return load_classifier(tiny_model_dir, ["good", "bad"],
                               pad_token_id=tokenizer.pad_token_id, dtype=dtype, seed=5)

    model = add_lora(reload("float32"), r=4, alpha=8, dropout=0.0,
                     target_modules="all-linear", task_type="SEQ_CLS")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-2)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cast_frozen(model, torch.bfloat16)
    on_stored = onto_stored_base(model, tiny_model_dir, reload)
    assert on_stored is not model
    again = {n: p for n, p in on_stored.named_parameters() if n in trained}
    assert set(again) == set(trained)
    for n, p in again.items():  # the head (trained in full) and every adapter carried over
        assert torch.equal(p, trained[n]), n
    assert {p.dtype for p in on_stored.parameters()} == {torch.float32}


def _never(dtype):
    raise AssertionError("the base should not be reloaded")
