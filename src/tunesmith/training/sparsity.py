"""A wrapper that keeps pruned weights at exactly zero while the rest train.

A pruned model's recovery fine-tune must not undo the pruning. Two things hold the mask:

- each masked parameter's gradient is zeroed where the mask is set (a tensor hook), so the
  gradient norm the loop clips and logs is that of the weights that can change, and AdamW
  never builds up moments there (a zero weight with a zero gradient and zero moments stays
  zero under AdamW, weight decay included);
- after every optimiser step the masked entries are set to zero again, so nothing (another
  optimiser, a scheduler of weight decay, rounding) can move them.

This is torch.nn.utils.prune's job in spirit, but that module replaces each weight with a
``weight_orig * weight_mask`` reparametrisation that changes the parameter names the
checkpoints, the optimiser and ``save_pretrained`` see; holding the zeros in place keeps the
model an ordinary model throughout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tunesmith.training.setup import TrainParts, Wrapper


def hold_zeros(masks: Mapping[str, torch.Tensor]) -> Wrapper:
    """A wrapper keeping ``model``'s parameters named in ``masks`` at zero where the mask
    is True (a bool tensor shaped like the parameter)."""

    def wrap(parts: TrainParts) -> TrainParts:
        params = dict(parts.model.named_parameters())
        missing = sorted(set(masks) - set(params))
        if missing:
            raise ValueError(f"no parameters named {missing[:3]} in the model to hold at zero")
        held = []
        for name, mask in masks.items():
            param = params[name]
            if mask.shape != param.shape:
                raise ValueError(f"{name}: mask shaped {tuple(mask.shape)}, weight "
                                 f"{tuple(param.shape)}")
            mask = mask.to(device=param.device, dtype=torch.bool)
            if param.requires_grad:
                param.register_hook(lambda grad, mask=mask: grad.masked_fill(mask, 0))
            held.append((param, mask))

        @torch.no_grad()
        def rezero(*_args: object) -> None:
            for param, mask in held:
                param.masked_fill_(mask, 0)

        rezero()
        parts.optimizer.register_step_post_hook(rezero)
        return parts

    return wrap
