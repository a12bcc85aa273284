"""Text features from a causal LM: the mean of one layer's hidden states over each text's tokens.

Used by the label-issue probe (``tunesmith.flows.label_issues``): a linear classifier on these
features is a cheap, model-aware stand-in for the fine-tune, so its out-of-sample confidence
can point at labels that disagree with the text.

Only the first ``layer`` decoder blocks run: a forward hook on block ``layer`` keeps its output
and stops the forward pass there, so a middle layer costs a fraction of the whole model and no
vocabulary projection is computed. (``output_hidden_states=True`` would run every block and
the LM head; transformers has no "stop at layer k" option.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from tunesmith.errors import ModelError
from tunesmith.models.generation import pad_batch

__all__ = ["decoder_layers", "embed_texts"]


class _Reached(Exception):
    """Raised by the hook once the wanted block has run, to skip the rest of the model."""


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    """The decoder blocks of a Hugging Face causal LM (Llama, Qwen, Mistral, Phi, GPT-2 ...)."""
    inner = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    for name in ("layers", "h", "blocks"):
        blocks = getattr(inner, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks
    raise ModelError(f"{type(model).__name__}: cannot find its decoder blocks (looked for "
                     "model.layers, transformer.h, blocks); pass a Hugging Face causal LM")


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length (shortest first) so each padded batch holds ~batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and lengths[i] * (len(current) + 1) > batch_tokens:
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


@torch.inference_mode()
def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, layer: int | None = None,
                max_tokens: int = 256, batch_tokens: int = 8192,
                advance: Callable[[int], None] | None = None) -> np.ndarray:
    """``[len(texts), hidden]`` float32: block ``layer``'s output (1-based; default: the
    middle block), averaged over each text's first ``max_tokens`` tokens.

    Middle layers are the usual choice for linear probes: the last blocks specialise in
    predicting the next token. ``advance(n)`` is called after each batch of n texts.
    """
    blocks = decoder_layers(model)
    depth = len(blocks)
    layer = layer if layer is not None else max(1, depth // 2)
    if not 1 <= layer <= depth:
        raise ModelError(f"layer {layer}: the model has {depth} decoder blocks (1..{depth})")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] or
           [tokenizer.pad_token_id] for t in texts]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    caught: dict[str, torch.Tensor] = {}

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        caught["h"] = output[0] if isinstance(output, tuple) else output
        raise _Reached

    was_training = model.training
    model.eval()
    handle = blocks[layer - 1].register_forward_hook(hook)
    device = next(model.parameters()).device
    try:
        for batch in _batches([len(x) for x in ids], batch_tokens):
            padded = pad_batch([ids[i] for i in batch], pad_id=tokenizer.pad_token_id,
                               side="right")
            mask = padded.attention_mask.to(device)
            with contextlib.suppress(_Reached):
                model(input_ids=padded.input_ids.to(device), attention_mask=mask,
                      use_cache=False)
            h = caught.pop("h").float()
            weights = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1)
            out[batch] = pooled.cpu().numpy()
            if advance is not None:
                advance(len(batch))
    finally:
        handle.remove()
        model.train(was_training)
    return out
