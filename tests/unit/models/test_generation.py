"""The one generation path on the tiny random model: parameters, seeding, stops, streaming,
padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunesmith.data.encode import encode_prompt
from tunesmith.errors import ConfigError, ModelError
from tunesmith.models.generation import (
    GenerationParams,
    first_stop,
    generate,
    held_back,
    pad_batch,
)
from tunesmith.service.batching import Batcher, Ticket

QUESTIONS = ["I love it", "broke after a day, would not buy again", "ok"]


@pytest.fixture(scope="module")
def prompts(tiny_loaded) -> list[list[int]]:
    _, tokenizer = tiny_loaded
    return [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def test_parameters_are_checked_all_at_once() -> None:
    params = GenerationParams(max_new_tokens=4)
    assert params.temperature == 0 and not params.sampling and params.stop == ()
    assert GenerationParams(max_new_tokens=4, temperature=0.7).sampling
    with pytest.raises(ConfigError) as err:
        GenerationParams(max_new_tokens=0, temperature=-1, top_p=0, stop=("",))
    assert len(err.value.problems) == 4
    assert "max_new_tokens" in str(err.value) and "top_p" in str(err.value)


def test_pad_batch_pads_left_for_generation_and_right_for_scoring() -> None:
    left = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert left.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    right = pad_batch([[5, 6, 7], [8], []], pad_id=9, side="right")
    assert right.input_ids.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]]
    assert right.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert right.input_ids.dtype == torch.long
    with pytest.raises(ModelError, match="pad token"):
        pad_batch([[1]], pad_id=None, side="left")


def test_greedy_is_deterministic_and_batching_does_not_change_replies(tiny_loaded, prompts) -> None:
    model, tokenizer = tiny_loaded
    params = GenerationParams(max_new_tokens=8)
    batched = generate(model, tokenizer, prompts, params, batch_size=3)
    assert generate(model, tokenizer, prompts, params, batch_size=3) == batched
    one_by_one = [generate(model, tokenizer, [p], params, batch_size=1)[0] for p in prompts]
    assert one_by_one == batched
    # without stop strings a reply ends early only at EOS
    assert all(r.finish_reason == "stop" if r.completion_tokens < 8 else r.completion_tokens == 8
               for r in batched)


def test_a_seed_makes_sampling_reproducible_and_leaves_the_caller_rng_alone(tiny_loaded, prompts
                                                                             ) -> None:
    model, tokenizer = tiny_loaded

    def sample(seed: int) -> list[str]:
        params = GenerationParams(max_new_tokens=8, temperature=1.0, seed=seed)
        return [r.text for r in generate(model, tokenizer, prompts, params)]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample(1)
    assert torch.equal(torch.get_rng_state(), state)  # the call's seed stayed inside it
    assert sample(1) == first
    assert any(sample(s) != first for s in (2, 3, 4))


def test_a_reply_runs_to_the_token_limit_when_nothing_stops_it(tiny_loaded, prompts) -> None:
    model, tokenizer = tiny_loaded
    # the random model's first greedy tokens are not its EOS (the decoded text shows which)
    reply = generate(model, tokenizer, prompts[:1], GenerationParams(max_new_tokens=3))[0]
    assert reply.finish_reason == "length" and reply.completion_tokens == 3
    assert reply.text == tokenizer.decode(_greedy_ids(model, prompts[0], 3),
                                          skip_special_tokens=True)


def test_a_stop_string_cuts_the_reply_and_ends_it_there(tiny_loaded, prompts) -> None:
    model, tokenizer = tiny_loaded
    full = generate(model, tokenizer, prompts, GenerationParams(max_new_tokens=12))
    target = max(full, key=lambda r: len(r.text.strip()))
    stop = target.text.strip()[3:6]
    assert stop and first_stop(target.text, [stop]) is not None
    cut = generate(model, tokenizer, prompts, GenerationParams(max_new_tokens=12, stop=(stop,)))
    for before, after in zip(full, cut, strict=True):
        at = first_stop(before.text, [stop])
        if at is None:  # rows without the stop string are not touched by another row's stop
            assert after == before
        else:
            assert after.text == before.text[:at] and after.finish_reason == "stop"
            assert after.completion_tokens < before.completion_tokens or \
                before.finish_reason == "stop"


def test_the_end_of_sequence_token_ends_a_reply_with_stop(tiny_model_dir: Path, prompts
                                                          ) -> None:
    from tunesmith.models.load import load

    model, tokenizer = load(tiny_model_dir)  # its own tokenizer: the EOS is changed below
    first = _greedy_ids(model.eval(), prompts[0], 1)[0]
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first)
    reply = generate(model, tokenizer, prompts[:1], GenerationParams(max_new_tokens=5))[0]
    assert reply.finish_reason == "stop" and reply.completion_tokens == 1


def stream(model, tokenizer, prompt: list[int], params: GenerationParams) -> Ticket:
    return Batcher(window_s=0).submit(Ticket(model, tokenizer, prompt, params, streaming=True))


def test_streamed_pieces_join_to_the_generated_text(tiny_loaded, prompts) -> None:
    model, tokenizer = tiny_loaded
    for params in (GenerationParams(max_new_tokens=12),
                   GenerationParams(max_new_tokens=12, temperature=1.0, seed=5)):
        for prompt in prompts:
            whole = generate(model, tokenizer, [prompt], params)[0]
            reply = stream(model, tokenizer, prompt, params)
            pieces = list(reply.pieces())
            assert "".join(pieces) == whole.text and reply.result() == whole
            assert len(pieces) >= 1
    # with a stop string, nothing at or after it is ever streamed
    whole = generate(model, tokenizer, prompts[1:2], GenerationParams(max_new_tokens=12))[0]
    stop = whole.text.strip()[2:4]
    params = GenerationParams(max_new_tokens=12, stop=(stop,))
    reply = stream(model, tokenizer, prompts[1], params)
    assert "".join(reply.pieces()) == whole.text[:whole.text.index(stop)]
    assert reply.result() == generate(model, tokenizer, prompts[1:2], params)[0]


def test_a_cancelled_stream_ends_its_generation(tiny_loaded, prompts) -> None:
    model, tokenizer = tiny_loaded
    reply = stream(model, tokenizer, prompts[0], GenerationParams(max_new_tokens=200))
    pieces = reply.pieces()
    next(pieces)
    reply.cancel()  # the client went away: the row ends at its next token
    pieces.close()
    assert reply.result(timeout=60).completion_tokens < 200
    # the lock is free again: a new generation runs
    assert generate(model, tokenizer, prompts[:1], GenerationParams(max_new_tokens=2))


def test_stop_sequence_helpers() -> None:
    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello", ("xyz",)) == 0
    assert held_back("ab", ("abc", "b!")) == 2
    assert first_stop("a stop and STOP", ["STOP", "stop"]) == 2
    assert first_stop("nothing", ["x"]) is None


def _greedy_ids(model, prompt: list[int], n: int) -> list[int]:
    """The first ``n`` greedy tokens by plain forward passes, as a reference."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out
