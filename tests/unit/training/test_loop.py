"""The loop on the tiny model: accumulation, early stopping, precision, checkpointing, stops."""

import copy

import pytest
import torch
from accelerate import Accelerator

from tests.helpers import review_rows
from tunesmith.data.encode import encode_chat
from tunesmith.models.load import add_lora, load
from tunesmith.training.checkpoint import list_checkpoints, load_weights
from tunesmith.training.loop import LoopSettings, train, train_step
from tunesmith.training.objectives import LMObjective
from tunesmith.training.setup import TrainParts


def encoded(tok, n=8, offset=0):
    return [encode_chat(tok, r["messages"]) for r in review_rows(n + offset)[offset:]]


def _one_step(model, tok, batch, micro, packing):
    objective = LMObjective(model, pad_id=tok.pad_token_id, packing=packing, pack_capacity=512)
    opt = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    settings = LoopSettings(learning_rate=1.0, epochs=1, batch_size=len(batch), total_steps=1,
                            eval_every=1, micro_batch_size=micro, packing=packing,
                            max_grad_norm=None)
    parts = TrainParts(model=model, objective=objective, optimizer=opt, scheduler=sched,
                       batches=None, accelerator=Accelerator(), precision="fp32",
                       module=objective)
    metrics = train_step(parts, batch, settings)
    return metrics, {n: p.detach().clone() for n, p in model.named_parameters()
                     if p.requires_grad}


def test_gradient_accumulation_and_packing_equal_one_large_batch(tiny):
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
    assert 0 <= big_m["train_token_accuracy"] <= 1
    assert pack_m["train_token_accuracy"] == pytest.approx(big_m["train_token_accuracy"])
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
    assert result.state.stopped_early and result.stop_reason == "early_stopping"
    assert result.state.step < 300
    assert result.state.best_step is not None and result.state.best_step < result.state.step
    # the model holds the best checkpoint's weights
    best = load_weights(tmp_path / "ck" / f"step-{result.state.best_step}")
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), best[name]), name


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


def test_gradient_checkpointing_gives_the_same_training(tiny_model_dir, tmp_path):
    def run(checkpointing):
        torch.manual_seed(0)
        model, tok = load(tiny_model_dir)
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
        losses = []

        class Record:
            def on_step(self, loop, metrics):
                losses.append(metrics["train_loss"])

        settings = LoopSettings(learning_rate=1e-2, epochs=1, batch_size=4, total_steps=3,
                                eval_every=3, precision="fp32",
                                gradient_checkpointing=checkpointing)
        train(model, encoded(tok, 12), [], settings=settings, pad_id=tok.pad_token_id,
              checkpoint_dir=tmp_path / str(checkpointing), callbacks=[Record()])
        on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert bool(on) == checkpointing  # really recomputing, not just configured
        return losses

    assert run(True) == pytest.approx(run(False), rel=1e-5)


def test_full_fine_tuning_trains_every_weight(tiny_model_dir, tmp_path):
    from tunesmith.config import parse_config
    from tunesmith.flows.steps import prepare_model_for_training

    cfg = parse_config({"data": {"train_file": "x.jsonl"}, "train": {"method": "full"}})
    model, tok = load(tiny_model_dir)
    model = prepare_model_for_training(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    settings = LoopSettings(learning_rate=1e-3, epochs=1, batch_size=4, total_steps=2,
                            eval_every=2, precision="auto")
    train(model, encoded(tok, 8), [], settings=settings, pad_id=tok.pad_token_id,
          checkpoint_dir=tmp_path / "ck")
    # trainable weights are never cast down: all of them stay fp32 and all of them moved
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


class StopAt:
    """A callback that asks the loop to stop after step ``n``."""

    def __init__(self, n):
        self.n, self.seen = n, []

    def on_step(self, loop, metrics):
        self.seen.append(loop.state.step)
        if loop.state.step == self.n:
            loop.control.stop("told to")


def test_a_callback_stops_training_cleanly_with_a_checkpoint(tiny, tmp_path):
    model, tok = tiny
    data = encoded(tok, 16)
    settings = LoopSettings(learning_rate=1e-2, epochs=5, batch_size=4, total_steps=20,
                            eval_every=4, precision="fp32")
    stop = StopAt(3)
    result = train(model, data, data[:4], settings=settings, pad_id=tok.pad_token_id,
                   checkpoint_dir=tmp_path / "ck", callbacks=[stop])
    assert result.state.step == 3 and stop.seen == [1, 2, 3]
    assert result.stop_reason == "told to" and not result.state.stopped_early
    assert (tmp_path / "ck" / "step-3") in list_checkpoints(tmp_path / "ck")


class RisingValidation:
    """Makes every evaluation's validation loss worse than the one before (best: step 0)."""

    def on_train_begin(self, loop):
        real = loop.evaluate

        def rising(data, *, batch_size):
            out = real(data, batch_size=batch_size)
            return {**out, "valid_loss": out["valid_loss"] + 10.0 * loop.state.step}

        loop.evaluate = rising


@pytest.mark.parametrize("restore_best", [False, True])
def test_restore_best_decides_which_weights_the_model_ends_with(tiny, tmp_path, restore_best):
    model, tok = tiny
    data = encoded(tok, 16)
    settings = LoopSettings(learning_rate=2e-2, epochs=1, batch_size=4, total_steps=4,
                            eval_every=2, early_stopping_patience=None, precision="fp32",
                            restore_best=restore_best)
    result = train(model, data, data[:4], settings=settings, pad_id=tok.pad_token_id,
                   checkpoint_dir=tmp_path / "ck", callbacks=[RisingValidation()])
    assert result.state.best_step == 0 and result.state.step == 4
    expected = load_weights(tmp_path / "ck" / ("step-0" if restore_best else "step-4"))
    other = load_weights(tmp_path / "ck" / ("step-4" if restore_best else "step-0"))
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, expected[n]) for n, p in trained.items())
    assert not all(torch.equal(p, other[n]) for n, p in trained.items())
