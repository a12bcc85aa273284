"""Objectives: what the loop minimises, as plug-ins behind one small protocol.

An objective owns everything that depends on what an example is: how examples become model
inputs (``collate``), what the loss of a batch is normalised by (``normaliser``: target tokens
for language modelling, examples for a classifier, pairs for preference losses), and
``forward(**inputs) -> ObjectiveOutput(loss_sum, metrics)`` with *summed* loss and metrics.
The loop divides both by the global batch's normaliser, so gradient accumulation and data
parallelism give the gradient of one big batch for every objective alike, and each named
metric reaches ``metrics.jsonl``, the progress bar, the service's events and the report as
``train_<name>`` / ``valid_<name>`` without special cases. An objective may also define
``summarise(sums)``, which turns summed counts into metrics that are not means (the
classifier's macro F1 from its confusion counts) after the evaluation's sums are complete.

An objective is an ``nn.Module`` whose trainable parameters are the model's, so Accelerate
can wrap it in DDP. Models it only consults (a DPO reference, a distillation teacher) are held
through ``Frozen``: in eval mode, without gradients, and invisible to ``parameters()``,
``train()`` and ``state_dict()``, so the optimiser never sees them and ``objective.train()``
never switches their dropout on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.encode import IGNORE_INDEX, Encoded
from tunesmith.data.packing import PackedRow, collate_packed, pack_rows, padded_width
from tunesmith.models.classifier import class_logits_at
from tunesmith.models.packed_attention import attends_by_sequence
from tunesmith.training.batches import PAD_MULTIPLE, collate
from tunesmith.training.loss import TargetLoss, sequence_log_probs
from tunesmith.training.precision import autocast

# Packed rows are padded to a multiple of this many tokens (see collate_packed): few enough
# shapes for oneDNN, which builds its kernels per shape (0.5-1 ms a product the first time),
# and little padding, whose tokens cost as much as real ones (a product's time grows with its
# rows, whatever their count). 16 against 64: 4% fewer tokens and 1.035x a pass on the SMS
# benchmark (docs/benchmarks.md, "Training speed").
SHAPE_MULTIPLE = 16
# Packed rows go through forward and backward together up to PASS_TOKENS (padded) tokens a
# pass, a longer row alone: the activations held at once stay bounded whatever the batch size,
# and with the loss normalised over the whole batch the gradient is the same as for all rows
# together. Each pass has fixed costs (a hundred-odd small operations per layer, one attention
# call per layer): on 2 CPU cores two 256-token rows a pass trained 17% faster than one
# (docs/benchmarks.md, "Training speed"), where one row a pass had once measured as fast.
# Within the memory estimate, which assumes the whole batch unpacked in one pass. Where a
# model attends sequence by sequence, a pass is one row of up to this many tokens.
PASS_TOKENS = 1024


@dataclass
class ObjectiveOutput:
    """Summed loss of the examples passed in, and summed named metrics (same normaliser)."""

    loss_sum: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def summarise(objective: Any, sums: dict[str, float]) -> dict[str, float]:
    """The final metrics of an evaluation from its (normalised) sums: the objective's own
    ``summarise`` where it has one, the sums themselves otherwise."""
    finish = getattr(objective, "summarise", None)
    return finish(sums) if finish is not None else sums


@runtime_checkable
class Objective(Protocol):
    """What the loop needs from an objective (an ``nn.Module``)."""

    def collate(self, examples: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
        """Model inputs for ``examples``: one dict per forward/backward pass."""
        ...

    def normaliser(self, examples: Sequence[Any]) -> float:
        """What the summed loss and metrics of ``examples`` are divided by."""
        ...

    def size(self, example: Any) -> int:
        """Tokens in one example (throughput, length grouping)."""
        ...

    def __call__(self, **inputs: torch.Tensor) -> ObjectiveOutput: ...


class Frozen:
    """A model an objective consults but never trains (reference, teacher).

    Not an ``nn.Module`` attribute on purpose: the objective's ``parameters()``, ``train()``,
    ``state_dict()`` and DDP never reach it. ``frozen_models`` lets setup move and cast it.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.module.eval()  # whatever a caller did, a frozen model never runs dropout
        return self.module(*args, **kwargs)

    def to(self, device: torch.device) -> Frozen:
        self.module.to(device)
        return self


def frozen_models(objective: Any) -> list[Frozen]:
    return [v for v in vars(objective).values() if isinstance(v, Frozen)]


def encoded_passes(examples: Sequence[Encoded], *, pad_id: int, packing: bool,
                   pack_capacity: int, one_row: bool = False) -> list[dict[str, torch.Tensor]]:
    """Encoded examples as model inputs: one padded batch, or packed rows up to PASS_TOKENS
    tokens a pass (each sequence attending only to itself, positions restarting).

    ``one_row`` (for a model that ``attends_by_sequence``): each pass is a single row, its
    sequences end to end up to PASS_TOKENS (or ``pack_capacity`` where more), padded only at
    its end; rows of ``pack_capacity`` would each pad to the widest (a fifth of the SMS
    benchmark's tokens were padding). Elsewhere attention costs the row's width squared, so
    rows stay at ``pack_capacity``."""
    if not packing:
        return [collate(examples, pad_id=pad_id, multiple=PAD_MULTIPLE)]
    if one_row:
        return [collate_packed([row], pad_id=pad_id, multiple=SHAPE_MULTIPLE)
                for row in pack_rows(examples, max(PASS_TOKENS, pack_capacity))]
    return [collate_packed(group, pad_id=pad_id, multiple=SHAPE_MULTIPLE)
            for group in row_groups(pack_rows(examples, pack_capacity), PASS_TOKENS)]


def row_groups(rows: Sequence[PackedRow], budget: int) -> list[list[PackedRow]]:
    """``rows`` in passes, in order, each of at most ``budget`` tokens once padded to its
    widest row (rounded up to SHAPE_MULTIPLE); a row wider than that on its own."""
    groups: list[list[PackedRow]] = []
    widest = 0
    for row in rows:
        width = padded_width(len(row), SHAPE_MULTIPLE)
        if groups and (len(groups[-1]) + 1) * max(widest, width) <= budget:
            groups[-1].append(row)
            widest = max(widest, width)
        else:
            groups.append([row])
            widest = width
    return groups


class LMObjective(nn.Module):
    """Causal-LM loss on target (assistant) tokens, normalised by the batch's target tokens."""

    def __init__(self, model: nn.Module, *, pad_id: int, precision: str = "fp32",
                 packing: bool = False, pack_capacity: int = 512) -> None:
        super().__init__()
        self.loss = TargetLoss(model, precision=precision)
        self.pad_id, self.packing, self.pack_capacity = pad_id, packing, pack_capacity

    def collate(self, examples: Sequence[Encoded]) -> list[dict[str, torch.Tensor]]:
        return encoded_passes(examples, pad_id=self.pad_id, packing=self.packing,
                              pack_capacity=self.pack_capacity,
                              one_row=attends_by_sequence(self.loss.model))

    def normaliser(self, examples: Sequence[Encoded]) -> float:
        return float(sum(e.n_targets for e in examples))

    def size(self, example: Encoded) -> int:
        return len(example)

    def forward(self, **inputs: torch.Tensor) -> ObjectiveOutput:
        out = self.loss(**inputs)
        return ObjectiveOutput(out.loss_sum, {"token_accuracy": float(out.n_correct)})

    def example_losses(self, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
        """Each row's mean loss over its own target tokens (one example per row): the
        per-example loss differential privacy clips, which no other example changes."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        sums, counts = sequence_log_probs(
            self.loss.model, input_ids, labels, rows[:, None].expand_as(labels),
            input_ids.shape[0], attention_mask=attention_mask, position_ids=position_ids,
            precision=self.loss.precision)
        return -sums / counts.clamp(min=1), {}


class ClassifierObjective(nn.Module):
    """Cross-entropy of a sequence-classification head on each example's last prompt token.

    Examples are encoded by ``encode_class_example``: the class index is the one label that is
    not -100, on the last prompt token, which is also where the head pools; so examples may be
    packed like LM rows, each pooled at its own last token. ``class_weights`` counter label
    imbalance; the loss is normalised by the summed weight of the batch's examples (as
    ``F.cross_entropy(reduction="mean")`` does), so a batch of only majority-class examples
    does not weigh less than one holding a minority example.
    """

    def __init__(self, model: nn.Module, *, pad_id: int, precision: str = "fp32",
                 class_weights: torch.Tensor | None = None, packing: bool = False,
                 pack_capacity: int = 512) -> None:
        super().__init__()
        self.model = model
        self.pad_id, self.precision = pad_id, precision
        self.packing, self.pack_capacity = packing, pack_capacity
        self.register_buffer("class_weights", class_weights, persistent=False)

    @staticmethod
    def target(example: Encoded) -> int:
        return max(example.labels)

    def collate(self, examples: Sequence[Encoded]) -> list[dict[str, torch.Tensor]]:
        return encoded_passes(examples, pad_id=self.pad_id, packing=self.packing,
                              pack_capacity=self.pack_capacity,
                              one_row=attends_by_sequence(self.model))

    def normaliser(self, examples: Sequence[Encoded]) -> float:
        if self.class_weights is None:
            return float(len(examples))
        weights = self.class_weights.cpu()
        return float(sum(float(weights[self.target(e)]) for e in examples))

    def size(self, example: Encoded) -> int:
        return len(example)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> ObjectiveOutput:
        losses, metrics = self.example_losses(input_ids, labels, attention_mask, position_ids)
        return ObjectiveOutput(losses.sum(), metrics)

    def example_losses(self, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict[str, float]]:
        """Each example's (weighted) loss in the order of its pooled token, and the summed
        (weighted) hits; unpacked, that is one loss per row."""
        marks = labels != IGNORE_INDEX
        with autocast(self.precision, input_ids.device, self.model):
            logits = class_logits_at(self.model, input_ids, marks,
                                     attention_mask=attention_mask, position_ids=position_ids)
        targets = labels[marks]
        losses = F.cross_entropy(logits, targets, weight=self.class_weights, reduction="none")
        predicted = logits.argmax(-1)
        hits = (predicted == targets).float()
        if self.class_weights is not None:
            hits = hits * self.class_weights[targets]
        metrics = {"accuracy": float(hits.sum())}
        if not self.training:  # evaluation: the confusion counts that ``summarise`` turns to F1
            k = logits.shape[-1]  # every class, so every process has the same keys
            tp = torch.bincount(targets[predicted == targets], minlength=k)
            fp = torch.bincount(predicted, minlength=k) - tp
            fn = torch.bincount(targets, minlength=k) - tp
            for name, counts in (("tp", tp), ("fp", fp), ("fn", fn)):
                metrics.update({f"{name}_{c}": float(n) for c, n in enumerate(counts.tolist())})
        return losses, metrics

    @staticmethod
    def summarise(sums: dict[str, float]) -> dict[str, float]:
        """``macro_f1`` (the unweighted mean of the classes' F1, as scikit-learn's
        ``f1_score(average="macro")``) in place of the confusion counts. The counts were all
        divided by the same normaliser, which F1, a ratio of counts, does not see."""
        out = {k: v for k, v in sums.items() if not k.startswith(("tp_", "fp_", "fn_"))}
        # the classes that occur among the targets or the predictions, as scikit-learn counts
        counts = [(sums[f"tp_{c}"], sums[f"fp_{c}"], sums[f"fn_{c}"])
                  for c in sorted(int(k[3:]) for k in sums if k.startswith("tp_"))]
        f1 = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts if tp + fp + fn > 0]
        if f1:
            out["macro_f1"] = sum(f1) / len(f1)
        return out
