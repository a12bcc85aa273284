import math

import pytest
import torch

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.errors import DataError
from tunesmith.evaluation.lm import lm_loss, text_windows


def scored(windows, offsets):
    out = []
    for w, begin in zip(windows, offsets, strict=True):
        out += [begin + i for i, t in enumerate(w.labels) if t != IGNORE_INDEX]
    return out


def test_disjoint_windows_score_all_but_each_window_start():
    ws = text_windows(list(range(10)), window=4)
    assert [w.input_ids for w in ws] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert scored(ws, [0, 4, 8]) == [1, 2, 3, 5, 6, 7, 9]


def test_overlapping_windows_score_every_token_once():
    ws = text_windows(list(range(10)), window=4, stride=2)
    assert [w.input_ids[0] for w in ws] == [0, 2, 4, 6]
    assert scored(ws, [0, 2, 4, 6]) == list(range(1, 10))


def test_bad_windows():
    with pytest.raises(DataError, match="stride"):
        text_windows([1, 2, 3], window=4, stride=5)
    assert text_windows([7], window=4) == []


def test_lm_loss_is_the_model_loss(tiny_model, tokenizer):
    text = "It is a truth universally acknowledged, that a single man in possession of a fortune"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = tiny_model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    got = lm_loss(tiny_model, tokenizer, [text], window=64)
    assert got.n_tokens == len(ids) - 1 and got.n_windows == 1
    assert got.loss == pytest.approx(want, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(want), rel=1e-5)


def test_lm_loss_batches_windows_and_texts(tiny_model, tokenizer):
    texts = ["one two three four five six seven eight nine ten eleven", "a short one"]
    whole = lm_loss(tiny_model, tokenizer, texts, window=4, stride=2, batch_size=3)
    one_by_one = [lm_loss(tiny_model, tokenizer, [t], window=4, stride=2) for t in texts]
    assert whole.n_tokens == sum(r.n_tokens for r in one_by_one)
    total = sum(r.loss * r.n_tokens for r in one_by_one)
    assert whole.loss == pytest.approx(total / whole.n_tokens, rel=1e-5)


def test_lm_loss_caps_tokens(tiny_model, tokenizer):
    r = lm_loss(tiny_model, tokenizer, ["word " * 200], window=32, max_tokens=50)
    assert r.n_tokens == 31 + 17  # 50 tokens in windows of 32 and 18; each first unscored


def test_lm_loss_of_nothing_is_a_data_error(tiny_model, tokenizer):
    with pytest.raises(DataError, match="no text to score"):
        lm_loss(tiny_model, tokenizer, ["", " "])
