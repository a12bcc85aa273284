import pytest
import torch

from tunesmith.errors import CheckpointError
from tunesmith.training import checkpoint as ck


def _opt():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return p, opt, sched


def test_roundtrip_and_prune_keeps_best(tmp_path):
    p, opt, sched = _opt()
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, weights={"w": p * step}, optimizer=opt, scheduler=sched,
                           state=ck.TrainState(step=step, best_step=1))
        ck.prune_checkpoints(tmp_path, keep_last=2, best_step=1)
    assert [c.name for c in ck.list_checkpoints(tmp_path)] == ["step-1", "step-3", "step-4"]
    weights, extra, state = ck.load_checkpoint(tmp_path / "step-3")
    assert torch.equal(weights["w"], torch.full((3,), 3.0))
    assert state.step == 3 and "optimizer" in extra and "rng" in extra


def test_a_failed_write_leaves_earlier_checkpoints_intact(tmp_path, monkeypatch):
    p, opt, sched = _opt()
    ck.save_checkpoint(tmp_path, weights={"w": p}, optimizer=opt, scheduler=sched,
                       state=ck.TrainState(step=1))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(CheckpointError, match="step-2: cannot write the checkpoint"):
        ck.save_checkpoint(tmp_path, weights={"w": p}, optimizer=opt, scheduler=sched,
                           state=ck.TrainState(step=2))
    assert [c.name for c in ck.list_checkpoints(tmp_path)] == ["step-1"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["step-1"]  # no temp dir left behind
    assert ck.load_checkpoint(tmp_path / "step-1")[2].step == 1
