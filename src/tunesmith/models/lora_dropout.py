"""LoRA dropout that draws its masks quickly on CPU.

PEFT puts an ``nn.Dropout`` on the input of every LoRA adapter. On CPU, PyTorch's dropout draws
each mask element with ``bernoulli_``, one random float per element, and then multiplies and
divides in separate passes: profiled on the bundled model (LoRA on every linear layer, bf16),
``aten::bernoulli_`` alone took a fifth of the training step, more than two thirds of all the
matrix products (docs/benchmarks.md, "Training speed").

``FastDropout`` is the same dropout with its random numbers drawn 16 bits at a time: one 64-bit
draw from PyTorch's generator gives the coins of four elements (an element is kept when its
16-bit number is at least ``round(p * 65536)``, so the drop probability is ``p`` rounded to
1/65536), and the kept elements are scaled by ``1 / (1 - p)`` as usual. The mask comes from
``torch``'s default generator, so ``torch.manual_seed`` fixes it and activation
checkpointing's replay of the forward pass draws the same one. It is a different random
stream from ``nn.Dropout``'s, not a different distribution. On CUDA, where PyTorch's dropout
is one fused kernel, ``nn.functional.dropout`` is used as it is.

Written by hand because no library offers a faster CPU dropout; ``use_fast_dropout`` swaps it
into a PEFT model in place of its ``nn.Dropout`` modules.

**One mask per input** (``shared=True``, ``train.lora.shared_dropout``): PEFT drops the input
of each adapter on its own, so the query, key and value adapters of a layer, which read the same
tensor, draw three masks and keep three dropped copies (gate and up: two). Shared, the
adapters that read the same tensor see the same dropped copy: each adapter's input is still
dropped with probability ``p``, but the masks of q/k/v (and of gate/up) are now the same one.
That changes the noise, not its rate, so it is an option; its default was chosen by measuring
speed and validation loss (docs/benchmarks.md, "Training speed").
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn

_BITS = 16
_LEVELS = 1 << _BITS
_PER_WORD = 4  # 16-bit chunks of a 64-bit draw


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A boolean CPU mask of ``shape`` whose elements are True with probability ``1 - p``
    (``p`` rounded to 1/65536), drawn from torch's default generator."""
    n = math.prod(shape)
    words = torch.empty((n + _PER_WORD - 1) // _PER_WORD, dtype=torch.int64)
    # over the whole int64 range torch takes each word from one full 64-bit draw, so all four
    # 16-bit chunks are uniform (plain random_() gives [0, 2**63): a 15-bit top chunk)
    words.random_(-(1 << 63), None)
    # a signed 16-bit chunk v stands for the unsigned v + 32768; keep it when that >= p * 65536
    threshold = round(p * _LEVELS) - _LEVELS // 2
    return (words.view(torch.int16)[:n] >= threshold).view(shape)


class LastDropped:
    """The dropped copy of the tensor an adapter read last, for the next adapter that reads
    the very same tensor (same object, unmodified since) with the same ``p``.

    Holds the input by weak reference, so a freed input is never matched by a new tensor that
    happens to reuse its id. Checkpointing's replay of a layer meets the same order of calls
    (the first adapter draws, the others reuse), so it draws the same masks again."""

    def __init__(self) -> None:
        self._input: weakref.ref[torch.Tensor] | None = None
        self._key: tuple[int, float] = (-1, 0.0)
        self._out: torch.Tensor | None = None

    def get(self, x: torch.Tensor, p: float) -> torch.Tensor | None:
        if self._input is not None and self._input() is x and self._key == (x._version, p):
            return self._out
        return None

    def put(self, x: torch.Tensor, p: float, out: torch.Tensor) -> None:
        self._input, self._key, self._out = weakref.ref(x), (x._version, p), out

    # what it holds belongs to one forward pass: a copied or pickled model starts afresh
    # (and a tensor inside an autograd graph could not be deep-copied)
    def __deepcopy__(self, memo: dict[int, Any]) -> LastDropped:
        return LastDropped()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


class FastDropout(nn.Module):
    """``nn.Dropout(p)`` with masks drawn by ``keep_mask`` on CPU (see the module); with
    ``shared``, adapters reading the same tensor share one dropped copy of it."""

    def __init__(self, p: float, shared: LastDropped | None = None) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.shared is None:
            return self._drop(x)
        out = self.shared.get(x, self.p)
        if out is None:
            out = self._drop(x)
            self.shared.put(x, self.p, out)
        return out

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        # where() keeps only the boolean mask for the backward pass (a byte per element, as
        # CUDA's dropout does; CPU's nn.Dropout keeps the mask in the input's dtype)
        return torch.where(keep_mask(x.shape, self.p), x, 0) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", shared" if self.shared is not None else "")


def use_fast_dropout(model: Any, *, shared: bool = False) -> int:
    """Replace the ``nn.Dropout`` of every LoRA adapter in a PEFT ``model`` by a
    ``FastDropout`` of the same probability; returns how many were replaced. With ``shared``
    the adapters that read the same tensor share one dropped copy (see the module)."""
    last = LastDropped() if shared else None
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                fast = FastDropout(dropout.p, last)
                fast.train(dropout.training)
                dropouts[name] = fast
                swapped += 1
    return swapped
