"""The language-model head as the model itself applies it to its last hidden states.

The loss, the preference and distillation objectives and label scoring run the head on the
few hidden states they need instead of asking the model for full-vocabulary logits; they
must then apply it exactly as the model's own forward does. Gemma 2 (and a Gemma 3 config
that sets it) soft-caps the logits, ``cap * tanh(logits / cap)``: a bare head would train
and score different logits from the ones the model generates with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SoftCappedHead(nn.Module):
    """``head`` followed by Gemma's final logit soft-capping."""

    def __init__(self, head: nn.Module, cap: float) -> None:
        super().__init__()
        self.head = head
        self.cap = cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


def output_head(lm: Any) -> nn.Module:
    """The module that turns ``lm``'s last hidden states into the logits its forward returns."""
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return SoftCappedHead(head, float(cap)) if cap else head
