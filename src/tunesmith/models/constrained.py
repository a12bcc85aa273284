"""Replies held to a JSON schema (OpenAI's ``response_format``: ``json_schema``, and
``json_object``, any JSON object), by masking at each step the tokens that could not continue
a text the schema allows.

outlines-core (the structured-generation core of Outlines, one of vLLM's guided-decoding
backends) turns the schema into a regular expression and that into an index over the
tokenizer's vocabulary; a ``Guide`` per reply walks it. Here: the vocabulary built from the
tokenizer's own bytes (``models.logprobs.token_bytes``; outlines-core's ``from_pretrained``
would fetch the tokenizer from the Hub), an index cache, and ``Masker``, the transformers
``LogitsProcessor`` that applies each row's mask.

- Properties come in the schema's order, and between JSON tokens at most one space is allowed
  (the default pattern allows any run of whitespace, and a small model can fill a whole reply
  with it). The reply ends at the end token once the object is complete.
- A reply cut by ``max_new_tokens`` before its object closes is incomplete JSON, with
  ``finish_reason`` "length", as OpenAI's is.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch

from tunesmith.errors import ConfigError

ANY_OBJECT = json.dumps({"type": "object"})
"""``json_object``'s schema: any JSON object (nested to outlines-core's default depth)."""
WHITESPACE = r"[ ]?"

MAX_ATOMS = 1_000
"""How large a schema's pattern may be with its bounded repetitions (``maxLength``,
``maxItems``...) written out (``_atoms``). An index grows with it, over SmolLM2's vocabulary:
a string of ``maxLength`` 250 (762 atoms) took 125 MB, 500 (1,512) 300 MB, 1,000 (3,012) 5 s
and 600 MB, 5,000 took 25 s and 3.7 GB; an array of 40 strings of 40 (4,962; bounds nested
multiply) 8 s and 700 MB. So a request could otherwise stall or exhaust the server. Without
bounds an index is small: a three-property object (54 atoms) 2 MB, any object (``json_object``,
261) 39 MB."""
MAX_SCHEMA_CHARS = 65_536
_BOUND = re.compile(r"\{(\d+)(?:,(\d*))?\}")

INDICES_KEPT = 16
"""Schemas whose index is kept per tokenizer (the least recently used goes first): a few MB
each for ordinary schemas, about 200 MB at most at the bound above."""


class _Compiled:
    """A tokenizer's outlines-core vocabulary and the indices of its recent schemas."""

    def __init__(self, tokenizer: Any) -> None:
        from outlines_core import Vocabulary

        from tunesmith.models.logprobs import token_bytes

        special = set(tokenizer.all_special_ids)
        tokens: dict[bytes, list[int]] = {}
        for i in range(len(tokenizer)):
            if i not in special:  # the end token is the vocabulary's own
                tokens.setdefault(token_bytes(tokenizer, i), []).append(i)
        self.vocabulary = Vocabulary(tokenizer.eos_token_id, tokens)
        self.indices: OrderedDict[str, Any] = OrderedDict()


_compiled: weakref.WeakKeyDictionary[Any, _Compiled] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def compile_schema(tokenizer: Any, schema: str) -> Any:
    """The index of ``schema`` (a JSON schema as text, ``check_schema``'s) over
    ``tokenizer``'s vocabulary, kept for the next reply to the same schema. A schema
    outlines-core cannot turn into a regular expression is a ``ConfigError`` saying why."""
    from outlines_core import Index
    from outlines_core.json_schema import build_regex_from_schema

    if tokenizer.eos_token_id is None:
        raise ConfigError("a reply held to a JSON schema needs a tokenizer with an end token")
    with _lock:  # the lookups only: one schema's build (seconds) holds up no other request
        compiled = _compiled.get(tokenizer)
        if compiled is None:
            compiled = _compiled[tokenizer] = _Compiled(tokenizer)
        if schema in compiled.indices:
            compiled.indices.move_to_end(schema)
            return compiled.indices[schema]
    try:  # two requests with a new schema at once may both build it; either index serves
        regex = build_regex_from_schema(schema, WHITESPACE)
        _check_size(regex)
        index = Index(regex, compiled.vocabulary)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"the JSON schema cannot be used: {err}") from None
    with _lock:
        compiled.indices[schema] = index
        while len(compiled.indices) > INDICES_KEPT:
            compiled.indices.popitem(last=False)
    return index


def _atoms(regex: str) -> int:
    """The atoms (characters, escapes, classes) of ``regex`` with each bounded repetition
    ``{m,n}`` written out n times, nested ones multiplied: what its automaton grows with."""
    groups, last, i = [0], 0, 0  # each open group's size so far; the last atom's size
    while i < len(regex):
        ch, step = regex[i], 1
        if ch == "\\":
            last, step = 1, 2
        elif ch == "[":  # a character class: one atom
            j = i + 1
            while j < len(regex) and regex[j] != "]":
                j += 2 if regex[j] == "\\" else 1
            last, step = 1, j + 1 - i
        elif ch == "(":
            groups.append(0)
            i += 1
            continue
        elif ch == ")":
            last = groups.pop()
            groups[-1] += last
            i += 1
            continue
        elif ch == "{" and (bound := _BOUND.match(regex, i)):
            times = int(bound.group(2) or bound.group(1))
            groups[-1] += last * (times - 1)
            last *= times
            i = bound.end()
            continue
        elif ch in "*+?|":
            i += 1
            continue
        else:
            last = 1
        groups[-1] += 1
        i += step
    return groups[0]


def _check_size(regex: str) -> None:
    """Refuse a schema whose bounded repetitions would make its index too large to build."""
    atoms = _atoms(regex)
    if atoms > MAX_ATOMS:
        raise ValueError(f"its bounded repetitions (maxLength, maxItems, minLength, minItems; "
                         f"nested ones multiply) write its pattern out to {atoms:,} atoms, over "
                         f"the {MAX_ATOMS:,} a reply's index may hold here; lower them or leave "
                         "them out")


def check_schema(schema: Any) -> str:
    """``schema`` (a JSON schema, as an object) as the text the index is cached under."""
    if not isinstance(schema, dict):
        raise ConfigError("a JSON schema is a JSON object, e.g. {\"type\": \"object\", "
                          "\"properties\": {...}}")
    text = json.dumps(schema)  # in its own key order: properties come in the schema's
    if len(text) > MAX_SCHEMA_CHARS:
        raise ConfigError(f"the JSON schema is {len(text):,} characters; the most taken is "
                          f"{MAX_SCHEMA_CHARS:,}")
    return text


class Guided:
    """One reply's walk through its schema's index; ``steps``: the tokens it has taken."""

    def __init__(self, index: Any) -> None:
        from outlines_core import Guide

        self.guide, self.steps = Guide(index), 0

    def follow(self, new: list[int], eos: int | None) -> None:
        """Take the reply's tokens ``new`` not taken yet (the end token ends it instead)."""
        for token in new[self.steps:]:
            if token != eos:
                self.guide.advance(token, return_tokens=False)
            self.steps += 1

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """[vocab_size] bool: the tokens that may come next. outlines-core writes 32 tokens a
        bit-packed int32 (its own torch kernel unpacks them under ``torch.compile``, which
        builds C++ on a CPU at first use; these are the same few tensor operations)."""
        words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self.guide.write_mask_into(words.data_ptr(), words.numel(), 4)
        bits = torch.arange(32, dtype=torch.int32)
        return ((words.unsqueeze(-1) >> bits) & 1).bool().view(-1)[:vocab_size]


class Masker:
    """A ``LogitsProcessor``: sets to -inf, in each guided row, the scores of the tokens its
    schema does not allow next. ``guides[i]``: row ``i``'s ``Guided``, or None."""

    def __init__(self, guides: list[Guided | None]) -> None:
        self.guides = guides

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, guided in enumerate(self.guides):
            if guided is not None:
                allowed = guided.allowed(scores.shape[-1]).to(scores.device)
                scores[i] = scores[i].masked_fill(~allowed, float("-inf"))
        return scores
