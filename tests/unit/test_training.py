"""The loop's mechanisms on the tiny model: packing, masking, accumulation, early stopping."""

import copy

import pytest
import torch

from tests.conftest import review_rows
from tunesmith.data.encode import IGNORE_INDEX, Encoded, encode_chat
from tunesmith.data.packing import collate_packed, pack_rows
from tunesmith.models.load import add_lora, load
from tunesmith.training.batches import collate
from tunesmith.training.loop import LoopSettings, build_optimizer, train, train_step
from tunesmith.training.loss import TargetLoss


@pytest.fixture
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    model, tok = load(tiny_model_dir)
    return add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear"), tok


def encoded(tok, n=8, offset=0):
    return [encode_chat(tok, r["messages"]) for r in review_rows(n + offset)[offset:]]


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


def _one_step(model, tok, batch, micro, packing):
    from accelerate import Accelerator

    module = TargetLoss(model)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    settings = LoopSettings(learning_rate=1.0, epochs=1, batch_size=len(batch), total_steps=1,
                            micro_batch_size=micro, packing=packing, max_grad_norm=None)
    metrics = train_step(module, batch, optimizer=opt, scheduler=sched,
                         accelerator=Accelerator(), settings=settings, pad_id=tok.pad_token_id)
    return metrics, {n: p.detach().clone() for n, p in model.named_parameters()
                     if p.requires_grad}


def test_gradient_accumulation_equals_one_large_batch(tiny):
    model, tok = tiny
    batch = encoded(tok, 8)
    # uneven target counts per micro-batch make per-micro-batch normalisation visibly wrong
    batch[0] = encode_chat(tok, [{"role": "user", "content": "x"},
                                 {"role": "assistant", "content": "a much longer answer here"}])
    big_m, big = _one_step(copy.deepcopy(model), tok, batch, None, False)
    acc_m, acc = _one_step(copy.deepcopy(model), tok, batch, 3, False)
    pack_m, packed = _one_step(copy.deepcopy(model), tok, batch, 2, True)
    assert acc_m["train_loss"] == pytest.approx(big_m["train_loss"], rel=1e-5)
    assert pack_m["train_loss"] == pytest.approx(big_m["train_loss"], rel=1e-5)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(packed[name], big[name], rtol=1e-4, atol=1e-6)


def test_early_stopping_fires_when_validation_gets_worse(tiny, tmp_path):
    model, tok = tiny
    rows = review_rows(48)
    train_rows = [r for r in rows if r["messages"][2]["content"] == "good"]
    flipped = copy.deepcopy(train_rows[:8])
    for r in flipped:
        r["messages"][2]["content"] = "bad"  # validation disagrees with everything trained
    settings = LoopSettings(learning_rate=2e-2, epochs=50, batch_size=4, total_steps=300,
                            eval_every=2, early_stopping_patience=2, precision="fp32")
    result = train(model, [encode_chat(tok, r["messages"]) for r in train_rows],
                   [encode_chat(tok, r["messages"]) for r in flipped], settings=settings,
                   pad_id=tok.pad_token_id, checkpoint_dir=tmp_path / "ck")
    assert result.state.stopped_early
    assert result.state.step < 300
    assert result.state.best_step is not None and result.state.best_step < result.state.step


def test_layer_wise_lr_decay_slows_earlier_layers(tiny):
    model, _ = tiny
    opt = build_optimizer(model, lr=1.0, weight_decay=0.1, layer_lr_decay=0.5, n_layers=2)
    by_lr = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            by_lr[names[id(p)]] = g["lr"]
    layer0 = {lr for n, lr in by_lr.items() if ".layers.0." in n}
    layer1 = {lr for n, lr in by_lr.items() if ".layers.1." in n}
    assert layer0 == {0.5} and layer1 == {1.0}


def test_bf16_keeps_trainable_weights_in_fp32(tiny, tmp_path):
    model, tok = tiny
    settings = LoopSettings(learning_rate=1e-2, epochs=1, batch_size=4, total_steps=2,
                            eval_every=2, precision="bf16", packing=True)
    data = encoded(tok, 8)
    result = train(model, data, data[:2], settings=settings, pad_id=tok.pad_token_id,
                   checkpoint_dir=tmp_path / "ck")
    assert result.precision == "bf16"
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}


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


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, tmp_path):
    def run(checkpointing):
        torch.manual_seed(0)
        model, tok = load(tiny_model_dir)
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
        losses = []

        class Record:
            def on_step(self, state, metrics):
                losses.append(metrics["train_loss"])

        settings = LoopSettings(learning_rate=1e-2, epochs=1, batch_size=4, total_steps=3,
                                precision="fp32", gradient_checkpointing=checkpointing)
        train(model, encoded(tok, 12), [], settings=settings, pad_id=tok.pad_token_id,
              checkpoint_dir=tmp_path / str(checkpointing), callbacks=[Record()])
        on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert bool(on) == checkpointing  # really recomputing, not just configured
        return losses

    assert run(True) == pytest.approx(run(False), rel=1e-5)


def test_full_fine_tuning_trains_every_weight(tiny_model_dir, tmp_path):
    from tests.conftest import review_rows as rows
    from tunesmith.config import parse_config
    from tunesmith.steps import prepare_model_for_training

    cfg = parse_config({"data": {"train_file": "x.jsonl"}, "train": {"method": "full"}})
    model, tok = load(tiny_model_dir)
    model = prepare_model_for_training(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    settings = LoopSettings(learning_rate=1e-3, epochs=1, batch_size=4, total_steps=2,
                            precision="auto")
    data = [encode_chat(tok, r["messages"]) for r in rows(8)]
    result = train(model, data, [], settings=settings, pad_id=tok.pad_token_id,
                   checkpoint_dir=tmp_path / "ck")
    assert result.precision == "bf16" or result.precision == "fp32"
    # trainable weights are never cast down: all of them stay fp32 and all of them moved
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_no_weight_decay_on_norms_and_biases(tiny):
    model, _ = tiny
    for p in model.parameters():
        p.requires_grad_(True)
    opt = build_optimizer(model, lr=1.0, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            plain = p.ndim < 2 or "norm" in names[id(p)]
            assert group["weight_decay"] == (0.0 if plain else 0.1), names[id(p)]


def test_length_grouped_batches_pad_little():
    from tunesmith.training.batches import epoch_batches

    data = [Encoded([1] * n, [1] * n) for n in range(1, 401)]
    grouped = list(epoch_batches(data, batch_size=8, seed=0, epoch=0, group_by_length=True))
    shuffled = list(epoch_batches(data, batch_size=8, seed=0, epoch=0))

    def padding(batches):
        return sum(max(map(len, b)) * len(b) - sum(map(len, b)) for b in batches)

    assert sorted(len(e) for b in grouped for e in b) == list(range(1, 401))  # all, once
    assert padding(grouped) < padding(shuffled) / 5
