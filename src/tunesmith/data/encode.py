"""Chat → tokens, with the loss mask. The one place that tokenizes chat for training and eval.

The mask is built from the rendered text, not by re-tokenizing pieces: each assistant turn is
located as a character span (the template rendered up to the turn's generation prompt, then up
to the end of the turn), and a token is a target when its characters start inside such a span.
This stays right for templates whose pieces would tokenize differently on their own, and trains
every assistant turn of a multi-turn conversation (except those with ``weight: 0``).

Templates differ in what they accept. One without a system role (Gemma's raises "System
role not supported"; some silently drop the message) gets the system message folded into the
first user message, ``system + "\n\n" + user``, as Gemma 3's own template does; this happens
here, so training, evaluation, generation and serving render a conversation alike, and a run
refuses it up front instead where ``data.system_fallback`` is 'refuse'. A template that
refuses a conversation (roles that must alternate) raises a ``DataError`` with the template's
own words, and so does one that renders earlier turns differently once later turns are added
(the loss mask could not find the assistant tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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


_PROBE = ("\x1fsystem-probe\x1f", "\x1fuser-probe\x1f")
_TAKES_SYSTEM: dict[str, bool] = {}  # chat template -> whether it renders a system message


def takes_system(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a leading system message: it neither
    raises nor drops it."""
    template = str(tokenizer.chat_template)
    if template not in _TAKES_SYSTEM:
        probe = [{"role": "system", "content": _PROBE[0]}, {"role": "user", "content": _PROBE[1]}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception:  # noqa: BLE001 (a Jinja template can raise anything)
            text = ""
        _TAKES_SYSTEM[template] = _PROBE[0] in text
    return _TAKES_SYSTEM[template]


def fold_system(messages: Sequence[dict]) -> list[dict]:
    """A leading system message put at the start of the first user message (blank line
    between), for templates without a system role."""
    if not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0], list(messages[1:])
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first_user is None:
        raise DataError("the model's chat template has no system role, and this conversation "
                        "has no user message to fold the system message into; add one",
                        code="template_error")
    user = rest[first_user]
    rest[first_user] = {**user, "content": f"{system['content']}\n\n{user['content']}"}
    return rest


def render(tokenizer: Any, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
    """The conversation as the chat template renders it (system message folded where the
    template has no system role); a ``DataError`` with the template's words if it refuses."""
    from jinja2 import TemplateError

    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    if clean and clean[0]["role"] == "system" and not takes_system(tokenizer):
        clean = fold_system(clean)
    try:
        return tokenizer.apply_chat_template(
            clean, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        roles = ", ".join(m["role"] for m in clean)
        raise DataError(f"the model's chat template refuses this conversation ({err}); its "
                        f"roles are {roles}; change the conversation to what the template "
                        "accepts, or give the model another chat template",
                        code="template_error") from err


def assistant_spans(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trainable assistant turns."""
    text = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or msg.get("weight", 1) == 0:
            continue
        start_text = render(tokenizer, messages[:i], add_generation_prompt=True)
        # the last turn ends where the whole conversation does: no need to render it again
        end_text = text if i == len(messages) - 1 else render(
            tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(start_text) or not text.startswith(end_text):
            raise DataError(
                "the model's chat template renders earlier turns differently once later turns "
                f"are added (message {i + 1}, an assistant turn, does not start the same in the "
                "whole conversation), so its tokens cannot be located for the loss mask; split the "
                "conversation into one example per assistant turn, or give the model a "
                "template that renders each turn the same whatever follows",
                code="template_error")
        spans.append((len(start_text), len(end_text)))
    return text, spans


def encode_chat(tokenizer: Any, messages: Sequence[dict]) -> Encoded:
    """Token ids of the conversation, and labels that are -100 everywhere but assistant turns."""
    return encode_chats(tokenizer, [messages])[0]


def encode_chats(tokenizer: Any, conversations: Sequence[Sequence[dict]]) -> list[Encoded]:
    """``encode_chat`` of many conversations; one tokenizer call, which a fast tokenizer runs
    in parallel (the data checks of 100,000 examples use this)."""
    rendered = [assistant_spans(tokenizer, messages) for messages in conversations]
    out = []
    for (_, spans), (ids, offsets) in zip(
            rendered, tokenize_batch(tokenizer, [text for text, _ in rendered]), strict=True):
        # a token is a target when its first character lies inside an assistant span
        starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(ids))
        target = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            target |= (starts >= a) & (starts < b)
        labels = np.where(target, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
        out.append(Encoded(ids, labels))
    return out


def tokenize_batch(tokenizer: Any, texts: list[str]
                   ) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text, without special tokens added."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # the Rust tokenizer itself: transformers' conversion of each result into its own
        # structures costs about half as much as the tokenizing
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(batch["input_ids"], batch["offset_mapping"], strict=True))


def encode_prompt(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant's generation prompt."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_class_example(tokenizer: Any, messages: Sequence[dict], label_index: int) -> Encoded:
    """A prompt for a classification head: the class index is the label of its last position."""
    ids = encode_prompt(tokenizer, messages)
    return Encoded(ids, [IGNORE_INDEX] * (len(ids) - 1) + [label_index])


@dataclass(frozen=True)
class PairEncoded:
    """A preference pair as two encoded conversations (prompt + answer each; the answer's
    tokens are the targets), with the reference model's summed log-probabilities of each
    answer once they are computed (reference-based objectives)."""

    chosen: Encoded
    rejected: Encoded
    reference: tuple[float, float] | None = None

    def __len__(self) -> int:
        """The longer of the two sequences: what ``data.max_length`` bounds."""
        return max(len(self.chosen), len(self.rejected))

    @property
    def n_targets(self) -> int:
        """Answer tokens of the shorter answer: 0 when either answer has nothing to score."""
        return min(self.chosen.n_targets, self.rejected.n_targets)


def encode_pair(tokenizer: Any, prompt: Sequence[dict], chosen: Sequence[dict],
                rejected: Sequence[dict]) -> PairEncoded:
    """Both conversations of a pair, with only the answers' tokens as targets."""
    quiet = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]
    a, b = encode_chats(tokenizer, [[*quiet, *chosen], [*quiet, *rejected]])
    return PairEncoded(a, b)
