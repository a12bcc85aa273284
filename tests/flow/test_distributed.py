"""Two processes (gloo on CPU, launched by torchrun) train like one with the same global batch,
also when the last global batch has fewer examples than processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_train.py")


def _launch(args, tmp_path):
    # no ACCELERATE_USE_CPU: without a GPU, training.processes tells Accelerate to use the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # a hang (a process waiting in an all-reduce the other never joins) fails, not blocks
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one(tiny_model_dir, tmp_path):
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    _launch([sys.executable, str(SCRIPT), str(tiny_model_dir), str(single)], tmp_path)
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node", "2", str(SCRIPT), str(tiny_model_dir), str(double)], tmp_path)
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["losses"]) == len(two["losses"]) == 11
    assert one["best_step"] == two["best_step"]
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-4)
    assert one["losses"][-1] < one["losses"][0]
    for name, value in one["lora"].items():
        assert two["lora"][name] == pytest.approx(value, rel=1e-3, abs=1e-4), name
