"""GGUF export of a tiny random GPT-NeoX as llama.cpp's gptneox architecture, and back through
the hand-written reader (transformers' GGUF loader has no gptneox): llama.cpp's tensor names and
metadata, the query_key_value rows regrouped as llama.cpp splits them, the same logits.

The model speaks a small byte-level BPE vocabulary (400 tokens, GPT-2's pre-tokenizer): gguf's
reader parses every vocabulary entry, seconds for the real 49,152-token one, which the GPT-NeoX
family run in the flow tests exports and reads back.
"""

import json
import shutil
import struct

import numpy as np
import pytest
import torch

from tunesmith.errors import ModelError
from tunesmith.models.export import export_gguf, load_gguf
from tunesmith.models.gguf_neox import qkv_from_llama_cpp, qkv_to_llama_cpp

TEXTS = ["great product, works well", "What is the capital of France? Paris, I think.",
         "call 09061701461 now to WIN £1000!!", "  leading spaces\tand\ttabs\n\nnew lines",
         "<|im_start|>user\nhi<|im_end|>\n", "日本語のテキスト 🚀 émojis"]
HEADS, HEAD_DIM = 4, 16
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# two layouts llama.cpp runs: attention and MLP side by side (Pythia's) with a quarter of each
# head rotating; one after the other with half rotating, no attention biases (llama.cpp needs
# them: zeros are written) and a tied head (llama.cpp reads output.weight: written again)
VARIANTS = {"parallel": dict(use_parallel_residual=True, rotary_pct=0.25),
            "sequential": dict(use_parallel_residual=False, rotary_pct=0.5, attention_bias=False,
                               tie_word_embeddings=True)}


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE as GPT-NeoX's own (GPT-2's split), learnt from the test texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXTS * 10, BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_neox(tokenizer, **settings):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=HEADS * HEAD_DIM, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=HEADS, max_position_embeddings=1024,
        initializer_range=0.2, layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **{"tie_word_embeddings": False, **settings})
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # the init leaves biases at 0 and norms at 1: make every one count
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """{variant: (model, model dir, f32 file, model and tokenizer loaded back)}."""
    found = {}
    for variant, settings in VARIANTS.items():
        out = tmp_path_factory.mktemp(f"neox-{variant}")
        model = tiny_neox(tokenizer, **settings)
        model.save_pretrained(out / "m")
        tokenizer.save_pretrained(out / "m")
        written = export_gguf(out / "m", out / "m-f32.gguf", tensor_type="f32", name="neox")
        found[variant] = (model, out / "m", written.path, *load_gguf(written.path))
    return found


def fields_and_tensors(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return ({k: f.contents() for k, f in reader.fields.items()},
            {t.name: np.asarray(t.data) for t in reader.tensors})


@torch.no_grad()
def max_logit_difference(a, b, tokenizer) -> tuple[float, float]:
    worst = scale = 0.0
    for text in TEXTS:
        x = torch.tensor([tokenizer(text)["input_ids"]])
        la, lb = a(input_ids=x).logits, b(input_ids=x).logits
        worst, scale = max(worst, float((la - lb).abs().max())), max(scale, float(la.abs().max()))
    return worst, scale


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_cpp_names_and_metadata(exported, variant):
    model, _, path, _, _ = exported[variant]
    fields, tensors = fields_and_tensors(path)
    settings = VARIANTS[variant]
    assert fields["general.architecture"] == "gptneox"
    assert fields["gptneox.block_count"] == 2 and fields["gptneox.embedding_length"] == 64
    assert fields["gptneox.feed_forward_length"] == 128
    assert fields["gptneox.attention.head_count"] == HEADS
    assert fields["gptneox.context_length"] == 1024
    # llama.cpp's converter: int(rotary_pct * head size) dimensions rotate
    assert fields["gptneox.rope.dimension_count"] == int(settings["rotary_pct"] * HEAD_DIM)
    assert fields["gptneox.rope.freq_base"] == 10000.0
    assert fields["gptneox.use_parallel_residual"] is settings["use_parallel_residual"]
    assert fields["gptneox.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert "gptneox.attention.layer_norm_rms_epsilon" not in fields  # LayerNorm, not RMSNorm
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    # every tensor llama.cpp's gptneox loads (llama-model.cpp), weights and biases, nothing more
    per_layer = [f"{t}.{p}" for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm",
                                      "ffn_up", "ffn_down") for p in ("weight", "bias")]
    expected = {"token_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight",
                *(f"blk.{i}.{n}" for i in range(2) for n in per_layer)}
    assert set(tensors) == expected
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert np.array_equal(tensors["output.weight"], state["gpt_neox.embed_in.weight"]
                          if settings.get("tie_word_embeddings") else state["lm_head.weight"])
    assert np.array_equal(tensors["blk.1.ffn_norm.bias"],
                          state["gpt_neox.layers.1.post_attention_layernorm.bias"])
    if settings.get("attention_bias") is False:
        assert not tensors["blk.0.attn_qkv.bias"].any()
        assert not tensors["blk.1.attn_output.bias"].any()


def test_query_key_value_rows_regrouped_as_llama_cpp_splits_them(exported):
    # Hugging Face views the fused product per head as [q | k | v] (16 rows each); llama.cpp
    # views it as all queries, then all keys, then all values (ggml_view_3d at offsets 0,
    # n_embd, 2 n_embd), head after head
    model, _, path, _, _ = exported["parallel"]
    _, tensors = fields_and_tensors(path)
    layer = model.gpt_neox.layers[1].attention.query_key_value
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    stored_w, stored_b = tensors["blk.1.attn_qkv.weight"], tensors["blk.1.attn_qkv.bias"]
    d = HEAD_DIM
    for kind, name in enumerate("qkv"):
        for head in range(HEADS):
            hf_rows = slice(head * 3 * d + kind * d, head * 3 * d + (kind + 1) * d)
            llama_rows = slice(kind * HEADS * d + head * d, kind * HEADS * d + (head + 1) * d)
            assert np.array_equal(stored_w[llama_rows], w[hf_rows]), (name, head)
            assert np.array_equal(stored_b[llama_rows], b[hf_rows]), (name, head)
    assert not np.array_equal(stored_w, w)
    assert np.array_equal(qkv_from_llama_cpp(qkv_to_llama_cpp(w, HEADS), HEADS), w)
    assert np.array_equal(qkv_from_llama_cpp(stored_b, HEADS), b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_round_trip_gives_the_same_logits(exported, tokenizer, variant):
    model, _, _, back, back_tok = exported[variant]
    assert type(back).__name__ == "GPTNeoXForCausalLM"
    assert back.config.use_parallel_residual is VARIANTS[variant]["use_parallel_residual"]
    assert back.gpt_neox.layers[0].attention.rotary_ndims == \
        model.gpt_neox.layers[0].attention.rotary_ndims
    worst, scale = max_logit_difference(model, back, tokenizer)
    assert scale > 1.0 and worst < 1e-5, (worst, scale)


def test_f16_logits_within_tolerance(exported, tokenizer, tmp_path):
    # f16 rounds each weight by at most 2^-11 of itself; a wrong tensor or row order is off by
    # the order of the logits themselves (the same bound as the Llama export's test)
    model, model_dir, _, _, _ = exported["parallel"]
    written = export_gguf(model_dir, tmp_path / "m-f16.gguf", tensor_type="f16")
    assert written.tensor_types == {"F16": 10, "F32": 18}  # matrices; norms and biases
    back, _ = load_gguf(written.path)
    worst, scale = max_logit_difference(model, back, tokenizer)
    assert worst <= 0.01 * scale, (worst, scale)


def test_tokenizer_comes_back(exported, tokenizer):
    _, _, _, _, back_tok = exported["parallel"]
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert back_tok(text, add_special_tokens=False)["input_ids"] == ids, text
        assert back_tok.decode(ids) == tokenizer.decode(ids)
    assert back_tok.chat_template == tokenizer.chat_template
    for name in ("bos", "eos", "pad"):
        assert getattr(back_tok, f"{name}_token") == getattr(tokenizer, f"{name}_token")


def test_an_activation_llama_cpp_does_not_apply_is_refused(exported, tmp_path):
    model_dir = shutil.copytree(exported["parallel"][1], tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ModelError, match="llama.cpp's gptneox architecture fixes in its code "
                       "what this model sets otherwise: hidden_act 'relu'"):
        export_gguf(model_dir, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out").exists()


def test_the_architecture_is_read_wherever_the_file_puts_it(exported, tmp_path):
    from tunesmith.models.gguf_neox import file_architecture

    def entry(key: str, value: str) -> bytes:  # a string entry: key, type 8, value
        k, v = key.encode(), value.encode()
        return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v

    assert file_architecture(exported["parallel"][2]) == "gptneox"  # first, as gguf writes it
    later = tmp_path / "later.gguf"  # magic, version 3, no tensors, two entries
    later.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + entry("general.name", "x")
                      + entry("general.architecture", "gptneox"))
    assert file_architecture(later) == "gptneox"


def test_a_gptneox_gguf_imports_as_a_base_model(exported, tokenizer, tmp_path):
    """`model.base: some.gguf` imports through the same reader: a trainable directory whose
    model gives the original's logits."""
    from tunesmith.models.load import load
    from tunesmith.models.resolve import resolve_model

    model, _, gguf_file, _, _ = exported["parallel"]
    imported = resolve_model(str(gguf_file), home=tmp_path / "home")
    assert (imported / "config.json").is_file() and imported.parent.parent == tmp_path / "home"
    back, back_tokenizer = load(imported)
    assert type(back).__name__ == "GPTNeoXForCausalLM"
    assert not hasattr(back.config, "quantization_config")
    assert back_tokenizer(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]
    worst, scale = max_logit_difference(model, back.eval(), tokenizer)
    assert scale > 1.0 and worst < 1e-5, (worst, scale)
