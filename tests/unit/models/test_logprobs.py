"""Log-probabilities of generated tokens (``models.logprobs``), on the tiny random model with
the real tokenizer: each token's is the log-softmax of a plain forward pass over the prompt and
the reply, whatever the temperature; the top tokens are the most likely, most likely first;
a stop string or the end token leaves out the tokens the text does not show; a token's bytes
are its part of a character split across tokens."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data.encode import encode_prompt
from tunesmith.errors import ConfigError
from tunesmith.models.generation import GenerationParams, generate
from tunesmith.models.logprobs import FLOOR, TokenLogprob, kept, openai_content, token_bytes

QUESTIONS = ["hi there", "what is up with you today", "x", "what is up with you now"]


def forward_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: the log-softmax at each reply token's step, teacher-forced."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    return logits.log_softmax(-1)[len(prompt) - 1:len(prompt) - 1 + len(tokens)]


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_each_token_has_its_forward_log_probability_and_the_top_tokens(tiny_loaded,
                                                                        temperature) -> None:
    model, tokenizer = tiny_loaded
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    params = GenerationParams(max_new_tokens=6, min_new_tokens=6, temperature=temperature,
                              seed=5, logprobs=3)
    for prompt, reply in zip(prompts, generate(model, tokenizer, prompts, params, batch_size=4),
                             strict=True):
        entries = reply.logprobs
        assert entries is not None and len(entries) == reply.completion_tokens == 6
        tokens = [e.token for e in entries]
        assert tokenizer.decode(tokens, skip_special_tokens=True) == reply.text
        expected = forward_logprobs(model, prompt, tokens)
        for step, entry in enumerate(entries):
            # the model's distribution, before temperature: the same at any temperature
            assert entry.logprob == pytest.approx(float(expected[step, entry.token]), abs=1e-4)
            values, ids = expected[step].topk(3)
            assert [t for t, _ in entry.top] == ids.tolist()
            assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
            if temperature == 0:
                assert entry.top[0][0] == entry.token  # greedy takes the most likely


def test_without_the_option_there_are_none_and_top_zero_gives_the_token_alone(tiny_loaded
                                                                               ) -> None:
    model, tokenizer = tiny_loaded
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    plain = generate(model, tokenizer, [prompt], GenerationParams(max_new_tokens=4))[0]
    assert plain.logprobs is None
    only = generate(model, tokenizer, [prompt], GenerationParams(max_new_tokens=4,
                                                                  logprobs=0))[0]
    assert only.text == plain.text and only.logprobs and all(not e.top for e in only.logprobs)
    with pytest.raises(ConfigError, match="logprobs is 21"):
        GenerationParams(max_new_tokens=4, logprobs=21)


def test_a_stop_string_leaves_out_the_tokens_past_it(tiny_loaded) -> None:
    model, tokenizer = tiny_loaded
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": QUESTIONS[1]}])
    whole = generate(model, tokenizer, [prompt], GenerationParams(max_new_tokens=12,
                                                                   logprobs=0))[0]
    stop = whole.text[len(whole.text) // 2:len(whole.text) // 2 + 3]
    cut = generate(model, tokenizer, [prompt], GenerationParams(max_new_tokens=12, stop=(stop,),
                                                                 logprobs=0))[0]
    assert cut.finish_reason == "stop" and cut.text == whole.text[:whole.text.index(stop)]
    tokens = [e.token for e in cut.logprobs]
    assert cut.logprobs == whole.logprobs[:len(tokens)]
    shown = tokenizer.decode(tokens, skip_special_tokens=True)
    assert shown.startswith(cut.text)  # every token the text shows, the last maybe in part
    assert len(tokenizer.decode(tokens[:-1], skip_special_tokens=True)) < len(cut.text)


def test_the_end_token_is_not_listed(tiny_loaded) -> None:
    _, tokenizer = tiny_loaded
    ids = tokenizer.encode(" hello world", add_special_tokens=False)
    tokens = [*ids, tokenizer.eos_token_id]
    entries = [TokenLogprob(t, -1.0) for t in tokens]
    assert kept(tokenizer, tokens, entries, " hello world", cut=False) == tuple(entries[:-1])


def test_bytes_of_a_character_split_across_tokens(tiny_loaded) -> None:
    _, tokenizer = tiny_loaded
    text = " ok 😀 — é"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [token_bytes(tokenizer, t) for t in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    assert any(p.decode("utf-8", errors="replace") != p.decode("utf-8", errors="ignore")
               for p in pieces)  # the emoji's bytes span two tokens
    content = openai_content(tokenizer, [TokenLogprob(ids[0], float("-inf"),
                                                      ((ids[0], float("-inf")),))])
    assert content[0]["logprob"] == FLOOR and content[0]["top_logprobs"][0]["logprob"] == FLOOR
    assert content[0]["bytes"] == list(pieces[0]) and content[0]["token"] == " ok"


def test_a_byte_fallback_token_is_its_byte() -> None:
    class SentencePieceLike:
        def convert_ids_to_tokens(self, token: int) -> str:
            return {1: "<0xE2>", 2: "▁hello"}[token]

        def decode(self, ids: list[int]) -> str:
            return {2: "hello"}[ids[0]]

    assert token_bytes(SentencePieceLike(), 1) == b"\xe2"
    assert token_bytes(SentencePieceLike(), 2) == b"hello"
