"""hold_zeros: a pruned model trains with all its weights while the pruned ones stay zero."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import review_rows
from tunesmith.compress.prune import prunable_linears, prune
from tunesmith.data.encode import encode_chat
from tunesmith.training.loop import train
from tunesmith.training.setup import LoopSettings
from tunesmith.training.sparsity import hold_zeros


def _train_pruned(tiny_model_dir, tmp_path, *, hold: bool):
    from tunesmith.models.load import load

    torch.manual_seed(0)
    model, tok = load(tiny_model_dir)
    prune(model, sparsity=0.5, method="magnitude")
    masks = {f"{name}.weight": layer.weight == 0
             for name, layer in prunable_linears(model).items()}
    for p in model.parameters():
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [encode_chat(tok, r["messages"]) for r in review_rows(32)]
    # weight decay on: AdamW must not move a zero weight whose gradient is masked
    settings = LoopSettings(learning_rate=1e-2, epochs=1, batch_size=8, total_steps=3,
                            eval_every=100, packing=False, weight_decay=0.1, seed=0,
                            restore_best=False)
    train(model, data, data[:8], settings=settings, pad_id=tok.pad_token_id,
          checkpoint_dir=tmp_path / f"ckpt-{hold}",
          wrappers=[hold_zeros(masks)] if hold else [])
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    return before, after, masks


def test_pruned_weights_stay_zero_and_the_rest_train(tiny_model_dir, tmp_path):
    before, after, masks = _train_pruned(tiny_model_dir, tmp_path, hold=True)
    for name, mask in masks.items():
        assert mask.float().mean() == 0.5
        assert (after[name][mask] == 0).all(), name
        kept = ~mask
        assert not torch.equal(after[name][kept], before[name][kept]), name
    # the weights outside the blocks train too (all weights are trainable)
    assert any(not torch.equal(before[n], after[n]) for n in after if n not in masks)


def test_without_the_wrapper_the_zeros_move(tiny_model_dir, tmp_path):
    """The test above can fail: plain training fills the pruned weights in."""
    _, after, masks = _train_pruned(tiny_model_dir, tmp_path, hold=False)
    assert all(not (after[name][mask] == 0).all() for name, mask in masks.items())


def test_a_mask_that_does_not_fit_is_refused():
    from accelerate import Accelerator

    from tunesmith.training.setup import TrainParts

    model = torch.nn.Linear(4, 4)
    parts = TrainParts(model=model, objective=model,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None,
                       batches=None, accelerator=Accelerator(), precision="fp32")
    with pytest.raises(ValueError, match="no parameters named"):
        hold_zeros({"missing.weight": torch.zeros(4, 4, dtype=torch.bool)})(parts)
    with pytest.raises(ValueError, match="mask shaped"):
        hold_zeros({"weight": torch.zeros(2, 4, dtype=torch.bool)})(parts)
