"""Ctrl-C during training: exit 130, a clear message, and every checkpoint on disk intact."""

import os
import signal
import subprocess
import sys
import time

from tunesmith.training.checkpoint import list_checkpoints, load_checkpoint


def test_ctrl_c_leaves_the_last_checkpoint_intact(make_config, tmp_path):
    cfg = make_config(train={"epochs": 200, "eval_every": 2, "keep_checkpoints": 2})
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "run", str(cfg), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # Ctrl-C as a terminal delivers it: a suite started in the background by a shell
        # without job control inherits SIGINT ignored, and Python keeps an ignored SIGINT
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and len(list_checkpoints(ckpt_dir)) < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    checkpoints = list_checkpoints(ckpt_dir)
    assert checkpoints
    for path in checkpoints:
        weights, extra, state = load_checkpoint(path)
        assert weights and state.step == int(path.name.split("-")[1])
    # nothing half-written is left under a checkpoint's name
    assert all(p.name.startswith(("step-", ".step-")) for p in ckpt_dir.iterdir())
