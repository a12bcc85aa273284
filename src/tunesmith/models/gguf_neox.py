"""GPT-NeoX (Pythia and its kin) as llama.cpp's gptneox architecture, written as llama.cpp's
``convert_hf_to_gguf.py`` writes it (``GPTNeoXModel``), and read back.

Hugging Face's fused ``query_key_value`` keeps each head's rows together, [q0 k0 v0 q1 k1 v1
...]; llama.cpp cuts the product into all the queries, then all the keys, then all the values,
so the rows (and the bias) are regrouped to [q0 q1 ...; k0 k1 ...; v0 v1 ...]. Both rotate the
first ``rope.dimension_count`` dimensions of a head in halves (NeoX order), so nothing moves
inside a head. llama.cpp's gptneox requires the attention biases and an output head: a model
without attention biases is written with zero ones, one with tied embeddings with its embedding
again as ``output.weight``.

The reader is written here by hand because transformers' GGUF loader has no gptneox
architecture: neither ``AutoModelForCausalLM`` nor ``AutoTokenizer`` accepts such a file (both
first build a model configuration from the metadata, which transformers only knows how to do
for the architectures it lists). The metadata becomes a ``GPTNeoXConfig``, the tensors its state
dict with the rows regrouped back, and the tokenizer comes from transformers' own GGUF tokenizer
builder, which reads the file's ``tokenizer.*`` fields only and is the same for every
architecture (in transformers 5; 4.x refuses the architecture there too, so reading a gptneox
file back needs transformers 5).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.errors import ModelError

ARCH = "gptneox"  # general.architecture
_QKV = ("query_key_value.weight", "query_key_value.bias")


def qkv_to_llama_cpp(array: np.ndarray, n_head: int) -> np.ndarray:
    """Rows (or bias) of ``query_key_value`` from Hugging Face's [q0 k0 v0 q1 k1 v1 ...] to
    llama.cpp's [q0 q1 ...; k0 k1 ...; v0 v1 ...]."""
    return array.reshape(n_head, 3, -1, *array.shape[1:]).swapaxes(0, 1).reshape(array.shape)


def qkv_from_llama_cpp(array: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of ``qkv_to_llama_cpp``."""
    return array.reshape(3, n_head, -1, *array.shape[1:]).swapaxes(0, 1).reshape(array.shape)


def gptneox_tensors(gguf_name: str, hf_name: str, array: np.ndarray,
                    config: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, array) for one Hugging Face tensor of a GPT-NeoX, in llama.cpp's layout."""
    if hf_name.endswith(_QKV):
        array = qkv_to_llama_cpp(array, config.num_attention_heads)
    yield gguf_name, array
    if gguf_name == "token_embd.weight" and config.tie_word_embeddings:
        yield "output.weight", array  # llama.cpp's gptneox reads its head from output only


def absent_biases(config: Any) -> Iterator[tuple[str, np.ndarray]]:
    """Zero attention biases for a GPT-NeoX built without them (``attention_bias: false``):
    llama.cpp's gptneox requires them, and adding zero changes nothing."""
    import gguf

    if getattr(config, "attention_bias", True):
        return
    names = gguf.TENSOR_NAMES
    for i in range(config.num_hidden_layers):
        yield (names[gguf.MODEL_TENSOR.ATTN_QKV].format(bid=i) + ".bias",
               np.zeros(3 * config.hidden_size, np.float32))
        yield (names[gguf.MODEL_TENSOR.ATTN_OUT].format(bid=i) + ".bias",
               np.zeros(config.hidden_size, np.float32))


# ----------------------------------------------------------------------------- reading back

_ARCH_KEY = b"general.architecture"


def file_architecture(path: Path) -> str:
    """A GGUF file's ``general.architecture``, read from its first metadata entry, where gguf's
    writer (this export's, llama.cpp's converter's) puts it; from gguf's reader otherwise, which
    parses every entry first, a vocabulary of 50,000 tokens included (seconds)."""
    import gguf

    with open(path, "rb") as f:
        head = f.read(512)
    # magic, version, tensor count, entry count, then the first key's length and bytes
    magic, _, _, _, length = struct.unpack_from("<IIQQQ", head)
    at = 32 + length
    if magic == gguf.GGUF_MAGIC and head[32:at] == _ARCH_KEY and \
            struct.unpack_from("<I", head, at)[0] == gguf.GGUFValueType.STRING:
        size = struct.unpack_from("<Q", head, at + 4)[0]
        return head[at + 12:at + 12 + size].decode("utf-8")
    return gguf.GGUFReader(path).get_field("general.architecture").contents()



def read_gptneox(path: Path) -> tuple[Any, dict[str, Any], Any]:
    """The ``GPTNeoXConfig``, state dict (float32, dequantised) and tokenizer of a gptneox
    GGUF file."""
    import gguf
    import torch
    from gguf.quants import dequantize
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast

    reader = gguf.GGUFReader(path)
    config = _config(reader)
    with torch.device("meta"):  # the parameter names only: nothing allocated or initialised
        hf_names = list(GPTNeoXForCausalLM(config).state_dict())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, config.num_hidden_layers)
    # transformers names the head lm_head (5.x) or embed_out (4.x): gguf's map knows both
    by_gguf = {names.get_name(n, try_suffixes=(".weight", ".bias")): n for n in hf_names}
    weights = {}
    for tensor in reader.tensors:
        if tensor.name not in by_gguf:
            raise ModelError(f"{path}: tensor {tensor.name} has no place in GPTNeoXForCausalLM")
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)  # a copy
        if tensor.name.endswith(("attn_qkv.weight", "attn_qkv.bias")):
            array = qkv_from_llama_cpp(array, config.num_attention_heads)
        weights[by_gguf[tensor.name]] = torch.from_numpy(np.ascontiguousarray(array))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    return config, weights, tokenizer


def _config(reader: Any) -> Any:
    """A ``GPTNeoXConfig`` from the file's metadata, as llama.cpp reads it: LayerNorm, GELU,
    biases throughout, an untied head (llama.cpp's gptneox always reads ``output.weight``)."""
    from transformers import GPTNeoXConfig

    def field(key: str, default: Any = None) -> Any:
        found = reader.get_field(key)
        return found.contents() if found is not None else default

    hidden, heads = field(f"{ARCH}.embedding_length"), field(f"{ARCH}.attention.head_count")
    head_dim = hidden // heads
    rotary = field(f"{ARCH}.rope.dimension_count", head_dim)
    fraction = rotary / head_dim
    if int(head_dim * fraction) != rotary:  # transformers rotates int(head_dim * fraction)
        fraction = float(np.nextafter(fraction, 1.0))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab_size = field(f"{ARCH}.vocab_size", len(tokens.data) if tokens is not None else None)
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden, num_hidden_layers=field(f"{ARCH}.block_count"),
        num_attention_heads=heads, intermediate_size=field(f"{ARCH}.feed_forward_length"),
        max_position_embeddings=field(f"{ARCH}.context_length"),
        layer_norm_eps=float(field(f"{ARCH}.attention.layer_norm_epsilon")),
        use_parallel_residual=bool(field(f"{ARCH}.use_parallel_residual", True)),
        rotary_pct=fraction, rotary_emb_base=float(field(f"{ARCH}.rope.freq_base", 10000.0)),
        # GPT-NeoX's own exact GELU, so that a comparison with the model measures what the
        # export changed; llama.cpp computes GELU's tanh form (a difference under 1e-3)
        hidden_act="gelu", attention_bias=True, tie_word_embeddings=False,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"))
