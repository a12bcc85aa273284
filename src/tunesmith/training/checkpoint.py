"""Checkpoints: written atomically, pruned to the last K plus the best, read back for resume.

A checkpoint is a directory ``step-N`` holding the trainable weights
(``trainable.safetensors``), the optimiser, scheduler and RNG states (``training.safetensors``
for their tensors, ``training.json`` for the rest) and ``state.json``. Nothing in it is a
pickle: reading a checkpoint never runs code from the file (``torch.load(weights_only=False)``
would). It is written into a temporary sibling directory and renamed into place, so a crash or
Ctrl-C mid-write leaves the previous checkpoints untouched and never a half-written one under a
real name.
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
TENSORS = "training.safetensors"
STRUCTURE = "training.json"


@dataclass
class TrainState:
    """Where a run is: enough, with the checkpoint's tensors, to continue it exactly."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    best_valid_loss: float | None = None  # the validation loss at best_step
    best_step: int | None = None
    best_score: float | None = None  # train.best_metric at best_step (the loss by default)
    evals_without_improvement: int = 0
    stopped_early: bool = False


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every generator a run draws from in this process: Python, NumPy, torch CPU and CUDA."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one per device (LoRA dropout masks)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- codec
# Optimiser and scheduler states are nested dicts of tensors, numbers, tuples and int keys.
# They are split into a safetensors file (tensors) and JSON (everything else), with small
# markers for what JSON cannot say, so loading needs neither pickle nor trust in the file.


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        # safetensors has no uint32 everywhere: widen losslessly, narrow again on load
        tensors[path] = torch.from_numpy(obj.astype(np.int64))
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"),
                               _encode(v, tensors, f"{path}.v{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint ({path})")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(folder: Path, state: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "s")
    save_file(tensors, folder / TENSORS)
    (folder / STRUCTURE).write_text(json.dumps(structure), encoding="utf-8")


def load_state(folder: Path) -> dict[str, Any]:
    tensors = load_file(folder / TENSORS)
    return _decode(json.loads((folder / STRUCTURE).read_text(encoding="utf-8")), tensors)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(root: Path, *, weights: dict[str, torch.Tensor], optimizer: Any,
                    scheduler: Any, state: TrainState,
                    rng: list[dict[str, Any]] | None = None) -> Path:
    """Write checkpoint ``root/step-N`` atomically and return its path.

    ``rng`` holds one RNG state per process (rank order); default: this process's.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{state.step}-", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS)
        save_state(tmp, {"optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(),
                         "rng": rng if rng is not None else [rng_state()]})
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
             and p.name.split("-", 1)[1].isdigit() and (p / "state.json").is_file()]
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
        raise CheckpointError(f"{path}: cannot read the checkpoint weights ({err}); delete "
                              "this checkpoint directory to resume from the one before") from err


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], TrainState]:
    """Weights, optimiser/scheduler/RNG states and TrainState of one checkpoint."""
    weights = load_weights(path)
    try:
        extra = load_state(path)
        state = TrainState(**json.loads((path / "state.json").read_text()))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err}); delete this "
                              "checkpoint directory to resume from the one before") from err
    return weights, extra, state
