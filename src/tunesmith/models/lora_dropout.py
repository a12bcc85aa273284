"""LoRA dropout that draws its masks quickly on CPU.

PEFT puts an ``nn.Dropout`` on the input of every LoRA adapter. On CPU, PyTorch's dropout draws
each mask element with ``bernoulli_``, one random float per element, and then multiplies and
divides in separate passes: profiled on the bundled model (LoRA on every linear layer, bf16),
``aten::bernoulli_`` alone took a fifth of the training step, more than two thirds of all the
matrix products (docs/benchmarks.md, "Training speed").

``FastDropout`` is the same dropout with its random numbers drawn 16 bits at a time: one 64-bit
draw from PyTorch's generator gives the coins of three elements (an element is kept when its
16-bit number is at least ``round(p * 65536)``, so the drop probability is ``p`` rounded to
1/65536), and the kept elements are scaled by ``1 / (1 - p)`` as usual. The mask comes from
``torch``'s default generator, so ``torch.manual_seed`` fixes it and activation
checkpointing's replay of the forward pass draws the same one. It is a different random
stream from ``nn.Dropout``'s, not a different distribution. On CUDA, where PyTorch's dropout
is one fused kernel, ``nn.functional.dropout`` is used as it is.

Written by hand because no library offers a faster CPU dropout; ``use_fast_dropout`` swaps it
into a PEFT model in place of its ``nn.Dropout`` modules.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

_BITS = 16
_LEVELS = 1 << _BITS
_PER_WORD = 3  # 16-bit chunks of a 64-bit draw that are uniform: random_() gives 63 bits


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A boolean CPU mask of ``shape`` whose elements are True with probability ``1 - p``
    (``p`` rounded to 1/65536), drawn from torch's default generator."""
    n = math.prod(shape)
    words = torch.empty((n + _PER_WORD - 1) // _PER_WORD, dtype=torch.int64)
    words.random_()  # uniform on [0, 2**63): the low three 16-bit chunks are uniform
    chunks = words.view(torch.int16).view(-1, 4)[:, :_PER_WORD]
    # a signed 16-bit chunk v stands for the unsigned v + 32768; keep it when that >= p * 65536
    threshold = round(p * _LEVELS) - _LEVELS // 2
    return (chunks >= threshold).reshape(-1)[:n].view(shape)


class FastDropout(nn.Module):
    """``nn.Dropout(p)`` with masks drawn by ``keep_mask`` on CPU (see the module)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        # where() keeps only the boolean mask for the backward pass (a byte per element, as
        # CUDA's dropout does; CPU's nn.Dropout keeps the mask in the input's dtype)
        return torch.where(keep_mask(x.shape, self.p), x, 0) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: Any) -> int:
    """Replace the ``nn.Dropout`` of every LoRA adapter in a PEFT ``model`` by a
    ``FastDropout`` of the same probability; returns how many were replaced."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                fast = FastDropout(dropout.p)
                fast.train(dropout.training)
                dropouts[name] = fast
                swapped += 1
    return swapped
