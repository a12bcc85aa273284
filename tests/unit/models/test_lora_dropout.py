"""FastDropout: the LoRA dropout that draws only the dropped positions where few drop, and
otherwise masks 16 bits at a time, on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.models.load import add_lora, load
from tunesmith.models.lora_dropout import (
    SPARSE_P,
    FastDropout,
    drop_positions,
    keep_mask,
    kept_bytes_per_element,
    use_fast_dropout,
)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_rate_is_one_minus_p_in_every_chunk(p):
    torch.manual_seed(0)
    n = 4 * 300_000
    keep = keep_mask((n,), p).float()
    # within 5 standard deviations of a binomial with the right rate, in each of the four
    # 16-bit chunks of a draw (a top chunk from a 63-bit draw would be off: 15 random bits)
    for chunk in range(4):
        part = keep[chunk::4]
        sd = math.sqrt(p * (1 - p) / part.numel())
        assert abs(part.mean().item() - (1 - p)) < 5 * sd, (chunk, part.mean().item())


def test_mask_elements_are_independent():
    torch.manual_seed(1)
    keep = keep_mask((600_000,), 0.5).float() - 0.5
    for lag in (1, 2, 3, 4, 5):  # neighbours, the same draw's chunks and the next draw's
        corr = (keep[:-lag] * keep[lag:]).mean().item() / 0.25
        assert abs(corr) < 5 / math.sqrt(keep.numel()), (lag, corr)


def test_shape_seed_and_odd_sizes():
    torch.manual_seed(3)
    a = keep_mask((7, 5, 3), 0.2)
    torch.manual_seed(3)
    b = keep_mask((7, 5, 3), 0.2)
    assert a.shape == (7, 5, 3) and a.dtype == torch.bool
    assert torch.equal(a, b)
    assert keep_mask((1,), 0.0).all()  # p = 0 keeps everything


def _expected_keep(shape, p, seed):
    """The keep mask ``FastDropout(p)`` draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    n = math.prod(shape)
    if p <= SPARSE_P:
        keep = torch.ones(n, dtype=torch.bool)
        keep[drop_positions(n, p)] = False
        return keep.view(shape)
    return keep_mask(shape, p)


@pytest.mark.parametrize("p", [0.05, SPARSE_P, 0.5])  # positions, positions, mask
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_are_dropout(dtype, p):
    drop = FastDropout(p)
    x = torch.randn(64, 48, dtype=dtype, requires_grad=True)
    torch.manual_seed(5)
    y = drop(x)
    keep = _expected_keep(x.shape, p, 5)
    assert y.dtype == dtype
    expected = torch.where(keep, x.detach(), 0) * (1 / (1 - p))
    assert torch.equal(y.detach(), expected)
    upstream = torch.randn_like(x)
    y.backward(upstream)
    assert torch.equal(x.grad, torch.where(keep, upstream, 0) * (1 / (1 - p)))
    # dropped elements are exactly the masked ones, at about the rate p
    sd = math.sqrt(p * (1 - p) / x.numel())
    assert abs((y == 0).float().mean().item() - p) < 5 * sd
    drop.eval()
    assert drop(x) is x


def test_drop_positions_are_bernoulli_coins():
    """Every element dropped with probability p, independently: the rate overall and in each
    stretch, no correlation between neighbours, geometric gaps between drops."""
    p, n = 0.05, 2_000_000
    torch.manual_seed(0)
    positions = drop_positions(n, p)
    assert positions.dtype == torch.int64
    assert bool((positions[1:] > positions[:-1]).all())  # ascending, no repeats
    assert int(positions[0]) >= 0 and int(positions[-1]) < n
    dropped = torch.zeros(n)
    dropped[positions] = 1.0
    for part in dropped.view(8, -1):  # the start, the middle and the end alike
        sd = math.sqrt(p * (1 - p) / part.numel())
        assert abs(part.mean().item() - p) < 5 * sd
    centred = dropped - p
    for lag in (1, 2, 3, 17):
        corr = (centred[:-lag] * centred[lag:]).mean().item() / (p * (1 - p))
        assert abs(corr) < 5 / math.sqrt(n), (lag, corr)
    gaps = torch.diff(positions).float()
    for k in (1, 2, 10):  # P(gap = k) = (1 - p)^(k - 1) p
        want = (1 - p) ** (k - 1) * p
        got = (gaps == k).float().mean().item()
        assert abs(got - want) < 5 * math.sqrt(want * (1 - want) / gaps.numel()), (k, got)


def test_drop_positions_continue_past_a_short_batch_and_repeat_with_the_seed():
    n, p = 100_000, 0.1
    torch.manual_seed(2)
    few = drop_positions(n, p, batch=50)  # ~200 batches of gaps to reach n
    assert bool((few[1:] > few[:-1]).all()) and int(few[-1]) < n
    assert abs(few.numel() / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    torch.manual_seed(2)
    assert torch.equal(drop_positions(n, p, batch=50), few)
    assert drop_positions(0, p).numel() == 0
    assert drop_positions(1, 0.01).numel() in (0, 1)


def test_dropout_of_a_non_contiguous_input():
    x = torch.randn(48, 64).t()  # a transposed view
    torch.manual_seed(4)
    y = FastDropout(0.1)(x)
    keep = _expected_keep(x.shape, 0.1, 4)
    assert torch.equal(y, torch.where(keep, x, 0) * (1 / 0.9))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_what_dropout_keeps_for_backward_is_counted(p):
    """The memory estimate counts ``kept_bytes_per_element`` beside the dropped copy: that
    is what autograd holds (the positions, int32, where few drop; a bool mask otherwise)."""
    n = 1_000_000
    x = torch.randn(n, requires_grad=True)
    kept = []

    def pack(t):
        if t is not x:  # the input (held by the caller anyway) is not the dropout's
            kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        FastDropout(p)(x)
    assert sum(kept) == pytest.approx(n * kept_bytes_per_element(p), rel=0.02)
    assert kept_bytes_per_element(p, "cuda") == 1.0 and kept_bytes_per_element(0.0) == 0.0


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_checkpoint_replay_draws_the_same_mask(p):
    """Activation checkpointing re-runs the forward pass in backward: the mask must repeat,
    or the gradients would belong to another mask."""
    layer = nn.Linear(32, 32)
    drop = FastDropout(p)
    x = torch.randn(16, 32, requires_grad=True)

    def block(t):
        return layer(drop(t)).tanh()

    torch.manual_seed(9)
    block(x).sum().backward()
    plain = (x.grad.clone(), layer.weight.grad.clone())
    x.grad = None
    layer.weight.grad = None
    torch.manual_seed(9)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert torch.equal(x.grad, plain[0]) and torch.equal(layer.weight.grad, plain[1])


def test_bad_probability_is_refused():
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.0)


def test_add_lora_uses_fast_dropout(tiny_model_dir):
    model, _ = load(tiny_model_dir)
    peft = add_lora(model, r=4, alpha=8, dropout=0.1, target_modules="all-linear")
    drops = [m for m in peft.modules() if isinstance(m, FastDropout)]
    assert len(drops) == 2 * 7  # every linear layer of the two decoder layers
    assert all(d.p == 0.1 for d in drops)
    assert not any(type(m) is nn.Dropout and m.p > 0 for m in peft.modules()
                   if m not in drops)
    assert use_fast_dropout(peft) == 0  # nothing left to swap
    # training draws masks (two forward passes differ), evaluation does not
    ids = torch.randint(0, 100, (2, 12))
    peft.train()
    for module in peft.modules():  # adapters start at B = 0: give them a say in the output
        if hasattr(module, "lora_B"):
            for b in module.lora_B.values():
                nn.init.normal_(b.weight, std=0.5)
    a, b = peft(input_ids=ids).logits, peft(input_ids=ids).logits
    assert not torch.allclose(a, b)
    peft.eval()
    assert torch.equal(peft(input_ids=ids).logits, peft(input_ids=ids).logits)


def _adapter_inputs(peft, ids, *, bf16=False):
    """What each adapter's lora_A read in one training forward, by module name."""
    from tunesmith.training.precision import autocast

    seen = {}
    hooks = [m.register_forward_hook(
        lambda mod, args, out, name=name: seen.__setitem__(name, args[0]))
        for name, m in peft.named_modules() if name.endswith("lora_A.default")]
    peft.train()
    with autocast("bf16" if bf16 else "fp32", torch.device("cpu"), peft):
        peft(input_ids=ids)
    for h in hooks:
        h.remove()
    return {n.rsplit(".", 2)[0]: x for n, x in seen.items()}  # "...layers.0.self_attn.q_proj"


@pytest.mark.parametrize("bf16", [False, True])
def test_shared_dropout_gives_adapters_of_one_input_one_dropped_copy(tiny_model_dir, bf16):
    model, _ = load(tiny_model_dir, dtype="bfloat16" if bf16 else "float32")
    peft = add_lora(model, r=4, alpha=8, dropout=0.3, target_modules="all-linear")
    ids = torch.randint(0, 100, (2, 12))
    seen = _adapter_inputs(peft, ids, bf16=bf16)
    layer = next(n for n in seen if n.endswith("self_attn.q_proj")).rsplit(".", 2)[0]
    q, k, v, o = (seen[f"{layer}.self_attn.{m}_proj"] for m in "qkvo")
    gate, up, down = (seen[f"{layer}.mlp.{m}_proj"] for m in ("gate", "up", "down"))
    # under bf16 autocast the adapters read the bf16 input itself (PEFT's fp32 cast is off)
    assert q.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert q is k is v and gate is up  # one dropped copy per input
    assert q is not gate and o is not down
    for x in (q, gate, o, down):  # each still dropped at the rate p
        assert 0.2 < (x == 0).float().mean().item() < 0.4

    apart = add_lora(load(tiny_model_dir)[0], r=4, alpha=8, dropout=0.3,
                     target_modules="all-linear", shared_dropout=False)
    seen = _adapter_inputs(apart, ids)
    q, k = seen[f"{layer}.self_attn.q_proj"], seen[f"{layer}.self_attn.k_proj"]
    assert not torch.equal(q == 0, k == 0)  # PEFT's way: a mask each


def test_a_shared_copy_is_reused_only_for_the_same_unchanged_tensor():
    from tunesmith.models.lora_dropout import LastDropped

    last = LastDropped()
    a, b = FastDropout(0.5, last), FastDropout(0.5, last)
    x = torch.randn(64, 32)
    y = a(x)
    assert b(x) is y  # the same tensor: the same dropped copy
    assert b(x.clone()) is not y  # equal values, another tensor: its own mask
    x.add_(1.0)  # changed in place since: a new draw
    assert not torch.equal(a(x) == 0, y == 0)
    assert FastDropout(0.25, last)(x) is not last.get(x, 0.5)  # another p: its own
    a.eval()
    assert a(x) is x
    import copy
    import pickle

    held = FastDropout(0.5, last)
    held(torch.randn(4, 4, requires_grad=True) * 2)  # holds a tensor inside a graph
    assert copy.deepcopy(held).shared.get(x, 0.5) is None
    assert pickle.loads(pickle.dumps(held)).shared is not None


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_shared_dropout_replays_under_checkpointing(p):
    from tunesmith.models.lora_dropout import LastDropped

    last = LastDropped()
    one, two = nn.Linear(32, 8), nn.Linear(32, 8)
    drop_one, drop_two = FastDropout(p, last), FastDropout(p, last)
    x = torch.randn(16, 32, requires_grad=True)

    def block(t):
        t = t * 1.5  # a tensor made inside the block, as a layer's normalised input is
        return (one(drop_one(t)) * two(drop_two(t))).tanh()

    def grads(run):
        for p in (x, one.weight, two.weight):
            p.grad = None
        torch.manual_seed(11)
        run().sum().backward()
        return [p.grad.clone() for p in (x, one.weight, two.weight)]

    plain = grads(lambda: block(x))
    replayed = grads(lambda: checkpoint(block, x, use_reentrant=False))
    assert all(torch.equal(a, b) for a, b in zip(plain, replayed, strict=True))


def test_detached_drops_as_forward_does_and_shares_only_its_own_kind():
    from tunesmith.models.lora_dropout import LastDropped

    last = LastDropped()
    a, b = FastDropout(0.1, last), FastDropout(0.1, last)
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(3)
    out, positions, scale = a.detached(x)
    torch.manual_seed(3)
    y = FastDropout(0.1)(x)  # the same draws through autograd
    assert torch.equal(out, y.detach()) and not out.requires_grad and scale == 1 / 0.9
    assert positions.dtype == torch.int32
    assert torch.equal(positions.long(), (y.flatten() == 0).nonzero().flatten())
    assert b.detached(x)[0] is out  # the same tensor: the same pair
    assert b(x) is not out and a(x) is b(x)  # the autograd kind is shared on its own
    assert FastDropout(0.5).detached(x) is None  # many drops: only forward's mask
    a.eval()
    kept, none, one = a.detached(x)
    assert kept is not x and torch.equal(kept, x.detach()) and none is None and one == 1.0
