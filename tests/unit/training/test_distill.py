"""The distillation objective equals the loss written out with full-vocabulary logits, in
chunks and packed too; weight 0 is the LM loss; the teacher is never trained."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from tunesmith.data.encode import IGNORE_INDEX, Encoded
from tunesmith.errors import ConfigError
from tunesmith.models.student import make_student
from tunesmith.training import distill
from tunesmith.training.batches import collate
from tunesmith.training.distill import (
    ClassifierDistillObjective,
    DistillObjective,
    held_out_kl,
)
from tunesmith.training.objectives import LMObjective, Objective

PAD = 0


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                       **extra)


@pytest.fixture
def pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A 4-layer teacher and a 2-layer student made of it, nudged so they differ more."""
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_config()).eval()
    student = make_student(teacher, 2)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def lm_rows() -> list[Encoded]:
    """Prompts (no targets) followed by answers (targets), of different lengths."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for prompt, answer in [(5, 3), (8, 6), (3, 2), (6, 9)]:
        ids = torch.randint(3, 96, (prompt + answer,), generator=g).tolist()
        rows.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


def class_rows() -> list[Encoded]:
    """Prompts whose class index sits on their last token, as encode_class_example puts it."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for n, label in [(5, 0), (9, 1), (4, 1), (7, 0)]:
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        rows.append(Encoded(ids, [IGNORE_INDEX] * (n - 1) + [label]))
    return rows


def by_hand(teacher, student, batch, temperature):
    """KL and CE summed over target tokens, from full-vocabulary logits of whole rows."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1]
    s_logits = student(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    where = targets != IGNORE_INDEX
    t, s, y = t_logits[where], s_logits[where], targets[where]
    p_t = torch.softmax(t / temperature, -1)
    kl = (p_t * (torch.log_softmax(t / temperature, -1)
                 - torch.log_softmax(s / temperature, -1))).sum()
    return kl, F.cross_entropy(s, y, reduction="sum"), (s.argmax(-1) == y).sum()


@pytest.mark.parametrize("chunk", [1024, 4])  # one chunk; several, checkpointed
def test_the_loss_and_its_gradient_equal_a_hand_computation(pair, monkeypatch, chunk):
    monkeypatch.setattr(distill, "HEAD_CHUNK", chunk)
    teacher, student = pair
    rows = lm_rows()
    objective = DistillObjective(student, teacher=teacher, pad_id=PAD, temperature=2.0,
                                 weight=0.3)
    assert isinstance(objective, Objective)
    assert objective.normaliser(rows) == sum(e.n_targets for e in rows) == 20
    [batch] = objective.collate(rows)
    out = objective(**batch)
    out.loss_sum.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    kl, ce, correct = by_hand(teacher, student, batch, 2.0)
    expected = 0.3 * 2.0 ** 2 * kl + 0.7 * ce
    expected.backward()
    assert kl > 0.01
    torch.testing.assert_close(out.loss_sum, expected)
    assert out.metrics["kl"] == pytest.approx(float(kl.detach()), rel=1e-5)
    assert out.metrics["ce"] == pytest.approx(float(ce.detach()), rel=1e-5)
    assert out.metrics["token_accuracy"] == float(correct)
    for name, p in student.named_parameters():
        # chunked and whole-row sums round differently in fp32: absolute error up to a few
        # float32 epsilons of the tensor's largest gradient (measured: 1.2e-6 on a q_proj
        # gradient whose largest entry is 5.5), which a fixed 1e-6 fails on its small entries
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6 * max(1.0, scale),
                                   msg=name)


def test_weight_zero_is_exactly_the_lm_loss(pair):
    teacher, student = pair
    rows = lm_rows()
    batch = collate(rows, pad_id=PAD)
    out = DistillObjective(student, teacher=teacher, pad_id=PAD, weight=0.0)(**batch)
    lm = LMObjective(student, pad_id=PAD)(**batch)
    assert torch.equal(out.loss_sum, lm.loss_sum)
    assert out.metrics["token_accuracy"] == lm.metrics["token_accuracy"]
    assert out.metrics["ce"] == float(lm.loss_sum.detach())


def test_packed_rows_give_the_loss_of_padded_ones(pair):
    teacher, student = pair
    rows = lm_rows()
    padded = DistillObjective(student, teacher=teacher, pad_id=PAD)
    packed = DistillObjective(student, teacher=teacher, pad_id=PAD, packing=True,
                              pack_capacity=64)
    passes = packed.collate(rows)
    assert "position_ids" in passes[0]
    with torch.no_grad():
        total = sum(packed(**p).loss_sum for p in passes)
        torch.testing.assert_close(total, padded(**padded.collate(rows)[0]).loss_sum,
                                   rtol=1e-4, atol=1e-4)


def test_the_teacher_is_frozen_unseen_and_untrained(pair):
    teacher, student = pair
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = DistillObjective(student, teacher=teacher, pad_id=PAD, weight=1.0)
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert {id(p) for p in objective.parameters()} == {id(p) for p in student.parameters()}
    assert not teacher_ids & {id(p) for p in objective.parameters()}
    assert all(k.startswith("model.") for k in objective.state_dict())
    assert len(objective.state_dict()) == len(student.state_dict())
    objective.train()
    assert not teacher.training and student.training
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    for _ in range(2):
        objective(**objective.collate(lm_rows())[0]).loss_sum.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_the_student_may_not_be_its_own_teacher(pair):
    with pytest.raises(ConfigError, match="a copy"):
        DistillObjective(pair[1], teacher=pair[1], pad_id=PAD)


@pytest.mark.parametrize(("temperature", "weight", "wrong"), [
    (0.0, 0.5, "temperature 0.0"), (-1.0, 0.5, "temperature -1.0"),
    (2.0, 1.5, "weight 1.5"), (2.0, -0.1, "weight -0.1")])
def test_bad_settings_are_refused(pair, temperature, weight, wrong):
    with pytest.raises(ConfigError) as err:
        DistillObjective(pair[1], teacher=pair[0], pad_id=PAD, temperature=temperature,
                         weight=weight)
    assert wrong in str(err.value)


def test_the_classifier_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    teacher = LlamaForSequenceClassification(tiny_config(num_labels=3)).eval()
    student = make_student(teacher, 2)
    rows = class_rows()
    objective = ClassifierDistillObjective(student, teacher=teacher, pad_id=PAD,
                                           temperature=3.0, weight=0.6)
    assert objective.normaliser(rows) == 4.0
    [batch] = objective.collate(rows)
    out = objective(**batch)
    # the models' own pooling: each row's last real token
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t = teacher(**inputs).logits
        s = student(**inputs).logits
    y = torch.tensor([0, 1, 1, 0])
    kl = (torch.softmax(t / 3, -1) * (torch.log_softmax(t / 3, -1)
                                      - torch.log_softmax(s / 3, -1))).sum()
    ce = F.cross_entropy(s, y, reduction="sum")
    assert kl > 1e-4
    torch.testing.assert_close(out.loss_sum.detach(), 0.6 * 9 * kl + 0.4 * ce)
    assert out.metrics["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert out.metrics["accuracy"] == float((s.argmax(-1) == y).sum())


def test_held_out_kl_is_the_mean_per_target_token(pair):
    teacher, student = pair
    rows = lm_rows()
    kl, _, _ = by_hand(teacher, student, collate(rows, pad_id=PAD), 1.0)
    student.train()
    got = held_out_kl(teacher, student, rows, pad_id=PAD, batch_size=3)
    assert student.training  # left in the mode it was in
    assert got == pytest.approx(float(kl.detach()) / 20, rel=1e-5)
    assert held_out_kl(teacher, make_student(teacher, 3), rows, pad_id=PAD) > 0
    assert held_out_kl(student, copy.deepcopy(student), rows, pad_id=PAD) == pytest.approx(
        0.0, abs=1e-6)  # a model and its copy agree
