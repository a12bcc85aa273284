"""Generation over many prompts: the shared prefix once, each batch's rest after it, repeated
prompts answered once; the replies are those of each prompt generated alone."""

import pytest

from tests.helpers import decoder_passes
from tunesmith.data.encode import encode_prompt
from tunesmith.models.generation import GenerationParams, generate
from tunesmith.models.load import load
from tunesmith.models.prefix_pass import shared_prefix

SYSTEM = {"role": "system", "content": "Label the review."}
OTHER = {"role": "system", "content": "Another task entirely."}


def conversations(family: str) -> list[list[dict]]:
    users = [{"role": "user", "content": "so so " * i + "product"} for i in range(5)]
    if family == "gemma3":  # its template takes no system message
        return [[u] for u in users] + [[users[1]]]
    return [[SYSTEM, u] for u in users] + [[OTHER, users[0]], [SYSTEM, users[2]]]


@pytest.mark.parametrize("family", ["llama", "llama-eager", "qwen2", "mistral", "gemma3", "phi3",
                                    "gpt_neox"])
def test_replies_are_those_of_each_prompt_alone(family, tiny_family_dir, tiny_model_dir):
    # gemma3's tiny model has a 16-token window, shorter than these prompts: it generates
    # whole prompts (the check that it falls back is the pass test below)
    path = tiny_model_dir if family.startswith("llama") else tiny_family_dir(family)
    model, tok = load(path)
    if family == "llama-eager":
        model.config._attn_implementation = "eager"
    model.eval()
    prompts = [encode_prompt(tok, c) for c in conversations(family)]
    # a fixed number of tokens: the replies do not end early on a random model's EOS
    params = GenerationParams(max_new_tokens=6, min_new_tokens=6)
    alone = [generate(model, tok, [p], params)[0] for p in prompts]
    assert all(r.completion_tokens == 6 for r in alone)
    for batch_size in (1, 2, 16):
        assert generate(model, tok, prompts, params, batch_size=batch_size) == alone, batch_size


def test_the_shared_prefix_runs_once_and_a_repeated_prompt_once(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    model.eval()
    prompts = [encode_prompt(tok, c) for c in conversations("llama")]
    unique = list(dict.fromkeys(map(tuple, prompts)))
    floor = shared_prefix(unique)
    assert floor == 3  # the chat header: the system prompts differ
    params = GenerationParams(max_new_tokens=3, min_new_tokens=3)
    counted: list[int] = []
    with decoder_passes(model.get_decoder()) as seen, decoder_passes(model.lm_head) as head:
        replies = generate(model, tok, prompts, params, batch_size=3, on_batch=counted.append)
    assert replies[6] == replies[2] and sum(counted) == len(prompts)
    # the vocabulary head runs at one position a row in every pass: the prefix passes keep
    # their KV cache only (``logits_to_keep``), as generate's own first step does
    assert len(head) == len(seen) and all(shape[1] == 1 for shape in head)
    # the set's prefix alone; a batch whose prompts share the whole system prompt goes on
    # from it (one more one-row pass); each batch's rest (no row holds a prefix again); then
    # one-token steps. The 6 distinct prompts take 6 rows, not 7
    assert seen[0] == (1, floor)
    longer = [width for rows, width in seen[1:] if rows == 1 and width > 1]
    prefill = [(rows, width) for rows, width in seen[1:] if rows > 1 and width > 1]
    assert len(longer) == 1 and sum(rows for rows, _ in prefill) == len(unique)
    assert all(width <= max(map(len, unique)) - floor for _, width in prefill)
    run = floor + sum(longer) + sum(rows * width for rows, width in prefill)
    assert run < 0.8 * sum(map(len, unique))
    steps = [s for s in seen[1:] if s[1] == 1]
    assert sum(rows for rows, _ in steps) == 2 * len(unique)  # tokens 2 and 3 of each reply


def test_samples_are_drawn_for_each_copy_of_a_prompt(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    model.eval()
    prompt = encode_prompt(tok, conversations("llama")[0])
    params = GenerationParams(max_new_tokens=4, min_new_tokens=4, temperature=1.0, seed=3)
    with decoder_passes(model.get_decoder()) as seen:
        replies = generate(model, tok, [prompt] * 4, params)
    assert len({r.text for r in replies}) > 1  # four draws, not one copied
    assert seen[0] == (1, len(prompt) - 1)  # identical prompts share all but the last token
    assert seen[1] == (4, 1)
    assert generate(model, tok, [prompt] * 4, params) == replies  # the seed holds


def test_a_window_shorter_than_the_prompts_generates_them_whole(tiny_family_dir):
    model, tok = load(tiny_family_dir("gemma3"))
    model.eval()
    prompts = [encode_prompt(tok, c) for c in conversations("gemma3")]
    assert model.config.sliding_window < max(map(len, prompts))
    with decoder_passes(model.get_decoder()) as seen:
        generate(model, tok, prompts, GenerationParams(max_new_tokens=2, min_new_tokens=2),
                 batch_size=16)
    distinct = len(set(map(tuple, prompts)))
    assert seen[0] == (distinct, max(map(len, prompts)))


def test_no_prompts_no_replies(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    assert generate(model, tok, [], GenerationParams(max_new_tokens=2)) == []


def test_long_replies_keep_batches_full(tiny_model_dir):
    # one long prompt among short ones: with short replies the long one runs alone (its
    # padding would cost more than a batch's steps); with long replies the batch stays whole
    model, tok = load(tiny_model_dir)
    model.eval()
    prompts = [encode_prompt(tok, [SYSTEM, {"role": "user", "content": "so " * n + "x"}])
               for n in (300, 1, 2, 3, 4, 5)]

    def prefills(new_tokens: int) -> list[int]:
        with decoder_passes(model.get_decoder()) as seen:
            generate(model, tok, prompts, GenerationParams(max_new_tokens=new_tokens,
                                                           min_new_tokens=new_tokens),
                     batch_size=16)
        return [rows for rows, width in seen[1:] if width > 1]

    assert prefills(2) == [1, 5]
    assert prefills(200) == [6]
