"""The one generation path: parameters, seeding, stop sequences, padding, batches of rows.

Evaluation, ``tunesmith.chat`` / ``tunesmith chat`` and the service's chat completions all
generate here: ``generate`` returns whole replies (batched, left-padded, the prompts' shared
prefix run once where the model's attention allows: ``models.prefix_pass``); ``generate_rows``
runs one batch whose rows each end on their own terms and report their tokens as they come,
which ``service.batching`` builds streaming and the service's request batching on. Every
reply comes from transformers' ``generate`` with the same arguments, so the same prompt and
parameters give the same tokens whichever way they are asked for. Prompts are token ids
rendered by ``data.encode.encode_prompt``, the chat template exactly as training renders it.

- Greedy when ``temperature`` is 0. A ``seed`` seeds torch inside ``torch.random.fork_rng``,
  so a seeded call is reproducible and the caller's random state is left as it was.
- A reply ends at the end-of-sequence token, at a stop string (cut from the text), or after
  ``max_new_tokens``; ``Generated`` says which ("stop" or "length") and how many tokens it took.
- Per row, in any batch: the tokens' log-probabilities (``models.logprobs``), a logit bias and
  presence and frequency penalties (``models.adjust``) and a JSON schema the reply is held to
  (``models.constrained``), as transformers ``LogitsProcessor``s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tunesmith.errors import ConfigError, ModelError
from tunesmith.models.adjust import MAX_BIAS, MAX_PENALTY, step_processors
from tunesmith.models.constrained import Guided
from tunesmith.models.logprobs import MAX_TOP, Recorder, TokenLogprob, kept
from tunesmith.models.prefix_pass import (
    PrefixCache,
    batched,
    cache_argument,
    mask_kind,
    shared_prefix,
)

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
    logprobs: int | None = None
    """None: no log-probabilities; k: each reply token's, with the k most likely tokens at its
    step (``models.logprobs``; 0 to 20)."""
    schema: str | None = None
    """A JSON schema the reply is held to (``models.constrained.check_schema``'s text)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the scores at every step (``models.adjust``)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

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
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP:
            problems.append(f"logprobs is {self.logprobs}; give 0 to {MAX_TOP} top tokens")
        if any(t < 0 or not -MAX_BIAS <= b <= MAX_BIAS for t, b in self.logit_bias):
            problems.append(f"logit_bias takes token ids and biases from -{MAX_BIAS:g} to "
                            f"{MAX_BIAS:g}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                problems.append(f"{name} is {getattr(self, name)}; give -{MAX_PENALTY:g} to "
                                f"{MAX_PENALTY:g}")
        if self.schema is not None and self.min_new_tokens:
            problems.append("min_new_tokens holds back the end token a JSON schema's reply "
                            "ends with; give 0")
        if problems:
            raise ConfigError("invalid generation parameters", problems)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class Generated:
    """A reply: its text, why it ended and how many tokens it took (the end token included);
    with ``GenerationParams.logprobs``, the log-probabilities of the tokens its text shows."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None


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


@dataclass
class Row:
    """One reply to generate in a batch: its prompt and parameters, and who hears of it.

    ``on_tokens`` gets the row's new token ids after every step until the row ends (for
    streaming); ``on_end`` gets the reply as soon as the row ends, while the batch may still run
    for longer rows; ``cancel`` ends the row at its next token (the client went away)."""

    prompt: Sequence[int]
    params: GenerationParams
    on_tokens: Callable[[list[int]], None] | None = None
    on_end: Callable[[Generated], None] | None = None
    cancel: threading.Event | None = None
    taken: list[TokenLogprob] = field(default_factory=list)
    """With ``params.logprobs``: an entry for each new token so far (before ``on_tokens``
    hears of it), across the ``generate`` calls a running batch makes."""
    guided: Guided | None = None
    """With ``params.schema``: where the reply stands in it, across those calls too."""


def _sampling(params: GenerationParams) -> tuple[Any, ...]:
    """What the rows of one ``generate_rows`` call share; their stops and token limits may
    differ."""
    if params.sampling:
        return ("sample", params.temperature, params.top_p, params.min_new_tokens, params.seed)
    return ("greedy", params.min_new_tokens)


def batch_key(params: GenerationParams) -> tuple[Any, ...] | None:
    """Replies to different requests whose parameters have the same key can be generated in
    one batch. None: this one runs alone (a seeded sample draws its own random numbers, which
    a batch would share with other requests)."""
    if params.sampling and params.seed is not None:
        return None
    return _sampling(params)


class _Ends:
    """A stopping criterion (transformers calls it like its own) that ends each row on its own
    terms: at EOS, once its decoded text holds one of its stop strings, at its own token limit
    or when its ``cancel`` is set; it notes where and why each row ended and tells the row.

    Not transformers' ``stop_strings``: its ``StopStringCriteria`` scans the whole vocabulary
    for every new set of stop strings (0.2-0.6 s on CPU for a 49k vocabulary), and the service
    gets new stops with each request; nor would it say where each row of a batch ended, which
    the token counts and finish reasons need. Checking the decoded text is the same test that
    cuts the reply, so the two always agree.
    """

    def __init__(self, tokenizer: Any, rows: Sequence[Row], *, starts: Sequence[int],
                 recorder: Recorder | None = None) -> None:
        """``starts[i]``: the column of the batch where row ``i``'s new tokens begin;
        ``recorder``: the step's log-probabilities, for the rows that want them."""
        self.tokenizer, self.rows, self.starts = tokenizer, rows, list(starts)
        self.recorder = recorder
        self.ends: list[int | None] = [None] * len(rows)
        self.reasons: list[FinishReason] = ["length"] * len(rows)
        self.replies: list[Generated | None] = [None] * len(rows)

    def _why(self, row: Row, new: list[int]) -> FinishReason | None:
        eos = self.tokenizer.eos_token_id
        if eos is not None and new and new[-1] == eos:
            return "stop"
        if row.params.stop:
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if first_stop(text, row.params.stop) is not None:
                return "stop"
        if len(new) >= row.params.max_new_tokens:
            return "length"
        if row.cancel is not None and row.cancel.is_set():
            return "length"
        return None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        first = min(self.starts)  # the columns before every row's reply stay out of Python
        ids = input_ids[:, first:].tolist()
        for i, row in enumerate(self.rows):
            if self.ends[i] is not None:
                continue
            new = ids[i][self.starts[i] - first:]
            if self.recorder is not None and row.params.logprobs is not None \
                    and len(row.taken) < len(new):
                row.taken.append(self.recorder.take(i, new[-1]))
            if row.guided is not None:
                row.guided.follow(new, self.tokenizer.eos_token_id)
            why = self._why(row, new)
            if row.on_tokens is not None:
                row.on_tokens(new)
            if why is not None:
                self.ends[i], self.reasons[i] = len(new), why
                self.end(i, new)
        return torch.tensor([e is not None for e in self.ends], dtype=torch.bool,
                            device=input_ids.device)

    def end(self, i: int, new_ids: list[int]) -> Generated:
        """Row ``i``'s reply from its new tokens (told to the row once)."""
        if self.replies[i] is None:
            end = self.ends[i]
            tokens = new_ids if end is None else new_ids[:end]  # after its end, padding
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            row = self.rows[i]
            cut = first_stop(text, row.params.stop)
            reason = "stop" if cut is not None else self.reasons[i]
            text = text if cut is None else text[:cut]
            logprobs = None if row.params.logprobs is None else kept(
                self.tokenizer, tokens, row.taken[:len(tokens)], text, cut is not None)
            reply = Generated(text, reason, len(tokens), logprobs)
            self.replies[i] = reply
            if self.rows[i].on_end is not None:
                self.rows[i].on_end(reply)
        return self.replies[i]  # type: ignore[return-value]


def generate_rows(model: Any, tokenizer: Any, rows: Sequence[Row],
                  prefixes: PrefixCache | None = None) -> list[Generated]:
    """The replies to ``rows`` from one ``model.generate`` call over the left-padded batch.

    The rows must share their sampling parameters; each ends on its own (see ``_Ends``) and
    the call runs until the last one has. With ``prefixes`` (the set's, see ``generate``) the
    call goes on from the KV cache of the prefix the rows share, and only the rest of each
    prompt is padded and run. Call it inside ``generating``."""
    prompts = [r.prompt for r in rows]
    shared = 0 if prefixes is None else max(shared_prefix(prompts), prefixes.floor)
    batch = pad_batch([p[shared:] for p in prompts], pad_id=tokenizer.pad_token_id,
                      side="left")
    ids, mask, cache = batch.input_ids, batch.attention_mask, None
    if shared:
        # [prefix | padding | rest]: the padding columns are masked, and transformers takes
        # each row's positions from the mask, so the rest sits right after the prefix
        device = next(model.parameters()).device
        head = torch.tensor([list(prompts[0][:shared])]).expand(len(rows), -1)
        ids = torch.cat([head, ids], dim=1)
        mask = torch.cat([torch.ones_like(head), mask], dim=1)
        cache = prefixes.rows(model, tuple(prompts[0][:shared]), len(rows), device)
    width = ids.shape[1]
    out, ends = extend(model, tokenizer, rows, ids, mask, starts=[width] * len(rows),
                       max_new_tokens=max(r.params.max_new_tokens for r in rows), cache=cache)
    return [ends.end(i, out[i, width:].tolist()) for i in range(len(rows))]


def extend(model: Any, tokenizer: Any, rows: Sequence[Row], input_ids: torch.Tensor,
           attention_mask: torch.Tensor, *, starts: Sequence[int], max_new_tokens: int,
           cache: Any = None) -> tuple[torch.Tensor, _Ends]:
    """One ``model.generate`` call: up to ``max_new_tokens`` more tokens for every row of the
    left-padded batch ``input_ids``, whose row ``i`` began its reply at column ``starts[i]``.
    With ``cache`` (a ``DynamicCache`` holding the batch's first columns: a shared prefix, or
    the service's running batch, every column but the last), the call runs only the columns
    after it and leaves it holding every column of the result but the last. The sequences and
    the criterion that says where each row ended."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    if len({_sampling(r.params) for r in rows}) != 1:
        raise ValueError("rows of one batch must share their sampling parameters")
    params = rows[0].params
    processors, recorder = step_processors(tokenizer, rows, starts)
    ends = _Ends(tokenizer, rows, starts=starts, recorder=recorder)
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens, do_sample=params.sampling,
        min_new_tokens=params.min_new_tokens or None,
        temperature=params.temperature if params.sampling else None,
        top_p=params.top_p if params.sampling else None, top_k=None,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([ends]), use_cache=True,
        logits_processor=LogitsProcessorList(processors),
        **({} if cache is None else {cache_argument(): cache}))
    return out, ends


@contextmanager
def generating(model: Any, seed: int | None) -> Iterator[None]:
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
    """The reply to each prompt (token ids from ``encode_prompt``), in batches.

    An evaluation set's prompts open alike (system prompt, instructions, chat header). Where
    the model's attention takes a mask with padding inside a row (``prefix_pass.mask_kind``:
    SDPA or eager, no sliding window the sequences outgrow), the prefix all prompts share runs
    once and each batch goes on from a copy of its KV cache, or from the longer prefix its own
    prompts share (``prefix_pass.PrefixCache``, as label scoring does); batches are cut longest
    first where their padding costs less than their decode steps
    (``prefix_pass.generation_batches``). Elsewhere whole prompts are left-padded,
    ``batch_size`` at a time. A repeated prompt is answered once when greedy
    (a sample is drawn for each copy). ``on_batch`` is told how many prompts each batch
    answered."""
    # prompts answered by one reply: a repeated prompt's copies where replies are greedy
    groups: dict[Any, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(i if params.sampling else tuple(prompt), []).append(i)
    sets = list(groups.values())
    leads = [prompts[s[0]] for s in sets]
    longest = max((len(p) for p in leads), default=0) + params.max_new_tokens
    prefixes: PrefixCache | None = None
    if len(prompts) > 1 and mask_kind(model.config, longest) is not None:
        prefixes, chunks = batched(leads, batch_size, new_tokens=params.max_new_tokens)
    else:
        # longest first so the first batch shows the peak memory, and batches pad little
        order = sorted(range(len(sets)), key=lambda k: -len(leads[k]))
        chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    replies: list[Generated | None] = [None] * len(prompts)
    with generating(model, params.seed):
        for chunk in chunks:
            done = generate_rows(model, tokenizer, [Row(leads[k], params) for k in chunk],
                                 prefixes)
            for k, reply in zip(chunk, done, strict=True):
                for i in sets[k]:
                    replies[i] = reply
            if on_batch is not None:
                on_batch(sum(len(sets[k]) for k in chunk))
    return replies  # type: ignore[return-value]
