"""The tokenizer of a GGUF export, written into the file's metadata as llama.cpp's converter
writes it:

- a byte-level BPE tokenizer (SmolLM2, Llama 3, Qwen2) as llama.cpp's "gpt2" vocabulary, with
  llama.cpp's name for its pre-tokenizer (``_set_vocab_gpt2``);
- a sentencepiece-style one (BPE with byte fallback and "▁" for spaces: Llama 2, Mistral
  7B, Phi-3, Gemma) as llama.cpp's "llama" vocabulary (``_set_vocab_sentencepiece``): tokens,
  token types (``<0xNN>`` byte pieces BYTE) and scores. llama.cpp merges the adjacent pair whose
  concatenation scores highest, so a token's score is minus the rank of the merge that makes
  it, and the tokenizer's merges order llama.cpp's merging as they order Hugging Face's. The
  merges are written too: llama.cpp ignores them for this vocabulary, transformers' GGUF loader
  builds the same tokenizer from them.

Written by hand because llama.cpp's own vocabulary classes live in its conversion script, which
is not a package; the ``gguf`` package only writes what it is given.
"""

from __future__ import annotations

import json
import re
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
    """A tokenizer as llama.cpp holds it: byte-level BPE ("gpt2") or sentencepiece ("llama")."""

    pre: str
    tokens: list[str]
    types: list[int]  # gguf.TokenType
    merges: list[str]
    model: str = "gpt2"
    scores: list[float] | None = None  # sentencepiece only
    add_space_prefix: bool = False


_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SPACE = "\u2581"  # sentencepiece's visible space


def vocabulary(tokenizer: Any, vocab_size: int) -> Vocabulary:
    """The GGUF vocabulary of a fast tokenizer (``get_vocab_base``: special tokens CONTROL,
    other added tokens USER_DEFINED, ids no token uses UNUSED), or a ``ModelError``."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model["type"] != "BPE":
        raise ModelError(f"the GGUF export writes BPE tokenizers (byte-level as SmolLM2's, or "
                         f"sentencepiece-style as Llama 2's); this one is {model['type']}; use "
                         "--format hf")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    if model.get("byte_fallback"):
        prefix = _space_prefix(backend)
        tokens, types = _tokens(tokenizer, vocab_size, sentencepiece=True)
        return Vocabulary("default", tokens, types, merges, model="llama",
                          scores=merge_scores(tokens, merges), add_space_prefix=prefix)
    pre = pre_tokenizer_name(backend.get("pre_tokenizer"))
    tokens, types = _tokens(tokenizer, vocab_size, sentencepiece=False)
    return Vocabulary(pre, tokens, types, merges)


def _space_prefix(backend: dict) -> bool:
    """Whether a sentencepiece-style tokenizer puts a space before the text (llama.cpp's
    ``add_space_prefix``), from its normalizer (Llama 2: Prepend + Replace; Gemma: Replace) or
    its Metaspace pre-tokenizer; a ``ModelError`` for any other shape, which llama.cpp's
    sentencepiece tokenizer would not split the same way."""
    normalizer, pre = backend.get("normalizer"), backend.get("pre_tokenizer")
    steps = (normalizer or {}).get("normalizers") or ([normalizer] if normalizer else [])
    replaces = [s for s in steps if s.get("type") == "Replace"
                and s.get("pattern") == {"String": " "} and s.get("content") == _SPACE]
    prepends = [s for s in steps if s.get("type") == "Prepend" and s.get("prepend") == _SPACE]
    # Gemma's tokenizer also splits at spaces, after its normalizer left none: a no-op
    inert = pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})
    if inert and replaces and len(steps) == len(replaces) + len(prepends):
        return bool(prepends)
    if not steps and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == _SPACE \
            and not pre.get("split", False):
        return pre.get("prepend_scheme", "always") != "never"
    raise ModelError(f"a sentencepiece-style tokenizer with normalizer {json.dumps(normalizer)} "
                     f"and pre-tokenizer {json.dumps(pre)}: the GGUF export knows Llama 2's, "
                     "Gemma's and Metaspace's space handling only; use --format hf")


def merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Each token's sentencepiece score: minus the rank of the first merge that makes it, so
    llama.cpp, merging the best-scored pair first, merges in the tokenizer's order; pieces no
    merge makes (characters, bytes, special tokens) score lowest, as they are never made by
    merging."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), r)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def _tokens(tokenizer: Any, vocab_size: int, *, sentencepiece: bool) -> tuple[list[str],
                                                                             list[int]]:
    import gguf

    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary "
                         f"only {vocab_size}; they do not belong together")
    added = tokenizer.added_tokens_decoder
    unk = tokenizer.unk_token_id
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses (vocabularies padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if sentencepiece and i == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and _BYTE_PIECE.match(token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_tokenizer(writer: Any, tokenizer: Any, vocab: Vocabulary) -> None:
    """Vocabulary, merges (and scores), special ids and chat template (``_set_vocab_gpt2``,
    ``_set_vocab_sentencepiece``)."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
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
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
