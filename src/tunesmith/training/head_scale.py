"""A classification head that trains on its input divided by a fixed per-feature scale.

A decoder's last hidden states are badly conditioned as a linear head's input: a few
"massive activation" features are tens of times larger than the rest (in SmolLM2-135M one
feature holds about 41 of a norm of 55 at every prompt's last token). Under DP-SGD that is
what stops a new head from learning: each example's gradient, ``(p - y) x``, is clipped to
one norm, so the large feature takes most of every example's budget, and no single learning
rate suits both it and the others (with Adam the head's logits overshoot and swing; with SGD
the small features barely move). Dividing the head's input by each feature's RMS removes the
disparity; it is a reparametrisation (``W x = (W diag(s)) (x / s)``), so the model it ends
as is the same kind of model: ``fold`` writes ``W diag(1/s)`` back into the head's weights.

The scale comes from **public** prompts (the general prompts shipped with tunesmith, rendered
with the run's chat template), never from the training data, so it spends no privacy budget.
It is computed on the base model before any update and again, identically, when a run
resumes, so checkpoints (kept in the scaled parametrisation) continue exactly.

This is the preconditioning DP linear probing does with public statistics (for example
normalising features with public data's statistics, Tramer and Boneh, ICLR 2021); no library
we use does it for a transformers classification head, hence the few lines here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tunesmith.errors import TrainingError
from tunesmith.models.load import unwrap

# a feature that is zero on every public prompt keeps its own scale (no division by zero)
MIN_SCALE = 1e-3


@torch.no_grad()
def public_feature_rms(model: Any, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per feature, the RMS of the head's input (the last hidden state at each prompt's last
    token, where a classification head reads it) over ``prompts``, in float32."""
    if not prompts:
        raise TrainingError("scaling the head's input needs at least one public prompt")
    clf = unwrap(model)
    was_training = clf.training
    clf.eval()
    device = next(clf.parameters()).device
    try:
        pooled = [clf.base_model(input_ids=torch.tensor([ids], device=device),
                                 use_cache=False).last_hidden_state[0, -1].float()
                  for ids in prompts]
    finally:
        clf.train(was_training)
    rms = torch.stack(pooled).pow(2).mean(0).sqrt()
    return rms.clamp(min=MIN_SCALE).cpu()


def trainable_head(model: Any) -> nn.Linear:
    """The classification head's trainable linear layer (PEFT trains a copy of ``score``)."""
    score = getattr(unwrap(model), "score", None)
    found = [m for m in score.modules() if isinstance(m, nn.Linear)
             and m.weight.requires_grad] if score is not None else []
    if len(found) != 1:
        raise TrainingError("scaling the head's input needs one trainable classification head "
                            f"(a 'score' linear layer); found {len(found)}")
    return found[0]


class ScaledHeadInput:
    """While attached, the head computes ``W (x / scale)``; ``fold`` makes it ``W' x`` again."""

    def __init__(self, model: Any, scale: torch.Tensor) -> None:
        self.head = trainable_head(model)
        # fp32 whatever the head's dtype: the fold divides fp32 weights by it
        self.scale = scale.to(self.head.weight.device, torch.float32)
        self._hook = self.head.register_forward_pre_hook(self._divide)

    def _divide(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        # Opacus' activation hook sees these scaled inputs: per-example gradients, clipping
        # and noise are in the scaled parametrisation
        return (args[0] / self.scale.to(args[0].dtype), *args[1:])

    def fold(self) -> None:
        """Write the scale into the head's weights and detach: the same outputs, plain head."""
        if self._hook is None:
            return
        with torch.no_grad():
            self.head.weight.div_(self.scale.to(self.head.weight.dtype))
        self._hook.remove()
        self._hook = None
