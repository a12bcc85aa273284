"""Tiny random models of the architecture families tunesmith is tested with.

Each is built with the family's own config class and quirks (Qwen2's q/k/v biases, Gemma's
tied and scaled embeddings with a soft-capped head and sliding-window layers, Phi-3's fused
qkv_proj and gate_up_proj, GPT-NeoX's fused query_key_value and partial rotary), 2 layers,
hidden 64, and saved with the real bundled tokenizer, whose copy gets the family's chat
template where it differs from the bundled ChatML one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("qwen2", "mistral", "gemma3", "phi3", "gpt_neox")

# Gemma's own layout: no system role, strict user/model alternation (as Gemma 2's template;
# the real one also starts with the bos token).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# These export to GGUF (llama.cpp's llama, qwen2, phi3 and gptneox architectures). The tiny
# Gemma 3 sets what llama.cpp's gemma3 fixes in code (its layer pattern, a soft-capped head), so
# it is refused naming those settings.
GGUF_EXPORTS = {"mistral", "qwen2", "phi3", "gpt_neox"}


def family_config(family: str, tokenizer: Any) -> Any:
    """The family's config class, tiny: 2 layers, hidden 64, GQA where the family has it."""
    import transformers as tf

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
                  # a wide init lets the head reach confident logits, so the loss can fall
                  initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "qwen2":  # biases on q/k/v; the small Qwen2s tie their embeddings
        return tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                sliding_window=None)
    if family == "gemma3":
        # tied, scaled embeddings; q/k norms; one sliding-window layer, one full; a
        # soft-capped head (Gemma 2's, which Gemma 3's config still takes)
        return tf.Gemma3TextConfig(**common, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=True, sliding_window=16,
                                   layer_types=["sliding_attention", "full_attention"],
                                   query_pre_attn_scalar=16, final_logit_softcapping=30.0)
    if family == "phi3":  # fused qkv_proj and gate_up_proj, partial rotary
        return tf.Phi3Config(**common, num_key_value_heads=2, tie_word_embeddings=False,
                             partial_rotary_factor=0.5)
    if family == "gpt_neox":  # fused query_key_value, parallel residual, 25 % rotary
        return tf.GPTNeoXConfig(**common, tie_word_embeddings=False, rotary_pct=0.25,
                                use_parallel_residual=True)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def build_family(family: str, tokenizer: Any, path: Path) -> Path:
    """A random model of ``family`` with a copy of ``tokenizer``, saved to ``path``."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
    model.save_pretrained(path)
    tok = copy.deepcopy(tokenizer)
    if family == "gemma3":
        tok.chat_template = GEMMA_TEMPLATE
    tok.save_pretrained(path)
    return path
