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
from tunesmith.data.encode import IGNORE_INDEX, Encoded, PairEncoded
from tunesmith.data.packing import pack_plan, padded_width
from tunesmith.models.load import unwrap
from tunesmith.training.batches import PAD_MULTIPLE, collate
from tunesmith.training.loss import sequence_log_probs
from tunesmith.training.objectives import PASS_TOKENS, SHAPE_MULTIPLE, ObjectiveOutput

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


def shared_prefix(pair: PairEncoded) -> int:
    """How many leading tokens the two conversations of ``pair`` can share in one forward pass:
    the common prompt, less its last token, which each answer's branch repeats so that its
    first target is predicted from within the branch. Never a target token."""
    a, b = pair.chosen, pair.rejected
    limit = min(_first_target(a), _first_target(b))
    k = 0
    while k < limit and a.input_ids[k] == b.input_ids[k]:
        k += 1
    return max(k - 1, 0)


def _first_target(seq: Encoded) -> int:
    return next((i for i, t in enumerate(seq.labels) if t != IGNORE_INDEX), len(seq))


def pair_size(pair: PairEncoded, *, share_prompt: bool = True) -> int:
    """Tokens ``pair`` takes in a forward pass: the prompt once and both answers' branches,
    or (``share_prompt`` off) both whole conversations."""
    whole = len(pair.chosen) + len(pair.rejected)
    return whole - shared_prefix(pair) if share_prompt else whole


def pair_inputs(pairs: Sequence[PairEncoded], *, pad_id: int, packing: bool,
                pack_capacity: int, share_prompt: bool = True) -> dict[str, torch.Tensor]:
    """One forward pass's inputs for ``pairs``, with each token's sequence index
    (``sequence``: chosen answers 0..n-1, rejected n..2n-1) and, when known, the reference
    log-probs (``reference``).

    ``share_prompt`` (the default): each pair is one block, its prompt once followed by the
    chosen and the rejected answer, with a 4-D attention mask in which each answer sees the
    prompt and itself but not the other answer, and position ids that restart both answers
    where the prompt ends. The log-probs are those of the two whole conversations (tested),
    at close to half the compute when prompts are long and answers short, as in
    classification by preference. Blocks are packed several per row (``packing``) or one per
    row, padded. Without ``share_prompt``: the two conversations as separate sequences,
    packed (block-diagonal attention from the position ids) or padded one per row.
    """
    if share_prompt:
        inputs = _shared_rows(pairs, pad_id=pad_id, packing=packing,
                              pack_capacity=pack_capacity)
    elif packing:
        seqs: list[Encoded] = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        segments = [[(i, s, 0, 0)] for i, s in enumerate(seqs)]
        inputs = _rows(segments, pad_id=pad_id, packing=True, pack_capacity=pack_capacity)
        del inputs["attention_mask"]  # packed rows: the model masks by position ids
    else:
        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        inputs = collate(seqs, pad_id=pad_id, multiple=PAD_MULTIPLE)
        inputs["sequence"] = torch.arange(len(seqs)).unsqueeze(1).expand_as(
            inputs["input_ids"]).contiguous()
    if all(p.reference is not None for p in pairs):
        inputs["reference"] = torch.tensor(
            [p.reference[0] for p in pairs] + [p.reference[1] for p in pairs],  # type: ignore[index]
            dtype=torch.float32)
    return inputs


# A segment: (sequence index, its tokens, first token taken, branch): branch 0 is a prompt or
# a whole sequence, 1 and 2 a pair's chosen and rejected answer, which see branch 0 of their
# block and themselves only.
Segment = tuple[int, Encoded, int, int]


def _shared_rows(pairs: Sequence[PairEncoded], *, pad_id: int, packing: bool,
                 pack_capacity: int) -> dict[str, torch.Tensor]:
    n = len(pairs)
    blocks: list[list[Segment]] = []
    for i, p in enumerate(pairs):
        s = shared_prefix(p)
        prompt = Encoded(p.chosen.input_ids[:s], [IGNORE_INDEX] * s)
        blocks.append([(i, prompt, 0, 0), (i, p.chosen, s, 1), (n + i, p.rejected, s, 2)])
    return _rows(blocks, pad_id=pad_id, packing=packing, pack_capacity=pack_capacity)


def _rows(blocks: Sequence[Sequence[Segment]], *, pad_id: int, packing: bool,
          pack_capacity: int) -> dict[str, torch.Tensor]:
    """Blocks of segments laid into rows (packed by first-fit decreasing, or one per row),
    with position ids, sequence owners and a boolean 4-D attention mask (True: may attend):
    causal within a block, a branch never seeing another branch."""
    sizes = [sum(len(seq) - start for _, seq, start, _ in b) for b in blocks]
    plan = (pack_plan(sizes, pack_capacity) if packing
            else [[i] for i in range(len(blocks))])
    width = max(sum(sizes[i] for i in row) for row in plan)
    width = padded_width(width, SHAPE_MULTIPLE) if packing else width
    ids = torch.full((len(plan), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    owner, pos, branch = torch.zeros_like(ids), torch.zeros_like(ids), torch.zeros_like(ids)
    block = torch.full_like(ids, -1)
    for r, row in enumerate(plan):
        at = 0
        for b in row:
            for i, seq, start, kind in blocks[b]:
                m = len(seq) - start
                ids[r, at:at + m] = torch.tensor(seq.input_ids[start:])
                # a segment's first token is never predicted from what precedes it in the row
                labels[r, at + 1:at + m] = torch.tensor(seq.labels[start + 1:])
                owner[r, at:at + m] = i
                pos[r, at:at + m] = torch.arange(start, start + m)
                branch[r, at:at + m] = kind
                block[r, at:at + m] = b
                at += m
        pos[r, at:] = torch.arange(width - at)  # padding: a block of its own, no targets
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = block[:, :, None] == block[:, None, :]
    sees = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    mask = (same & sees & causal).unsqueeze(1)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "sequence": owner,
            "attention_mask": mask}


def pair_passes(pairs: Sequence[PairEncoded], budget: int | None = None, *,
                share_prompt: bool = True) -> list[list[PairEncoded]]:
    """``pairs`` in groups of at most ``budget`` tokens (chosen and rejected
    conversations together), each group at least one pair.

    ``budget``: what one SFT pass holds: ``PASS_TOKENS`` tokens of packed rows, or one row of
    ``pack_capacity`` where that is more (see ``objectives.encoded_passes``); None (padded
    rows): the chosen conversations' tokens, as SFT on the same rows would pad in one pass. A
    pair is two conversations (prompt + chosen, prompt + rejected), often with a longer
    rejected answer, so one pass over a step's pairs would keep several times SFT's
    activations for the backward pass.
    Splitting is exact: the loss is a sum over pairs, normalised by the whole step's pair
    count, and the loop accumulates the passes' gradients. Only a pair longer than the budget
    on its own takes a pass of two rows.
    """
    if budget is None:
        budget = sum(len(p.chosen) for p in pairs)
    # the fewest passes: first-fit decreasing, as rows are packed (the order within a step
    # does not change its gradient)
    plan = pack_plan([pair_size(p, share_prompt=share_prompt) for p in pairs], budget)
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
        self.share_prompt = can_share_prompt(model)

    def collate(self, pairs: Sequence[PairEncoded]) -> list[dict[str, torch.Tensor]]:
        """The passes for ``pairs``: as many as keep each within SFT's memory (see
        ``pair_passes``); both answers of a pair always share a pass."""
        budget = max(PASS_TOKENS, self.pack_capacity) if self.packing else None
        return [pair_inputs(group, pad_id=self.pad_id, packing=self.packing,
                            pack_capacity=self.pack_capacity, share_prompt=self.share_prompt)
                for group in pair_passes(pairs, budget, share_prompt=self.share_prompt)]

    def normaliser(self, pairs: Sequence[PairEncoded]) -> float:
        return float(len(pairs))

    def size(self, pair: PairEncoded) -> int:
        return pair_size(pair, share_prompt=self.share_prompt)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, sequence: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                reference: torch.Tensor | None = None) -> ObjectiveOutput:
        n_seq = int(sequence.max()) + 1
        n = n_seq // 2
        logps, counts = sequence_log_probs(
            self.model, input_ids, labels, sequence, n_seq,
            attention_mask=model_mask(self.model, attention_mask),
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


def can_share_prompt(model: Any) -> bool:
    """Whether the model's attention takes the custom 4-D mask a shared prompt needs: SDPA
    and eager do; flash-attention kernels take none, so pairs go as two sequences there."""
    return _attention(model) in ("sdpa", "eager")


def _attention(model: Any) -> str:
    """The model's attention implementation (transformers' default, SDPA, when unset)."""
    return getattr(getattr(unwrap(model), "config", None), "_attn_implementation", "sdpa")


def model_mask(model: Any, mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean 4-D mask as the model's attention wants it: as it is for SDPA, additive
    (0 or the dtype's minimum) for eager attention."""
    if mask is None or mask.dim() != 4 or _attention(model) != "eager":
        return mask
    dtype = next(unwrap(model).parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min)


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
    share = can_share_prompt(model)
    was_training = model.training
    model.eval()
    found: list[tuple[float, float] | None] = [None] * len(pairs)
    try:
        with _adapters_off(model):
            for idx in _by_length(pairs, batch_size):
                batch = [pairs[i] for i in idx]
                inputs = pair_inputs(batch, pad_id=pad_id, packing=False, pack_capacity=0,
                                     share_prompt=share)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                n_seq = 2 * len(batch)
                logps, _ = sequence_log_probs(
                    model, inputs["input_ids"], inputs["labels"], inputs["sequence"], n_seq,
                    attention_mask=model_mask(model, inputs["attention_mask"]),
                    position_ids=inputs.get("position_ids"), precision=precision)
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
