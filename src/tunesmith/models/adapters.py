"""The trainable state of a model: what a checkpoint stores and a federated client exchanges.

With LoRA these are the adapter tensors (and a new classification head); with full
fine-tuning, every weight. Names are the model's own parameter names, so a state taken from
one process loads into the same setup in another.
"""

from __future__ import annotations

import torch

from tunesmith.errors import ModelError


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (live tensors; copy them before changing the model)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def trainable_state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the trainable parameters: safe to send, store or average."""
    return {n: p.detach().to("cpu", copy=True) for n, p in trainable_state(model).items()}


def load_trainable_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the model's trainable parameters, in place (dtype/device kept).

    A parameter sharded by FSDP2 (a ``DTensor``) takes its own shard of the full tensor, which
    every process holds, with no communication."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # torch < 2.5: no public DTensor, so no FSDP2-sharded parameter
        DTensor = None  # noqa: N806

    params = trainable_state(model)
    missing = sorted(set(params) - set(weights))
    if missing:
        raise ModelError(f"the saved state lacks {len(missing)} trainable tensors (e.g. "
                         f"{missing[0]}); it belongs to another model or LoRA setup")
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise ModelError(f"{name}: saved shape {tuple(weights[name].shape)} differs "
                                 f"from the model's {tuple(p.shape)}; check train.lora.r")
            value = weights[name]
            if DTensor is not None and isinstance(p, DTensor):
                value = distribute_tensor(value.to(device=p.device, dtype=p.dtype),
                                          p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(value)
