"""Preference objectives: losses against hand-computed values, log-probs against full logits,
and LoRA-DPO through the loop with the reference taken from the adapters switched off."""

import math

import pytest
import torch

from tests.helpers import review_rows
from tunesmith.data.encode import IGNORE_INDEX, encode_pair
from tunesmith.models.load import add_lora, load
from tunesmith.training.callbacks import MetricsLog, read_metrics
from tunesmith.training.loop import LoopSettings, fit
from tunesmith.training.loss import sequence_log_probs
from tunesmith.training.policies import standard_policies
from tunesmith.training.preference import (
    PreferenceObjective,
    model_mask,
    pair_inputs,
    pair_losses,
    pair_passes,
    pair_size,
    reference_log_probs,
    shared_prefix,
    with_reference,
)
from tunesmith.training.setup import setup


def _sig(x):
    return 1 / (1 + math.exp(-x))


# policy and reference summed log-probs of two pairs; answers of 2 and 4 tokens
TOY = {"chosen": torch.tensor([-2.0, -6.0]), "rejected": torch.tensor([-8.0, -4.0]),
       "chosen_tokens": torch.tensor([2.0, 4.0]), "rejected_tokens": torch.tensor([4.0, 2.0]),
       "ref_chosen": torch.tensor([-3.0, -5.0]), "ref_rejected": torch.tensor([-7.0, -5.0])}


def test_dpo_loss_and_rewards_by_hand():
    out = pair_losses("dpo", **TOY, beta=0.1)
    # pair 0: chosen ratio +1, rejected ratio -1 -> logit 2; pair 1: -1 and +1 -> -2
    assert out.losses.tolist() == pytest.approx([-math.log(_sig(0.2)), -math.log(_sig(-0.2))])
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])
    smooth = pair_losses("dpo", **TOY, beta=0.1, label_smoothing=0.2)
    assert smooth.losses[0].item() == pytest.approx(
        -0.8 * math.log(_sig(0.2)) - 0.2 * math.log(_sig(-0.2)))


def test_ipo_simpo_orpo_by_hand():
    ipo = pair_losses("ipo", **TOY, beta=0.5)
    # averaged: pair 0 chosen (-2+3)/2 = 0.5, rejected (-8+7)/4 = -0.25 -> gap 0.75; target 1
    assert ipo.losses[0].item() == pytest.approx((0.75 - 1.0) ** 2)
    simpo = pair_losses("simpo", **TOY, beta=2.0, simpo_gamma=0.5)
    # mean log-probs pair 0: -1 vs -2 -> 2 * 1 - 1 = 1
    assert simpo.losses[0].item() == pytest.approx(-math.log(_sig(1.0)))
    assert simpo.chosen_rewards[0].item() == pytest.approx(-2.0)
    orpo = pair_losses("orpo", **TOY, beta=0.1)
    a, b = -1.0, -2.0
    log_odds = (a - b) - (math.log1p(-math.exp(a)) - math.log1p(-math.exp(b)))
    assert orpo.losses[0].item() == pytest.approx(-0.1 * math.log(_sig(log_odds)))
    with pytest.raises(ValueError, match="reference"):
        pair_losses("dpo", **{k: v for k, v in TOY.items() if not k.startswith("ref")}, beta=0.1)


def _pairs(tok, n):
    out = []
    for r in review_rows(n):
        prompt, answer = r["messages"][:2], r["messages"][2]["content"]
        wrong = {"good": "bad", "bad": "good"}[answer]
        rejected = wrong if len(out) % 2 else f"I think this review is {wrong}, honestly."
        out.append(encode_pair(tok, prompt, [{"role": "assistant", "content": answer}],
                               [{"role": "assistant", "content": rejected}]))
    return out


@torch.no_grad()
def _full_logits_log_probs(model, seqs):
    """Reference implementation: full-vocabulary log-softmax of each sequence alone."""
    out = []
    for s in seqs:
        ids = torch.tensor([s.input_ids])
        logits = model(input_ids=ids).logits[0, :-1].float()
        targets = torch.tensor(s.labels[1:])
        lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[:, None])[:, 0]
        out.append(float((lp * (targets != IGNORE_INDEX)).sum()))
    return out


def test_packed_and_padded_log_probs_equal_full_logits(tiny_model_dir):
    model, tok = load(tiny_model_dir)
    pairs = _pairs(tok, 6)
    assert all(p.chosen.n_targets >= 1 and p.rejected.n_targets >= 1 for p in pairs)
    expected = _full_logits_log_probs(model, [p.chosen for p in pairs]
                                      + [p.rejected for p in pairs])
    ref = reference_log_probs(model, pairs, pad_id=tok.pad_token_id, batch_size=4)
    assert [a for a, _ in ref] + [b for _, b in ref] == pytest.approx(expected, abs=1e-4)
    for packing, share in [(p, s) for p in (True, False) for s in (True, False)]:
        objective = PreferenceObjective(model, loss="dpo", beta=0.1, pad_id=tok.pad_token_id,
                                        packing=packing, pack_capacity=256)
        objective.share_prompt = share
        rows = pair_inputs(pairs, pad_id=tok.pad_token_id, packing=packing, pack_capacity=256,
                           share_prompt=share)
        if packing:  # several sequences share a row
            assert rows["input_ids"].shape[0] < (len(pairs) if share else 2 * len(pairs))
        if share:  # each prompt goes through the model once: about half the tokens
            whole = sum(len(p.chosen) + len(p.rejected) for p in pairs)
            assert int((rows["labels"] != IGNORE_INDEX).sum()) == sum(
                p.chosen.n_targets + p.rejected.n_targets for p in pairs)
            assert sum(pair_size(p) for p in pairs) < 0.7 * whole
            with torch.no_grad():
                logps, _ = sequence_log_probs(
                    model, rows["input_ids"], rows["labels"], rows["sequence"],
                    2 * len(pairs), attention_mask=rows["attention_mask"],
                    position_ids=rows["position_ids"])
            assert logps.tolist() == pytest.approx(expected, abs=1e-4)
        with torch.no_grad():
            outs = [objective(**inputs) for inputs in objective.collate(
                with_reference(pairs, ref))]
        # policy == reference: every reward 0, loss log 2 per pair
        loss = sum(o.loss_sum.item() for o in outs)
        assert loss == pytest.approx(len(pairs) * math.log(2), abs=1e-3)
        assert abs(sum(o.metrics["reward_margin"] for o in outs)) < 1e-4


def test_a_step_runs_in_passes_no_bigger_than_sft_and_the_gradient_is_the_same(
        tiny_model_dir, monkeypatch):
    # an SFT pass holds PASS_TOKENS tokens of packed rows (1024), or one row where that is
    # more: here one row of pack_capacity = 160 tokens, so these short pairs need several
    import tunesmith.training.preference as preference

    monkeypatch.setattr(preference, "PASS_TOKENS", 100)
    torch.manual_seed(0)
    base, tok = load(tiny_model_dir)
    model = add_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, w in model.named_parameters():
        if "lora_B" in name:  # a policy away from the reference
            torch.nn.init.normal_(w, std=0.05)
    pairs = _pairs(tok, 8)
    pairs = with_reference(pairs, reference_log_probs(model, pairs, pad_id=tok.pad_token_id))
    def tokens(group):
        return sum(pair_size(p) for p in group)

    # packed: a pass holds what one SFT pass holds, one row of pack_capacity tokens
    groups = pair_passes(pairs, 160)
    assert len(groups) > 1 and sorted(id(p) for g in groups for p in g) == sorted(map(id, pairs))
    assert max(len(g) for g in groups) >= 2  # several short pairs share a row
    assert all(tokens(g) <= 160 or len(g) == 1 for g in groups)
    objective = PreferenceObjective(model, loss="dpo", beta=0.1, pad_id=tok.pad_token_id,
                                    packing=True, pack_capacity=160)
    passes = objective.collate(pairs)
    assert len(passes) == len(groups)
    for inputs, group in zip(passes, groups, strict=True):  # a pair is one block: one row
        assert inputs["input_ids"].shape[0] == 1
        assert inputs["input_ids"].shape[1] <= max(160, tokens(group) + 63)
    # padded: at most the chosen conversations' tokens, as SFT would pad in one pass
    sft_tokens = sum(len(p.chosen) for p in pairs)
    assert all(tokens(g) <= sft_tokens for g in pair_passes(pairs))
    assert all(sum(len(p.chosen) + len(p.rejected) for p in g) <= sft_tokens
               for g in pair_passes(pairs, share_prompt=False))

    def gradient(inputs_list):
        model.zero_grad()
        for inputs in inputs_list:
            (objective(**inputs).loss_sum / len(pairs)).backward()
        return {n: w.grad.clone() for n, w in model.named_parameters() if w.requires_grad}

    split = gradient(passes)
    whole = gradient([pair_inputs(pairs, pad_id=tok.pad_token_id, packing=True,
                                  pack_capacity=160)])
    # the prompt shared by both answers gives the gradient of the two whole conversations
    apart = gradient([pair_inputs(pairs, pad_id=tok.pad_token_id, packing=True,
                                  pack_capacity=160, share_prompt=False)])
    assert split.keys() == whole.keys() == apart.keys()
    for name in split:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(apart[name], whole[name], atol=1e-6, rtol=1e-4)


def test_lora_dpo_trains_adapters_only_and_the_reference_is_the_base(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    base, tok = load(tiny_model_dir)
    model = add_lora(base, r=4, alpha=8, dropout=0.1, target_modules="all-linear")
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    data = _pairs(tok, 40)
    ref = reference_log_probs(model, data, pad_id=tok.pad_token_id)
    data = with_reference(data, ref)
    train_pairs, valid_pairs = data[:32], data[32:]
    settings = LoopSettings(learning_rate=5e-3, epochs=2, batch_size=8, total_steps=8,
                            eval_every=4, precision="fp32")
    parts = setup(model, lambda m, precision: PreferenceObjective(
        m, loss="dpo", beta=0.5, pad_id=tok.pad_token_id, sft_weight=0.1), train_pairs,
        settings=settings)
    log = tmp_path / "metrics.jsonl"
    policies = standard_policies(valid_pairs, checkpoint_dir=tmp_path / "ck", eval_every=4,
                                 eval_batch_size=8, early_stopping_patience=None,
                                 keep_checkpoints=2, restore_best=False)
    fit(parts, settings=settings, callbacks=[MetricsLog(log), *policies])

    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    # the adapters moved, yet with them off the model still gives the stored reference ...
    def flat(values):
        return [v for pair in values for v in pair]

    after = reference_log_probs(model, data, pad_id=tok.pad_token_id)
    assert flat(after) == pytest.approx(flat(ref), abs=1e-4)
    # ... which is the base model's own output
    fresh, _ = load(tiny_model_dir)
    assert flat(reference_log_probs(fresh, data, pad_id=tok.pad_token_id)) == pytest.approx(
        flat(ref), abs=1e-4)
    records = read_metrics(log)
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r for r in records if r["kind"] == "train"]
    for key in ("reward_chosen", "reward_rejected", "reward_margin", "pair_accuracy"):
        assert f"valid_{key}" in evals[0] and f"train_{key}" in steps[0]
    assert evals[0]["valid_reward_margin"] == pytest.approx(0.0, abs=1e-3)
    assert evals[-1]["valid_reward_margin"] > 0
    assert evals[-1]["valid_pair_accuracy"] > 0.5


def test_pairs_collate_keeps_each_answer_with_its_sequence(tokenizer):
    pairs = _pairs(tokenizer, 4)
    inputs = pair_inputs(pairs, pad_id=0, packing=True, pack_capacity=10_000)
    owner, labels = inputs["sequence"], inputs["labels"]
    for i, s in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
        mine = labels[owner == i]
        assert sorted(t for t in mine.tolist() if t != IGNORE_INDEX) == sorted(
            t for t in s.labels[1:] if t != IGNORE_INDEX)
    assert "reference" not in inputs


def test_a_shared_prompt_stops_before_the_first_target_and_answers_never_see_each_other(
        tokenizer):
    pairs = _pairs(tokenizer, 2)
    p = pairs[0]
    s = shared_prefix(p)
    first = min(next(i for i, t in enumerate(x.labels) if t != IGNORE_INDEX)
                for x in (p.chosen, p.rejected))
    assert 0 < s < first and p.chosen.input_ids[:s + 1] == p.rejected.input_ids[:s + 1]
    rows = pair_inputs([p], pad_id=0, packing=False, pack_capacity=0)
    mask, pos = rows["attention_mask"][0, 0], rows["position_ids"][0]
    n_c, n_r = len(p.chosen) - s, len(p.rejected) - s
    assert mask.shape == (s + n_c + n_r,) * 2
    chosen, rejected = slice(s, s + n_c), slice(s + n_c, s + n_c + n_r)
    assert mask[rejected, :s].all() and mask[chosen, :s].all()  # both see the prompt
    assert not mask[rejected, chosen].any()  # ... and not each other
    assert not mask[:s, s:].any()  # the prompt sees neither answer
    assert pos[chosen].tolist() == list(range(s, len(p.chosen)))
    assert pos[rejected].tolist() == list(range(s, len(p.rejected)))
    # eager attention takes it as an additive bias
    model = torch.nn.Linear(1, 1)
    model.config = type("C", (), {"_attn_implementation": "eager"})()
    bias = model_mask(model, rows["attention_mask"])
    assert bias.dtype == torch.float32 and (bias[0, 0][rejected, chosen] < -1e30).all()
    assert (bias[0, 0][rejected, :s] == 0).all()
