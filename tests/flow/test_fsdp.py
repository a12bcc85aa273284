"""FSDP2 through Accelerate: two processes with sharded parameters and optimiser state train like
two DDP processes (LoRA, full fine-tuning, LoRA with a classification head, LoRA with DPO, LoRA
in bf16, a student distilled in full from a teacher that is not sharded), resume after SIGKILL
on the same curve, and leave a merged model that loads in a plain process.

On CPU (gloo) Accelerate itself refuses FSDP, so ``fsdp_train.py`` switches its state to FSDP
(see its docstring); torch's ``fully_shard`` and Accelerate's FSDP2 preparation then run as on
GPUs. The CUDA variant (NCCL, one GPU per process) needs two GPUs and switches nothing.

Tolerances: losses within 1e-4 of DDP's at every step (with two processes the averaged
gradients are the same sums, so they agree to float rounding; measured on CPU, torch 2.13: at
most 3.2e-7 for LoRA, 9.5e-7 for full fine-tuning, 1.0e-6 with the classification head,
identical for DPO and for bf16, 4.8e-7 for distillation), trained weights' sums within 1e-3
relative (measured: 5e-7); a resumed run within 1e-4 of the uninterrupted one (measured:
identical). Each variant takes 1.5-6 minutes on 2 shared CPU cores, hence ``slow``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tunesmith.training.checkpoint import list_checkpoints

SCRIPT = Path(__file__).with_name("fsdp_train.py")
LOSS_TOL = 1e-4
STEPS = 11


def _fsdp_on_cpu() -> str | None:
    """Why FSDP cannot run on CPU with this torch, or None."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        return f"this torch ({torch.__version__}) has no FSDP2 fully_shard: {err}"
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return f"this torch ({torch.__version__}) has no gloo backend"
    return None


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(_fsdp_on_cpu() is not None,
                                                  reason=str(_fsdp_on_cpu()))),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="the CUDA (NCCL) variant needs two GPUs, one per process")),
]


def _start(out: Path, mode: str, method: str, device: str, model_dir: Path, *extra: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"  # what `accelerate launch --cpu` sets
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", str(SCRIPT), str(model_dir), str(out), mode, method, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out.parent,
        start_new_session=True)  # its own process group: SIGKILL reaches every worker


def _finish(proc) -> None:
    try:
        _, err = proc.communicate(timeout=900)  # a hang fails, not blocks
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-4000:]


def _losses(out: Path) -> dict[int, float]:
    """Each step's loss; a step logged again after a resume counts with its later value."""
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Runs by (mode, method, device), each trained once for the module's tests."""
    done: dict[tuple[str, str, str], Path] = {}
    root = tmp_path_factory.mktemp("fsdp")

    def get(mode: str, method: str, device: str) -> Path:
        key = (mode, method, device)
        if key not in done:
            out = root / "-".join(key)
            _finish(_start(out, mode, method, device, tiny_model_dir))
            done[key] = out
        return done[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["lora", "full", "classifier", "dpo", "lora-bf16",
                                    "distill"])
def test_fsdp_trains_like_ddp(runs, method, device):
    ddp, fsdp = runs("ddp", method, device), runs("fsdp", method, device)
    a, b = (json.loads((d / "result.json").read_text()) for d in (ddp, fsdp))
    assert (a["world_size"], b["world_size"]) == (2, 2)
    assert (a["sharded"], b["sharded"]) == (False, True)  # FSDP really trained DTensor shards
    assert "FSDP" in b["distributed_type"]
    # each decoder layer (2; the distilled student keeps 1), and the rest at the root
    assert b["fsdp_units"] == (2 if method == "distill" else 3)
    expected, got = _losses(ddp), _losses(fsdp)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= LOSS_TOL, (step, got[step], loss)
    assert expected[STEPS] < expected[1]
    assert a["best_step"] == b["best_step"]
    for name, value in a["trained"].items():
        assert b["trained"][name] == pytest.approx(value, rel=1e-3, abs=1e-4), name


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_merged_model_loads_in_a_plain_process(runs, method, device):
    from tunesmith.models.load import load

    out = runs("fsdp", method, device)
    saved = json.loads((out / "result.json").read_text())["merged"]
    model, _ = load(out / "merged")  # this process: no process group, no FSDP
    got = {n: p.detach().double().sum().item() for n, p in model.state_dict().items()}
    assert sorted(got) == sorted(saved)
    for name, value in saved.items():
        assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    assert not any(n.startswith("base_model") or "lora_" in n for n in got)  # merged, plain


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_fsdp_resume_after_sigkill_continues_the_curve(runs, tiny_model_dir, tmp_path, device):
    expected = _losses(runs("fsdp", "lora", device))
    out = tmp_path / "killed"
    proc = _start(out, "fsdp", "lora", device, tiny_model_dir)
    deadline = time.time() + 900
    while time.time() < deadline and not any(
            int(p.name.split("-")[1]) >= 5 for p in list_checkpoints(out / "checkpoints")):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = max(int(p.name.split("-")[1]) for p in list_checkpoints(out / "checkpoints"))
    assert killed_at < STEPS, "the run finished before it could be killed"

    _finish(_start(out, "fsdp", "lora", device, tiny_model_dir, "--resume"))
    got = _losses(out)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= LOSS_TOL, (step, got[step], loss)
