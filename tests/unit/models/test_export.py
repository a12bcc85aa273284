"""GGUF export of the tiny random Llama, loaded back through transformers' GGUF loader (the one
the bundled model is imported with); the hf export; the Ollama Modelfile."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from tunesmith.data.encode import encode_prompt
from tunesmith.errors import ModelError
from tunesmith.models.export import export_gguf, export_hf, load_gguf, permute
from tunesmith.models.generation import GenerationParams, generate
from tunesmith.models.gguf_vocab import pre_tokenizer_name
from tunesmith.models.load import load
from tunesmith.models.modelfile import modelfile_text

PROMPTS = ["great product, works well", "broke after a day", "What is the capital of France?",
           "call 09061701461 now to WIN £1000!!", "Write a haiku about rain.", "I love it",
           "terrible quality, do not buy", "Hello"]
TEXTS = [*PROMPTS, "  leading spaces\tand\ttabs\n\nnew lines", "日本語のテキスト 🚀 émojis",
         "<|im_start|>user\nhi<|im_end|>\n", "3.14159 12,345 1e-9", "don't won't it's"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """The tiny model as GGUF in each tensor type, loaded back: {type: (written, model, tok)}."""
    out = tmp_path_factory.mktemp("gguf")
    found = {}
    for tensor_type in ("f32", "f16", "q8_0"):
        written = export_gguf(tiny_model_dir, out / f"tiny-{tensor_type}.gguf",
                              tensor_type=tensor_type, name="tiny")
        found[tensor_type] = (written, *load_gguf(written.path))
    return found


def conversations():
    return [[{"role": "user", "content": p}] for p in PROMPTS]


def prompt_ids(tokenizer):
    return [encode_prompt(tokenizer, c) for c in conversations()]


@torch.no_grad()
def max_logit_difference(a, b, ids) -> tuple[float, float]:
    """Largest |logit difference| over every position of every prompt, and the largest
    |logit| of ``a`` (the scale it is measured against)."""
    worst = scale = 0.0
    for x in ids:
        la, lb = a(input_ids=torch.tensor([x])).logits, b(input_ids=torch.tensor([x])).logits
        worst = max(worst, float((la - lb).abs().max()))
        scale = max(scale, float(la.abs().max()))
    return worst, scale


def test_f32_round_trip_is_exact(reference, exported):
    # names, the q/k permutation and the tied head all right: nothing to round, nothing differs
    model, tokenizer = reference
    _, back, back_tok = exported["f32"]
    worst, _ = max_logit_difference(model, back, prompt_ids(tokenizer))
    assert worst < 1e-5


def test_f16_logits_within_tolerance(reference, exported):
    # f16 keeps 11 significant bits: each weight is off by at most 2^-11 (0.05%) of itself.
    # Through two layers and the tied head those errors add up to a few times that (0.27%
    # of the largest logit observed); 1% leaves 4x headroom, while a wrong tensor or
    # permutation is off by the order of the logits themselves.
    model, tokenizer = reference
    _, back, _ = exported["f16"]
    worst, scale = max_logit_difference(model, back, prompt_ids(tokenizer))
    assert worst <= 0.01 * scale, (worst, scale)


def _q8_0_reference(tiny_model_dir):
    """The tiny model with every matrix rounded through q8_0 and back, in numpy (gguf.quants)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    model, _ = load(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                w = p.numpy()
                q = dequantize(quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(q.reshape(w.shape)))
    return model.eval()


def test_q8_0_holds_exactly_the_quantised_model(tiny_model_dir, reference, exported):
    # The file must be the model with each matrix rounded to q8_0, nothing more: same greedy
    # replies (8 prompts, 8 new tokens) and the same logits as that model rounded in numpy.
    _, tokenizer = reference
    _, back, back_tok = exported["q8_0"]
    rounded = _q8_0_reference(tiny_model_dir)
    ids = prompt_ids(tokenizer)
    params = GenerationParams(max_new_tokens=8)
    assert [r.text for r in generate(rounded, tokenizer, ids, params)] == \
        [r.text for r in generate(back, back_tok, prompt_ids(back_tok), params)]
    assert max_logit_difference(rounded, back, ids)[0] < 1e-4


@torch.no_grad()
def test_q8_0_greedy_agreement_with_the_original(reference, exported):
    # A random tiny model is too fragile for whole greedy replies to survive q8_0: its top two
    # next-token logits are typically 0.2 apart, q8_0 moves logits by up to ~0.8 here, and one
    # flipped token changes the rest of the reply (observed: 2 of 8 replies identical). So the
    # test feeds both models the original's greedy replies and compares each next-token choice
    # (observed 88% the same, the first token in 7 of 8). A broken export agrees by chance
    # only (~0%); 75% separates the two with margin.
    model, tokenizer = reference
    _, back, _ = exported["q8_0"]
    ids = prompt_ids(tokenizer)
    params = GenerationParams(max_new_tokens=8)
    same = total = first = 0
    for x, reply in zip(ids, generate(model, tokenizer, ids, params), strict=True):
        full = x + tokenizer(reply.text, add_special_tokens=False)["input_ids"]
        positions = slice(len(x) - 1, len(full) - 1)
        a = model(input_ids=torch.tensor([full])).logits[0, positions].argmax(-1)
        b = back(input_ids=torch.tensor([full])).logits[0, positions].argmax(-1)
        same, total, first = same + int((a == b).sum()), total + len(a), first + int(a[0] == b[0])
    assert same / total >= 0.75, (same, total)
    assert first >= 6


def test_tokenizer_round_trip(reference, exported):
    _, tokenizer = reference
    for _, _, back_tok in exported.values():
        for text in TEXTS:
            assert back_tok(text, add_special_tokens=False)["input_ids"] == \
                tokenizer(text, add_special_tokens=False)["input_ids"], text
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert back_tok.decode(ids) == tokenizer.decode(ids)
        assert back_tok.chat_template == tokenizer.chat_template
        assert prompt_ids(back_tok) == prompt_ids(tokenizer)
        for name in ("bos", "eos", "pad", "unk"):
            assert getattr(back_tok, f"{name}_token") == getattr(tokenizer, f"{name}_token")


def test_metadata_and_tensor_types(tiny_model_dir, exported):
    from gguf import GGUFReader

    config = json.loads((tiny_model_dir / "config.json").read_text())
    reader = GGUFReader(exported["q8_0"][0].path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "tiny"
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.feed_forward_length"] == 128
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.context_length"] == 1024 and fields["llama.rope.dimension_count"] == 16
    assert fields["llama.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert fields["tokenizer.ggml.merges"][0] == "Ġ t"
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # <|endoftext|>, <|im_*|>
    assert fields["tokenizer.ggml.eos_token_id"] == config["eos_token_id"]
    assert fields["tokenizer.chat_template"].startswith("{% for message in messages %}")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: the head is token_embd
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.1.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert exported["q8_0"][0].tensor_types == {"Q8_0": 15, "F32": 5}
    assert exported["f16"][0].tensor_types == {"F16": 15, "F32": 5}
    assert exported["q8_0"][0].bytes < exported["f16"][0].bytes < exported["f32"][0].bytes
    umask = os.umask(0)
    os.umask(umask)  # an ordinary file's permissions, not tempfile's private 0600
    assert exported["q8_0"][0].path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_permute_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    undo = LlamaTensorProcessor()._reverse_permute_weights
    assert not np.array_equal(permute(w, 8, 8), w)
    assert np.array_equal(undo(permute(w, 8, 8), 8, 8), w)
    assert np.array_equal(undo(permute(w[:32], 8, 2), 8, 2), w[:32])  # grouped k heads


def test_untied_head_is_written_as_output(tmp_path, reference):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = reference
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False))
    model.save_pretrained(tmp_path / "untied")
    tokenizer.save_pretrained(tmp_path / "untied")
    written = export_gguf(tmp_path / "untied", tmp_path / "untied.gguf", tensor_type="f32")
    back, _ = load_gguf(written.path)
    assert not back.config.tie_word_embeddings
    assert max_logit_difference(model.eval(), back, prompt_ids(tokenizer))[0] < 1e-5


def _with_architecture(src, dst, arch):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = [arch]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_other_architectures_are_refused(tmp_path, tiny_model_dir):
    model_dir = _with_architecture(tiny_model_dir, tmp_path / "m", "FalconForCausalLM")
    with pytest.raises(ModelError, match="supports LlamaForCausalLM.*Phi3ForCausalLM, "
                       "Gemma3ForCausalLM, GPTNeoXForCausalLM .*this model is Falcon"):
        export_gguf(model_dir, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out").exists()


def test_gemma3_settings_llama_cpp_fixes_otherwise_are_refused(tmp_path, tiny_family_dir):
    model_dir = tiny_family_dir("gemma3")  # one full layer of two, a soft-capped head
    with pytest.raises(ModelError) as err:
        export_gguf(model_dir, tmp_path / "out" / "g.gguf")
    message = str(err.value)
    assert "llama.cpp's gemma3 architecture fixes in its code" in message
    assert "layer_types ['sliding_attention', 'full_attention']" in message
    assert "final_logit_softcapping 30.0 (llama.cpp's gemma3 applies none)" in message
    assert "--format hf" in message
    assert not (tmp_path / "out").exists()


def test_classification_head_is_refused(tmp_path, tiny_model_dir):
    model_dir = _with_architecture(tiny_model_dir, tmp_path / "m",
                                   "LlamaForSequenceClassification")
    with pytest.raises(ModelError, match="classification head"):
        export_gguf(model_dir, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_an_interrupted_export_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from tunesmith.models import export as export_module

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_encode", broken)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_model_dir, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_hf_export_is_clean_and_standalone(tmp_path, tiny_model_dir, reference):
    source = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, source)
    (source / "adapter_config.json").write_text("{}")  # leftovers a clean export drops
    (source / "optimizer.pt").write_bytes(b"x")
    (source / "calibration.json").write_text('{"temperature": 0.5}')
    written = export_hf(source, tmp_path / "hf")
    names = {p.name for p in written.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "chat_template.jinja", "calibration.json"} <= names
    assert not names & {"adapter_config.json", "optimizer.pt"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert written.path.stat().st_mode & 0o777 == 0o777 & ~umask
    model, tokenizer = reference
    back, back_tok = load(written.path)
    assert back_tok.chat_template == tokenizer.chat_template
    assert max_logit_difference(model, back, prompt_ids(tokenizer))[0] == 0.0


def test_modelfile_translates_chatml(reference):
    _, tokenizer = reference
    text, notes = modelfile_text("tiny-q8_0.gguf", tokenizer, system="Label it.",
                                 temperature=0.0)
    assert notes == []
    assert "FROM ./tiny-q8_0.gguf\n" in text
    assert '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'SYSTEM """Label it."""' in text
    assert 'PARAMETER stop "<|im_start|>"' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER temperature 0\n" in text
    # no shared system prompt: the one SmolLM2's template inserts by itself
    text, _ = modelfile_text("m.gguf", tokenizer)
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    assert "temperature" not in text


def test_modelfile_leaves_other_templates_to_ollama(tiny_model_dir):
    from tunesmith.models.load import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                               "{% endfor %}")
    text, notes = modelfile_text("m.gguf", tokenizer, system="S")
    assert "TEMPLATE" not in text.replace("# TEMPLATE", "") and notes
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in text and 'SYSTEM """S"""' in text


def test_pre_tokenizer_names_follow_llama_cpp():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}) == "smollm"
    with pytest.raises(ModelError, match="Metaspace"):
        pre_tokenizer_name({"type": "Metaspace", "replacement": "▁"})
    with pytest.raises(ModelError, match="add_prefix_space"):
        pre_tokenizer_name({**byte_level, "add_prefix_space": True})
    llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501 (as Llama 3's tokenizer.json has it)
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": llama3}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}) == "llama-bpe"
    qwen2 = llama3.replace(r"\p{N}{1,3}", r"\p{N}")  # as Qwen2.5's tokenizer.json has it
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": qwen2}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}) == "qwen2"


def test_unsupported_tokenizers_are_refused_before_writing(tmp_path, tiny_model_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tunesmith.models.gguf_vocab import vocabulary

    # byte fallback, but spaces split by whitespace: no sentencepiece tokenizer llama.cpp knows
    odd = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[], byte_fallback=True))
    odd.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ModelError, match="sentencepiece-style tokenizer .*Whitespace"):
        vocabulary(PreTrainedTokenizerFast(tokenizer_object=odd), 2)
    word_level = Tokenizer(models.WordLevel(vocab={"a": 0, "<unk>": 1}, unk_token="<unk>"))
    with pytest.raises(ModelError, match="this one is WordLevel"):
        vocabulary(PreTrainedTokenizerFast(tokenizer_object=word_level), 2)
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "m")
    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                             "split": False}
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="Metaspace"):
        export_gguf(model_dir, tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------- sentencepiece vocabularies

SPACE = "\u2581"
# words the small vocabulary only covers in parts, where the order of merges decides the split
NOVEL = ["productive haikus rained over capitals", "worksheet of brokers", "heartbroken",
         "lovely Frenchmen write haiku", "terribly wonderful day-trips", "capitalist"]


def sentencepiece_tokenizer(style: str):
    """A small tokenizer shaped as a sentencepiece model converted to tokenizer.json: BPE with
    byte fallback, <unk> <s> </s> then the 256 <0xNN> byte pieces, spaces as "\u2581"; a
    space before the text as Llama 2's normalizer puts it ("llama2") or none (Gemma's)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    steps = [normalizers.Replace(" ", SPACE)]
    if style == "llama2":
        steps.insert(0, normalizers.Prepend(SPACE))
    learner = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    learner.normalizer = normalizers.Sequence(steps)
    learner.pre_tokenizer = pre_tokenizers.Split(SPACE, behavior="merged_with_next")
    learner.train_from_iterator(TEXTS * 10, BpeTrainer(vocab_size=400, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                                   unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence(steps)
    if style == "gemma":  # as transformers' GemmaTokenizer builds it (spaces are gone by then)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if style == "llama2" else []))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}")
    return tokenizer


def llama_cpp_sentencepiece(text: str, tokens: list, scores: list, prefix: bool) -> list[int]:
    """llama.cpp's sentencepiece tokenizer (``llm_tokenizer_spm``), as a reference: spaces to
    "\u2581" (one before the text with ``add_space_prefix``), characters merged pair by pair,
    the best-scored pair whose concatenation is a token first (the leftmost of equals), then
    each piece's id, or its UTF-8 bytes' <0xNN> pieces."""
    ids = {t: i for i, t in enumerate(tokens)}
    pieces = list((SPACE if prefix else "") + text.replace(" ", SPACE))
    while True:
        pairs = [(scores[ids[a + b]], -i)
                 for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))
                 if a + b in ids]
        if not pairs:
            break
        i = -max(pairs)[1]
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    out = []
    for piece in pieces:
        out.extend([ids[piece]] if piece in ids
                   else [ids[f"<0x{b:02X}>"] for b in piece.encode("utf-8")])
    return out


def sentencepiece_model(family: str, tokenizer):
    """A tiny random model of ``family`` for a sentencepiece ``tokenizer``: Llama, Phi-3
    (partial rotary, fused projections) or Gemma 3 (llama.cpp's layer pattern: both of two
    layers sliding; q/k norms, norms around both blocks, tied scaled embeddings)."""
    import transformers as tf

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  bos_token_id=1, eos_token_id=2)
    config = {"llama": lambda: tf.LlamaConfig(**common),
              "phi3": lambda: tf.Phi3Config(**common, pad_token_id=0,
                                            partial_rotary_factor=0.5),
              "gemma3": lambda: tf.Gemma3TextConfig(**common, head_dim=16, pad_token_id=0,
                                                    query_pre_attn_scalar=16)}[family]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(("style", "family"), [("llama2", "llama"), ("llama2", "phi3"),
                                               ("gemma", "gemma3")])
def test_sentencepiece_vocabularies_round_trip(tmp_path, style, family):
    """Llama 2 / Mistral 7B / Phi-3 / Gemma keep sentencepiece vocabularies: the file holds
    llama.cpp's "llama" vocabulary, whose scores make llama.cpp split text as the tokenizer
    does, and transformers' loader gives back the same tokenizer and model. The Phi-3 (partial
    rotary, fused projections) and the Gemma 3 (llama.cpp's layer pattern: both of two layers
    sliding; q/k norms, norms around both blocks, tied scaled embeddings) also show their
    architectures' layouts in the file and come back with the same logits."""
    from gguf import GGUFReader

    tokenizer = sentencepiece_tokenizer(style)
    model = sentencepiece_model(family, tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    written = export_gguf(tmp_path / "m", tmp_path / "m.gguf", tensor_type="f32")

    fields = {k: f.contents() for k, f in GGUFReader(written.path).fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is (style == "llama2")
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:4] == [2, 3, 3, 6] and tokens[3] == "<0x00>"  # unknown, control, byte
    split_as_llama_cpp = []
    for text in TEXTS + NOVEL:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llama_cpp_sentencepiece(text, tokens, scores, style == "llama2") == expected, text
        split_as_llama_cpp.append(llama_cpp_sentencepiece(text, tokens, [0.0] * len(tokens),
                                                          style == "llama2") == expected)
    assert not all(split_as_llama_cpp)  # without the scores llama.cpp would split otherwise

    back, back_tok = load_gguf(written.path)
    for text in TEXTS + NOVEL:
        if family == "llama" and text.startswith(" "):
            # transformers' loader builds Llama's tokenizer with a Metaspace pre-tokenizer, which
            # reads leading spaces differently from Llama 2's normalizer (and from llama.cpp)
            continue
        ids = tokenizer(text)["input_ids"]
        assert back_tok(text)["input_ids"] == ids, text
        assert back_tok.decode(ids) == tokenizer.decode(ids)
    assert back_tok.chat_template == tokenizer.chat_template
    ids = [tokenizer(text)["input_ids"] for text in PROMPTS]
    assert max_logit_difference(model, back, ids)[0] < 1e-5

    tensors = {t.name: t for t in GGUFReader(written.path).tensors}
    assert fields["general.architecture"] == family
    if family == "phi3":
        # fused tensors stay fused; 8 of each head's 16 dimensions rotate, which transformers'
        # loader would leave at all 16 (load_gguf sets it from the file)
        assert fields["phi3.rope.dimension_count"] == 8
        assert fields["phi3.attention.sliding_window"] == 0
        assert tuple(tensors["blk.0.attn_qkv.weight"].shape) == (64, 128)  # gguf: (in, out)
        assert tuple(tensors["blk.0.ffn_up.weight"].shape) == (64, 256)
        assert back.config.partial_rotary_factor == 0.5
    elif family == "gemma3":
        from safetensors.torch import load_file

        assert fields["gemma3.attention.key_length"] == 16
        assert fields["gemma3.attention.sliding_window"] == model.config.sliding_window
        assert "output.weight" not in tensors  # tied
        stored = np.asarray(tensors["blk.0.attn_q_norm.weight"].data)
        weights = load_file(tmp_path / "m" / "model.safetensors")
        # llama.cpp multiplies by the norm weight as stored; Gemma's RMSNorm by 1 + weight
        assert np.allclose(stored, weights["model.layers.0.self_attn.q_norm.weight"].numpy() + 1)
        assert back.config.query_pre_attn_scalar == 16  # the loader's default would be 256
        assert back.config.layer_types == model.config.layer_types
