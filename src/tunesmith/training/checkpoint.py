"""Checkpoints: written atomically, pruned to the last K plus the best, read back for resume.

A checkpoint is a directory ``step-N`` holding the trainable weights (safetensors), the
optimiser and scheduler states, the RNG states and ``state.json``. It is written into a
temporary sibling directory and renamed into place, so a crash or Ctrl-C mid-write leaves the
previous checkpoints untouched and never a half-written one under a real name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import CheckpointError

WEIGHTS = "trainable.safetensors"


@dataclass
class TrainState:
    """Where a run is: enough, with the checkpoint's tensors, to continue it exactly."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    best_valid_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(root: Path, *, weights: dict[str, torch.Tensor], optimizer: Any,
                    scheduler: Any, state: TrainState) -> Path:
    """Write checkpoint ``root/step-N`` atomically and return its path."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{state.step}-", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, tmp / "training.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as err:
        raise CheckpointError(f"{final}: cannot write the checkpoint ({err}); check free disk "
                              "space and permissions") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def prune_checkpoints(root: Path, *, keep_last: int, best_step: int | None) -> None:
    checkpoints = list_checkpoints(root)
    keep = {p.name for p in checkpoints[-keep_last:]}
    if best_step is not None:
        keep.add(f"step-{best_step}")
    for p in checkpoints:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / WEIGHTS)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint weights ({err})") from err


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], TrainState]:
    """Weights, optimiser/scheduler/RNG states and TrainState of one checkpoint."""
    weights = load_weights(path)
    try:
        extra = torch.load(path / "training.pt", weights_only=False)
        state = TrainState(**json.loads((path / "state.json").read_text()))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err})") from err
    return weights, extra, state
