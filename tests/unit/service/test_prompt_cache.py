"""Prompt caching (``service.prompt_cache``) on tiny random models: a request whose prompt
opens with kept blocks runs only the rest, reports those tokens as cached, and gets exactly the
reply it gets alone with no cache; blocks requests admitted together share run once; a reply
is kept for the next turn of its conversation; the pool keeps within its budget, evicting the
least recently used leaves first, across models."""

from __future__ import annotations

import pytest
import torch

from tests.families import FAMILIES
from tests.helpers import decoder_passes
from tunesmith.data.encode import encode_prompt
from tunesmith.models.generation import GenerationParams, generate
from tunesmith.service.batching import Batcher, Ticket
from tunesmith.service.prompt_cache import BLOCK, PromptCache, PromptPool

LONG = ("You answer questions about orders for an online shop. Be brief and polite. Never "
        "promise refunds; point customers to the returns page. Orders ship within two days. ")
QUESTIONS = ["Where is my order?", "Can I return a lamp?", "ok", "How long does shipping take",
             "The box arrived crushed and the glass was broken, what now?", "thanks"]


def prompts_of(tokenizer, system: str = LONG) -> list[list[int]]:
    return [encode_prompt(tokenizer, [{"role": "system", "content": system},
                                      {"role": "user", "content": q}]) for q in QUESTIONS]


def alone(model, tokenizer, prompt, params):
    return generate(model, tokenizer, [prompt], params, batch_size=1)[0]


def ask(batcher: Batcher, model, tokenizer, prompts, params) -> list[Ticket]:
    tickets = [batcher.submit(Ticket(model, tokenizer, p, q))
               for p, q in zip(prompts, params, strict=True)]
    for t in tickets:
        t.result(timeout=120)
    return tickets


def test_later_requests_run_only_what_follows_their_kept_blocks(tiny_loaded) -> None:
    model, tokenizer = tiny_loaded
    prompts = prompts_of(tokenizer)
    params = [GenerationParams(max_new_tokens=(4, 12, 7)[i % 3]) for i in range(len(prompts))]
    expected = [alone(model, tokenizer, p, q) for p, q in zip(prompts, params, strict=True)]
    pool = PromptPool(64 * 2**20)
    batcher = Batcher(max_batch=4, window_s=0.0, pool=pool)

    first = ask(batcher, model, tokenizer, prompts[:1], params[:1])[0]
    assert first.result() == expected[0] and first.cached_tokens == 0
    assert batcher.prompts is not None and len(batcher.prompts.nodes) == len(prompts[0]) // BLOCK

    # the others share the system prompt's blocks: each runs from the first block it differs
    shared = 0
    while prompts[1][shared] == prompts[0][shared]:
        shared += 1
    with decoder_passes(model.model) as seen:
        tickets = ask(batcher, model, tokenizer, prompts[1:], params[1:])
    assert [t.result() for t in tickets] == expected[1:]
    assert shared >= 2 * BLOCK
    assert [t.cached_tokens for t in tickets] == [shared // BLOCK * BLOCK] * 5
    # the admissions' first passes ran at most each prompt's rest (with its row's padding)
    rests = sorted(len(p) - shared // BLOCK * BLOCK for p in prompts[1:])
    assert seen[0][0] * seen[0][1] <= max(rests[-4:]) * 4

    # the same prompt again: all of it is kept but its last token and the partial block
    again = ask(batcher, model, tokenizer, prompts[4:5], params[4:5])[0]
    assert again.result() == expected[4]
    assert again.cached_tokens == (len(prompts[4]) - 1) // BLOCK * BLOCK


def test_requests_admitted_together_run_their_shared_blocks_once(tiny_loaded) -> None:
    model, tokenizer = tiny_loaded
    prompts = prompts_of(tokenizer)[:4]
    params = [GenerationParams(max_new_tokens=5)] * 4
    expected = [alone(model, tokenizer, p, q) for p, q in zip(prompts, params, strict=True)]
    batcher = Batcher(max_batch=4, window_s=0.3, pool=PromptPool(64 * 2**20))
    with decoder_passes(model.model) as seen, decoder_passes(model.lm_head) as head:
        tickets = ask(batcher, model, tokenizer, prompts, params)
    assert [t.result() for t in tickets] == expected
    kept = min(t.cached_tokens for t in tickets)
    assert kept >= 2 * BLOCK and kept % BLOCK == 0
    assert seen[0] == (1, kept)  # the shared blocks, one row, once
    assert head[0] == (1, 1, model.config.hidden_size)  # their logits at one position only
    assert seen[1] == (4, max(len(p) - kept for p in prompts))  # then each row's rest


def test_a_reply_is_kept_for_the_conversation_that_sends_it_back(tiny_loaded) -> None:
    model, tokenizer = tiny_loaded
    prompt, params = prompts_of(tokenizer)[4], GenerationParams(max_new_tokens=40)
    batcher = Batcher(max_batch=2, window_s=0.0, pool=PromptPool(64 * 2**20))
    first = ask(batcher, model, tokenizer, [prompt], [params])[0].result()
    with torch.no_grad():  # the reply's tokens (greedy: what the batch generated)
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=40,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = out[0, len(prompt):len(prompt) + first.completion_tokens].tolist()
    assert tokenizer.decode(reply, skip_special_tokens=True) == first.text
    assert len(reply) > BLOCK

    # the next turn sends the prompt, the reply and a new message
    follow = [*prompt, *reply, *prompts_of(tokenizer)[2][-12:]]
    again = ask(batcher, model, tokenizer, [follow], [GenerationParams(max_new_tokens=6)])[0]
    assert again.result() == alone(model, tokenizer, follow, GenerationParams(max_new_tokens=6))
    # every whole block of the prompt and reply the batch's cache held (all but the last token)
    assert again.cached_tokens == (len(prompt) + len(reply) - 1) // BLOCK * BLOCK
    assert again.cached_tokens > len(prompt) // BLOCK * BLOCK


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_answers_from_the_cache_as_alone(family: str, tiny_family_dir) -> None:
    from tunesmith.models.load import load

    model, tokenizer = load(tiny_family_dir(family))
    model.eval()
    prompts = prompts_of(tokenizer)
    params = [GenerationParams(max_new_tokens=(4, 9, 6)[i % 3]) for i in range(len(prompts))]
    expected = [alone(model, tokenizer, p, q) for p, q in zip(prompts, params, strict=True)]
    batcher = Batcher(max_batch=3, window_s=0.0, pool=PromptPool(64 * 2**20))
    tickets = ask(batcher, model, tokenizer, prompts[:2], params[:2])
    tickets += ask(batcher, model, tokenizer, prompts[2:], params[2:])
    assert [t.result() for t in tickets] == expected
    cached = PromptCache.usable(model) and family != "gemma3"  # Gemma 3 runs batches whole
    assert any(t.cached_tokens for t in tickets) == cached


def test_the_pool_keeps_its_budget_evicting_least_recent_leaves_across_models(tiny_loaded
                                                                               ) -> None:
    model, tokenizer = tiny_loaded
    pool = PromptPool(10**9)
    a, b = PromptCache(pool), PromptCache(pool)
    p1, p2 = prompts_of(tokenizer)[:2], prompts_of(tokenizer, "Another system prompt " * 8)[:1]
    device = torch.device("cpu")
    for cache, prompts in ((a, p1), (b, p2)):
        from tunesmith.models.generation import generating

        with generating(model, None):
            cache._share(model, prompts * 2, device)  # keeps the prompts' shared blocks
    assert a.nodes and b.nodes and pool.used == a.bytes + b.bytes
    block = next(iter(a.nodes)).bytes
    # touch b's blocks last: a's leaves go first, deepest first
    with generating(model, None):
        b.lay_out(model, p2, tokenizer.pad_token_id)
    before = len(a.nodes)
    pool.budget = pool.used - block
    with pool.lock:
        pool.make_room()
    assert len(a.nodes) == before - 1 and pool.used <= pool.budget
    pool.budget = 0
    with pool.lock:
        pool.make_room()
    assert not a.nodes and not b.nodes and pool.used == 0
    assert not a.root.children and not b.root.children


def test_a_budget_of_zero_keeps_nothing(tiny_loaded) -> None:
    model, tokenizer = tiny_loaded
    batcher = Batcher(max_batch=2, window_s=0.0, pool=PromptPool(0))
    assert batcher.prompts is None
    prompts = prompts_of(tokenizer)[:2]
    tickets = ask(batcher, model, tokenizer, prompts, [GenerationParams(max_new_tokens=3)] * 2)
    assert [t.cached_tokens for t in tickets] == [0, 0]
    with pytest.raises(ValueError, match=">= 0"):
        PromptPool(-1)
