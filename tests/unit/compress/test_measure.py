"""Generated tokens per second (``measure.generation_speed``) with fake generators and a fake
clock: what is counted, what is timed, and the interleaving of models."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from tunesmith.compress import measure


class Clock:
    """Stands in for the ``time`` module: only the fake generators move it forward."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def perf_counter(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu

    def spend(self, wall: float, cpu: float) -> None:
        self.wall += wall
        self.cpu += cpu


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=c.perf_counter,
                                                         process_time=c.process_time))
    return c


def generator(clock: Clock, calls: list, name: str, *, tokens: int, wall: float, cpu: float):
    def run(prompt: str) -> int:
        calls.append((name, prompt))
        clock.spend(wall, cpu)
        return tokens
    return run


def test_tokens_per_second_of_one_model_leaves_the_warmup_out(clock: Clock) -> None:
    calls: list = []
    fn = generator(clock, calls, "m", tokens=32, wall=0.5, cpu=0.25)
    got = measure.generation_speed(fn, ["a", "b", "c", "d"], warmup=2)
    assert [p for _, p in calls] == ["a", "b", "a", "b", "c", "d"]  # 2 untimed, then all 4
    assert got["prompts"] == 4 and got["new_tokens"] == 4 * 32
    assert got["seconds"] == pytest.approx(2.0) and got["cpu_seconds"] == pytest.approx(1.0)
    assert got["tokens_per_s"] == pytest.approx(64.0)
    assert got["cpu_tokens_per_s"] == pytest.approx(128.0)


def test_models_are_interleaved_and_each_gets_its_own_rate(clock: Clock) -> None:
    calls: list = []
    runs = {"tuned": generator(clock, calls, "tuned", tokens=32, wall=1.0, cpu=1.0),
            "int8": generator(clock, calls, "int8", tokens=32, wall=2.0, cpu=1.6)}
    got = measure.generation_speeds(runs, ["a", "b", "c"], warmup=1)
    timed = calls[2:]  # after one warmup prompt for each model
    assert timed == [("tuned", "a"), ("int8", "a"), ("int8", "b"), ("tuned", "b"),
                     ("tuned", "c"), ("int8", "c")]
    assert got["tuned"]["tokens_per_s"] == pytest.approx(32.0)
    assert got["int8"]["tokens_per_s"] == pytest.approx(16.0)
    assert got["int8"]["cpu_tokens_per_s"] == pytest.approx(20.0)
    assert got["int8"]["new_tokens"] == 96


def test_no_prompts_gives_no_rate(clock: Clock) -> None:
    got = measure.generation_speed(lambda p: 32, [])
    assert got == {"prompts": 0, "new_tokens": 0, "seconds": 0, "cpu_seconds": 0,
                   "tokens_per_s": None, "cpu_tokens_per_s": None}


def test_real_clock_gives_a_positive_rate() -> None:
    def busy(prompt: str) -> int:
        end = time.perf_counter() + 0.002
        while time.perf_counter() < end:
            pass
        return 8

    got = measure.generation_speed(busy, ["x"] * 3)
    assert got["prompts"] == 3 and got["new_tokens"] == 24
    assert got["tokens_per_s"] > 0 and got["cpu_tokens_per_s"] > 0
