"""Deciding once for all the processes of a run (real ones: tests/flow/test_multinode.py)."""

from dataclasses import dataclass

import pytest

from tunesmith.errors import ConfigError, TrainingError, TunesmithError
from tunesmith.training import processes


@dataclass
class Group:
    is_main_process: bool = True
    num_processes: int = 1


def test_one_process_decides_alone_and_keeps_its_error():
    assert processes.main_decides(Group(), lambda: 41 + 1) == 42

    def refuse():
        raise ConfigError("the run directory exists")

    with pytest.raises(ConfigError, match="exists"):
        processes.main_decides(Group(), refuse)


def test_another_process_follows_the_main_ones_answer_and_error(monkeypatch):
    sent = {"value": ["/runs/a", None]}

    def broadcast(box, from_process):
        assert from_process == 0
        box[:] = sent["value"]

    monkeypatch.setattr(processes, "broadcast_object_list", broadcast)
    other = Group(is_main_process=False, num_processes=2)
    never = pytest.fail  # only the main process looks
    assert processes.main_decides(other, never) == "/runs/a"
    sent["value"] = [None, "/runs/a: the run directory exists and is not empty"]
    with pytest.raises(TunesmithError, match="exists and is not empty"):
        processes.main_decides(other, never)


def test_processes_that_disagree_all_stop(monkeypatch):
    assert processes.same_everywhere(Group(), "step-8", what="x", fix="y") == "step-8"
    two = Group(num_processes=2)
    monkeypatch.setattr(processes, "gather_object", lambda v: ["step-8", "step-8"])
    assert processes.same_everywhere(two, "step-8", what="x", fix="y") == "step-8"
    monkeypatch.setattr(processes, "gather_object", lambda v: ["step-8", None])
    with pytest.raises(TrainingError, match="disagree on the checkpoint.*step-8, None.*share"):
        processes.same_everywhere(two, "step-8", what="the checkpoint",
                                  fix="the filesystems must share it")
