"""Requests generated together (``service.batching``) on the tiny random model: each reply is
exactly what the request gets alone, with its own token limit, stop strings, token count,
finish reason, stream and cancellation; seeded samples run alone."""

from __future__ import annotations

import pytest

from tests.families import FAMILIES
from tunesmith.data.encode import encode_prompt
from tunesmith.models.generation import (
    GenerationParams,
    Row,
    generate,
    generate_rows,
    generating,
)
from tunesmith.service.batching import (
    CHUNK_TOKENS,
    Batcher,
    Cancelled,
    Ticket,
    _joinable,
    batcher_for,
)

QUESTIONS = ["I love it", "broke after a day, would not buy again", "ok", "Where is my order?",
             "The screen cracked when I dropped it from the table", "fine"]


@pytest.fixture(scope="module")
def prompts(tiny_loaded) -> list[list[int]]:
    _, tokenizer = tiny_loaded
    return [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def alone(tiny_loaded, prompt: list[int], params: GenerationParams):
    model, tokenizer = tiny_loaded
    return generate(model, tokenizer, [prompt], params, batch_size=1)[0]


def mixed_params(tiny_loaded, prompts) -> list[GenerationParams]:
    """Different token limits, and stop strings taken from the replies themselves so they
    really cut some of them."""
    full = [alone(tiny_loaded, p, GenerationParams(max_new_tokens=12)) for p in prompts]
    params = []
    for i, reply in enumerate(full):
        stop = (reply.text.strip()[2:4],) if i % 3 == 1 and len(reply.text.strip()) > 4 else ()
        params.append(GenerationParams(max_new_tokens=(4, 12, 7)[i % 3], stop=stop))
    assert any(p.stop for p in params)
    return params


def test_concurrent_requests_share_batches_and_each_gets_its_reply_alone(tiny_loaded, prompts
                                                                         ) -> None:
    model, tokenizer = tiny_loaded
    params = mixed_params(tiny_loaded, prompts)
    expected = [alone(tiny_loaded, p, q) for p, q in zip(prompts, params, strict=True)]
    assert {r.finish_reason for r in expected} == {"stop", "length"}

    batcher = Batcher(max_batch=4, window_s=0.2)
    tickets = [batcher.submit(Ticket(model, tokenizer, p, q))
               for p, q in zip(prompts, params, strict=True)]
    assert [t.result(timeout=120) for t in tickets] == expected  # text, reason, token count
    assert max(batcher.sizes) <= 4  # never more than max_batch rows in a call
    assert batcher.sizes[0] == 4 - sum(r.completion_tokens == 1 for r in expected[:4])


def test_rows_leave_a_running_batch_and_queued_requests_join_it(tiny_loaded, prompts) -> None:
    model, tokenizer = tiny_loaded
    params = [GenerationParams(max_new_tokens=(4, 12, 7)[i % 3]) for i in range(6)]
    expected = [alone(tiny_loaded, p, q) for p, q in zip(prompts, params, strict=True)]
    assert [r.completion_tokens for r in expected] == [4, 12, 7] * 2  # the random model
    batcher = Batcher(max_batch=4, window_s=0.2)
    tickets = [batcher.submit(Ticket(model, tokenizer, p, q))
               for p, q in zip(prompts, params, strict=True)]
    assert [t.result(timeout=120) for t in tickets] == expected
    # rows 0-3 take one token each to join, then a call of CHUNK_TOKENS (8): rows of 4 and 7
    # tokens end, the 12 goes on; the two queued join it (3 rows), and the last 12 ends alone
    assert CHUNK_TOKENS == 8 and list(batcher.sizes) == [4, 3, 1]


def test_a_row_ends_and_answers_while_a_longer_row_goes_on(tiny_loaded, prompts) -> None:
    model, tokenizer = tiny_loaded
    steps_of_long: list[int] = []
    seen_when_short_ended: list[int] = []
    long = Row(prompts[0], GenerationParams(max_new_tokens=20, min_new_tokens=20),
               on_tokens=lambda ids: steps_of_long.append(len(ids)))
    short = Row(prompts[1], GenerationParams(max_new_tokens=3, min_new_tokens=0))
    short.on_end = lambda reply: seen_when_short_ended.append(len(steps_of_long))
    with pytest.raises(ValueError, match="sampling parameters"):  # min_new_tokens differ
        generate_rows(model, tokenizer, [long, short])
    short.params = GenerationParams(max_new_tokens=3, min_new_tokens=3)
    long.params = GenerationParams(max_new_tokens=20, min_new_tokens=3)
    with generating(model, None):
        long_reply, short_reply = generate_rows(model, tokenizer, [long, short])
    assert short_reply.completion_tokens == 3 and short_reply.finish_reason == "length"
    assert seen_when_short_ended == [3]  # told at its own third token, not the batch's last
    assert steps_of_long[-1] == long_reply.completion_tokens > 3


def test_seeded_samples_run_alone_and_repeat(tiny_loaded, prompts) -> None:
    model, tokenizer = tiny_loaded
    seeded = [GenerationParams(max_new_tokens=8, temperature=1.0, seed=s) for s in (1, 2)]
    expected = [alone(tiny_loaded, prompts[0], q) for q in seeded]
    batcher = Batcher(window_s=0.2)
    tickets = [batcher.submit(Ticket(model, tokenizer, prompts[0], q)) for q in seeded]
    assert [t.result(timeout=120) for t in tickets] == expected
    assert list(batcher.sizes) == [1, 1]
    # unseeded samples of the same temperature do share a batch
    free = GenerationParams(max_new_tokens=8, temperature=1.0)
    tickets = [batcher.submit(Ticket(model, tokenizer, p, free)) for p in prompts[:3]]
    assert all(t.result(timeout=120).completion_tokens >= 1 for t in tickets)
    assert list(batcher.sizes)[2:] == [3]


def test_streams_in_one_batch_join_to_their_replies_and_one_can_leave(tiny_loaded, prompts
                                                                      ) -> None:
    model, tokenizer = tiny_loaded
    params = mixed_params(tiny_loaded, prompts[:3])
    expected = [alone(tiny_loaded, p, q) for p, q in zip(prompts[:3], params, strict=True)]
    batcher = Batcher(window_s=0.3)
    leaving = batcher.submit(Ticket(model, tokenizer, prompts[3],
                                    GenerationParams(max_new_tokens=200), streaming=True))
    tickets = [batcher.submit(Ticket(model, tokenizer, p, q, streaming=True))
               for p, q in zip(prompts[:3], params, strict=True)]
    first = leaving.pieces()
    next(first)
    leaving.cancel()  # the client went away after its first piece
    first.close()
    streamed = ["".join(t.pieces()) for t in tickets]
    assert streamed == [r.text for r in expected]
    assert [t.result() for t in tickets] == expected
    # all four joined at once, the leaver included (a reply of one token ends as it joins)
    assert batcher.sizes[0] == 4 - sum(r.completion_tokens == 1 for r in expected)
    assert leaving.result(timeout=60).completion_tokens < 200


def test_a_ticket_cancelled_before_its_batch_never_runs(tiny_loaded, prompts) -> None:
    model, tokenizer = tiny_loaded
    batcher = Batcher(window_s=0.3)
    ticket = Ticket(model, tokenizer, prompts[0], GenerationParams(max_new_tokens=4))
    ticket.cancel()
    batcher.submit(ticket)
    with pytest.raises(Cancelled):
        ticket.result(timeout=60)


def test_an_error_reaches_every_request_of_the_batch(tiny_loaded, prompts) -> None:
    class Broken:
        training = False

        def __init__(self, model) -> None:
            self.model, self.config = model, model.config

        def parameters(self):
            return self.model.parameters()

        def eval(self):
            return self

        def train(self, mode: bool = True):
            return self

        def generate(self, **kwargs):
            raise RuntimeError("out of memory")

    model, tokenizer = tiny_loaded
    broken = Broken(model)
    batcher = batcher_for(broken, window_s=0.2)
    assert batcher_for(broken, window_s=0.2) is batcher
    tickets = [batcher.submit(Ticket(broken, tokenizer, p, GenerationParams(max_new_tokens=4)))
               for p in prompts[:3]]
    for t in tickets:
        with pytest.raises(RuntimeError, match="out of memory"):
            t.result(timeout=60)
    # the worker goes on: the next request (a ticket carries its own model) is answered
    ok = batcher.submit(Ticket(model, tokenizer, prompts[0], GenerationParams(max_new_tokens=2)))
    assert ok.result(timeout=60).completion_tokens <= 2


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_answers_in_a_batch_as_alone(family: str, tiny_family_dir) -> None:
    """Families whose layers keep a plain KV cache run in a batch that rows join (all but
    Gemma 3 here: these Mistral and Phi-3 configs set no sliding window); Gemma 3's
    sliding-window layers run each batch in one call. Either way each reply is the one it
    gets alone."""
    from tunesmith.models.load import load

    model, tokenizer = load(tiny_family_dir(family))
    model.eval()
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    params = [GenerationParams(max_new_tokens=(4, 12, 7)[i % 3]) for i in range(len(prompts))]
    expected = [alone((model, tokenizer), p, q) for p, q in zip(prompts, params, strict=True)]
    batcher = Batcher(max_batch=4, window_s=0.2)
    tickets = [batcher.submit(Ticket(model, tokenizer, p, q))
               for p, q in zip(prompts, params, strict=True)]
    assert [t.result(timeout=120) for t in tickets] == expected
    joins = _joinable(tickets[0])
    assert joins == (family != "gemma3")
    if joins:  # the two queued requests joined the running batch (see the test above)
        assert [r.completion_tokens for r in expected] != [4, 12, 7] * 2 or \
            list(batcher.sizes) == [4, 3, 1]
    else:
        assert list(batcher.sizes) == [4, 2]


def test_log_probabilities_in_a_batch_are_those_alone_and_stream_with_their_text(
        tiny_loaded, prompts) -> None:
    model, tokenizer = tiny_loaded
    params = [GenerationParams(max_new_tokens=(5, 11, 8)[i % 3], logprobs=(None, 2, 0)[i % 3])
              for i in range(len(prompts))]
    expected = [alone(tiny_loaded, p, q) for p, q in zip(prompts, params, strict=True)]
    batcher = Batcher(max_batch=4, window_s=0.2)
    tickets = [batcher.submit(Ticket(model, tokenizer, p, q, streaming=True))
               for p, q in zip(prompts, params, strict=True)]
    streamed = [list(t.chunks()) for t in tickets]
    for ticket, chunks, want, q in zip(tickets, streamed, expected, params, strict=True):
        got = ticket.result()
        assert (got.text, got.completion_tokens) == (want.text, want.completion_tokens)
        assert "".join(text for text, _ in chunks) == got.text
        if q.logprobs is None:
            assert got.logprobs is None and all(not e for _, e in chunks)
            continue
        assert [e.token for e in got.logprobs] == [e.token for e in want.logprobs]
        assert [e.logprob for e in got.logprobs] == pytest.approx(
            [e.logprob for e in want.logprobs], abs=1e-4)
        assert all(len(e.top) == q.logprobs for e in got.logprobs)
        # each chunk carries the tokens it completes; together, the reply's
        assert [e for _, entries in chunks for e in entries] == list(got.logprobs)
    assert max(batcher.sizes) > 1
