"""The shared-prefix pass: its mask, its batches, and a classification head read through it."""

import pytest
import torch

from tests.helpers import decoder_passes
from tunesmith.models.prefix_pass import MAX_PADDING, batches, tree_mask

SYSTEM = {"role": "system", "content": "Label the review."}


def test_the_tree_mask():
    # one row: a padding column, two context tokens, answer 1 (two tokens), answer 2 (one)
    mask = tree_mask(torch.tensor([[-1, 0, 0, 1, 1, 2]]), shared=2)[0, 0].int()
    assert mask.tolist() == [
        [0, 0, 1, 0, 0, 0, 0, 0],  # padding: itself alone
        [1, 1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 1, 1, 0, 0],
        [1, 1, 0, 1, 1, 1, 1, 0],
        [1, 1, 0, 1, 1, 0, 0, 1],  # answer 2 does not see answer 1
    ]


def test_batches_bound_their_padding():
    rows = [150, 90, 88, 87, 85, 60, 59, 59, 58, 58, 57, 20]
    cuts = batches(rows, batch_size=4)
    assert [rows[c] for c in cuts] == [[150], [90, 88, 87, 85], [60, 59, 59, 58], [58, 57],
                                       [20]]
    for c in cuts:
        part = rows[c]
        assert len(part) <= 4
        assert sum(part[0] - r for r in part) <= MAX_PADDING * part[0] * len(part)
    assert batches([5, 5, 5], batch_size=8) == [slice(0, 3)]
    assert batches([7], batch_size=8) == [slice(0, 1)]


@pytest.mark.parametrize("family", ["llama", "llama-eager", "qwen2", "mistral", "gemma3", "phi3",
                                    "gpt_neox"])
def test_a_head_reads_each_prompt_as_alone(family, tiny_family_dir, tiny_model_dir, tokenizer):
    # the head's probabilities through the shared-prefix pass equal those of each prompt run
    # alone; gemma3's tiny model (16-token window) runs its prompts whole, right-padded
    from transformers import AutoModelForSequenceClassification

    from tunesmith.data.encode import encode_prompt
    from tunesmith.evaluation.classifier import class_probabilities
    from tunesmith.models.classifier import class_logits, load_classifier
    from tunesmith.models.load import load_tokenizer

    path = tiny_model_dir if family.startswith("llama") else tiny_family_dir(family)
    tok = load_tokenizer(path)
    if family == "llama-eager":
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, pad_token_id=tok.pad_token_id, attn_implementation="eager")
    else:
        model = load_classifier(path, ["good", "bad"], pad_token_id=tok.pad_token_id, seed=0)
    model.eval()
    users = [{"role": "user", "content": "so so " * i + "product"} for i in range(5)]
    convs = [[u] for u in users] if family == "gemma3" else [[SYSTEM, u] for u in users]
    if family != "gemma3":
        convs.append([{"role": "system", "content": "Another task."}, users[0]])
    convs.append(convs[1])  # a repeated prompt
    with torch.no_grad():
        want = torch.cat([torch.softmax(class_logits(
            model, torch.tensor([encode_prompt(tok, c)]), None), -1) for c in convs])
    for batch_size in (1, 3, 16):
        with decoder_passes(model.base_model) as shapes:
            got = class_probabilities(model, tok, convs, batch_size=batch_size)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        if family != "gemma3" and batch_size == 16:
            # the prefix every prompt shares ("<|im_start|>system\n") once, then one batch
            # (the padding bound allows); the repeated prompt is not run again
            assert shapes[0][0] == 1 and shapes[-1][0] < len(convs)


def test_the_prefix_cache_keeps_the_floor_and_the_last_longer_prefix(tiny_model_dir):
    from tunesmith.models.load import load
    from tunesmith.models.prefix_pass import PrefixCache

    decoder = load(tiny_model_dir)[0].eval().get_decoder()
    contexts = [[1, 2, 3, 10, 11, 12, 5], [1, 2, 3, 10, 11, 13, 5], [1, 2, 3, 20, 21, 5]]
    prefixes = PrefixCache(contexts)
    assert prefixes.floor == 3
    device = torch.device("cpu")
    with torch.no_grad(), decoder_passes(decoder) as ran:
        for prefix in [(1, 2, 3, 10, 11), (1, 2, 3, 10, 11, 12), (1, 2, 3, 20, 21), (1, 2, 3)]:
            got = prefixes.get(decoder, prefix, device)
            whole = decoder(input_ids=torch.tensor([prefix]), use_cache=True)
            for mine, alone in zip(got.layers, getattr(whole, _name()).layers, strict=True):
                assert torch.allclose(mine.keys, alone.keys, atol=1e-5)
                assert torch.allclose(mine.values, alone.values, atol=1e-5)
            assert len(prefixes.caches) <= 2 and (1, 2, 3) in prefixes.caches
    # the floor once; each longer prefix from the longest kept (12 after 10, 11); the floor
    # asked for again is not run again (each check's whole pass is counted between them)
    assert [width for _, width in ran] == [3, 2, 5, 1, 6, 2, 5, 3]


def _name() -> str:
    from tunesmith.models.prefix_pass import cache_argument

    return cache_argument()


def _cost(rows, cuts, new_tokens):
    from tunesmith.models.prefix_pass import STEP_TOKENS

    return sum((c.stop - c.start) * rows[c.start] + STEP_TOKENS * new_tokens for c in cuts)


def test_generation_batches_are_the_cheapest_cuts():
    import itertools
    import random

    from tunesmith.models.prefix_pass import generation_batches

    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 8)
        rows = sorted((rng.randint(1, 400) for _ in range(n)), reverse=True)
        size, new = rng.randint(1, 5), rng.choice([1, 4, 32])
        cuts = generation_batches(rows, size, new)
        assert [i for c in cuts for i in range(c.start, c.stop)] == list(range(n))
        assert all(0 < c.stop - c.start <= size for c in cuts)
        every = []  # each way to cut n rows into consecutive batches of at most `size`
        for points in itertools.product([False, True], repeat=n - 1):
            ends = [i + 1 for i, cut in enumerate(points) if cut] + [n]
            way = [slice(a, b) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
            if all(s.stop - s.start <= size for s in way):
                every.append(_cost(rows, way, new))
        assert _cost(rows, cuts, new) == min(every)


def test_short_replies_cut_where_long_prompts_trail_and_long_replies_do_not():
    from tunesmith.models.prefix_pass import generation_batches

    rows = [400, 60, 58, 57, 55, 50]
    assert generation_batches(rows, 16, 4) == [slice(0, 1), slice(1, 6)]
    assert generation_batches(rows, 16, 200) == [slice(0, 6)]
    # at most 4 a batch: the long prompt's padding is cheapest spread over 2 rows
    assert generation_batches(rows, 4, 200) == [slice(0, 2), slice(2, 6)]
