"""How llama.cpp lays out each architecture the GGUF export writes, and the settings its code
fixes or derives (``convert_hf_to_gguf.py`` and ``llama-model.cpp``): the hyperparameters in the
file's metadata, what makes a Gemma 3 differ from llama.cpp's gemma3 (or a GPT-NeoX from its
gptneox), and the settings transformers' GGUF loader leaves at its defaults when it reads such a
file back."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layout:
    """How llama.cpp's converter writes one Hugging Face architecture."""

    arch: str  # a gguf.MODEL_ARCH member
    interleaved_rope: bool = False  # llama's q/k rows are permuted to interleaved pairs
    norm_offset: float = 0.0  # Gemma stores 1 + weight


# Hugging Face architecture -> llama.cpp's, as its convert_hf_to_gguf.py writes them. Mistral
# is Llama's layout (written as "llama" too) when it has no sliding window, which llama.cpp's
# llama architecture does not apply; Qwen2 is Llama's with q/k/v biases and rotary halves
# (NeoX order), so its q and k rows are written as they are; Phi-3 keeps its fused
# projections; Gemma 3 (the text model) has q/k norms and norms around both blocks; GPT-NeoX
# keeps its fused query_key_value (its rows regrouped, ``models.gguf_neox``), LayerNorms with
# biases and rotary halves on part of each head.
GGUF_LAYOUTS = {"LlamaForCausalLM": Layout("LLAMA", interleaved_rope=True),
                "MistralForCausalLM": Layout("LLAMA", interleaved_rope=True),
                "Qwen2ForCausalLM": Layout("QWEN2"),
                "Phi3ForCausalLM": Layout("PHI3"),
                "Gemma3ForCausalLM": Layout("GEMMA3", norm_offset=1.0),
                "GPTNeoXForCausalLM": Layout("GPTNEOX")}
SUPPORTED_ARCHITECTURES = tuple(GGUF_LAYOUTS)
# transformers' names for the GELU llama.cpp's gptneox applies in its code, exactly or in the
# tanh form llama.cpp computes (a difference of the approximation's size, under 1e-3)
GELUS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python", "gelu_accurate")
# llama.cpp's gemma3 (llama-model.cpp) fixes these in code: one layer in six attends to the
# whole context, the others to a window with their own rotary base
GEMMA3_FULL_EVERY = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_27B_LAYERS = 62  # the one size llama.cpp scales attention by hidden / heads


def ropes(config: Any) -> dict[str, dict[str, Any]]:
    """Rotary settings by attention kind: Gemma 3's configuration has one for its sliding
    layers and one for its full ones; the others one for every layer ("full_attention")."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not rope:
        rope = {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    if all(isinstance(v, dict) for v in rope.values()):
        return {kind: dict(v) for kind, v in rope.items()}
    return {"full_attention": dict(rope)}


def rope_theta(config: Any, kind: str = "full_attention") -> float:
    return float(ropes(config).get(kind, {}).get("rope_theta", 10000.0))


def sliding_window(config: Any) -> int | None:
    # Qwen2 configs carry a window they only apply with use_sliding_window
    return getattr(config, "sliding_window", None) \
        if getattr(config, "use_sliding_window", True) else None


def gemma3_differences(config: Any) -> list[str]:
    """What a Gemma 3 configuration sets otherwise than llama.cpp's gemma3 code assumes."""
    n = config.num_hidden_layers
    expected = ["full_attention" if (i + 1) % GEMMA3_FULL_EVERY == 0 else "sliding_attention"
                for i in range(n)]
    found = []
    if sliding_window(config) is None:
        found.append("no sliding_window (llama.cpp's gemma3 needs one)")
    if list(config.layer_types) != expected:
        found.append(f"layer_types {list(config.layer_types)} (llama.cpp: every "
                     f"{GEMMA3_FULL_EVERY}th layer full attention, {expected})")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, cap, None) is not None:
            found.append(f"{cap} {getattr(config, cap)} (llama.cpp's gemma3 applies none)")
    scalar = gemma3_attention_scalar(config)
    if float(config.query_pre_attn_scalar) != scalar:
        found.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp scales "
                     f"attention by 1/sqrt({scalar}) for this size)")
    local = rope_theta(config, "sliding_attention")
    if "sliding_attention" in ropes(config) and local != GEMMA3_LOCAL_ROPE_BASE:
        found.append(f"sliding layers' rope_theta {local:g} (llama.cpp: "
                     f"{GEMMA3_LOCAL_ROPE_BASE:g})")
    return found


def gptneox_differences(config: Any) -> list[str]:
    """What a GPT-NeoX configuration sets otherwise than llama.cpp's gptneox code assumes."""
    act = getattr(config, "hidden_act", "gelu")
    return [] if act in GELUS else [f"hidden_act {act!r} (llama.cpp's gptneox applies GELU)"]


# per llama.cpp architecture: what its code fixes that a model may set otherwise
FIXED_IN_CODE = {"GEMMA3": gemma3_differences, "GPTNEOX": gptneox_differences}


def gemma3_attention_scalar(config: Any) -> int:
    """llama.cpp's gemma3 attention scale is 1/sqrt(this): the head size, or hidden size per
    head for the 27B model, which it recognises by its layer count."""
    if config.num_hidden_layers == GEMMA3_27B_LAYERS:
        return config.hidden_size // config.num_attention_heads
    return int(head_size(config))


def head_size(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_fraction(config: Any) -> float:
    """The share of each head that rotates: ``partial_rotary_factor`` (Phi-3; GPT-NeoX in
    transformers 5) or GPT-NeoX's ``rotary_pct`` (transformers 4)."""
    rope = ropes(config)["full_attention"]
    found = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    return float(found or getattr(config, "rotary_pct", None) or 1.0)


def add_parameters(writer: Any, config: Any, layout: Layout) -> None:
    """The hyperparameters llama.cpp reads (``TextModel.set_gguf_parameters`` and each
    architecture's own: ``LlamaModel``, ``Phi3MiniModel``, ``Gemma3Model``)."""
    if layout.arch == "GPTNEOX":
        _add_gptneox_parameters(writer, config)
        return
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    head_dim = head_size(config)
    if layout.arch == "PHI3":
        # partial rotary: llama.cpp rotates int(factor * hidden) // heads dimensions per head
        writer.add_rope_dimension_count(int(rotary_fraction(config) * config.hidden_size)
                                        // config.num_attention_heads)
        original = getattr(config, "original_max_position_embeddings", None)
        if original:
            writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_sliding_window(int(sliding_window(config) or 0))  # 0: none (as Phi-4 writes it)
        return
    if layout.arch == "GEMMA3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(int(sliding_window(config)))
        return
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_gptneox_parameters(writer: Any, config: Any) -> None:
    """``GPTNeoXModel.set_gguf_parameters``: LayerNorm's epsilon (not RMS), the rotating share
    of each head as a dimension count, the parallel-residual flag. Also the rotary base, which
    llama.cpp reads for every architecture (its converter leaves this one at the default
    10000), and the vocabulary size, as for the others."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(int(rotary_fraction(config) * head_size(config)))
    writer.add_head_count(config.num_attention_heads)
    writer.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))
    writer.add_layer_norm_eps(float(config.layer_norm_eps))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_vocab_size(config.vocab_size)


def as_llama_cpp(config: Any, path: Path) -> Any | None:
    """A copy of ``config`` (read from the GGUF file at ``path`` by transformers' loader) with
    what llama.cpp derives and the loader (5.x) leaves at its defaults: Phi-3's
    ``rope.dimension_count`` (skipped) and Gemma 3's attention scale (256); None when the
    loader's config is already llama.cpp's."""
    import gguf

    if config.model_type not in ("phi3", "gemma3_text"):
        return None
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # the loader's marker that weights came from GGUF
        del config.quantization_config
    if config.model_type == "phi3":
        field = gguf.GGUFReader(path).get_field("phi3.rope.dimension_count")
        if field is not None:
            factor = int(field.contents()) / head_size(config)
            if hasattr(config, "rope_parameters") and config.rope_parameters is not None:
                config.rope_parameters["partial_rotary_factor"] = factor
            config.partial_rotary_factor = factor
    elif config.model_type == "gemma3_text":
        config.query_pre_attn_scalar = gemma3_attention_scalar(config)
    return config
