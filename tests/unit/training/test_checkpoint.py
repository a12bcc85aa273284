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

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(CheckpointError, match="step-2: cannot write the checkpoint"):
        ck.save_checkpoint(tmp_path, weights={"w": p}, optimizer=opt, scheduler=sched,
                           state=ck.TrainState(step=2))
    assert [c.name for c in ck.list_checkpoints(tmp_path)] == ["step-1"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["step-1"]  # no temp dir left behind
    assert ck.load_checkpoint(tmp_path / "step-1")[2].step == 1


def test_loading_a_checkpoint_never_unpickles(tmp_path, monkeypatch):
    import pickle
    import random

    import numpy as np

    p, opt, sched = _opt()
    p.sum().backward()
    opt.step()  # AdamW state: int-keyed dict of tensors, tuples in param_groups
    sched.step()
    path = ck.save_checkpoint(tmp_path, weights={"w": p}, optimizer=opt, scheduler=sched,
                              state=ck.TrainState(step=5, best_step=5, best_valid_loss=0.5))
    assert not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    weights, extra, state = ck.load_checkpoint(path)
    assert state.step == 5 and state.best_valid_loss == 0.5
    p2, opt2, sched2 = _opt()
    opt2.load_state_dict(extra["optimizer"])
    sched2.load_state_dict(extra["scheduler"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state[p2][key], opt.state[p][key])
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    assert sched2.state_dict() == sched.state_dict()

    # every generator continues where it was saved
    ck.set_rng_state(extra["rng"][0])
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ck.set_rng_state(extra["rng"][0])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_rng_state_round_trips_through_the_codec(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    ck.save_state(tmp_path, {"rng": [ck.rng_state()]})
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ck.set_rng_state(ck.load_state(tmp_path)["rng"][0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
