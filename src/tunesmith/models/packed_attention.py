"""Attention for packed rows on CPU: each sequence on its own, grouped by length, in fp32.

A packed row holds several sequences (``position_ids`` restart at each); transformers turns
that into a block-diagonal causal mask over the whole row and hands it to PyTorch's SDPA. On
CPU the flash kernel then computes every block of the ``row x row`` square, masked or not,
and its bf16 backward is slow for short sequences: on the bundled model (256-token rows of
about four sequences each), attention took over a quarter of a LoRA training step (measured by
taking it away), for well under 1% of its arithmetic.

``packed_sdpa`` attends within each sequence instead: sequences of similar length (rounded
up to ``WIDTH_MULTIPLE`` tokens) are gathered into one batch and run through SDPA with
``is_causal``, in fp32 (on CPU the fp32 kernels are 2-2.5x faster than bf16 at these lengths,
and no less exact), and the outputs are put back in row order. A sequence's padding slots
repeat its last token; being after every real position they are never attended to, and their
outputs are dropped. The result is what the masked kernel computes, in fp32. Where the flash
kernel takes the heads (equal head sizes), the gathers and the kernel calls are one autograd
function (``_SequenceFlash``) whose backward puts the gradients back with one gather a tensor.

It is registered with transformers' ``AttentionInterface`` as ``NAME`` and reads the packing
from the kwargs transformers' flash-attention path already uses for packed sequences
(``cu_seq_lens_q``, ``max_length_q``; ``packed_kwargs`` makes them from ``position_ids``).
Any call it does not cover (no such kwargs, not on CPU, a KV cache, attention dropout,
sliding windows, soft-capping, attention sinks) goes to transformers' own SDPA function
unchanged, so a model switched to it (``use_packed_attention``) generates and evaluates as
before. Written by hand because neither PyTorch nor transformers has a CPU kernel for
variable-length attention.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.import_utils import is_torch_greater_or_equal

from tunesmith.models.load import unwrap

log = logging.getLogger("tunesmith")
_GQA = is_torch_greater_or_equal("2.5")  # SDPA's enable_gqa

NAME = "tunesmith_packed_sdpa"
WIDTH_MULTIPLE = 16  # padding vs number of SDPA calls: 8 and 16 measured best (docs/benchmarks.md)



def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    global _sdpa
    _sdpa = sdpa_attention_forward
    AttentionInterface.register(NAME, packed_sdpa)
    # calls that fall back to SDPA need SDPA's mask
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


_sdpa: Any = None


def use_packed_attention(model: nn.Module) -> bool:
    """Switch a transformers ``model`` (or a PEFT model around one) that attends with SDPA to
    ``packed_sdpa``; returns whether it did. Other implementations (eager, flash-attention)
    and models whose attention transformers cannot swap are left as they are. The switch is
    not saved with the model (transformers never writes it to ``config.json``)."""
    lm = unwrap(model)
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    if not getattr(lm, "_supports_attention_backend", False):
        return False
    if config._attn_implementation != NAME:
        try:
            _register()
            lm.set_attn_implementation(NAME)
        except (ImportError, ValueError) as err:  # a transformers without custom attention
            log.info("packed rows keep transformers' masked SDPA: %s", err)
            return False
    return config._attn_implementation == NAME


def attends_by_sequence(model: Any) -> bool:
    """Whether packed rows of ``model`` (or a PEFT model around one) attend sequence by
    sequence: it uses ``packed_sdpa`` and sits on the CPU, where that is what runs. The cost
    of a row then no longer grows with its width squared, so a pass may lay all its sequences
    end to end in one row, padded only at its end (``training.objectives.encoded_passes``)."""
    lm = unwrap(model)
    if getattr(getattr(lm, "config", None), "_attn_implementation", None) != NAME:
        return False
    first = next(lm.parameters(), None)
    return first is not None and first.device.type == "cpu"


def packed_kwargs(model: Any, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None) -> dict[str, Any]:
    """For packed rows (``position_ids``, no mask) of a model using ``packed_sdpa``: the
    sequences' boundaries in transformers' flash-attention kwargs, over the flattened rows.
    A sequence starts at each row's start and wherever the position does not follow the one
    before (transformers' own rule for packed rows). Empty for anything else."""
    config = getattr(model, "config", None)
    if attention_mask is not None or position_ids is None or position_ids.dim() != 2 \
            or getattr(config, "_attn_implementation", None) != NAME:
        return {}
    pos = position_ids
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    first = starts.flatten().nonzero().flatten()
    cu = torch.cat([first, first.new_tensor([pos.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
            "max_length_k": longest}


class _Plan:
    """Where each sequence's tokens go. Sequences are grouped by width; ``index`` is the flat
    token index of every group's slots ``[sequences * width]``, end to end, ``spans`` each
    group's first slot, sequences and width there; ``slot_of`` is every token's slot, and
    ``source`` is ``index`` with each padding slot pointing one past the last token (a zero
    row, for gradients)."""

    def __init__(self, cu: torch.Tensor) -> None:
        bounds = cu.tolist()
        groups: dict[int, list[tuple[int, int]]] = {}
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            width = -(-(end - start) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
            groups.setdefault(width, []).append((start, end))
        indexes: list[torch.Tensor] = []
        self.spans: list[tuple[int, int, int]] = []
        slot_of = torch.empty(bounds[-1], dtype=torch.long)
        offset = 0
        for width, spans in sorted(groups.items()):
            index = torch.empty(len(spans), width, dtype=torch.long)
            for row, (start, end) in enumerate(spans):
                n = end - start
                index[row, :n] = torch.arange(start, end)
                index[row, n:] = end - 1  # padding slots: the last token again, never attended
                slot_of[start:end] = offset + row * width + torch.arange(n)
            indexes.append(index.flatten())
            self.spans.append((offset, len(spans), width))
            offset += len(spans) * width
        self.slot_of = slot_of
        self.index = torch.cat(indexes)
        self.source = torch.full_like(self.index, bounds[-1])
        self.source[slot_of] = torch.arange(bounds[-1])


_last: tuple[weakref.ref[torch.Tensor], _Plan] | None = None


def _plan(cu: torch.Tensor) -> _Plan:
    """The plan for ``cu``, made once per forward pass: every layer gets the same tensor."""
    global _last
    if _last is not None and _last[0]() is cu:
        return _last[1]
    plan = _Plan(cu)
    _last = (weakref.ref(cu), plan)
    return plan


def _covered(module: nn.Module, query: torch.Tensor, key: torch.Tensor, dropout: float,
             kwargs: dict[str, Any]) -> bool:
    cu = kwargs.get("cu_seq_lens_q")
    return (cu is not None and query.device.type == "cpu" and dropout == 0
            and query.shape[2] == key.shape[2] and int(cu[-1]) == query.shape[0] * query.shape[2]
            and kwargs.get("sliding_window") is None and getattr(module, "sliding_window", None)
            is None and not kwargs.get("softcap") and kwargs.get("s_aux") is None
            and getattr(module, "sinks", None) is None and getattr(module, "is_causal", True))


def packed_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attention_mask: torch.Tensor | None,
                dropout: float = 0.0, scaling: float | None = None, **kwargs: Any
                ) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``[batch, heads, len, dim]``,
    ``key``/``value`` ``[batch, kv_heads, len, dim]``; returns ``[batch, len, heads, dim]``."""
    if not _covered(module, query, key, dropout, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout,
                     scaling=scaling, **kwargs)
    plan = _plan(kwargs["cu_seq_lens_q"])
    batch, heads, length, dim = query.shape
    kv_heads, v_dim = key.shape[1], value.shape[-1]  # values may be narrower or wider
    with torch.autocast(device_type="cpu", enabled=False):
        flat_q = query.transpose(1, 2).reshape(batch * length, heads, dim)
        flat_k = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
        flat_v = value.transpose(1, 2).reshape(batch * length, kv_heads, v_dim)
        # the flash kernel takes equal head sizes (SDPA runs others by its math backend)
        if _FLASH is not None and v_dim == dim and (kv_heads == heads or _GQA):
            out = _SequenceFlash.apply(flat_q, flat_k, flat_v, plan, scaling)
            return out.view(batch, length, heads, v_dim), None
        gathered = [t.float().index_select(0, plan.index) for t in (flat_q, flat_k, flat_v)]
        outs = []
        for start, n, width in plan.spans:
            q, k, v = (_group(t, start, n, width) for t in gathered)
            extra = {}
            if kv_heads != heads and _GQA:
                extra = {"enable_gqa": True}
            elif kv_heads != heads:  # torch < 2.5: no enable_gqa
                k = k.repeat_interleave(heads // kv_heads, dim=1)
                v = v.repeat_interleave(heads // kv_heads, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, **extra)
            outs.append(out)
        out = _ungroup(outs).index_select(0, plan.slot_of)
    return out.view(batch, length, heads, v_dim).to(query.dtype), None


# The CPU flash kernel SDPA calls, and its backward (what SDPA's autograd formula calls)
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten,
                          "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _SequenceFlash(torch.autograd.Function):
    """Each sequence of the flat tokens ``q``, ``k``, ``v`` (``[tokens, heads, dim]``) attends
    to itself, causally, in fp32, by the CPU flash kernel, one call per width group; returns
    ``[tokens, heads, v_dim]`` in ``q``'s dtype. The same as SDPA over ``index_select``-ed
    groups, but its gathers go through autograd as one ``index_select`` each way: autograd's
    backward of a gather per group and tensor zeroes a whole tensor and adds into it, then
    sums the groups. The backward puts each group's gradients back with one gather: padding
    slots' gradients are zero (their outputs are dropped, so nothing flows back from them, and
    no real token attends to them), so a token's gradient is that of its one real slot."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan,
                scale: float | None) -> torch.Tensor:
        gathered = [t.index_select(0, plan.index).float() for t in (q, k, v)]
        outs, lses = [], []
        for start, n, width in plan.spans:
            out, lse = _FLASH(*(_group(t, start, n, width) for t in gathered), 0.0, True,
                              scale=scale)
            outs.append(out)
            lses.append(lse)
        ctx.save_for_backward(*gathered, *outs, *lses)
        ctx.plan, ctx.scale, ctx.dtypes = plan, scale, (q.dtype, k.dtype, v.dtype)
        return _ungroup(outs).index_select(0, plan.slot_of).to(q.dtype)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        plan = ctx.plan
        gq, gk, gv, *rest = ctx.saved_tensors
        outs, lses = rest[:len(plan.spans)], rest[len(plan.spans):]
        tokens = dout.shape[0]
        padded = dout.new_empty((tokens + 1, *dout.shape[1:]), dtype=torch.float32)
        padded[:tokens].copy_(dout)
        padded[tokens].zero_()  # what every padding slot's output gradient reads
        dslots = padded.index_select(0, plan.source)
        grads: tuple[list[torch.Tensor], ...] = ([], [], [])
        for (start, n, width), out, lse in zip(plan.spans, outs, lses, strict=True):
            parts = _FLASH_BACKWARD(_group(dslots, start, n, width),
                                    *(_group(t, start, n, width) for t in (gq, gk, gv)),
                                    out, lse, 0.0, True, scale=ctx.scale)
            for acc, part in zip(grads, parts, strict=True):
                acc.append(part)
        return (*(_ungroup(g).index_select(0, plan.slot_of).to(dtype) if need else None
                  for g, dtype, need in zip(grads, ctx.dtypes, ctx.needs_input_grad,
                                            strict=False)), None, None)


def _group(flat: torch.Tensor, start: int, n: int, width: int) -> torch.Tensor:
    """A group's slots of ``flat`` (``[slots, heads, dim]``) as ``[n, heads, width, dim]``."""
    return flat[start:start + n * width].view(n, width, *flat.shape[1:]).transpose(1, 2)


def _ungroup(parts: list[torch.Tensor]) -> torch.Tensor:
    """Groups' ``[n, heads, width, dim]`` tensors back to slots, end to end."""
    return torch.cat([p.transpose(1, 2).reshape(-1, *p.shape[1:2], p.shape[-1])
                      for p in parts])
