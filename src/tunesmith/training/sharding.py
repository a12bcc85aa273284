"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) as Accelerate
applies it, and what the loop needs around it.

A process launched with an FSDP accelerate config (``accelerate launch --config_file
examples/accelerate/fsdp-1node.yaml``) gets an ``Accelerator`` whose ``prepare`` shards the
objective's parameters, gradients and optimiser state over the processes; the loop is the same
one. Three things differ from DDP, and they live here:

* every process must run the same number of forward/backward passes in a step, because each
  pass all-gathers and reduce-scatters every layer (``max_passes``);
* checkpoints are **gathered**: the trainable weights and the optimiser state are collected
  into full tensors and the main process writes them in the usual checkpoint format (the
  optimiser keyed by parameter name). A checkpoint therefore resumes under any number of
  FSDP processes and its weights load in a plain process; the price is that the main process
  holds one full copy of the trainable weights and optimiser state in CPU memory while it
  writes (small for LoRA; for full fine-tuning of a large model, about 3x its fp32 size);
* when training ends the model is **unsharded in place** (``unshard``): every process holds
  the full trained weights as plain tensors again, so saving the adapter, merging and
  evaluating after the loop work as after any other run.

Only FSDP2 is supported (``fsdp_version: 2``); torch >= 2.6 has it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunesmith.errors import TrainingError


def is_fsdp(accelerator: Any) -> bool:
    """Whether ``accelerator`` shards the model (FSDP2); FSDP1 is refused with what to change."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise TrainingError("the accelerate config asks for FSDP version 1; tunesmith trains "
                            "with FSDP2: set fsdp_config.fsdp_version: 2 (see "
                            "examples/accelerate/fsdp-1node.yaml)")
    return True


def wrap_layers_of(accelerator: Any, model: nn.Module) -> None:
    """Shard each decoder layer as its own unit unless the config names the layer classes.

    Accelerate takes the classes from the prepared module's ``_no_split_modules``; the module it
    prepares is the objective wrapping the model, which has none, and would then gather the
    whole model at once in every forward.
    """
    plugin = accelerator.state.fsdp_plugin
    layers = getattr(model, "_no_split_modules", None)
    if plugin.transformer_cls_names_to_wrap is None and layers:
        plugin.transformer_cls_names_to_wrap = list(layers)


def max_passes(accelerator: Any, n: int) -> int:
    """The most passes any process runs this step (a collective: every process calls it)."""
    count = torch.tensor([n], dtype=torch.long, device=accelerator.device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def reshard_all(root: nn.Module) -> None:
    """Put every FSDP unit back to its shards (no communication). The root keeps its full
    parameters after a forward; weights copied in then would be dropped at the next reshard."""
    from torch.distributed.fsdp import FSDPModule

    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.full_tensor() if isinstance(p, DTensor) else p


def gathered_trainable(model: nn.Module, *, keep: bool) -> dict[str, torch.Tensor]:
    """The full trainable weights by name, on CPU where ``keep`` (the writing process), empty
    elsewhere. A collective: every process calls it, parameter by parameter, so only one full
    tensor at a time is on the device."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = _full(p.detach())
            if keep:
                out[name] = full.to("cpu", copy=True)
    return out


def _options(*, cpu_offload: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def gathered_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer
                             ) -> dict[str, Any]:
    """The optimiser state as full tensors keyed by parameter name, on the main process only
    (empty elsewhere). A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not _inner(optimizer).state:
        # before the first step: torch would create the state with a zero-lr step, which counts
        # as a step for Adam's bias correction and so changes every later update
        return {"state": {}, "param_groups": []}
    return get_optimizer_state_dict(module, _inner(optimizer), options=_options(cpu_offload=True))


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    """Load a gathered optimiser state (every process holds it); each keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not state.get("state"):
        return  # saved before the first step: the fresh optimiser is that state
    set_optimizer_state_dict(module, _inner(optimizer), state,
                             options=_options(cpu_offload=False))


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the real one


def unshard(root: nn.Module) -> None:
    """Turn a module Accelerate sharded with FSDP2 back into a plain one, in place: every
    process gathers the full parameters (shared ones once, so tied weights stay tied) and the
    FSDP hooks and classes are removed. A collective.

    ``fully_shard`` has no inverse in torch; this undoes what it does (an ``FSDP<Class>``
    subclass swapped in, forward hooks, DTensor parameters) and fails loudly if a future
    torch changes that.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    reshard_all(root)
    done: dict[int, nn.Parameter] = {}
    for module in root.modules():
        for name, p in list(module._parameters.items()):
            if p is None or (id(p) not in done and not isinstance(p, DTensor)):
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(p.detach().full_tensor(),
                                           requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for handle in {id(h): h for h in (getattr(state, "_pre_forward_hook_handle", None),
                                          getattr(state, "_post_forward_hook_handle", None))
                       if h is not None}.values():
            handle.remove()
        plain = [c for c in type(module).__bases__ if not issubclass(c, FSDPModule)]
        if len(plain) != 1:
            raise TrainingError(f"cannot unshard {type(module).__name__} with this torch "
                                "version; report it with your torch version")
        module.__class__ = plain[0]
