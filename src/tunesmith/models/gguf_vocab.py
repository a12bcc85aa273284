"""The tokenizer of a GGUF export: a fast tokenizer as llama.cpp's byte-level BPE ("gpt2")
vocabulary, with llama.cpp's name for its pre-tokenizer, written into the file's metadata
(llama.cpp's ``_set_vocab_gpt2``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import ModelError

# tokenizers' pre-tokenizer -> llama.cpp's name for the same split (``tokenizer.ggml.pre``)
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}
_SMOLLM = [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's: Llama 3's split with single digits (llama.cpp's "qwen2")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN2 = [{"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated",
           "invert": False}, {**_BYTE_LEVEL, "use_regex": False}]
_LLAMA3 = [{"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated",
            "invert": False}, {**_BYTE_LEVEL, "use_regex": False}]


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a tokenizers pre-tokenizer, or a
    ``ModelError``: llama.cpp splits text by this name, so a wrong one tokenizes differently."""

    def matches(step: dict, expected: dict) -> bool:
        return all(step.get(k, True if k == "use_regex" else None) == v
                   for k, v in expected.items())

    if pre_tokenizer and matches(pre_tokenizer, _BYTE_LEVEL):
        return "gpt-2"  # GPT-2's regex, which ByteLevel(use_regex=True) applies
    steps = (pre_tokenizer or {}).get("pretokenizers") or []
    for name, known in (("smollm", _SMOLLM), ("llama-bpe", _LLAMA3), ("qwen2", _QWEN2)):
        if len(steps) == 2 and all(matches(s, e) for s, e in zip(steps, known, strict=True)):
            return name
    raise ModelError(f"the tokenizer's pre-tokenizer {json.dumps(pre_tokenizer)} is not one "
                     "the GGUF export knows llama.cpp's name for (plain byte-level as in GPT-2, "
                     "digits + byte-level as in SmolLM, Llama 3's or Qwen2's split); use "
                     "--format hf")


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer as llama.cpp's byte-level BPE ("gpt2") model holds it."""

    pre: str
    tokens: list[str]
    types: list[int]  # gguf.TokenType
    merges: list[str]


def vocabulary(tokenizer: Any, vocab_size: int) -> Vocabulary:
    """The GGUF vocabulary of a fast tokenizer (``get_vocab_base``: special tokens CONTROL,
    other added tokens USER_DEFINED, ids no token uses UNUSED), or a ``ModelError``."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model["type"] != "BPE" or model.get("byte_fallback"):
        kind = "a sentencepiece-style one (Llama 2, TinyLlama)" if model.get("byte_fallback") \
            else model["type"]
        raise ModelError(f"the GGUF export writes byte-level BPE tokenizers (SmolLM2); this one "
                         f"is {kind}; use --format hf")
    pre = pre_tokenizer_name(backend.get("pre_tokenizer"))
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary "
                         f"only {vocab_size}; they do not belong together")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses (vocabularies padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return Vocabulary(pre, tokens, types, merges)


def add_tokenizer(writer: Any, tokenizer: Any, vocab: Vocabulary) -> None:
    """Vocabulary, merges, special ids and chat template (``_set_vocab_gpt2``)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
