"""Log-probabilities of generated tokens, as OpenAI's chat API reports them (``logprobs``,
``top_logprobs``): each reply token's log-probability and the ``k`` most likely tokens at its
step, with their text and bytes.

The values are those of the model's own next-token distribution at each step: the log-softmax
of its logits after transformers' default processors (``min_new_tokens`` holding back the end
token, say) and before the sampling warpers (temperature, top-p), what vLLM reports by
default, and before ``models.adjust``'s bias and penalties and a schema's mask. So a token's
log-probability does not depend on the temperature it was drawn at, and greedy decoding's token
is the first of its ``top_logprobs`` unless a bias, a penalty or a schema moved it.

``Recorder`` is a ``LogitsProcessor`` that keeps the last step's log-softmax, and
``models.generation._Ends`` (the stopping criterion, called once the step's token is chosen)
reads each row's token from it: transformers offers ``output_logits``, but that keeps every
step's logits for every row ([rows, vocab] a step: 100 MB for 512 tokens of 16 rows over a
49k vocabulary), where this keeps one step's and the handful of numbers each row asked for.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch

MAX_TOP = 20
"""OpenAI's bound on ``top_logprobs``."""
FLOOR = -9999.0
"""What OpenAI reports for a token the model rules out (JSON has no -inf)."""

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class TokenLogprob:
    """One reply token: its id and log-probability, and the step's most likely tokens (id,
    log-probability), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Recorder:
    """Keeps the log-softmax of each step's scores, and their ``top`` most likely tokens, for
    the rows that want log-probabilities (a ``LogitsProcessor``: returns the scores as they
    are)."""

    def __init__(self, wanted: list[int | None]) -> None:
        """``wanted[i]``: None (row ``i`` wants none) or how many top tokens it wants."""
        self.wanted = wanted
        self.top = max((k for k in wanted if k is not None), default=0)
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        values, ids = logprobs.topk(self.top, dim=-1) if self.top else (None, None)
        self.last = (logprobs, values, ids)  # type: ignore[assignment]
        return scores

    def take(self, row: int, token: int) -> TokenLogprob:
        """Row ``row``'s entry for ``token``, chosen at the last step."""
        assert self.last is not None, "the recorder saw no step"
        logprobs, values, ids = self.last
        k = self.wanted[row] or 0
        top = () if not k else tuple(zip(ids[row, :k].tolist(), values[row, :k].tolist(),
                                         strict=True))
        return TokenLogprob(token, float(logprobs[row, token]), top)


def kept(tokenizer: Any, tokens: list[int], entries: list[TokenLogprob], text: str,
         cut: bool) -> tuple[TokenLogprob, ...]:
    """The entries of the tokens a reply's ``text`` shows: not its end-of-sequence token, and
    where a stop string cut the text (``cut``), not the tokens that begin past it."""
    eos = tokenizer.eos_token_id
    count = len(entries)
    if count and tokens[count - 1] == eos:
        count -= 1
    if cut:
        count = next((k for k in range(count) if len(
            tokenizer.decode(tokens[:k], skip_special_tokens=True)) >= len(text)), count)
    return tuple(entries[:count])


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards: a printable character for each of the 256 bytes
    (``tokenizers``' ``ByteLevel``; transformers keeps no public copy of the table)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The bytes a token stands for: part of a character where a character spans tokens (an
    emoji's four bytes over two tokens, say), which its decoded text cannot show."""
    piece = tokenizer.convert_ids_to_tokens(token)
    byte = _BYTE_TOKEN.fullmatch(piece or "")
    if byte:  # a SentencePiece byte-fallback token
        return bytes([int(byte.group(1), 16)])
    if piece is not None and _byte_level(tokenizer):
        table = _byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return tokenizer.decode([token]).encode("utf-8")


def openai_content(tokenizer: Any, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]
                   ) -> list[dict[str, Any]]:
    """``choices[].logprobs.content`` of OpenAI's chat completion (and of a chunk's delta)."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token)
        return {"token": raw.decode("utf-8", errors="replace"),
                "logprob": max(logprob, FLOOR), "bytes": list(raw)}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
            for e in entries]
