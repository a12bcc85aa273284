"""Mixed precision: frozen weights in bf16, trainable weights in fp32, bf16 autocast."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def bf16_native(device: torch.device) -> bool:
    """Whether the device computes bf16 matmuls natively (otherwise bf16 is emulated, slow)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool((check and check()) or (amx and amx()))
    return False


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return choice


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast frozen floating-point weights to ``dtype``; trainable ones stay in fp32."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
    for name, buf in model.named_buffers():
        # rotary inverse frequencies stay fp32: positions need the precision
        if buf.is_floating_point() and "inv_freq" not in name:
            buf.data = buf.data.to(dtype)


def autocast(precision: str, device: torch.device, model: torch.nn.Module | None = None
             ) -> Any:
    """bf16 autocast where ``precision`` is bf16, else nothing.

    PEFT casts each adapter's input to the adapters' dtype (fp32 here) before its dropout and
    ``lora_A``, and autocast casts it straight back to bf16 for the product: two copies per
    adapter and a dropout in fp32, for a result autocast rounds to bf16 anyway. Under autocast
    that cast is switched off for ``model``'s adapters (PEFT's own switch), so the adapters read
    the bf16 input itself, and adapters reading the same tensor can share its dropout
    (``models.lora_dropout``). Outside autocast PEFT's cast stays: there it matches dtypes."""
    if precision != "bf16":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
    if model is not None:
        from peft.helpers import disable_input_dtype_casting

        stack.enter_context(disable_input_dtype_casting(model))
    return stack


def load_dtype(choice: str, *, precision: str, method: str, device: torch.device) -> str:
    """The dtype to load base weights in: bf16 straight away when they will be frozen in bf16
    (saves the fp32 copy and its peak memory), fp32 when any of them will be trained."""
    if choice != "auto":
        return choice
    bf16 = resolve_precision(precision, device) == "bf16"
    return "bfloat16" if bf16 and method == "lora" else "float32"
