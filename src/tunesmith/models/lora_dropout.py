"""LoRA dropout that draws its masks quickly on CPU.

PEFT puts an ``nn.Dropout`` on the input of every LoRA adapter. On CPU, PyTorch's dropout draws
each mask element with ``bernoulli_``, one random float per element, and then multiplies and
divides in separate passes: profiled on the bundled model (LoRA on every linear layer, bf16),
``aten::bernoulli_`` alone took a fifth of the training step, more than two thirds of all the
matrix products (docs/benchmarks.md, "Training speed").

``FastDropout`` is the same dropout, each element dropped independently with probability ``p``
and the kept ones scaled by ``1 / (1 - p)``, with fewer random numbers:

- **Few drops** (``p <= SPARSE_P``, LoRA's usual 0.05-0.1): only the dropped elements are drawn.
  The gaps between consecutive dropped elements of independent Bernoulli(``p``) coins are
  geometric, so ``drop_positions`` draws about ``n * p`` gaps (inverse CDF of 24-bit uniforms,
  two from each 64-bit draw, in float32) instead of a coin per element; the forward pass is
  one scaled copy with those positions zeroed, the backward pass the same on the gradient, and
  what is kept for backward is the positions (int32: ``4 * p`` bytes per element instead of a
  byte of mask).
- **More drops**: a boolean mask, one 64-bit draw from PyTorch's generator giving the coins of
  four elements (kept when its 16-bit number is at least ``round(p * 65536)``, so ``p`` is
  rounded to 1/65536), applied with ``where``.

Either way the draws come from ``torch``'s default generator, so ``torch.manual_seed`` fixes
them and activation checkpointing's replay of the forward pass draws the same ones. It is a
different random stream from ``nn.Dropout``'s, not a different distribution. On CUDA, where
PyTorch's dropout is one fused kernel, ``nn.functional.dropout`` is used as it is.

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


SPARSE_P = 0.25  # at most this, dropout draws the dropped positions (see the module)
_HALF_GRID, _GRID_STEP = float(1 << 23), 2.0 ** -24  # drop_positions' 24-bit uniforms


def drop_positions(n: int, p: float, *, batch: int | None = None) -> torch.Tensor:
    """The ascending flat indices (int64) of the elements of an ``n``-element tensor that
    dropout drops, each independently with probability ``0 < p < 1``, drawn from torch's
    default generator.

    The gap from one dropped element to the next is geometric: ``floor(log(V) / log(1 - p)) +
    1`` for ``V`` uniform on (0, 1], so only about ``n * p`` uniforms are drawn, ``batch`` gaps
    at a time (by default enough to pass ``n`` but once in ~10**9 calls). ``V`` is ``(m + 1) /
    2**24`` for ``m`` the top 24 bits of a 32-bit half of a 64-bit draw: two uniforms a draw,
    exact in float32 (half the draws and twice the vector width of float64 uniforms: 107 us
    instead of 145 for a 512 x 576 input, 199 instead of 334 for 512 x 1536). The grid caps a
    gap at ``-24 log 2 / log(1 - p)`` (325 at ``p = 0.05``), which Bernoulli coins pass with
    probability about ``2**-24``."""
    mean = n * p
    batch = batch or int(mean + 6 * math.sqrt(mean * (1 - p)) + 16)
    scale = 1.0 / math.log1p(-p)
    parts: list[torch.Tensor] = []
    next_start = 0  # the first index the next gap may reach
    while True:
        words = torch.empty((batch + 1) // 2, dtype=torch.int64).random_(-(1 << 63), None)
        top = torch.bitwise_right_shift(words.view(torch.int32)[:batch], 8)  # [-2**23, 2**23)
        v = top.float().add_(_HALF_GRID + 1).mul_(_GRID_STEP)  # (m + 1) / 2**24, m in [0, 2**24)
        gaps = v.log_().mul_(scale).floor_().to(torch.int64).add_(1)
        positions = gaps.cumsum_(0).add_(next_start - 1)
        parts.append(positions)
        last = int(positions[-1])
        if last >= n:
            break
        next_start = last + 1
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[:int(torch.searchsorted(positions, n))]


def _scaled_copy_without(x: torch.Tensor, positions: torch.Tensor, scale: float
                         ) -> torch.Tensor:
    """A contiguous ``x * scale`` with the elements at flat ``positions`` set to zero."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x, scale, out=out)
    return out.view(-1).index_fill_(0, positions.long(), 0).view(x.shape)


def _compact(positions: torch.Tensor, n: int) -> torch.Tensor:
    """``positions`` as kept for backward: int32 where it fits (``4 * p`` bytes an element)."""
    return positions.int() if n < 2 ** 31 else positions


class _DropAt(torch.autograd.Function):
    """Dropout that keeps the dropped elements' positions for backward, not a mask."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        n = x.numel()
        positions = drop_positions(n, p)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(_compact(positions, n))
        return _scaled_copy_without(x, positions, ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (positions,) = ctx.saved_tensors
        return _scaled_copy_without(grad, positions, ctx.scale), None


def kept_bytes_per_element(p: float, device: str = "cpu") -> float:
    """Bytes a ``FastDropout(p)`` keeps for backward per element of its input, on average:
    the dropped positions (int32) on CPU where ``p <= SPARSE_P``, else a bool mask."""
    if p == 0:
        return 0.0
    return 4 * p if device == "cpu" and p <= SPARSE_P else 1.0


class LastDropped:
    """The dropped copy of the tensor an adapter read last, for the next adapter that reads
    the very same tensor (same object, unmodified since) with the same ``p``.

    Holds the input by weak reference, so a freed input is never matched by a new tensor that
    happens to reuse its id. Checkpointing's replay of a layer meets the same order of calls
    (the first adapter draws, the others reuse), so it draws the same masks again."""

    def __init__(self) -> None:
        self._input: weakref.ref[torch.Tensor] | None = None
        self._key: tuple[int, float, str] = (-1, 0.0, "")
        self._out: Any = None

    def get(self, x: torch.Tensor, p: float, kind: str = "autograd") -> Any:
        """What ``put`` left for ``x`` and ``p``; ``kind`` keeps ``FastDropout``'s two forms
        (an autograd output, or ``detached``'s pair) from standing in for each other."""
        if self._input is not None and self._input() is x \
                and self._key == (x._version, p, kind):
            return self._out
        return None

    def put(self, x: torch.Tensor, p: float, out: Any, kind: str = "autograd") -> None:
        self._input, self._key, self._out = weakref.ref(x), (x._version, p, kind), out

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

    def detached(self, x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
        """The dropped copy of ``x`` outside autograd, the flat positions it zeroed (int32
        where they fit; ``None``: nothing dropped) and the scale of the kept elements (``1 /
        (1 - p)`` as in ``forward``), for a layer that puts the dropout's backward into its own
        (``models.fused_layers``); shared like ``forward``'s copy. ``None`` where only
        ``forward`` applies (not on the CPU, or more than ``SPARSE_P`` dropped)."""
        if not self.training or self.p == 0:
            return x.detach(), None, 1.0
        if x.device.type != "cpu" or self.p > SPARSE_P:
            return None
        got = None if self.shared is None else self.shared.get(x, self.p, "detached")
        if got is None:
            n, scale = x.numel(), 1.0 / (1.0 - self.p)
            with torch.no_grad():
                positions = drop_positions(n, self.p)
                out = _scaled_copy_without(x.detach(), positions, scale)
            got = (out, _compact(positions, n), scale)
            if self.shared is not None:
                self.shared.put(x, self.p, got, "detached")
        return got

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, training=True)
        if self.p <= SPARSE_P:
            return _DropAt.apply(x, self.p)
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
