"""Preference objectives (DPO, IPO, SimPO, ORPO) on pairs of a preferred and a rejected answer.

The losses follow the papers and TRL's implementations (``DPOTrainer`` for sigmoid/IPO,
``CPOTrainer`` for SimPO, ``ORPOTrainer``), so their numbers match (tested against TRL's DPO).
Written here rather than by subclassing TRL because the loop's objective protocol computes
log-probabilities through the same target-only, chunked LM head as SFT (``sequence_log_probs``)
on packed rows; bench/dpo_speed.py measures the difference against TRL's DPOTrainer.

Rewards are the papers' implicit rewards: ``beta * (log pi(y|x) - log pi_ref(y|x))`` for DPO and
IPO, ``beta * mean log pi(y|x)`` for the reference-free losses. DPO optimises the margin
between the two; the chosen reward alone may well fall while the margin grows.

The reference model's log-probabilities are computed once, before training, by
``reference_log_probs`` (with LoRA: the same model with its adapters switched off; full
fine-tuning: the weights as loaded) and carried by each ``PairEncoded``. No second copy of the
model is held and no reference forward pass runs during training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config import REFERENCE_LOSSES
from tunesmith.data.encode import Encoded, PairEncoded
from tunesmith.data.packing import pack_plan
from tunesmith.training.batches import collate
from tunesmith.training.loss import sequence_log_probs
from tunesmith.training.objectives import ROWS_PER_PASS, SHAPE_MULTIPLE, ObjectiveOutput

LOSSES = ("dpo", "ipo", "simpo", "orpo")
# the per-token averaged log-probabilities these losses are defined on (TRL does the same)
AVERAGED = ("ipo", "simpo", "orpo")


@dataclass
class PairLosses:
    """Per-pair loss and implicit rewards."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def pair_losses(loss: str, *, chosen: torch.Tensor, rejected: torch.Tensor,
                chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                ref_chosen: torch.Tensor | None = None, ref_rejected: torch.Tensor | None = None,
                beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5
                ) -> PairLosses:
    """The preference loss of each pair from summed answer log-probabilities.

    ``chosen``/``rejected``: summed log-probs of the answers under the policy; ``*_tokens``:
    their token counts; ``ref_*``: the same under the reference (DPO, IPO).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown preference loss {loss!r}; one of {LOSSES}")
    if loss in AVERAGED:
        chosen, rejected = chosen / chosen_tokens, rejected / rejected_tokens
    if loss in REFERENCE_LOSSES:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"the {loss} loss needs the reference log-probabilities")
        if loss in AVERAGED:
            ref_chosen, ref_rejected = ref_chosen / chosen_tokens, ref_rejected / rejected_tokens
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        logits = chosen_ratio - rejected_ratio
        if loss == "dpo":
            losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                      - F.logsigmoid(-beta * logits) * label_smoothing)
        else:  # IPO (Azar et al.): squared distance of the log-ratio gap from 1 / (2 beta)
            losses = (logits - 1 / (2 * beta)) ** 2
        return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    if loss == "simpo":  # Meng et al.: margin gamma = simpo_gamma * beta on mean log-probs
        logits = beta * (chosen - rejected) - simpo_gamma * beta
        losses = (-F.logsigmoid(logits) * (1 - label_smoothing)
                  - F.logsigmoid(-logits) * label_smoothing)
    else:  # ORPO (Hong et al.): log odds ratio of the mean log-probs; its NLL term is added
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen))
                                          - torch.log1p(-torch.exp(rejected)))
        losses = -beta * F.logsigmoid(log_odds)
    return PairLosses(losses, beta * chosen.detach(), beta * rejected.detach())


def pair_inputs(pairs: Sequence[PairEncoded], *, pad_id: int, packing: bool,
                pack_capacity: int) -> dict[str, torch.Tensor]:
    """One forward pass's inputs for ``pairs``: the chosen sequences (0..n-1), then the
    rejected ones (n..2n-1), padded one per row or packed several per row, with each token's
    sequence index (``sequence``) and, when known, the reference log-probs (``reference``)."""
    seqs: list[Encoded] = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if packing:
        rows = [[(i, seqs[i]) for i in group]
                for group in pack_plan([len(s) for s in seqs], pack_capacity)]
        width = max(sum(len(s) for _, s in row) for row in rows)
        width = -(-width // SHAPE_MULTIPLE) * SHAPE_MULTIPLE
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        owner = torch.zeros_like(ids)
        pos = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            at = 0
            for i, s in row:
                n = len(s)
                ids[r, at:at + n] = torch.tensor(s.input_ids)
                # a sequence's first token is never predicted from the previous sequence
                labels[r, at + 1:at + n] = torch.tensor(s.labels[1:])
                owner[r, at:at + n] = i
                pos[r, at:at + n] = torch.arange(n)
                at += n
            pos[r, at:] = torch.arange(width - at)  # padding: one more sequence, no targets
        inputs = {"input_ids": ids, "labels": labels, "position_ids": pos, "sequence": owner}
    else:
        inputs = collate(seqs, pad_id=pad_id)
        inputs["sequence"] = torch.arange(len(seqs)).unsqueeze(1).expand_as(
            inputs["input_ids"]).contiguous()
    if all(p.reference is not None for p in pairs):
        inputs["reference"] = torch.tensor(
            [p.reference[0] for p in pairs] + [p.reference[1] for p in pairs],  # type: ignore[index]
            dtype=torch.float32)
    return inputs


def pair_passes(pairs: Sequence[PairEncoded], budget: int | None = None
                ) -> list[list[PairEncoded]]:
    """``pairs`` in groups of at most ``budget`` tokens (chosen and rejected
    conversations together), each group at least one pair.

    ``budget``: what one SFT pass holds: ``ROWS_PER_PASS`` packed rows of ``pack_capacity``
    tokens (see ``objectives.encoded_passes``); None (padded rows): the chosen conversations'
    tokens, as SFT on the same rows would pad in one pass. A pair is two conversations
    (prompt + chosen, prompt + rejected), often with a longer rejected answer, so one pass over
    a step's pairs would keep several times SFT's activations for the backward pass.
    Splitting is exact: the loss is a sum over pairs, normalised by the whole step's pair
    count, and the loop accumulates the passes' gradients. Only a pair longer than the budget
    on its own takes a pass of two rows.
    """
    if budget is None:
        budget = sum(len(p.chosen) for p in pairs)
    # the fewest passes: first-fit decreasing, as rows are packed (the order within a step
    # does not change its gradient)
    plan = pack_plan([len(p.chosen) + len(p.rejected) for p in pairs], budget)
    return [[pairs[i] for i in sorted(group)] for group in sorted(plan, key=min)]


class PreferenceObjective(nn.Module):
    """A preference loss on pairs, normalised by the number of pairs, with named metrics:
    the chosen and rejected rewards, their margin, the share of pairs whose chosen reward is
    higher (``pair_accuracy``), and the mean per-token log-prob of each answer."""

    def __init__(self, model: nn.Module, *, loss: str, beta: float, pad_id: int,
                 precision: str = "fp32", sft_weight: float = 0.0, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, packing: bool = True, pack_capacity: int = 512
                 ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown preference loss {loss!r}; one of {LOSSES}")
        self.model = model
        self.loss, self.beta, self.pad_id, self.precision = loss, beta, pad_id, precision
        self.label_smoothing, self.simpo_gamma = label_smoothing, simpo_gamma
        # ORPO's loss is NLL + odds-ratio term: its NLL weight is 1 on top of sft_weight
        self.nll_weight = sft_weight + (1.0 if loss == "orpo" else 0.0)
        self.packing, self.pack_capacity = packing, pack_capacity

    def collate(self, pairs: Sequence[PairEncoded]) -> list[dict[str, torch.Tensor]]:
        """The passes for ``pairs``: as many as keep each within SFT's memory (see
        ``pair_passes``); both answers of a pair always share a pass."""
        budget = ROWS_PER_PASS * self.pack_capacity if self.packing else None
        return [pair_inputs(group, pad_id=self.pad_id, packing=self.packing,
                            pack_capacity=self.pack_capacity)
                for group in pair_passes(pairs, budget)]

    def normaliser(self, pairs: Sequence[PairEncoded]) -> float:
        return float(len(pairs))

    def size(self, pair: PairEncoded) -> int:
        return len(pair.chosen) + len(pair.rejected)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, sequence: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                reference: torch.Tensor | None = None) -> ObjectiveOutput:
        n_seq = int(sequence.max()) + 1
        n = n_seq // 2
        logps, counts = sequence_log_probs(
            self.model, input_ids, labels, sequence, n_seq, attention_mask=attention_mask,
            position_ids=position_ids, precision=self.precision)
        counts = counts.clamp(min=1)
        out = pair_losses(
            self.loss, chosen=logps[:n], rejected=logps[n:], chosen_tokens=counts[:n],
            rejected_tokens=counts[n:], ref_chosen=None if reference is None else reference[:n],
            ref_rejected=None if reference is None else reference[n:], beta=self.beta,
            label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
        loss = out.losses.sum()
        mean_lp = (logps / counts).detach()
        if self.nll_weight:
            loss = loss + self.nll_weight * -(logps[:n] / counts[:n]).sum()
        margin = out.chosen_rewards - out.rejected_rewards
        return ObjectiveOutput(loss, {
            "reward_chosen": float(out.chosen_rewards.sum()),
            "reward_rejected": float(out.rejected_rewards.sum()),
            "reward_margin": float(margin.sum()),
            "pair_accuracy": float((margin > 0).float().sum()),
            "likelihood_accuracy": float((mean_lp[:n] > mean_lp[n:]).float().sum()),
            "logp_chosen": float(mean_lp[:n].sum()), "logp_rejected": float(mean_lp[n:].sum())})


def _adapters_off(model: Any) -> contextlib.AbstractContextManager[Any]:
    """With PEFT adapters, a context in which the model is its base; else nothing changes."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else \
        contextlib.nullcontext()


@torch.no_grad()
def reference_log_probs(model: Any, pairs: Sequence[PairEncoded], *, pad_id: int,
                        batch_size: int = 16, precision: str = "fp32",
                        device: torch.device | None = None) -> list[tuple[float, float]]:
    """Summed log-probs of each pair's chosen and rejected answer under the reference: the
    model with its adapters off (LoRA), else the model as it is now (before full training)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    found: list[tuple[float, float] | None] = [None] * len(pairs)
    try:
        with _adapters_off(model):
            for idx in _by_length(pairs, batch_size):
                batch = [pairs[i] for i in idx]
                inputs = pair_inputs(batch, pad_id=pad_id, packing=False, pack_capacity=0)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                n_seq = 2 * len(batch)
                logps, _ = sequence_log_probs(
                    model, inputs["input_ids"], inputs["labels"], inputs["sequence"], n_seq,
                    attention_mask=inputs["attention_mask"], precision=precision)
                values = logps.double().cpu().tolist()
                for i, chosen, rejected in zip(idx, values[:len(batch)], values[len(batch):],
                                               strict=True):
                    found[i] = (chosen, rejected)
    finally:
        model.train(was_training)
    return [v for v in found if v is not None]


def _by_length(pairs: Sequence[PairEncoded], batch_size: int) -> Iterator[list[int]]:
    """Batches of pair indices of similar length, so little of each batch is padding."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i]))
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def with_reference(pairs: Sequence[PairEncoded], values: Sequence[tuple[float, float]]
                   ) -> list[PairEncoded]:
    return [replace(p, reference=(float(a), float(b)))
            for p, (a, b) in zip(pairs, values, strict=True)]
