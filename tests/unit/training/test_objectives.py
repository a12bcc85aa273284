"""The objective seam: a pairwise objective with a frozen reference trains through it."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import review_rows
from tunesmith.data.encode import IGNORE_INDEX, encode_chat
from tunesmith.data.packing import collate_packed
from tunesmith.evaluation.overfitting import training_metrics
from tunesmith.evaluation.report import write_reports
from tunesmith.models.load import add_lora, load
from tunesmith.training.batches import collate
from tunesmith.training.callbacks import MetricsLog, read_metrics
from tunesmith.training.loop import LoopSettings, fit
from tunesmith.training.objectives import Frozen, LMObjective, Objective, ObjectiveOutput
from tunesmith.training.policies import standard_policies
from tunesmith.training.setup import setup


class PairMargin(nn.Module):
    """A toy preference objective: the policy's log-probability margin of the chosen over the
    rejected answer, measured against a frozen copy of the starting model, pushed above zero.
    Normalised per pair, with its own named metrics."""

    def __init__(self, model, reference, *, pad_id):
        super().__init__()
        self.model, self.reference, self.pad_id = model, Frozen(reference), pad_id

    def collate(self, pairs):
        return [collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id=self.pad_id)]

    def normaliser(self, pairs):
        return float(len(pairs))

    def size(self, pair):
        return len(pair[0]) + len(pair[1])

    @staticmethod
    def _log_probs(model, input_ids, attention_mask, labels):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        targets = labels[:, 1:]
        picked = torch.log_softmax(logits.float(), -1).gather(
            -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (targets != IGNORE_INDEX)).sum(-1)

    def forward(self, input_ids, attention_mask, labels):
        policy = self._log_probs(self.model, input_ids, attention_mask, labels)
        ref = self._log_probs(self.reference, input_ids, attention_mask, labels)
        n = input_ids.shape[0] // 2
        margin = (policy[:n] - ref[:n]) - (policy[n:] - ref[n:])
        loss = -F.logsigmoid(margin)
        return ObjectiveOutput(loss.sum(), {"reward_margin": float(margin.detach().sum()),
                                            "pair_accuracy": float((margin > 0).sum())})


def pairs(tok, rows):
    out = []
    for r in rows:
        flipped = {"good": "bad", "bad": "good"}[r["messages"][2]["content"]]
        rejected = [*r["messages"][:2], {"role": "assistant", "content": flipped}]
        out.append((encode_chat(tok, r["messages"]), encode_chat(tok, rejected)))
    return out


def test_a_pairwise_objective_with_a_frozen_reference_trains_through_the_seam(
        tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    base, tok = load(tiny_model_dir)
    reference, _ = load(tiny_model_dir)
    model = add_lora(base, r=4, alpha=8, dropout=0.1, target_modules="all-linear")
    ref_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    trained_before = {n: p.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad}
    data = pairs(tok, review_rows(40))
    train_pairs, valid_pairs = data[:32], data[32:]
    settings = LoopSettings(learning_rate=5e-3, epochs=2, batch_size=8, total_steps=8,
                            eval_every=4, precision="fp32", packing=False)

    parts = setup(model, lambda m, precision: PairMargin(m, reference, pad_id=tok.pad_token_id),
                  train_pairs, settings=settings)
    assert isinstance(parts.objective, Objective)
    in_optimizer = {id(p) for g in parts.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert not in_optimizer & {id(p) for p in reference.parameters()}

    log = tmp_path / "metrics.jsonl"
    policies = standard_policies(valid_pairs, checkpoint_dir=tmp_path / "ck", eval_every=4,
                                 eval_batch_size=8, early_stopping_patience=None,
                                 keep_checkpoints=2, restore_best=False)
    result = fit(parts, settings=settings, callbacks=[MetricsLog(log), *policies])
    assert result.state.step == 8

    # the frozen copy: unchanged and never switched to train mode (its dropout stays off)
    assert not any(m.training for m in reference.modules())
    for n, p in reference.named_parameters():
        assert torch.equal(p, ref_before[n]), n
    # only the trainable weights moved
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, trained_before[n]), n
        else:
            assert torch.equal(p, frozen_before[n]), n

    records = read_metrics(log)
    train_rows = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert {"train_loss", "train_reward_margin", "train_pair_accuracy"} <= set(train_rows[0])
    assert {"valid_loss", "valid_reward_margin", "valid_pair_accuracy"} <= set(evals[0])
    assert all(0 <= r["train_pair_accuracy"] <= 1 for r in train_rows)
    # at step 0 policy == reference: zero margin, loss log(2) per pair
    assert evals[0]["valid_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert evals[0]["valid_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert evals[-1]["valid_reward_margin"] > 0 and evals[-1]["valid_loss"] < evals[0]["valid_loss"]

    # ... and in the report, with no code there that knows these names
    summary = training_metrics(records)
    assert summary["valid_reward_margin"]["last"] == pytest.approx(evals[-1]["valid_reward_margin"])
    results = {"name": "pairs", "model": "tiny", "task": "generation", "labels": None,
               "data_counts": {"train": 32}, "hyperparameters": {"beta": 1.0},
               "training": {"best_step": result.state.best_step},
               "base": None, "tuned": {"n": 8, "exact_match": 0.0},
               "training_metrics": summary}
    write_reports(tmp_path, results)
    report = (tmp_path / "report.md").read_text()
    assert "train_reward_margin" in report and "valid_pair_accuracy" in report
    json.dumps(summary)  # plain numbers, as metrics.json needs


def test_packed_rows_go_in_passes_of_at_most_pass_tokens(tiny_loaded):
    from tunesmith.data.encode import Encoded
    from tunesmith.data.packing import pack_rows
    from tunesmith.training.objectives import PASS_TOKENS, SHAPE_MULTIPLE, row_groups

    def example(n):
        return Encoded(input_ids=list(range(1, n + 1)), labels=[-100] * (n - 2) + [5, 6])

    examples = [example(n) for n in (250, 240, 200, 120, 100, 60, 60, 40, 30, 700, 20)]
    rows = pack_rows(examples, 256)
    groups = row_groups(rows, PASS_TOKENS)
    assert [r for g in groups for r in g] == rows  # every row, in order
    for g in groups:
        width = -(-max(len(r) for r in g) // SHAPE_MULTIPLE) * SHAPE_MULTIPLE
        assert len(g) * width <= PASS_TOKENS or len(g) == 1
    assert len(groups) < len(rows)  # short rows share a pass
    assert [len(g) for g in row_groups(rows, 1)] == [1] * len(rows)
    # the passes an objective makes are these groups, and the loss of all of them together
    # is the loss of one row at a time
    model, tok = tiny_loaded
    objective = LMObjective(model, pad_id=tok.pad_token_id, packing=True, pack_capacity=256)
    passes = objective.collate(examples)
    assert [p["input_ids"].shape[0] for p in passes] == [len(g) for g in groups]
    with torch.no_grad():
        whole = sum(float(objective(**p).loss_sum) for p in passes)
        one_by_one = sum(float(objective(**collate_packed([r], pad_id=tok.pad_token_id))
                               .loss_sum) for r in rows)
    assert whole == pytest.approx(one_by_one, rel=1e-5)


def test_a_model_that_attends_by_sequence_gets_one_row_a_pass(tiny_model_dir):
    from tunesmith.data.encode import Encoded
    from tunesmith.data.packing import pack_rows
    from tunesmith.models.packed_attention import use_packed_attention
    from tunesmith.training.objectives import PASS_TOKENS, SHAPE_MULTIPLE

    def example(n, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, 1000, (n,), generator=g).tolist()
        return Encoded(input_ids=ids, labels=[-100] * (n // 2) + ids[n // 2:])

    lengths = (250, 240, 200, 120, 100, 60, 60, 40, 30, 1100, 20, 90, 70)
    examples = [example(n, i) for i, n in enumerate(lengths)]
    model, tok = load(tiny_model_dir)
    model.eval()
    objective = LMObjective(model, pad_id=tok.pad_token_id, packing=True, pack_capacity=256)
    rows = objective.collate(examples)  # SDPA: rows of at most 256 tokens, several a pass
    assert max(p["input_ids"].shape[0] for p in rows) > 1
    assert use_packed_attention(model)
    passes = objective.collate(examples)
    assert all(p["input_ids"].shape[0] == 1 for p in passes)
    assert len(passes) < sum(p["input_ids"].shape[0] for p in rows)
    # every token once, the sequences end to end, padding (never a target) only at the end
    real = [len(r) for r in pack_rows(examples, PASS_TOKENS)]
    assert sum(real) == sum(lengths)
    for p, n in zip(passes, real, strict=True):
        width = p["input_ids"].shape[1]
        assert width == -(-n // SHAPE_MULTIPLE) * SHAPE_MULTIPLE
        assert n <= PASS_TOKENS or n == 1100  # a longer sequence alone
        assert (p["labels"][0, n:] == IGNORE_INDEX).all()
        assert (p["input_ids"][0, n:] == tok.pad_token_id).all()
    targets = sum(int((p["labels"] != IGNORE_INDEX).sum()) for p in passes)
    assert targets == sum(int((p["labels"] != IGNORE_INDEX).sum()) for p in rows)
    # the same loss as the rows of pack_capacity, and as each example alone
    with torch.no_grad():
        one_row = sum(float(objective(**p).loss_sum) for p in passes)
        by_rows = sum(float(objective(**p).loss_sum) for p in rows)
        alone = sum(float(objective(**collate_packed(pack_rows([e], 2048),
                                                     pad_id=tok.pad_token_id)).loss_sum)
                    for e in examples)
    assert one_row == pytest.approx(by_rows, rel=1e-5)
    assert one_row == pytest.approx(alone, rel=1e-5)
