"""The server scores rounds before the last in the background and records each round once
its scores are in; a round saved but not yet scored is found again after a restart."""

from __future__ import annotations

import threading

import pytest
import torch

from tunesmith.flows.federated import rounds
from tunesmith.flows.federated.scoring import RoundScorer


def test_a_background_round_is_recorded_with_its_scores_before_the_next(tmp_path) -> None:
    release = threading.Event()
    seen_threads = []

    def evaluate() -> dict[str, float]:
        seen_threads.append(torch.get_num_threads())
        release.wait(timeout=10)
        return {"global_accuracy": 0.5}

    before = torch.get_num_threads()
    scorer = RoundScorer(tmp_path, evaluate)
    scorer.score({"round": 1}, background=True)
    assert rounds.read_rounds(tmp_path) == []  # still scoring: nothing recorded yet
    release.set()
    scorer.score({"round": 2}, background=False)  # waits for round 1 first
    assert rounds.read_rounds(tmp_path) == [{"round": 1, "global_accuracy": 0.5},
                                            {"round": 2, "global_accuracy": 0.5}]
    assert seen_threads == [1, before]  # one core in the background, every core at the end
    assert torch.get_num_threads() == before


def test_a_failure_in_the_background_is_raised_in_the_servers_thread(tmp_path) -> None:
    def evaluate() -> dict[str, float]:
        raise RuntimeError("eval_file line 3: broken")

    scorer = RoundScorer(tmp_path, evaluate)
    scorer.score({"round": 1}, background=True)
    with pytest.raises(RuntimeError, match="line 3"):
        scorer.wait()
    assert rounds.read_rounds(tmp_path) == []


def test_a_round_saved_but_not_scored_is_found_after_a_restart(tmp_path) -> None:
    state = {"l.lora_B.weight": torch.ones(2, 2)}
    rounds.save_round(tmp_path, 1, state, record={"round": 1, "examples": 5})
    rounds.append_round(tmp_path, {"round": 1, "examples": 5, "global_accuracy": 0.4})
    rounds.save_round(tmp_path, 2, state, record={"round": 2, "examples": 7})
    assert rounds.saved_record(tmp_path, 1) is None  # already in rounds.jsonl
    assert rounds.saved_record(tmp_path, 2) == {"round": 2, "examples": 7}
    assert rounds.last_round(tmp_path)[0] == 2
