"""On a CUDA GPU, a few training steps give the losses they give on the CPU, within bf16's
tolerance: the same run config through the CLI, once with the GPU hidden
(``CUDA_VISIBLE_DEVICES=""``) and once on it. Skipped without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import loss_curve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU; this machine has none")

# dropout 0: the CPU and CUDA draw their dropout from different generators
TRAIN = {"epochs": 1, "eval_every": 3, "precision": "bf16",
         "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
# bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.4%); the CPU and CUDA kernels
# round and accumulate in different orders, and the difference grows a little step by step
FIRST_STEP_REL, LATER_REL = 1e-2, 3e-2


def _run(cfg, *, gpu: bool) -> None:
    env = {**os.environ, **({} if gpu else {"CUDA_VISIBLE_DEVICES": ""})}
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "run", str(cfg),
                           "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(run_dir) -> tuple[dict, dict, dict]:
    training = json.loads((run_dir / "metrics.json").read_text())["training"]
    return loss_curve(run_dir), loss_curve(run_dir, "eval"), training


@pytest.mark.parametrize("packing", [True, False])
def test_cuda_steps_match_the_cpu_losses_in_bf16(make_config, tmp_path, packing):
    train = {**TRAIN, "packing": packing}
    cpu_cfg = make_config(train=train, output_dir=str(tmp_path / "cpu"))
    _run(cpu_cfg, gpu=False)
    cpu_train, cpu_valid, cpu_info = _losses(tmp_path / "cpu")
    gpu_cfg = make_config(train=train, output_dir=str(tmp_path / "gpu"))
    _run(gpu_cfg, gpu=True)
    gpu_train, gpu_valid, gpu_info = _losses(tmp_path / "gpu")

    assert cpu_info["device"] == "cpu" and gpu_info["device"].startswith("cuda")
    assert cpu_info["precision"] == gpu_info["precision"] == "bf16"
    assert sorted(gpu_train) == sorted(cpu_train) and len(cpu_train) >= 5
    assert gpu_train[1] == pytest.approx(cpu_train[1], rel=FIRST_STEP_REL)
    for step, loss in cpu_train.items():
        assert gpu_train[step] == pytest.approx(loss, rel=LATER_REL), step
    assert sorted(gpu_valid) == sorted(cpu_valid)
    for step, loss in cpu_valid.items():
        assert gpu_valid[step] == pytest.approx(loss, rel=LATER_REL), step
    assert cpu_train[max(cpu_train)] < cpu_train[1]  # it trained
