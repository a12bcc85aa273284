"""Two "nodes" (two torchrun agents, one process each, gloo on CPU) rendezvous on 127.0.0.1
and run ``tunesmith run`` with the same config: the same losses as one process, one run
directory written by the main process alone, and a killed run resumed by both nodes."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tunesmith.training.callbacks import read_metrics
from tunesmith.training.checkpoint import list_checkpoints

# 60 training examples in global batches of 8: 8 steps an epoch, the last batch of 4 split
# between the nodes; a checkpoint every 4 steps
TRAIN = {"epochs": 2, "batch_size": 8, "eval_every": 4, "precision": "fp32",
         "keep_checkpoints": 2}
# what the evaluation adds (base model, calibration, forgetting) costs time, not coverage here
EVAL = {"compare_base": False, "calibration": False, "forgetting": False}
# a hang (a process waiting in a collective the other never joins) fails, not blocks
TIMEOUT = 600


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(cfg, *extra):
    """Both nodes' torchrun agents, as on two machines (here one, so the run dir is shared).

    With c10d the rendezvous, not the order of starting, decides which node is rank 0."""
    port, run_id = _free_port(), uuid.uuid4().hex[:8]
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
         "--nproc_per_node", "1", "--rdzv_backend", "c10d",
         "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id,
         "-m", "tunesmith.cli", "run", str(cfg), "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for _ in range(2)]


def _finish(procs):
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT))
    finally:
        _kill(procs)
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return outputs


def _kill(procs):
    """SIGKILL each agent and its worker (torchrun starts workers in their own session)."""
    for p in procs:
        try:
            tree = [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]
        except psutil.NoSuchProcess:
            continue
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        p.wait(timeout=30)


def _curve(run_dir):
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "a step logged twice"
    return {r["step"]: r["train_loss"] for r in records}


def _written(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _one_process(cli, cfg, run_dir):
    """The reference: the same config in one process (this one, sparing a start-up)."""
    code, _, err = cli("run", str(cfg), "--no-progress")
    assert code == 0, err
    return _curve(run_dir)


def test_two_nodes_train_like_one_process(make_config, cli, tmp_path):
    single_cfg = make_config(train=TRAIN, eval=EVAL, output_dir=str(tmp_path / "single"))
    expected = _one_process(cli, single_cfg, tmp_path / "single")
    assert len(expected) == 16

    cfg = make_config(train=TRAIN, eval=EVAL, output_dir=str(tmp_path / "runs" / "two-nodes"))
    _finish(_nodes(cfg))
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["two-nodes"]
    run_dir = tmp_path / "runs" / "two-nodes"
    got = _curve(run_dir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), step
    # the same files as the single process wrote, each by one writer (no per-node copies)
    assert _written(run_dir) == _written(tmp_path / "single")
    assert len(read_metrics(run_dir / "metrics.jsonl")) == \
        len(read_metrics(tmp_path / "single" / "metrics.jsonl"))
    assert (run_dir / "run.log").read_text().count("hyperparameters:") == 1
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "report.html").is_file()


@pytest.mark.slow
def test_two_nodes_resume_a_killed_run(make_config, cli, tmp_path):
    reference = make_config(train=TRAIN, eval=EVAL, output_dir=str(tmp_path / "reference"))
    expected = _one_process(cli, reference, tmp_path / "reference")

    cfg = make_config(train=TRAIN, eval=EVAL, output_dir=str(tmp_path / "killed"))
    run_dir = tmp_path / "killed"
    procs = _nodes(cfg)
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline and not any(
                int(p.name.split("-")[1]) >= 8 for p in list_checkpoints(run_dir / "checkpoints")):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
    finally:
        _kill(procs)  # both machines lose power
    killed_at = max(int(p.name.split("-")[1]) for p in list_checkpoints(run_dir / "checkpoints"))
    assert killed_at < max(expected), "the run finished before it could be killed"
    # mark what was logged up to the checkpoint: a resumed run keeps those lines, a run that
    # started over would log them afresh
    log = run_dir / "metrics.jsonl"
    log.write_text("".join(json.dumps({**r, "before_kill": True}) + "\n"
                           for r in read_metrics(log)), encoding="utf-8")

    _finish(_nodes(cfg, "--resume"))
    got = _curve(run_dir)
    assert sorted(got) == sorted(expected)  # each step logged once, none missing
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), step
    marked = {r["step"] for r in read_metrics(log) if r["kind"] == "train" and "before_kill" in r}
    assert marked == set(range(1, killed_at + 1))
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
