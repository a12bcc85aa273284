"""RMSNorm, LoRA linear layers and the rotary embedding as single autograd functions, for
training on the CPU.

On the CPU a LoRA step of a small model is, besides its matrix products, many small
operations, each with its own dispatch, allocation and autograd node. Three layers make many of
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
  instead of ``out``) and writes the backward as its five products. The dropout's draws stay
  ``FastDropout``'s (``models.lora_dropout``: adapters reading one tensor still share one
  dropped copy), but its backward is done inside the layer's: the adapter's share of the
  input's gradient is zeroed where dropped and the base's share added onto it in one
  ``addmm_``, which saves a gradient per dropped copy, a scaled copy of it and two sums.
- **Rotary embedding** (transformers' ``apply_rotary_pos_emb``: ``q * cos + rotate_half(q) *
  sin`` and the same for ``k``: slices, a negation, a concatenation, two products and a sum
  each, forward and backward). ``_Rope`` writes each half as one product and one ``addcmul_``
  and its backward as the inverse rotation. It goes where transformers lets the rotary
  function be replaced per attention module (``kernels.kernelize``'s hook), and only where it
  computes Llama's rotation (tried on a probe input) with ``cos`` and ``sin`` whose two halves
  are equal (checked once per forward pass).

Measured in the training loop on the bundled model (docs/benchmarks.md, "Training speed"):
each pass's forward and backward with a change switched on against off, in turn in one
process: the norm and LoRA layer together 1.042x (median of 16 pairs; the norm alone 1.013x,
the LoRA layer alone 1.020x); then the dropout's backward folded in 1.014x, the rotary
embedding 1.021x. Written by hand because neither PyTorch nor PEFT has a fused CPU RMSNorm,
LoRA layer or rotary embedding, and transformers' kernel hub has none for the CPU (and would
fetch its kernels at run time).

``use_fused_layers`` swaps them into a model (instance ``forward``, so nothing is saved with
the model). Every call checks that the fused path computes what the module would: anything
else (a trained norm or base weight, a bias on an adapter, DoRA and other variants, merged or
disabled adapters, several active adapters, quantised base layers, hooks on the layers such as
Opacus' per-example gradients, no gradient wanted, another device, another layout of the
rotary embedding's inputs) runs the module's own forward unchanged.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.models.lora_dropout import FastDropout


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
    ``xd`` (its dropped copy) the adapter. Gradients for ``x``, ``A`` and ``B``, and for
    ``xd`` where ``drop_scale`` is ``None``. Otherwise ``xd`` was made outside autograd
    (``FastDropout.detached``: ``x`` scaled by ``drop_scale``, zero at the flat ``positions``)
    and the dropout's backward is done here: the adapter's share of ``x``'s gradient is
    zeroed at ``positions`` and the base's added onto it with one ``addmm_``, instead of a
    gradient for ``xd``, autograd's sum of those of every adapter reading it, a scaled copy
    and one more sum into ``x``'s."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, xd: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, scaling: float,
                dtype: torch.dtype, positions: torch.Tensor | None = None,
                drop_scale: float | None = None) -> torch.Tensor:
        w_, a_, b_ = weight.to(dtype), a.to(dtype), b.to(dtype)
        xd_ = xd.to(dtype)
        h = xd_ @ a_.t()
        out = F.linear(x.to(dtype), w_, None if bias is None else bias.to(dtype))
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b_.t(), alpha=scaling)
        ctx.save_for_backward(xd_, h, w_, a_, b_, positions)
        ctx.scaling, ctx.drop_scale = scaling, drop_scale
        ctx.dtypes = (x.dtype, xd.dtype, a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xd_, h, w_, a_, b_, positions = ctx.saved_tensors
        x_dtype, xd_dtype, a_dtype, b_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        lead = dy.shape[:-1]
        dy2 = dy.to(w_.dtype).reshape(-1, dy.shape[-1])
        g = (dy2 @ b_).mul_(ctx.scaling)  # gradient of s * h: [tokens, r]
        dx = dxd = None
        if ctx.drop_scale is None:
            dx = (dy2 @ w_).view(*lead, w_.shape[1]).to(x_dtype) if need[0] else None
            dxd = (g @ a_).view(*lead, a_.shape[1]).to(xd_dtype) if need[1] else None
        elif need[0]:
            # the dropout's backward on the adapter's share (scale on the rank side), then
            # the base's share added in the same product
            t = (g * ctx.drop_scale if ctx.drop_scale != 1 else g) @ a_
            if positions is not None:
                t.view(-1).index_fill_(0, positions.long(), 0)
            dx = t.addmm_(dy2, w_).view(*lead, w_.shape[1]).to(x_dtype)
        da = (g.t() @ xd_.reshape(-1, xd_.shape[-1])).to(a_dtype) if need[4] else None
        db = None
        if need[5]:
            db = (dy2.t() @ h.reshape(-1, h.shape[-1])).mul_(ctx.scaling).to(b_dtype)
        return dx, dxd, None, None, da, db, None, None, None, None


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
    # the dropout's backward folded into the layer's where the dropout allows it
    dropped = _dropped(dropout, x)
    xd, positions, drop_scale = (dropout(x), None, None) if dropped is None else dropped
    with torch.autocast("cpu", enabled=False):
        return _LoraLinear.apply(x, xd, base.weight, base.bias, lora_a.weight, lora_b.weight,
                                 float(self.scaling[name]), dtype, positions, drop_scale)


def _dropped(dropout: nn.Module, x: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """``x``'s dropped copy outside autograd, the positions dropped and the kept elements'
    scale (``FastDropout.detached``), or ``None`` where the dropout must run as a module
    (any other kind of dropout)."""
    if type(dropout) is nn.Identity:
        return x.detach(), None, 1.0
    if type(dropout) is FastDropout:
        return dropout.detached(x)
    return None


class _Rope(torch.autograd.Function):
    """Llama's rotary embedding of ``q`` and ``k`` (``[batch, heads, len, dim]``): with
    ``c``/``s`` the first halves of ``cos``/``sin`` (their two halves are equal),
    ``(q1 c - q2 s, q2 c + q1 s)``, each half one product and one ``addcmul_`` written into
    the output (rounded once where transformers' rounds twice); the backward is the inverse
    rotation, and nothing but ``c`` and ``s`` is kept for it."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, s: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(c, s)
        return _rotate(q, c, s, 1), _rotate(k, c, s, 1)

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor, dk: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c, s = ctx.saved_tensors
        return _rotate(dq, c, s, -1), _rotate(dk, c, s, -1), None, None


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, sign: int) -> torch.Tensor:
    """``(x1 c - sign x2 s, x2 c + sign x1 s)``, laid out as ``x`` (transformers' layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c, out=o1).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=o2).addcmul_(x1, s, value=sign)
    return out


_ROPE_KEY = "rotary_pos_emb"  # the kernel layer name transformers gives the rotary function
_halves: tuple[Any, Any, torch.Tensor, torch.Tensor] | None = None


def _rope_halves(cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first halves of ``cos`` and ``sin`` ready to broadcast over heads, or ``None`` if
    their halves differ; worked out once per forward pass (every layer gets the same two)."""
    global _halves
    if _halves is not None and _halves[0]() is cos and _halves[1]() is sin:
        return _halves[2], _halves[3]
    half = cos.shape[-1] // 2
    if not (torch.equal(cos[..., :half], cos[..., half:])
            and torch.equal(sin[..., :half], sin[..., half:])):
        return None
    c, s = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    _halves = (weakref.ref(cos), weakref.ref(sin), c, s)
    return c, s


def _rope_forward(self: nn.Module, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
    if (not torch.is_grad_enabled() or unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4
            or cos.dim() != 3 or cos.shape != sin.shape or q.device.type != "cpu"
            or not q.shape[-1] == k.shape[-1] == cos.shape[-1] or q.shape[-1] % 2
            or not q.dtype == k.dtype == cos.dtype == sin.dtype):
        return type(self).forward(self, q, k, cos, sin, unsqueeze_dim)
    halves = _rope_halves(cos, sin)
    if halves is None:
        return type(self).forward(self, q, k, cos, sin, unsqueeze_dim)
    return _Rope.apply(q, k, *halves)


def _kernel_rope(module: nn.Module) -> nn.Module | None:
    """The attention's own rotary-embedding function, where transformers lets it be swapped
    per module (``kernels``' ``use_kernelized_func``: what ``kernels.kernelize`` replaces)."""
    funcs = module.__dict__.get("_kernel_funcs")
    rope = funcs.get(_ROPE_KEY) if isinstance(funcs, dict) else None
    return rope if isinstance(rope, nn.Module) else None


def _rope_of(module: nn.Module) -> nn.Module | None:
    """``_kernel_rope(module)`` where it is not swapped yet and computes Llama's rotation."""
    rope = _kernel_rope(module)
    if rope is None or "forward" in rope.__dict__ or not _is_llama_rope(rope):
        return None
    return rope


def _is_llama_rope(rope: nn.Module) -> bool:
    """Whether the rotary function ``rope`` computes Llama's rotation, tried on a probe."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 1, 5, 8, generator=gen)
    angles = torch.outer(torch.arange(5.0), torch.rand(4, generator=gen))
    cos, sin = torch.cat([angles.cos()] * 2, -1)[None], torch.cat([angles.sin()] * 2, -1)[None]
    try:
        with torch.no_grad():
            own = type(rope).forward(rope, q, k, cos, sin)
    except Exception:  # another signature: not Llama's
        return False
    half = (cos[..., :4].unsqueeze(1), sin[..., :4].unsqueeze(1))
    ours = (_rotate(q, *half, 1), _rotate(k, *half, 1))
    return isinstance(own, tuple) and len(own) == 2 and all(
        isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
        for a, b in zip(own, ours, strict=True))


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
        rope = _rope_of(module)
        if rope is not None:
            rope.forward = types.MethodType(_rope_forward, rope)
            swapped += 1
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
        rope = _kernel_rope(module)
        forward = None if rope is None else rope.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ is _rope_forward:
            del rope.forward
            restored += 1
        forward = module.__dict__.get("forward")
        if isinstance(forward, types.MethodType) and forward.__func__ in (_lora_forward,
                                                                          _norm_forward):
            del module.forward
            restored += 1
    return restored
