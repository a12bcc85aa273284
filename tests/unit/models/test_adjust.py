"""OpenAI's logit_bias, presence_penalty and frequency_penalty (``models.adjust``) on the tiny
random model: the greedy reply is the one a plain loop of forward passes picks under OpenAI's
formula; rows with their own values share a batch and each answers as alone; values out of
range are refused."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data.encode import encode_prompt
from tunesmith.errors import ConfigError
from tunesmith.models.adjust import Adjuster
from tunesmith.models.generation import GenerationParams, generate
from tunesmith.service.batching import Batcher, Ticket

QUESTIONS = ["hi there", "what is up", "tell me more about the shop", "x"]


def prompts(tokenizer) -> list[list[int]]:
    return [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def by_hand(model, prompt: list[int], steps: int, bias: dict[int, float], presence: float,
            frequency: float) -> list[int]:
    """Greedy tokens from whole forward passes, the scores adjusted by OpenAI's formula."""
    reply: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + reply])).logits[0, -1].float()
        for token, b in bias.items():
            logits[token] += b
        for token in set(reply):
            logits[token] -= frequency * reply.count(token) + presence
        reply.append(int(logits.argmax()))
    return reply


@pytest.mark.parametrize("presence,frequency", [(0.0, 0.0), (1.5, 0.0), (0.0, 2.0), (-1.0, 1.0)])
def test_greedy_replies_follow_openais_formula(tiny_loaded, presence, frequency) -> None:
    model, tokenizer = tiny_loaded
    prompt = prompts(tokenizer)[2]
    free = generate(model, tokenizer, [prompt], GenerationParams(max_new_tokens=8,
                                                                  min_new_tokens=8))[0]
    first = tokenizer.encode(free.text, add_special_tokens=False)[0]
    bias = {first: -100.0, 1000: 3.5}  # the free reply's first token ruled out
    params = GenerationParams(max_new_tokens=8, min_new_tokens=8, logprobs=0,
                              logit_bias=tuple(bias.items()), presence_penalty=presence,
                              frequency_penalty=frequency)
    reply = generate(model, tokenizer, [prompt], params)[0]
    tokens = [e.token for e in reply.logprobs]
    assert tokens == by_hand(model, prompt, 8, bias, presence, frequency)
    assert tokens[0] != first


def test_a_bias_of_100_forces_its_token(tiny_loaded) -> None:
    model, tokenizer = tiny_loaded
    token = tokenizer.encode(" shop", add_special_tokens=False)[0]
    reply = generate(model, tokenizer, prompts(tokenizer)[:1],
                     GenerationParams(max_new_tokens=5, logit_bias=((token, 100.0),)))[0]
    assert reply.text == " shop" * 5


def test_rows_with_their_own_values_share_a_batch_and_answer_as_alone(tiny_loaded) -> None:
    model, tokenizer = tiny_loaded
    params = [GenerationParams(max_new_tokens=7, presence_penalty=(0.0, 2.0, 0.5, 0.0)[i],
                               frequency_penalty=(0.0, 0.0, 1.0, 2.0)[i],
                               logit_bias=((42, 5.0),) if i == 3 else ())
              for i in range(len(QUESTIONS))]
    alone = [generate(model, tokenizer, [p], q)[0]
             for p, q in zip(prompts(tokenizer), params, strict=True)]
    batcher = Batcher(max_batch=4, window_s=0.2)
    tickets = [batcher.submit(Ticket(model, tokenizer, p, q))
               for p, q in zip(prompts(tokenizer), params, strict=True)]
    assert [t.result(timeout=120) for t in tickets] == alone and max(batcher.sizes) > 1


def test_the_adjuster_counts_only_the_reply() -> None:
    scores = torch.zeros(2, 6)
    ids = torch.tensor([[5, 5, 1, 1, 2], [5, 3, 3, 3, 4]])  # replies begin at columns 2 and 1
    p = GenerationParams(max_new_tokens=4, presence_penalty=0.5, frequency_penalty=1.0,
                         logit_bias=((0, 2.0),))
    out = Adjuster([p, GenerationParams(max_new_tokens=4)], [2, 1])(ids, scores)
    assert out[0].tolist() == [2.0, -2.5, -1.5, 0.0, 0.0, 0.0]  # token 5 is the prompt's
    assert out[1].tolist() == [0.0] * 6


@pytest.mark.parametrize("values", [{"presence_penalty": 2.5}, {"frequency_penalty": -3},
                                    {"logit_bias": ((1, 101.0),)}, {"logit_bias": ((-1, 1.0),)}])
def test_values_out_of_range_are_refused(values) -> None:
    with pytest.raises(ConfigError):
        GenerationParams(max_new_tokens=4, **values)
