"""Pruning: set a share of each decoder-block linear layer's weights to exactly zero.

Which linear layers: every ``nn.Linear`` inside the decoder blocks (for Llama-style models
q/k/v/o and gate/up/down). Embeddings, norms and the LM head (or a classification head) lie
outside the blocks and are never touched.

Which weights, scored per layer:

- ``magnitude``: score ``|W_ij|``, compared across the whole matrix (as the Wanda authors'
  magnitude baseline does);
- ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  ``|W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the L2 norm of input feature ``j`` over every
  calibration token, compared within each output row ``i``.

Patterns: ``unstructured`` removes ``round(sparsity * n)`` lowest-scoring weights (n = the
matrix for magnitude, each row for Wanda), so every layer gets the requested sparsity (exactly,
when ``sparsity * n`` is a whole number); ``2:4`` keeps the two highest-scoring weights of
every group of four consecutive input weights of a row (always 50%).

How this differs from the reference implementation (github.com/locuslab/wanda, lib/prune.py):

- One calibration pass over the *unpruned* model collects the input norms of every layer,
  then all layers are pruned at once. The reference prunes block by block and feeds block
  ``i`` the outputs of the already pruned blocks ``0..i-1``, so later blocks' norms see
  the pruning error upstream; within one block it also uses the unpruned block, as here.
- Calibration data are the run's own training conversations (chat template, padding masked
  out of the norms), not 128 random 2048-token windows of C4.
- The reference divides the summed squared norms by the number of samples; that constant
  per layer changes no ranking, so the sums are kept as they are.
- Ties in the scores are broken by a stable sort (the lower index is pruned first).

A recovery fine-tune with the mask held fixed is ``training.sparsity.hold_zeros`` (used by
``flows.compress``). Not done: sparse storage. The pruned weights stay in the model's dense
tensors as exact zeros, so the result
loads as a plain Hugging Face model anywhere and the mask is recoverable from the weights
(``W == 0``); a sparse kernel (2:4 semi-structured on recent GPUs, or a sparse CPU runtime) can
take them from there. The file on disk is as large as the dense model's: safetensors has no
sparse tensor type, and compressed-tensors (the bitmask format vLLM reads) removed its sparsity
compressors in 0.20, so there is no maintained sparse format transformers loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.models.student import decoder_layers

Method = Literal["magnitude", "wanda"]
Pattern = Literal["unstructured", "2:4"]
METHODS: tuple[str, ...] = ("magnitude", "wanda")
PATTERNS: tuple[str, ...] = ("unstructured", "2:4")
GROUP, KEEP = 4, 2  # the 2:4 pattern: keep 2 of every 4


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer inside the decoder blocks, by its name in ``model``."""
    prefix, blocks = decoder_layers(model)
    found = {f"{prefix}.{name}": m for name, m in blocks.named_modules()
             if isinstance(m, nn.Linear)}
    if not found:
        raise ConfigError("the decoder blocks hold no linear layers to prune")
    return found


def check_settings(sparsity: float, method: str, pattern: str) -> None:
    """Every problem with the pruning settings at once, as a ``ConfigError``."""
    problems = []
    if not 0 < sparsity < 1:
        problems.append(f"sparsity {sparsity}: give a share strictly between 0 and 1, e.g. 0.5")
    if method not in METHODS:
        problems.append(f"method {method!r}: one of {', '.join(METHODS)}")
    if pattern not in PATTERNS:
        problems.append(f"pattern {pattern!r}: one of {', '.join(PATTERNS)}")
    elif pattern == "2:4" and sparsity != 0.5:
        problems.append(f"pattern 2:4 keeps 2 of every 4 weights, a sparsity of 0.5, not "
                        f"{sparsity}; give 0.5 or use the unstructured pattern")
    if problems:
        raise ConfigError("cannot prune with these settings", problems)


def check_pattern(linears: dict[str, nn.Linear], pattern: str) -> None:
    """2:4 needs every pruned layer's input size to be a multiple of 4."""
    if pattern != "2:4":
        return
    odd = [f"{name} has {m.in_features} inputs" for name, m in linears.items()
           if m.in_features % GROUP]
    if odd:
        raise ConfigError("the 2:4 pattern needs input sizes divisible by 4; use the "
                          "unstructured pattern for this model", odd[:5] + (
                              [f"... and {len(odd) - 5} more"] if len(odd) > 5 else []))


@torch.no_grad()
def input_norms(model: nn.Module, rows: Sequence[Sequence[int]], *, pad_id: int,
                batch_size: int = 8, linears: dict[str, nn.Linear] | None = None
                ) -> dict[str, torch.Tensor]:
    """Per pruned layer, ``||X_j||_2 ** 2`` summed over every real token of ``rows``: the
    squared L2 norm of each input feature, from forward hooks on the layers' inputs."""
    linears = linears if linears is not None else prunable_linears(model)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64)
            for name, m in linears.items()}
    keep: dict[str, torch.Tensor] = {}  # the current batch's real (unpadded) positions

    def hook(name: str):
        def accumulate(_module: nn.Module, args: tuple, _output: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])[keep["mask"]]
            sums[name] += x.double().pow(2).sum(0).cpu()
        return accumulate

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
                mask[i, :len(r)] = 1
            keep["mask"] = mask.reshape(-1).bool().to(device)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: s.float() for name, s in sums.items()}


def scores(weight: torch.Tensor, method: str, norm_sq: torch.Tensor | None = None
           ) -> torch.Tensor:
    """How much each weight matters: ``|W|``, or Wanda's ``|W| * ||X_j||_2``."""
    w = weight.detach().float().abs()
    if method == "magnitude":
        return w
    if norm_sq is None:
        raise ValueError("wanda needs the input norms of the layer (input_norms)")
    return w * norm_sq.to(w.device).float().sqrt().reshape(1, -1)


def prune_mask(score: torch.Tensor, sparsity: float, pattern: str, *, per_row: bool
               ) -> torch.Tensor:
    """True where a weight is pruned: the lowest scores, per row or across the matrix, or the
    two lowest of every four consecutive inputs (2:4)."""
    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if pattern == "2:4":
        groups = score.reshape(rows, cols // GROUP, GROUP)
        lowest = torch.topk(groups, GROUP - KEEP, dim=-1, largest=False).indices
        return mask.reshape(rows, cols // GROUP, GROUP).scatter_(-1, lowest, True
                                                                 ).reshape(rows, cols)
    if per_row:
        k = round(cols * sparsity)
        lowest = torch.sort(score, dim=1, stable=True).indices[:, :k]
        return mask.scatter_(1, lowest, True)
    k = round(score.numel() * sparsity)
    lowest = torch.sort(score.flatten(), stable=True).indices[:k]
    return mask.flatten().scatter_(0, lowest, True).reshape(rows, cols)


@dataclass
class PruneReport:
    """What was pruned: the settings and each layer's share of zero weights afterwards."""

    method: str
    pattern: str
    sparsity: float
    layers: dict[str, float]  # name -> share of zero weights

    @property
    def overall(self) -> float:
        return sum(self.layers.values()) / len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "pattern": self.pattern, "sparsity": self.sparsity,
                "layers": len(self.layers), "min_layer_sparsity": min(self.layers.values()),
                "max_layer_sparsity": max(self.layers.values())}


@torch.no_grad()
def prune(model: nn.Module, *, sparsity: float, method: str = "wanda",
          pattern: str = "unstructured", norms: dict[str, torch.Tensor] | None = None
          ) -> PruneReport:
    """Zero the lowest-scoring weights of every decoder-block linear layer, in place.

    ``norms`` (from ``input_norms``) are required for ``wanda``.
    """
    check_settings(sparsity, method, pattern)
    linears = prunable_linears(model)
    check_pattern(linears, pattern)
    if method == "wanda":
        missing = sorted(set(linears) - set(norms or {}))
        if missing:
            raise ValueError(f"wanda needs input norms for every layer; missing {missing[:3]}")
    done = {}
    for name, layer in linears.items():
        score = scores(layer.weight, method, norms[name] if method == "wanda" else None)
        mask = prune_mask(score, sparsity, pattern, per_row=method == "wanda")
        layer.weight.masked_fill_(mask.to(layer.weight.device), 0)
        done[name] = float((layer.weight == 0).float().mean())
    return PruneReport(method, pattern, sparsity, done)

