"""A model's sizes from its configuration alone: parameter counts, linear layers, LoRA adapters.

The model is built on PyTorch's ``meta`` device, so every shape is the real architecture's
(any family transformers knows) while no weight is read or allocated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import ModelError

# a module inside decoder layer i: model.layers.i..., gpt_neox.layers.i...
_IN_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer a module's qualified name lies in, or None (embeddings, heads)."""
    found = _IN_LAYER.search(name)
    return int(found.group(1)) if found else None


def decoder_linear_names(model: Any) -> list[str]:
    """The distinct short names of the linear layers inside the decoder layers (q_proj, ...):
    what 'all-linear' adapts, as the list of names PEFT needs to adapt some layers only."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and layer_index(name) is not None})


@dataclass(frozen=True)
class Linear:
    name: str  # the module's qualified name, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShape:
    """What a memory estimate needs to know of a decoder-only model."""

    n_params: int  # distinct parameters (a tied head is counted once)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linears: tuple[Linear, ...]  # every linear layer except the LM head


def load_model_config(path: Path) -> Any:
    """The transformers config of a model directory, or of a GGUF file (its metadata only)."""
    from transformers import AutoConfig

    try:
        if path.suffix == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # transformers raises many kinds here
        raise ModelError(f"{path}: cannot read the model's configuration ({err})") from err


def model_shape(config: Any) -> ModelShape:
    """Sizes of the causal LM ``config`` describes, from a weightless (meta-device) copy."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:
        raise ModelError(f"cannot build the model from its configuration ({err})") from err
    head = model.get_output_embeddings()
    linears = tuple(Linear(name, m.in_features, m.out_features)
                    for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    text = config.get_text_config()
    hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
    return ModelShape(
        n_params=sum(p.numel() for p in model.parameters()),
        layers=int(text.num_hidden_layers), hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        vocab=int(text.vocab_size), linears=linears)


def lora_targets(shape: ModelShape, target_modules: list[str] | str,
                 layers: Sequence[int] | None = None) -> list[Linear]:
    """The linear layers PEFT puts adapters on: 'all-linear' is every linear layer but the LM
    head; a list of names matches a module whose name is one of them or ends in '.' + one;
    ``layers`` (negative: from the top) keeps those inside these decoder layers only."""
    if target_modules == "all-linear":
        found = list(shape.linears)
    else:
        names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        found = [lin for lin in shape.linears
                 if any(lin.name == t or lin.name.endswith("." + t) for t in names)]
    if layers is None:
        return found
    keep = {i % shape.layers for i in layers}
    return [lin for lin in found if layer_index(lin.name) in keep]


def lora_parameters(targets: list[Linear], r: int) -> int:
    """Adapter parameters: A (in x r) and B (r x out) per adapted linear layer."""
    return sum(r * (lin.in_features + lin.out_features) for lin in targets)
