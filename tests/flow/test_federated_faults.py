"""Faults in a real federation (a SuperLink and three SuperNodes on 127.0.0.1, tiny model).

Marked slow: Flower notices a dead SuperNode when its heartbeats stop (about a minute), and a
killed server is started again, so each test takes minutes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import federated_config, review_rows, write_jsonl

pytest.importorskip("flwr", reason="federated training needs `pip install -e '.[federated]'`")
pytestmark = pytest.mark.slow
N_CLIENTS = 3


def _config(root: Path, tiny_model_dir: Path, rounds: int) -> Path:
    rows = review_rows(60)
    files = [write_jsonl(root / f"client-{i}.jsonl", rows[i::N_CLIENTS][:16])
             for i in range(N_CLIENTS)]
    return federated_config(root, tiny_model_dir, files, rounds=rounds)


def _wait_for(what: str, check, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _process_groups(*words: str) -> list[int]:
    """Process groups of the processes whose command line holds every one of ``words``."""
    groups = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if all(w in line for w in words):
            groups.append(os.getpgid(p.pid))
    return groups


def test_a_client_killed_mid_round_leaves_the_round_to_the_others(
        tmp_path: Path, tiny_model_dir: Path, test_home: Path) -> None:
    from tunesmith.flows.federated import simulate

    cfg = _config(tmp_path, tiny_model_dir, rounds=2)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(
        result=simulate(cfg, home=test_home)), daemon=True)
    runner.start()
    log = tmp_path / "run" / "flower" / "logs" / "client-2.log"
    # the third client has its round-1 message and has started training on it: kill it
    _wait_for("client 2 to start its round", lambda: log.is_file() and "Start `flwr-clientapp`"
              in log.read_text(errors="replace"))
    for group in _wait_for("client 2's SuperNode",
                           lambda: _process_groups("flower-supernode", "client-2.jsonl")):
        os.killpg(group, signal.SIGKILL)
    runner.join(timeout=600)
    assert not runner.is_alive() and "result" in outcome
    first, second = outcome["result"].rounds
    assert len(first["clients"]) == 2 and len(first["failures"]) == 1
    assert len(second["clients"]) == 2 and not second.get("skipped")
    assert (tmp_path / "run" / "merged" / "config.json").is_file()


def test_a_killed_server_resumes_at_the_next_round(tmp_path: Path, tiny_model_dir: Path,
                                                  test_home: Path) -> None:
    import subprocess
    import sys

    cfg = _config(tmp_path, tiny_model_dir, rounds=2)
    args = [sys.executable, "-m", "tunesmith.cli", "federated", "simulate", str(cfg)]
    env = {**os.environ, "TUNESMITH_HOME": str(test_home)}
    first = subprocess.Popen(args, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rounds = tmp_path / "run" / "rounds.jsonl"
    _wait_for("round 1 to be saved", lambda: rounds.is_file() and rounds.read_text().strip())
    # the machine fails: the command and everything it started (SuperLink, ServerApp,
    # SuperNodes, ClientApps) die at once
    everything = [first, *psutil.Process(first.pid).children(recursive=True)]
    for p in everything:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    first.wait(timeout=30)
    psutil.wait_procs(everything[1:], timeout=30)
    assert not (tmp_path / "run" / "merged").exists()

    again = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    import json

    done = [json.loads(line)["round"] for line in rounds.read_text().splitlines()]
    assert done == [1, 2]  # round 1 was not trained again
    assert (tmp_path / "run" / "merged" / "config.json").is_file()
