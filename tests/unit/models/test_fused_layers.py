"""The fused RMSNorm and LoRA linear layers compute what the modules they replace compute."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tunesmith.models.fused_layers import _rope_forward, restore_layers, use_fused_layers
from tunesmith.models.load import add_lora, load
from tunesmith.training.precision import autocast

FUSED = ("_lora_forward", "_norm_forward")


def _fused(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(getattr(forward, "__func__", None), "__name__", None) in FUSED


def _ropes(model: nn.Module) -> list[nn.Module]:
    """The attentions' own rotary functions (transformers' per-module kernel functions)."""
    return [m.__dict__["_kernel_funcs"]["rotary_pos_emb"] for m in model.modules()
            if "rotary_pos_emb" in m.__dict__.get("_kernel_funcs", {})]


def _rope_fused(model: nn.Module) -> int:
    return sum(getattr(r.__dict__.get("forward"), "__func__", None) is _rope_forward
               for r in _ropes(model))


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
    # 2 layers x 7 adapted linears, 2 x 2 norms and the final one, 2 rotary embeddings
    assert use_fused_layers(peft) == 14 + 5 + 2
    assert sum(_fused(m) for m in peft.modules()) == 19 and _rope_fused(peft) == 2
    fused_loss, fused_grads = _loss_and_grads(peft, ids)
    assert torch.allclose(fused_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 28  # every A and B
    for name, g in grads.items():
        assert _rel(fused_grads[name], g) < 1e-5, name
    assert use_fused_layers(peft) == 0  # nothing left to swap
    assert restore_layers(peft) == 21 and not any(_fused(m) for m in peft.modules())
    assert _rope_fused(peft) == 0


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
    use_fused_layers(gemma)
    assert not any(_fused(m) for m in gemma.modules())
    qwen, _ = load(tiny_family_dir("qwen2"))  # Llama's norm under another name: swapped
    use_fused_layers(qwen)
    assert sum(_fused(m) for m in qwen.modules()) == 2 * 2 + 1


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


def _graph(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        todo.extend(f for f, _ in fn.next_functions)
    return names


def test_the_dropout_backward_runs_inside_the_lora_layer(tiny_model_dir):
    peft = _peft(tiny_model_dir, dropout=0.2)
    q = next(m for n, m in peft.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    x = torch.randn(2, 5, 64, requires_grad=True)
    dy = torch.randn(2, 5, q.out_features)

    def x_grad():
        x.grad = None
        torch.manual_seed(7)  # the same drops both times
        out = q(x)
        out.backward(dy)
        return out.detach(), x.grad.clone(), _graph(out)

    own, own_grad, own_graph = x_grad()
    use_fused_layers(peft)
    fused, fused_grad, fused_graph = x_grad()
    assert "_DropAtBackward" in str(own_graph)
    assert not any("DropAt" in n for n in fused_graph)  # folded into the layer's backward
    assert torch.allclose(fused, own, atol=1e-6)
    assert torch.allclose(fused_grad, own_grad, atol=1e-6)  # zeroed where dropped, scaled
    ids = torch.randint(0, 1000, (1, 12))
    assert "_LoraLinearBackward" in _graph(peft(input_ids=ids, labels=ids).loss)


def test_rotary_embedding_matches_transformers_and_falls_back(tiny_model_dir):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = load(tiny_model_dir)
    use_fused_layers(model)
    assert _rope_fused(model) == 2
    rope, cfg = _ropes(model)[0], model.config
    heads, kv, dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.hidden_size // cfg.num_attention_heads)
    pos = torch.arange(9)[None].expand(2, 9) * 37  # long contexts: big angles
    for dtype in (torch.float32, torch.bfloat16):
        # laid out as the attention makes them: [batch, len, heads, dim] transposed
        q0 = torch.randn(2, 9, heads, dim, dtype=torch.float64).transpose(1, 2)
        k0 = torch.randn(2, 9, kv, dim, dtype=torch.float64).transpose(1, 2)
        dq, dk = torch.randn_like(q0), torch.randn_like(k0)
        cos, sin = model.model.rotary_emb(q0.to(dtype), pos)

        def run(fn, to=dtype, q0=q0, k0=k0, dq=dq, dk=dk, cos=cos, sin=sin, dtype=dtype):
            # the same inputs, rounded to dtype, computed in ``to``
            q, k = (t.to(dtype).to(to).requires_grad_() for t in (q0, k0))
            out = fn(q, k, cos.to(to), sin.to(to))
            torch.autograd.backward(out, [dq.to(dtype).to(to), dk.to(dtype).to(to)])
            return (*out, q.grad, k.grad)

        fused, own = run(rope), run(apply_rotary_pos_emb)
        exact = run(apply_rotary_pos_emb, to=torch.float64)
        assert fused[0].grad_fn.name().endswith("_RopeBackward")
        for f, o, e in zip(fused, own, exact, strict=True):
            assert f.dtype == o.dtype and f.stride() == o.stride()  # the attention's layout
            if dtype == torch.float32:
                assert torch.allclose(f, o, atol=1e-5)
            else:  # one rounding where transformers has two: no further from the exact
                assert (f.double() - e).abs().mean() <= (o.double() - e).abs().mean()
    q, k = torch.randn(1, heads, 4, dim), torch.randn(1, kv, 4, dim)
    cos, sin = model.model.rotary_emb(q, torch.arange(4)[None])
    with torch.no_grad():  # evaluation and generation: transformers' own, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(rope(q, k, cos, sin),
                                                     apply_rotary_pos_emb(q, k, cos, sin),
                                                     strict=True))
    odd = cos.clone()
    odd[..., -1] += 0.5  # halves that differ: not Llama's embedding, its own function
    q.requires_grad_()
    out = rope(q, k, odd, sin)
    assert out[0].grad_fn.name() == "AddBackward0"
    assert torch.equal(out[0], apply_rotary_pos_emb(q, k, odd, sin)[0])


def test_a_rotary_function_that_rotates_otherwise_is_left_alone():
    from transformers.models.llama.modeling_llama import rotate_half

    def llama(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s

    def interleaved(q, k, cos, sin):  # GPT-J's: neighbouring pairs rotate
        def turn(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + turn(q) * s, k * c + turn(k) * s

    class Rotary(nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, q, k, cos, sin, unsqueeze_dim=1):
            return self.fn(q, k, cos, sin)

    for fn, swapped in ((llama, 1), (interleaved, 0)):
        holder = nn.Module()
        holder.__dict__["_kernel_funcs"] = {"rotary_pos_emb": Rotary(fn)}
        assert use_fused_layers(holder) == swapped
