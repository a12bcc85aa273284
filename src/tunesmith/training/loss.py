"""Causal-LM loss on target tokens only, without materialising full-vocabulary logits.

Only positions whose next token is a target go through the LM head, in chunks; for chat
fine-tuning (short answers after long prompts) this skips most of the head's work and memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.models.heads import output_head
from tunesmith.models.load import unwrap
from tunesmith.models.packed_attention import packed_kwargs
from tunesmith.training.precision import autocast

HEAD_CHUNK = 1024


@dataclass
class LossSums:
    """Summed (not averaged) loss and counts, so callers can normalise over any token total."""

    loss_sum: torch.Tensor
    n_tokens: int
    n_correct: int


def _head_chunk(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.argmax(-1) == targets).sum()
    return loss, correct


class TargetLoss(nn.Module):
    """Wraps a causal LM so its forward returns summed loss on target tokens.

    Being an ``nn.Module`` whose forward does all the work, it can be wrapped by DDP/FSDP
    (Accelerate) like any model.
    """

    def __init__(self, model: Any, *, precision: str = "fp32") -> None:
        super().__init__()
        self.model = model
        self.precision = precision

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> LossSums:
        """Summed loss over target tokens. Packed rows pass ``position_ids`` and no mask."""
        with autocast(self.precision, input_ids.device, self.model):
            return self._forward(input_ids, labels, attention_mask, position_ids)

    def _forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                 attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
                 ) -> LossSums:
        lm = unwrap(self.model)
        selected, wanted, _ = target_hidden(lm, input_ids, labels, attention_mask, position_ids)
        head = output_head(lm)
        loss_sum = selected.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long)
        for start in range(0, wanted.shape[0], HEAD_CHUNK):
            h, y = selected[start:start + HEAD_CHUNK], wanted[start:start + HEAD_CHUNK]
            if torch.is_grad_enabled() and wanted.shape[0] > HEAD_CHUNK:
                # recompute each chunk's logits in backward instead of keeping them all
                part, ok = checkpoint(_head_chunk, head, h, y, use_reentrant=False)
            else:
                part, ok = _head_chunk(head, h, y)
            loss_sum = loss_sum + part
            correct = correct + ok.cpu()
        return LossSums(loss_sum, int(wanted.shape[0]), int(correct))


def target_hidden(lm: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                  attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last hidden states that predict a target token, those tokens, and where they are
    (a mask over ``labels[:, 1:]``). The full hidden states are freed before any head runs."""
    hidden = lm.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=False, **packed_kwargs(lm, attention_mask, position_ids),
    ).last_hidden_state
    # Position t predicts token t+1.
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    selected = hidden[:, :-1][mask]
    return selected, targets[mask], mask


def _token_log_probs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
                     ) -> torch.Tensor:
    logits = head(hidden).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def sequence_log_probs(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                       sequence: torch.Tensor, n_sequences: int, *,
                       attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, precision: str = "fp32"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's target tokens, and how many there are.

    ``sequence`` (shaped like ``labels``) says which sequence each token belongs to, so padded
    rows (one sequence per row) and packed rows (several per row) work alike. Only target
    positions go through the LM head, in chunks, as for the SFT loss: preference losses never
    hold full-vocabulary logits of whole sequences.
    """
    with autocast(precision, input_ids.device, model):
        lm = unwrap(model)
        selected, wanted, mask = target_hidden(lm, input_ids, labels, attention_mask,
                                               position_ids)
        owner = sequence[:, 1:][mask]
        head = output_head(lm)
        parts = []
        for start in range(0, wanted.shape[0], HEAD_CHUNK):
            h, y = selected[start:start + HEAD_CHUNK], wanted[start:start + HEAD_CHUNK]
            if torch.is_grad_enabled() and wanted.shape[0] > HEAD_CHUNK:
                parts.append(checkpoint(_token_log_probs, head, h, y, use_reentrant=False))
            else:
                parts.append(_token_log_probs(head, h, y))
    token_lp = torch.cat(parts) if parts else selected.new_zeros(0, dtype=torch.float32)
    sums = token_lp.new_zeros(n_sequences).index_add(0, owner, token_lp)
    counts = torch.zeros(n_sequences, dtype=torch.float32, device=owner.device).index_add(
        0, owner, torch.ones_like(owner, dtype=torch.float32))
    return sums, counts
