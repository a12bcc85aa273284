"""Knowledge distillation: a student learns a frozen teacher's output distributions.

The loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"), summed over
target tokens (a causal LM) or examples (a classification head)::

    weight * T^2 * KL(teacher_T || student_T) + (1 - weight) * cross-entropy(student, labels)

where ``p_T = softmax(logits / T)``; the ``T^2`` keeps the soft term's gradients on the scale
of the hard term's as ``T`` grows. The LM variant computes both models' logits only at
positions whose next token is a target, through each LM head in chunks of ``HEAD_CHUNK`` (as
``TargetLoss`` does), so no full-vocabulary logits of whole sequences are ever held; with
more targets than one chunk, each chunk's logits (the teacher's too) are recomputed in
backward instead of kept. The teacher is held through ``Frozen``: in eval mode, without
gradients, never in ``parameters()``.

Metrics (summed, like the loss): ``kl`` (at temperature ``T``, without ``T^2``), ``ce``, and
``token_accuracy`` (LM) or ``accuracy`` (classification head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.data.encode import IGNORE_INDEX, Encoded
from tunesmith.errors import ConfigError
from tunesmith.models.classifier import class_logits_at
from tunesmith.models.heads import output_head
from tunesmith.models.load import unwrap
from tunesmith.models.packed_attention import attends_by_sequence
from tunesmith.training.loss import HEAD_CHUNK, target_hidden
from tunesmith.training.objectives import Frozen, ObjectiveOutput, encoded_passes
from tunesmith.training.precision import autocast


def check_distillation(temperature: float, weight: float) -> None:
    """Every problem with the distillation settings at once, as a ``ConfigError``."""
    problems = []
    if not temperature > 0:
        problems.append(f"temperature {temperature}: give a positive number such as 2.0")
    if not 0 <= weight <= 1:
        problems.append(f"weight {weight}: give the share of the teacher's term, between 0 "
                        "(labels only) and 1 (teacher only), such as 0.5")
    if problems:
        raise ConfigError("cannot distil with these settings", problems)


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
           temperature: float) -> torch.Tensor:
    """Summed KL(teacher || student) of the rows' distributions at ``temperature``."""
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def _head_chunk(head: nn.Module, hidden: torch.Tensor, teacher_head: nn.Module,
                teacher_hidden: torch.Tensor, targets: torch.Tensor, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    with torch.no_grad():
        teacher = teacher_head(teacher_hidden).float()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return kl_sum(teacher, logits, temperature), ce, correct


class _Distill(nn.Module):
    """What both variants share: the student, the frozen teacher, the settings, batching."""

    def __init__(self, model: nn.Module, *, teacher: nn.Module, pad_id: int,
                 temperature: float = 2.0, weight: float = 0.5, precision: str = "fp32",
                 packing: bool = False, pack_capacity: int = 512) -> None:
        super().__init__()
        check_distillation(temperature, weight)
        if teacher is model:
            raise ConfigError("the teacher is the student itself; give the student a copy "
                              "(tunesmith.models.student.make_student)")
        self.model = model
        self.teacher = Frozen(teacher)
        self.pad_id, self.precision = pad_id, precision
        self.temperature, self.weight = temperature, weight
        self.packing, self.pack_capacity = packing, pack_capacity

    def collate(self, examples: Sequence[Encoded]) -> list[dict[str, torch.Tensor]]:
        # the teacher sees the same rows: one row a pass only where both attend by sequence
        one_row = attends_by_sequence(self.model) and attends_by_sequence(self.teacher.module)
        return encoded_passes(examples, pad_id=self.pad_id, packing=self.packing,
                              pack_capacity=self.pack_capacity, one_row=one_row)

    def size(self, example: Encoded) -> int:
        return len(example)

    def _loss(self, kl: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        return self.weight * self.temperature ** 2 * kl + (1 - self.weight) * ce

    def _teacher(self) -> Any:
        teacher = self.teacher.module
        teacher.eval()  # whatever a caller did, the teacher never runs dropout
        return unwrap(teacher)


class DistillObjective(_Distill):
    """A causal-LM student on its teacher's next-token distributions at the target tokens and
    on the labels; normalised by the batch's target tokens."""

    def normaliser(self, examples: Sequence[Encoded]) -> float:
        return float(sum(e.n_targets for e in examples))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> ObjectiveOutput:
        with autocast(self.precision, input_ids.device, self.model):
            lm, teacher = unwrap(self.model), self._teacher()
            hidden, targets, _ = target_hidden(lm, input_ids, labels, attention_mask,
                                               position_ids)
            with torch.no_grad():
                teacher_hidden, _, _ = target_hidden(teacher, input_ids, labels,
                                                     attention_mask, position_ids)
            head, teacher_head = output_head(lm), output_head(teacher)
            kl = hidden.new_zeros((), dtype=torch.float32)
            ce = hidden.new_zeros((), dtype=torch.float32)
            correct = torch.zeros((), dtype=torch.long)
            for start in range(0, targets.shape[0], HEAD_CHUNK):
                part = slice(start, start + HEAD_CHUNK)
                args = (head, hidden[part], teacher_head, teacher_hidden[part],
                        targets[part], self.temperature)
                if torch.is_grad_enabled() and targets.shape[0] > HEAD_CHUNK:
                    # recompute each chunk's logits in backward instead of keeping them all
                    part_kl, part_ce, ok = checkpoint(_head_chunk, *args, use_reentrant=False)
                else:
                    part_kl, part_ce, ok = _head_chunk(*args)
                kl, ce, correct = kl + part_kl, ce + part_ce, correct + ok.cpu()
        return ObjectiveOutput(self._loss(kl, ce), {
            "kl": float(kl.detach()), "ce": float(ce.detach()), "token_accuracy": float(correct)})


class ClassifierDistillObjective(_Distill):
    """A classification-head student on its teacher's class distribution at each example's
    pooled token and on the class labels; normalised by the batch's examples."""

    def normaliser(self, examples: Sequence[Encoded]) -> float:
        return float(len(examples))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> ObjectiveOutput:
        marks = labels != IGNORE_INDEX
        with autocast(self.precision, input_ids.device, self.model):
            logits = class_logits_at(self.model, input_ids, marks,
                                     attention_mask=attention_mask, position_ids=position_ids)
            with torch.no_grad():
                teacher = class_logits_at(self._teacher(), input_ids, marks,
                                          attention_mask=attention_mask,
                                          position_ids=position_ids)
        targets = labels[marks]
        kl = kl_sum(teacher, logits, self.temperature)
        ce = F.cross_entropy(logits, targets, reduction="sum")
        hits = (logits.argmax(-1) == targets).sum()
        return ObjectiveOutput(self._loss(kl, ce), {
            "kl": float(kl.detach()), "ce": float(ce.detach()), "accuracy": float(hits)})


def distill_objective(model: nn.Module, *, teacher: nn.Module, head: bool, pad_id: int,
                      temperature: float = 2.0, weight: float = 0.5, precision: str = "fp32",
                      packing: bool = False, pack_capacity: int = 512) -> _Distill:
    """The LM variant, or the classification-head one when ``head``."""
    kind = ClassifierDistillObjective if head else DistillObjective
    return kind(model, teacher=teacher, pad_id=pad_id, temperature=temperature, weight=weight,
                precision=precision, packing=packing, pack_capacity=pack_capacity)


def has_class_head(model: nn.Module) -> bool:
    """Whether ``model`` labels text through a sequence-classification head (``score``)."""
    return hasattr(unwrap(model), "score")


@torch.no_grad()
def held_out_kl(teacher: nn.Module, student: nn.Module, rows: Sequence[Encoded], *,
                pad_id: int, temperature: float = 1.0, batch_size: int = 8) -> float:
    """Mean KL(teacher || student) at ``temperature`` per target token of ``rows`` (per
    example for classification-head models), both models in eval mode and on one device.
    NaN when ``rows`` hold no targets."""
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size}: give 1 or more")
    objective = distill_objective(student, teacher=teacher, head=has_class_head(student),
                                  pad_id=pad_id, temperature=temperature, weight=1.0)
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    total, norm = 0.0, 0.0
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            norm += objective.normaliser(batch)
            for inputs in objective.collate(batch):
                out = objective(**{k: v.to(device) for k, v in inputs.items()})
                total += out.metrics["kl"]
    finally:
        student.train(was_training)
    return total / norm if norm else float("nan")
