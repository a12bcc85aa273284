"""The fused RMSNorm and LoRA linear layers compute what the modules they replace compute."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tunesmith.models.fused_layers import restore_layers, use_fused_layers
from tunesmith.models.load import add_lora, load
from tunesmith.training.precision import autocast

FUSED = ("_lora_forward", "_norm_forward")


def _fused(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(getattr(forward, "__func__", None), "__name__", None) in FUSED


def _peft(tiny_model_dir, *, dtype="float32", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model, _ = load(tiny_model_dir, dtype=dtype)
    peft = add_lora(model, r=4, alpha=8, dropout=dropout, target_modules="all-linear")
    for module in peft.modules():  # adapters start at B = 0: give them a say
        if hasattr(module, "lora_B"):
            for b in module.lora_B.values():
                nn.init.normal_(b.weight, std=0.3)
    return peft.train()


def _loss_and_grads(peft, ids, *, bf16=False, seed=1):
    for p in peft.parameters():
        p.grad = None
    torch.manual_seed(seed)  # the same dropout draws in both runs
    with autocast("bf16" if bf16 else "fp32", torch.device("cpu"), peft):
        loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters()
                           if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp32_training_matches_peft_and_hf(tiny_model_dir, dropout):
    peft = _peft(tiny_model_dir, dropout=dropout)
    ids = torch.randint(0, 1000, (2, 24))
    loss, grads = _loss_and_grads(peft, ids)
    # 2 layers x 7 adapted linears, 2 x 2 norms and the final one
    assert use_fused_layers(peft) == 14 + 5
    assert sum(_fused(m) for m in peft.modules()) == 19
    fused_loss, fused_grads = _loss_and_grads(peft, ids)
    assert torch.allclose(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 28  # every A and B
    for name, g in grads.items():
        assert _rel(fused_grads[name], g) < 1e-5, name
    assert use_fused_layers(peft) == 0  # nothing left to swap
    assert restore_layers(peft) == 19 and not any(_fused(m) for m in peft.modules())


def test_bf16_autocast_training_matches_within_bf16_rounding(tiny_model_dir):
    ids = torch.randint(0, 1000, (2, 24))
    reference = _peft(tiny_model_dir, dtype="float32", dropout=0.1)
    ref_loss, ref_grads = _loss_and_grads(reference, ids)  # fp32 throughout
    peft = _peft(tiny_model_dir, dtype="bfloat16", dropout=0.1)
    loss, grads = _loss_and_grads(peft, ids, bf16=True)
    use_fused_layers(peft)
    fused_loss, fused_grads = _loss_and_grads(peft, ids, bf16=True)
    # the fused layers are no further from the fp32 result than PEFT's own bf16 path
    assert abs(fused_loss - ref_loss) <= 2 * abs(loss - ref_loss) + 2e-3
    for name, g in ref_grads.items():
        assert _rel(fused_grads[name], g) <= 2 * _rel(grads[name], g) + 1e-2, name
        assert fused_grads[name].dtype == torch.float32  # the adapters stay fp32


def test_norms_that_compute_otherwise_keep_their_forward(tiny_family_dir):
    class OnePlusWeight(nn.Module):  # Gemma's RMSNorm scales by 1 + weight
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.randn(8)), 1e-6

        def forward(self, x):
            r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return ((x.float() * r) * (1.0 + self.weight.float())).to(x.dtype)

    assert use_fused_layers(nn.Sequential(OnePlusWeight())) == 0
    gemma, _ = load(tiny_family_dir("gemma3"))
    assert use_fused_layers(gemma) == 0
    qwen, _ = load(tiny_family_dir("qwen2"))  # Llama's norm under another name: swapped
    assert use_fused_layers(qwen) == 2 * 2 + 1


def test_each_call_falls_back_where_the_fused_path_would_differ(tiny_model_dir):
    peft = _peft(tiny_model_dir)
    use_fused_layers(peft)
    layer = next(m for n, m in peft.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    x = torch.randn(2, 5, 64, requires_grad=True)
    fused = layer(x)
    restore_layers(peft)
    own = layer(x)
    use_fused_layers(peft)
    assert torch.allclose(fused, own, atol=1e-6)
    assert fused.grad_fn.name().endswith("_LoraLinearBackward")

    seen = []  # hooks (Opacus' per-example gradients hook lora_A/lora_B): PEFT's path
    handle = layer.lora_A["default"].register_forward_hook(lambda *a: seen.append(1))
    assert not layer(x).grad_fn.name().endswith("_LoraLinearBackward") and seen == [1]
    handle.remove()
    with torch.no_grad():  # evaluation and generation: PEFT's own forward
        assert torch.equal(layer(x), own.detach())
    with peft.disable_adapter():
        assert torch.equal(layer(x), layer.base_layer(x))
    layer.base_layer.weight.requires_grad_(True)  # a trained base weight
    assert layer(x).grad_fn.name() == "AddBackward0"
    layer.base_layer.weight.requires_grad_(False)

    norm = next(m for n, m in peft.named_modules() if n.endswith("layers.0.input_layernorm"))
    h = torch.randn(3, 64, requires_grad=True)
    assert norm(h).grad_fn.name().endswith("_RMSNormBackward")
    norm.weight.requires_grad_(True)  # a trained norm (full fine-tuning)
    assert not norm(h).grad_fn.name().endswith("_RMSNormBackward")


def test_a_copy_keeps_the_swap_bound_to_itself(tiny_model_dir):
    peft = _peft(tiny_model_dir)
    use_fused_layers(peft)
    twin = copy.deepcopy(peft)
    q = next(m for n, m in twin.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    assert _fused(q) and q.forward.__self__ is q
    with torch.no_grad():
        q.lora_B["default"].weight.zero_()  # the copy's adapter, not the original's
    ids = torch.randint(0, 1000, (1, 8))
    assert not torch.equal(twin(input_ids=ids).logits, peft(input_ids=ids).logits)
