"""The LM target loss: packing, isolation of packed sequences, the chunked head."""

import pytest
import torch

from tests.helpers import review_rows
from tunesmith.data.encode import IGNORE_INDEX, Encoded, encode_chat
from tunesmith.data.packing import collate_packed, pack_rows
from tunesmith.training.batches import collate
from tunesmith.training.loss import TargetLoss


def encoded(tok, n=8):
    return [encode_chat(tok, r["messages"]) for r in review_rows(n)]


def test_packed_batch_gives_the_same_loss_as_each_sequence_alone(tiny):
    model, tok = tiny
    loss = TargetLoss(model).eval()
    examples = encoded(tok, 5)
    with torch.no_grad():
        alone = [loss(**collate([e], pad_id=tok.pad_token_id)) for e in examples]
        rows = pack_rows(examples, capacity=10_000)
        assert len(rows) == 1
        packed = loss(**collate_packed(rows, pad_id=tok.pad_token_id))
    assert packed.n_tokens == sum(a.n_tokens for a in alone)
    assert float(packed.loss_sum) == pytest.approx(sum(float(a.loss_sum) for a in alone),
                                                   rel=1e-5)


def test_no_token_attends_to_another_sequence_in_the_row(tiny):
    model, tok = tiny
    loss = TargetLoss(model).eval()
    a, b = encoded(tok, 2)
    silent_a = Encoded(a.input_ids, [IGNORE_INDEX] * len(a))  # only b's targets count
    other_a = Encoded([t + 1 for t in a.input_ids], silent_a.labels)
    with torch.no_grad():
        one = loss(**collate_packed(pack_rows([silent_a, b], 10_000), pad_id=0))
        two = loss(**collate_packed(pack_rows([other_a, b], 10_000), pad_id=0))
    assert float(one.loss_sum) == pytest.approx(float(two.loss_sum), rel=1e-6)


def test_chunked_lm_head_matches_one_chunk(tiny, monkeypatch):
    import tunesmith.training.loss as loss_mod

    model, tok = tiny
    batch = collate(encoded(tok, 6), pad_id=tok.pad_token_id)

    def loss_and_grads(chunk):
        monkeypatch.setattr(loss_mod, "HEAD_CHUNK", chunk)
        model.zero_grad()
        out = TargetLoss(model)(**batch)
        out.loss_sum.backward()
        return float(out.loss_sum.detach()), {n: p.grad.clone()
                                              for n, p in model.named_parameters()
                                              if p.requires_grad}

    whole, g_whole = loss_and_grads(10_000)
    chunked, g_chunked = loss_and_grads(3)  # many chunks, each recomputed in backward
    assert chunked == pytest.approx(whole, rel=1e-5)
    for name in g_whole:  # equal up to summation order
        diff = (g_chunked[name] - g_whole[name]).norm() / g_whole[name].norm().clamp_min(1e-12)
        assert diff < 1e-4, (name, float(diff))
