"""packed_sdpa: packed rows attend within each sequence, grouped by length, in fp32 on CPU."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from tunesmith.data.encode import IGNORE_INDEX
from tunesmith.models.load import add_lora, load
from tunesmith.models.packed_attention import (
    NAME,
    WIDTH_MULTIPLE,
    attends_by_sequence,
    packed_kwargs,
    use_packed_attention,
)
from tunesmith.training.loss import TargetLoss

LENGTHS = [[5, 17, 40, 9], [33, 2, 1, 30, 19]]  # several widths, a 1- and a 2-token sequence
WIDTH = 112  # each row padded to it: the padding is one more sequence


def packed_rows(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(LENGTHS), WIDTH), generator=g)
    pos = torch.zeros_like(ids)
    for r, lengths in enumerate(LENGTHS):
        start = 0
        for n in [*lengths, WIDTH - sum(lengths)]:
            pos[r, start:start + n] = torch.arange(n)
            start += n
    return ids, pos


def alone(model, ids, pos):
    """Each sequence through the model on its own (no packing at all), in row order."""
    out = []
    for r, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            seq = ids[r:r + 1, start:start + n]
            out.append(model.get_decoder()(input_ids=seq, use_cache=False).last_hidden_state[0])
            start += n
    return torch.cat(out)


def real(hidden):
    """The packed rows' real tokens (not the padding), in row order."""
    return torch.cat([hidden[r, :sum(lengths)] for r, lengths in enumerate(LENGTHS)])


def test_packed_rows_match_each_sequence_alone_and_the_masked_kernel(tiny_model_dir):
    model, _ = load(tiny_model_dir)
    model.eval()
    ids, pos = packed_rows(model.config.vocab_size)
    decoder = model.get_decoder()
    with torch.no_grad():
        masked = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        expected = alone(model, ids, pos)
        assert use_packed_attention(model) and model.config._attn_implementation == NAME
        kwargs = packed_kwargs(model, None, pos)
        packed = decoder(input_ids=ids, position_ids=pos, use_cache=False,
                         **kwargs).last_hidden_state
    bounds = kwargs["cu_seq_lens_q"].tolist()
    assert bounds == [0, 5, 22, 62, 71, WIDTH, WIDTH + 33, WIDTH + 35, WIDTH + 36,
                      WIDTH + 66, WIDTH + 85, 2 * WIDTH]
    assert kwargs["max_length_q"] == 41  # the first row's padding
    torch.testing.assert_close(real(packed), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed, masked, atol=2e-5, rtol=1e-5)  # the padding too


def test_gradients_equal_the_masked_kernels(tiny_model_dir):
    """The LoRA gradients of a packed SFT loss, through packed_sdpa and through SDPA with
    transformers' block-diagonal mask."""
    ids, pos = packed_rows(1000, seed=1)
    labels = ids.clone()
    labels[:, ::3] = IGNORE_INDEX

    def grads(packed: bool):
        torch.manual_seed(0)
        model = add_lora(load(tiny_model_dir)[0], r=4, alpha=8, dropout=0.0,
                         target_modules="all-linear")
        for name, p in model.named_parameters():  # B = 0 at the start: give it a say
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
        if packed:
            assert use_packed_attention(model)
        loss = TargetLoss(model)(input_ids=ids, labels=labels, position_ids=pos).loss_sum
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss_masked, masked = grads(False)
    loss_packed, packed = grads(True)
    torch.testing.assert_close(loss_packed, loss_masked, atol=1e-4, rtol=1e-5)
    assert masked.keys() == packed.keys() and masked
    for name in masked:
        torch.testing.assert_close(packed[name], masked[name], atol=1e-5, rtol=1e-4,
                                   msg=name)


def test_under_bf16_it_is_at_least_as_close_to_fp32(tiny_model_dir):
    """bf16 weights under autocast: packed_sdpa's fp32 attention is no further from the fp32
    model than the masked bf16 kernel is."""
    model, _ = load(tiny_model_dir, dtype="bfloat16")
    model.eval()
    ids, pos = packed_rows(model.config.vocab_size, seed=2)
    decoder = model.get_decoder()
    with torch.no_grad():
        reference = alone(load(tiny_model_dir)[0].eval(), ids, pos)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            masked = real(decoder(input_ids=ids, position_ids=pos,
                                  use_cache=False).last_hidden_state)
            assert use_packed_attention(model)
            packed = real(decoder(input_ids=ids, position_ids=pos, use_cache=False,
                                  **packed_kwargs(model, None, pos)).last_hidden_state)
    assert packed.dtype == masked.dtype == torch.bfloat16
    err_packed = (packed.float() - reference).abs().mean()
    err_masked = (masked.float() - reference).abs().mean()
    assert err_packed <= err_masked * 1.05, (err_packed, err_masked)


def test_what_it_does_not_cover_goes_to_sdpa_unchanged(tiny_model_dir, tmp_path):
    model, tok = load(tiny_model_dir)
    model.eval()
    prompt = tok("hello there, how are you", return_tensors="pt")
    with torch.no_grad():
        before = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        padded = torch.tensor([[7, 8, 9, 0, 0], [7, 8, 9, 10, 11]])
        mask = (padded != 0).long()
        logits = model(input_ids=padded, attention_mask=mask).logits
        assert use_packed_attention(model)
        # a KV cache (generation), a padding mask: no packing kwargs, SDPA's own results
        assert torch.equal(model.generate(**prompt, max_new_tokens=8, do_sample=False), before)
        assert packed_kwargs(model, mask, torch.arange(5).expand(2, 5)) == {}
        assert torch.equal(model(input_ids=padded, attention_mask=mask).logits, logits)
    # the switch is not saved: the model loads anywhere as an SDPA model
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    assert load(tmp_path)[0].config._attn_implementation == "sdpa"


def test_only_sdpa_models_are_switched(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not use_packed_attention(eager)
    assert eager.config._attn_implementation == "eager"
    assert packed_kwargs(eager, None, torch.zeros(1, 4, dtype=torch.long)) == {}
    peft = add_lora(load(tiny_model_dir)[0], r=4, alpha=8, dropout=0.0,
                    target_modules="all-linear")
    assert not attends_by_sequence(peft)  # still SDPA: not yet switched
    assert use_packed_attention(peft) and use_packed_attention(peft)  # twice: still on
    assert peft.get_base_model().config._attn_implementation == NAME
    assert attends_by_sequence(peft) and attends_by_sequence(peft.get_base_model())
    assert not attends_by_sequence(eager)
    assert not attends_by_sequence(peft.to("meta"))  # off the CPU the masked kernel runs


def test_training_setup_switches_models_that_train_on_packed_rows(tiny_model_dir):
    from tunesmith.training.loop import LoopSettings
    from tunesmith.training.objectives import LMObjective
    from tunesmith.training.setup import setup

    for packing in (False, True):
        model, tok = load(tiny_model_dir)
        settings = LoopSettings(learning_rate=1e-3, epochs=1, batch_size=2, total_steps=1,
                                eval_every=1, packing=packing)

        def objective(m, precision, pad_id=tok.pad_token_id, packing=packing):
            return LMObjective(m, pad_id=pad_id, precision=precision, packing=packing)

        setup(model, objective, [], settings=settings)
        assert (model.config._attn_implementation == NAME) is packing


def test_width_multiple_groups_sequences():
    from tunesmith.models.packed_attention import _Plan

    cu = torch.tensor([0, 5, 22, 62, 71, 100], dtype=torch.int32)
    plan = _Plan(cu)
    widths = [w for _, _, w in plan.spans]
    assert widths == sorted(set(widths)) and all(w % WIDTH_MULTIPLE == 0 for w in widths)
    assert sum(n for _, n, _ in plan.spans) == 5
    # the groups lie end to end in the slots
    assert [start for start, _, _ in plan.spans] == [0, *itertools.accumulate(
        n * w for _, n, w in plan.spans[:-1])]
    assert len(plan.index) == sum(n * w for _, n, w in plan.spans)
    # every token has one slot, and the slot holds that token
    assert torch.equal(plan.index[plan.slot_of], torch.arange(100))


@pytest.mark.parametrize("bad", ["window", "dropout"])
def test_uncovered_calls_fall_back(tiny_model_dir, bad, monkeypatch):
    """A sliding window or attention dropout is SDPA's business: the mask path is taken."""
    from tunesmith.models import packed_attention

    model, _ = load(tiny_model_dir)
    use_packed_attention(model)
    ids, pos = packed_rows(model.config.vocab_size)
    calls = []
    real_sdpa = packed_attention._sdpa
    monkeypatch.setattr(packed_attention, "_sdpa",
                        lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    attn = model.model.layers[0].self_attn
    if bad == "window":
        monkeypatch.setattr(attn, "sliding_window", 8, raising=False)
        model.eval()
    else:
        monkeypatch.setattr(attn, "attention_dropout", 0.1)
        model.train()
    with torch.no_grad():
        model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False,
                            **packed_kwargs(model, None, pos))
    assert len(calls) == 1  # the patched layer only; the other layer is covered


def test_values_of_another_width_and_grouped_heads():
    """The function alone: 4 query heads over 2 key/value heads, values wider than keys, equal
    to SDPA with the block-diagonal mask (what transformers would have passed)."""
    from torch import nn

    from tunesmith.models import packed_attention

    packed_attention._register()
    torch.manual_seed(0)
    lengths = [7, 20, 3, 18]  # one row of 48
    cu = torch.tensor([0, 7, 27, 30, 48], dtype=torch.int32)
    q = torch.randn(1, 4, 48, 16)
    k = torch.randn(1, 2, 48, 16)
    v = torch.randn(1, 2, 48, 24)
    seq = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    mask = (seq[:, None] == seq[None, :]) & torch.ones(48, 48, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask,
        scale=0.3).transpose(1, 2)
    got, _ = packed_attention.packed_sdpa(nn.Module(), q, k, v, None, scaling=0.3,
                                          cu_seq_lens_q=cu, max_length_q=20)
    assert got.shape == (1, 48, 4, 24)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma3", "phi3", "gpt_neox"])
def test_every_family_gives_the_masked_kernels_hidden_states(tiny_family_dir, family):
    """Each supported family, packed rows: the same last hidden states with the switch as
    with transformers' masked SDPA (covered calls or, e.g. sliding windows, fallen back)."""
    model, _ = load(tiny_family_dir(family))
    model.eval()
    ids, pos = packed_rows(model.config.vocab_size, seed=3)
    decoder = model.get_decoder()
    with torch.no_grad():
        masked = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        switched = use_packed_attention(model)
        packed = decoder(input_ids=ids, position_ids=pos, use_cache=False,
                         **packed_kwargs(model, None, pos)).last_hidden_state
    assert switched == (model.config._attn_implementation == NAME)
    torch.testing.assert_close(packed, masked, atol=3e-5, rtol=1e-5)


def test_a_transformers_that_refuses_the_switch_keeps_its_sdpa(tiny_model_dir, monkeypatch):
    model, _ = load(tiny_model_dir)

    def refuse(self, name, **kw):
        raise ValueError(f"{name} is not a known attention implementation")

    monkeypatch.setattr(type(model), "set_attn_implementation", refuse)
    assert not use_packed_attention(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_flash_path_and_its_gradients(dtype, monkeypatch):
    """Grouped heads, sequences that leave padding slots in their groups: the output and the
    gradients of q, k and v equal SDPA's with the block-diagonal mask (fp32), and are bit for
    bit those of SDPA over autograd's gathers (the path taken without the flash op)."""
    from torch import nn

    from tunesmith.models import packed_attention

    packed_attention._register()
    assert packed_attention._FLASH is not None  # torch >= 2.4 on the CPU has it
    torch.manual_seed(1)
    lengths = [7, 20, 3, 18, 1]  # widths 16, 32, 16, 32, 16: padding in every group
    cu = torch.tensor([0, 7, 27, 30, 48, 49], dtype=torch.int32)
    inputs = [torch.randn(1, 49, h, 16).transpose(1, 2).to(dtype) for h in (4, 2, 2)]
    dout = torch.randn(1, 49, 4, 16).to(dtype)

    def run():
        q, k, v = (t.detach().requires_grad_() for t in inputs)
        out, _ = packed_attention.packed_sdpa(nn.Module(), q, k, v, None, scaling=0.3,
                                              cu_seq_lens_q=cu, max_length_q=20)
        out.backward(dout)
        return out, q.grad, k.grad, v.grad

    got = run()
    monkeypatch.setattr(packed_attention, "_FLASH", None)
    autograd_gathers = run()
    for a, b in zip(got, autograd_gathers, strict=True):
        assert a.dtype == dtype and torch.equal(a, b)
    seq = torch.repeat_interleave(torch.arange(5), torch.tensor(lengths))
    mask = (seq[:, None] == seq[None, :]) & torch.ones(49, 49, dtype=torch.bool).tril()
    q, k, v = (t.detach().float().requires_grad_() for t in inputs)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask,
        scale=0.3).transpose(1, 2)
    expected.backward(dout.float())
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2,
                                                                        "rtol": 2e-2}
    for a, b in zip(got, (expected, q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(a.float(), b, **tol)
