"""The one generation path: parameters, seeding, stop sequences, streaming, padding.

Evaluation, ``tunesmith.chat`` / ``tunesmith chat`` and the service's chat completions all
generate here: ``generate`` returns whole replies (batched, left-padded), ``stream`` yields one
reply as text pieces. Both run transformers' ``generate`` with the same arguments, so the same
prompt and parameters give the same tokens either way. Prompts are token ids rendered by
``data.encode.encode_prompt``, the chat template exactly as training renders it.

- Greedy when ``temperature`` is 0. A ``seed`` seeds torch inside ``torch.random.fork_rng``,
  so a seeded call is reproducible and the caller's random state is left as it was.
- A reply ends at the end-of-sequence token, at a stop string (cut from the text), or after
  ``max_new_tokens``; ``Generated`` says which ("stop" or "length") and how many tokens it took.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tunesmith.errors import ConfigError, ModelError

# transformers' generate takes no torch.Generator: sampling draws from torch's process-wide
# random state. Calls hold this lock so one call's seed is not drawn from by another; on CPU
# two generations at once would only share the same cores anyway.
GENERATION_LOCK = threading.Lock()

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    """How to generate a reply; greedy (deterministic) when ``temperature`` is 0."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    """Seeds the sampling of this call alone; None draws from torch's current random state."""
    stop: tuple[str, ...] = ()
    """Text that ends the reply; it is cut from the reply with everything after it."""
    min_new_tokens: int = 0
    """The end token is held back until this many tokens are generated (speed measurements
    that must compare the same number of tokens)."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens is {self.max_new_tokens}; give 1 or more")
        if self.temperature < 0:
            problems.append(f"temperature is {self.temperature}; give 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p is {self.top_p}; give a value in (0, 1]")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(f"min_new_tokens is {self.min_new_tokens}; give 0 to "
                            f"max_new_tokens ({self.max_new_tokens})")
        if any(not s for s in self.stop):
            problems.append("a stop sequence is empty; give non-empty strings")
        if problems:
            raise ConfigError("invalid generation parameters", problems)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class Generated:
    """A reply: its text, why it ended and how many tokens it took (the end token included)."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class Padded:
    input_ids: torch.Tensor       # [rows, width], int64
    attention_mask: torch.Tensor  # [rows, width], 1 on real tokens, 0 on padding


def pad_batch(rows: Sequence[Sequence[int]], *, pad_id: int | None,
              side: Literal["left", "right"]) -> Padded:
    """Token-id lists padded with ``pad_id`` to the longest: left for generation (every row's
    next token follows its last real one), right for scoring (positions start at 0)."""
    if pad_id is None:
        raise ModelError("the tokenizer has no pad token; load it with tunesmith's loader, "
                         "which uses the end-of-sequence token for padding")
    if not rows:
        raise ValueError("pad_batch needs at least one row")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return Padded(ids, mask)


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Random draws inside come from ``seed``; the random state outside is restored after."""
    if seed is None:
        yield
        return
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop sequence in ``text`` begins, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still turn into a stop sequence."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class _Ends:
    """A stopping criterion (transformers calls it like its own): end a row at EOS or once its
    decoded text holds a stop string, noting how many new tokens it took; end every row once
    ``cancel`` is set (a streaming client went away).

    Not transformers' ``stop_strings``: its ``StopStringCriteria`` scans the whole vocabulary
    for every new set of stop strings (0.2-0.6 s on CPU for a 49k vocabulary), and the service
    gets new stops with each request; nor would it say where each row of a batch ended, which
    the token counts and finish reasons need. Checking the decoded text is the same test that
    cuts the reply, so the two always agree.
    """

    def __init__(self, tokenizer: Any, params: GenerationParams, *, prompt_width: int,
                 rows: int, cancel: threading.Event | None) -> None:
        self.tokenizer, self.stops = tokenizer, params.stop
        self.prompt_width, self.cancel = prompt_width, cancel
        self.ends: list[int | None] = [None] * rows

    def _ended(self, input_ids: torch.Tensor) -> list[bool]:
        eos = self.tokenizer.eos_token_id
        ended = [eos is not None and t == eos for t in input_ids[:, -1].tolist()]
        if self.stops:
            for row, new in enumerate(input_ids[:, self.prompt_width:].tolist()):
                if not ended[row] and self.ends[row] is None:
                    text = self.tokenizer.decode(new, skip_special_tokens=True)
                    ended[row] = first_stop(text, self.stops) is not None
        return ended

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        ended = self._ended(input_ids)
        new_tokens = input_ids.shape[1] - self.prompt_width
        for row, now in enumerate(ended):
            if now and self.ends[row] is None:
                self.ends[row] = new_tokens
        if self.cancel is not None and self.cancel.is_set():
            ended = [True] * len(ended)
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)


def _finish(tokenizer: Any, new_ids: list[int], end: int | None, stops: Sequence[str]
            ) -> Generated:
    # after its end a finished row holds only padding
    tokens = new_ids if end is None else new_ids[:end]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = first_stop(text, stops)
    reason: FinishReason = "stop" if end is not None or cut is not None else "length"
    return Generated(text if cut is None else text[:cut], reason, len(tokens))


def _generate_batch(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
                    params: GenerationParams, *, streamer: Any = None,
                    cancel: threading.Event | None = None) -> list[Generated]:
    from transformers import StoppingCriteriaList

    batch = pad_batch(prompts, pad_id=tokenizer.pad_token_id, side="left")
    width = batch.input_ids.shape[1]
    ends = _Ends(tokenizer, params, prompt_width=width, rows=len(prompts), cancel=cancel)
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
        max_new_tokens=params.max_new_tokens, do_sample=params.sampling,
        min_new_tokens=params.min_new_tokens or None,
        temperature=params.temperature if params.sampling else None,
        top_p=params.top_p if params.sampling else None, top_k=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([ends]), streamer=streamer, use_cache=True)
    return [_finish(tokenizer, out[row, width:].tolist(), ends.ends[row], params.stop)
            for row in range(len(prompts))]


@contextmanager
def _generating(model: Any, seed: int | None) -> Iterator[None]:
    """The lock, eval mode and the call's seed, for one generation call."""
    was_training = model.training
    with GENERATION_LOCK, torch.no_grad(), seeded(seed, next(model.parameters()).device):
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]],
             params: GenerationParams, *, batch_size: int = 16,
             on_batch: Callable[[int], None] | None = None) -> list[Generated]:
    """The reply to each prompt (token ids from ``encode_prompt``), in batches."""
    # longest first so the first batch shows the peak memory, and batches pad little
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: dict[int, Generated] = {}
    with _generating(model, params.seed):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            done = _generate_batch(model, tokenizer, [prompts[i] for i in idx], params)
            replies.update(zip(idx, done, strict=True))
            if on_batch is not None:
                on_batch(len(idx))
    return [replies[i] for i in range(len(prompts))]


class TextStream:
    """One reply as text pieces, for streaming; ``result`` once the pieces are all read.

    The pieces join to ``result.text``, the text ``generate`` gives for the same prompt and
    parameters. Text that could still become a stop sequence is held back until it is clear.
    Closing the iteration early (the client went away) ends the generation at the next token.
    """

    def __init__(self, model: Any, tokenizer: Any, prompt: Sequence[int],
                 params: GenerationParams) -> None:
        self.model, self.tokenizer, self.prompt, self.params = model, tokenizer, prompt, params
        self._result: Generated | None = None
        self._sent = 0  # characters handed out so far

    @property
    def result(self) -> Generated:
        if self._result is None:
            raise RuntimeError("the stream has not been read to its end")
        return self._result

    def __iter__(self) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True)
        cancel = threading.Event()
        self._sent = 0
        outcome: list[Generated | BaseException] = []

        def work() -> None:
            try:
                with _generating(self.model, self.params.seed):
                    outcome.append(_generate_batch(self.model, self.tokenizer, [self.prompt],
                                                   self.params, streamer=streamer,
                                                   cancel=cancel)[0])
            except BaseException as err:  # handed to the reader, raised there
                outcome.append(err)
                streamer.end()  # unblocks the reader

        thread = threading.Thread(target=work, name="generate", daemon=True)
        thread.start()
        try:
            yield from self._pieces(streamer)
            thread.join()
            reply = outcome[0]
            if isinstance(reply, BaseException):
                raise reply
            if len(reply.text) > self._sent:  # the tail held back for a stop that never came
                yield reply.text[self._sent:]
            self._result = reply
        finally:
            cancel.set()
            thread.join()

    def _pieces(self, streamer: Iterator[str]) -> Iterator[str]:
        stops = self.params.stop
        text, cut = "", None
        for piece in streamer:
            if cut is not None:  # the rest is cut; generation ends at the stop's last token
                continue
            text += piece
            cut = first_stop(text, stops)
            ready = cut if cut is not None else len(text) - held_back(text, stops)
            if ready > self._sent:
                yield text[self._sent:ready]
                self._sent = ready


def stream(model: Any, tokenizer: Any, prompt: Sequence[int], params: GenerationParams
           ) -> TextStream:
    """The reply to ``prompt`` as text pieces (see ``TextStream``)."""
    return TextStream(model, tokenizer, prompt, params)
