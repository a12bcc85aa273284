"""What a ``generate`` call does to each step's scores, per row of its batch
(``step_processors``): log-probabilities read, OpenAI's ``logit_bias``, ``presence_penalty``
and ``frequency_penalty`` applied, a JSON schema's mask.

The bias and penalties (``Adjuster``):

At each step, for a row with them, before sampling (temperature, top-p) and after the
log-probabilities are read (``models.logprobs``: the model's own distribution)::

    logits[j] += logit_bias[j] - frequency_penalty * count[j] - presence_penalty * (count[j] > 0)

where ``count[j]`` is how often token ``j`` occurs in the row's reply so far (OpenAI's formula
in its "parameter details"; the prompt's tokens do not count, as in vLLM). transformers'
``RepetitionPenaltyLogitsProcessor`` is another penalty (a factor, prompt included) and its
``SequenceBiasLogitsProcessor`` is one bias for the whole batch, so neither serves requests
batched together with their own values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tunesmith.models.constrained import Guided, Masker, compile_schema
from tunesmith.models.logprobs import Recorder

MAX_BIAS = 100.0
MAX_PENALTY = 2.0


def adjusts(params: Any) -> bool:
    """Whether ``params`` (``GenerationParams``) change the scores at all."""
    return bool(params.logit_bias) or bool(params.presence_penalty) \
        or bool(params.frequency_penalty)


class Adjuster:
    """A ``LogitsProcessor`` applying each row's bias and penalties; ``starts[i]``: the column
    where row ``i``'s reply begins in the ``input_ids`` transformers passes."""

    def __init__(self, params: Sequence[Any], starts: Sequence[int]) -> None:
        self.params, self.starts = list(params), list(starts)
        # each row's bias as (ids, values) tensors, made once for the call's every step
        self.bias = [(torch.tensor([t for t, _ in p.logit_bias]),
                      torch.tensor([b for _, b in p.logit_bias])) if p.logit_bias else None
                     for p in self.params]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        for i, p in enumerate(self.params):
            if not adjusts(p):
                continue
            row = scores[i]
            if self.bias[i] is not None:
                ids, values = self.bias[i]
                if ids.device != row.device:
                    ids, values = self.bias[i] = (ids.to(row.device), values.to(row.device))
                row.index_add_(0, ids, values.to(row.dtype))
            if p.presence_penalty or p.frequency_penalty:
                reply = input_ids[i, self.starts[i]:]
                count = torch.bincount(reply[reply < vocab], minlength=vocab).to(row.dtype)
                row -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        return scores


def step_processors(tokenizer: Any, rows: Sequence[Any], starts: Sequence[int]
                    ) -> tuple[list[Any], Recorder | None]:
    """The ``LogitsProcessor``s of one ``generate`` call over ``rows`` (``generation.Row``s,
    whose reply begins at column ``starts[i]``), in order: the model's own distribution read
    for the rows that want log-probabilities; each row's bias and penalties; each guided row's
    schema mask (a row's ``Guided`` made at its first call). Then the recorder, if any."""
    wanted = [r.params.logprobs for r in rows]
    recorder = Recorder(wanted) if any(k is not None for k in wanted) else None
    for r in rows:
        if r.params.schema is not None and r.guided is None:
            r.guided = Guided(compile_schema(tokenizer, r.params.schema))
    processors: list[Any] = [recorder] if recorder else []
    if any(adjusts(r.params) for r in rows):
        processors.append(Adjuster([r.params for r in rows], starts))
    if any(r.guided is not None for r in rows):
        processors.append(Masker([r.guided for r in rows]))
    return processors, recorder
