"""A run killed with SIGKILL and resumed follows the same loss curve as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import loss_curve, review_pairs
from tunesmith.training.checkpoint import list_checkpoints

TRAIN = {"epochs": 4, "eval_every": 3, "precision": "fp32", "keep_checkpoints": 2,
         "lora": {"r": 8, "alpha": 16, "dropout": 0.1}}  # dropout: the RNG state must resume


def _run(cfg, *extra):
    return subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "run", str(cfg),
                             "--no-progress", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# differential privacy: Poisson batches, noise and the accountant must all resume
PRIVATE = {"objective": "sft", "batch_size": 16, "epochs": 6,
           "privacy": {"noise_multiplier": 0.8, "max_grad_norm": 1.0, "accountant": "rdp"}}


# sft stays in `make test`; dpo and sft-dp (slow) resume through the same checkpoint code
# head-dp: a classification head under DP, trained on scaled input (the scale is computed
# again on resume and folded in at the end), with SGD's momentum in the checkpoint
PRIVATE_HEAD = {**PRIVATE, "head": "classifier", "optimizer": "sgd", "learning_rate": 0.05,
                "head_learning_rate": 0.5}


@pytest.mark.parametrize("objective", ["sft", pytest.param("dpo", marks=pytest.mark.slow),
                                       pytest.param("sft-dp", marks=pytest.mark.slow),
                                       pytest.param("head-dp", marks=pytest.mark.slow)])
def test_sigkill_and_resume_follows_the_same_curve(make_config, tmp_path, objective):
    train = ({**TRAIN, **PRIVATE} if objective == "sft-dp" else
             {**TRAIN, **PRIVATE_HEAD} if objective == "head-dp" else
             {**TRAIN, "objective": objective})
    rows = review_pairs(80) if objective == "dpo" else None
    reference_cfg = make_config(rows, train=train, output_dir=str(tmp_path / "reference"))
    ref = _run(reference_cfg)
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    expected = loss_curve(tmp_path / "reference")

    cfg = make_config(rows, train=train, output_dir=str(tmp_path / "killed"))
    proc = _run(cfg)
    ckpt = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(
            int(p.name.split("-")[1]) >= 6 for p in list_checkpoints(ckpt)):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = max(int(p.name.split("-")[1]) for p in list_checkpoints(ckpt))
    assert killed_at < max(expected), "the run finished before it could be killed"

    resumed = _run(cfg, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    got = loss_curve(tmp_path / "killed")
    assert sorted(got) == sorted(expected)  # each step logged once, none missing
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-4, (step, got[step], loss)
    if objective == "head-dp":  # the same head saved, the scale folded in once
        from safetensors.torch import load_file

        heads = [{k: v for k, v in load_file(tmp_path / d / "adapter" /
                                             "adapter_model.safetensors").items() if "score" in k}
                 for d in ("reference", "killed")]
        assert heads[0].keys() == heads[1].keys() and heads[0]
        for k in heads[0]:
            torch.testing.assert_close(heads[1][k], heads[0][k], rtol=1e-4, atol=1e-5)
    if objective in ("sft-dp", "head-dp"):  # the accountant resumed: the same epsilon
        spent = [_privacy(tmp_path / d) for d in ("reference", "killed")]
        assert spent[0]["steps"] == spent[1]["steps"] == max(expected)
        assert spent[1]["epsilon"] == pytest.approx(spent[0]["epsilon"], abs=1e-9)
        assert spent[0]["epsilon"] > 0


def _privacy(run_dir):
    import json

    card = json.loads((run_dir / "adapter" / "privacy.json").read_text())
    assert card == json.loads((run_dir / "merged" / "privacy.json").read_text())
    assert json.loads((run_dir / "metrics.json").read_text())["privacy"] == card
    return card
