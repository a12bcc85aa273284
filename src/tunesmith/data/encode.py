"""Chat → tokens, with the loss mask. The one place that tokenizes chat for training and eval.

The mask is built from the rendered text, not by re-tokenizing pieces: each assistant turn is
located as a character span (the template rendered up to the turn's generation prompt, then up
to the end of the turn), and a token is a target when its characters start inside such a span.
This stays right for templates whose pieces would tokenize differently on their own, and trains
every assistant turn of a multi-turn conversation (except those with ``weight: 0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


def render(tokenizer: Any, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    return tokenizer.apply_chat_template(
        clean, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trainable assistant turns."""
    text = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or msg.get("weight", 1) == 0:
            continue
        start_text = render(tokenizer, messages[:i], add_generation_prompt=True)
        end_text = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(start_text) or not text.startswith(end_text):
            raise DataError(
                "the model's chat template renders earlier turns differently once later turns "
                "are added, so assistant tokens cannot be located; use a template without "
                "that behaviour")
        spans.append((len(start_text), len(end_text)))
    return text, spans


def encode_chat(tokenizer: Any, messages: Sequence[dict]) -> Encoded:
    """Token ids of the conversation, and labels that are -100 everywhere but assistant turns."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[k] = ids[k]
    return Encoded(ids, labels)


def encode_prompt(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant's generation prompt."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_class_example(tokenizer: Any, messages: Sequence[dict], label_index: int) -> Encoded:
    """A prompt for a classification head: the class index is the label of its last position."""
    ids = encode_prompt(tokenizer, messages)
    return Encoded(ids, [IGNORE_INDEX] * (len(ids) - 1) + [label_index])
