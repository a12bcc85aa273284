"""RMSNorm and LoRA linear layers as single autograd functions, for training on the CPU.

On the CPU a LoRA step of a small model is, besides its matrix products, many small
operations, each with its own dispatch, allocation and autograd node. Two layers make many of
them:

- **RMSNorm** (Llama's: ``weight * (x * rsqrt(mean(x**2) + eps))`` in fp32, cast back before
  the weight): about ten operations forward and twenty in autograd's backward.
  ``_RMSNorm`` computes the same forward (bit for bit; checked against the module's own
  forward before it is swapped in) and writes the backward out: ``dx = r * (g - x_hat *
  mean(g * x_hat))`` with ``g = dy * weight``, seven operations. Only for frozen weights
  (LoRA): a trained norm weight keeps the module's own forward.
- **LoRA linear** (PEFT's ``lora.Linear``: ``base(x) + lora_B(lora_A(dropout(x))) * s``):
  base product, two adapter products, the scaling and the sum, each a node, and under
  autocast a cast per weight. ``_LoraLinear`` does the sum inside the base output's product
  (``addmm_`` of the rank-r side, scaled, onto the base output: the scaling on ``r`` columns
  instead of ``out``) and writes the backward as its five products. The dropout stays PEFT's
  module (``models.lora_dropout``), so adapters reading one tensor still share one dropped copy
  and its backward runs once on their summed gradient.

Measured in the training loop on the bundled model (docs/benchmarks.md, "Training speed"):
each pass's forward and backward with both switched on against off, in turn in one process,
1.042x (median of 16 pairs; the norm alone 1.013x, the LoRA layer alone 1.020x). Written by
hand because neither PyTorch nor PEFT has a fused CPU RMSNorm or LoRA layer, and transformers'
kernel hub has none for the CPU (and would fetch its kernels at run time).

``use_fused_layers`` swaps them into a model (instance ``forward``, so nothing is saved with
the model). Every call checks that the fused path computes what the module would: anything
else (a trained norm or base weight, a bias on an adapter, DoRA and other variants, merged or
disabled adapters, several active adapters, quantised base layers, hooks on the layers such as
Opacus' per-example gradients, no gradient wanted, another device) runs the module's own
forward unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32, copy=True)  # a fresh fp32 tensor to work in, whatever x is
        r = xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        ctx.save_for_backward(x, r, weight)
        return xf.mul_(r).to(x.dtype).mul_(weight)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        x, r, weight = ctx.saved_tensors
        g = (dy * weight).float()
        x_hat = x.to(torch.float32, copy=True).mul_(r)
        m = (g * x_hat).mean(-1, keepdim=True)
        return g.sub_(x_hat.mul_(m)).mul_(r).to(x.dtype), None, None


def _norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if (not torch.is_grad_enabled() or w.requires_grad or x.dtype != w.dtype
            or x.device.type != "cpu"):
        return type(self).forward(self, x)
    with torch.autocast("cpu", enabled=False):  # none of its operations autocasts anyway
        return _RMSNorm.apply(x, w, self._fused_eps)


def _is_llama_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an RMSNorm that computes what ``_RMSNorm`` does: tried on a probe
    input against its own forward (Gemma's ``1 + weight`` or a norm without a weight differ)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 \
            or not isinstance(eps, (int, float)) \
            or not weight.is_floating_point() or weight.device.type != "cpu":
        return False
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(3, weight.shape[0], generator=gen).to(weight.dtype)
    with torch.no_grad():
        own = type(module).forward(module, probe)
        fused = _RMSNorm.apply(probe, weight.detach(), float(eps))
    if own.dtype != fused.dtype or not torch.equal(own, fused):
        return False
    module._fused_eps = float(eps)
    return True


class _LoraLinear(torch.autograd.Function):
    """``x @ W^T (+ bias) + s * (xd @ A^T) @ B^T`` in ``dtype``; ``x`` feeds the frozen base,
    ``xd`` (its dropped copy) the adapter. Gradients for ``x``, ``xd``, ``A`` and ``B``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, xd: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scaling: float,
                dtype: torch.dtype) -> torch.Tensor:
        w_, a_, b_ = weight.to(dtype), a.to(dtype), b.to(dtype)
        xd_ = xd.to(dtype)
        h = xd_ @ a_.t()
        out = F.linear(x.to(dtype), w_, None if bias is None else bias.to(dtype))
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b_.t(), alpha=scaling)
        ctx.save_for_backward(xd_, h, w_, a_, b_)
        ctx.scaling = scaling
        ctx.dtypes = (x.dtype, xd.dtype, a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xd_, h, w_, a_, b_ = ctx.saved_tensors
        x_dtype, xd_dtype, a_dtype, b_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        lead = dy.shape[:-1]
        dy2 = dy.to(w_.dtype).reshape(-1, dy.shape[-1])
        dx = (dy2 @ w_).view(*lead, w_.shape[1]).to(x_dtype) if need[0] else None
        g = (dy2 @ b_).mul_(ctx.scaling)  # gradient of s * h: [tokens, r]
        dxd = (g @ a_).view(*lead, a_.shape[1]).to(xd_dtype) if need[1] else None
        da = (g.t() @ xd_.reshape(-1, xd_.shape[-1])).to(a_dtype) if need[4] else None
        db = None
        if need[5]:
            db = (dy2.t() @ h.reshape(-1, h.shape[-1])).mul_(ctx.scaling).to(b_dtype)
        return dx, dxd, None, None, da, db, None, None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _lora_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged
            or not torch.is_grad_enabled() or x.device.type != "cpu"
            or name not in self.lora_A or name in self.lora_variant):
        return type(self).forward(self, x, *args, **kwargs)
    base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
    dropout = self.lora_dropout[name]
    if (type(base) is not nn.Linear or type(lora_a) is not nn.Linear
            or type(lora_b) is not nn.Linear or lora_a.bias is not None
            or lora_b.bias is not None or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            or any(_hooked(m) for m in (base, lora_a, lora_b, dropout))):
        return type(self).forward(self, x, *args, **kwargs)
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    elif x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype:
        dtype = x.dtype
    else:  # PEFT casts between dtypes here: its own forward
        return type(self).forward(self, x, *args, **kwargs)
    xd = dropout(x)
    with torch.autocast("cpu", enabled=False):
        return _LoraLinear.apply(x, xd, base.weight, base.bias, lora_a.weight, lora_b.weight,
                                 float(self.scaling[name]), dtype)


def use_fused_layers(model: nn.Module) -> int:
    """Swap ``_RMSNorm`` into every Llama-style RMSNorm of ``model`` and ``_LoraLinear`` into
    every PEFT ``lora.Linear``; returns how many modules now have the fused forward. Each call
    still falls back to the module's own forward where the fused one would differ (see the
    module). A copy of the model (``copy.deepcopy``) keeps the swap, bound to the copy."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLinear = ()  # type: ignore[assignment,misc]
    swapped = 0
    for module in model.modules():
        if "forward" in module.__dict__:
            continue  # already swapped, or someone else's instance forward
        if isinstance(module, LoraLinear):
            module.forward = types.MethodType(_lora_forward, module)
        elif type(module).__name__.endswith("RMSNorm") and _is_llama_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
        else:
            continue
        swapped += 1
    return swapped


def restore_layers(model: nn.Module) -> int:
    """Undo ``use_fused_layers``: the modules' own forwards again; returns how many."""
    restored = 0
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ in (_lora_forward,
                                                                          _norm_forward):
            del module.forward
            restored += 1
    return restored
