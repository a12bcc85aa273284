"""``training_memory``: the peak memory a run configuration will need to train, before running.

Reads the base model's configuration only (a bundled or GGUF model not imported yet is read
for its metadata), never its weights; ``tunesmith config check`` prints the result.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tunesmith.config import RunConfig
from tunesmith.config.hyper import AUTO_BATCH_MAX
from tunesmith.flows.steps import base_dtype
from tunesmith.models.resolve import locate_model
from tunesmith.models.sizing import load_model_config, model_shape
from tunesmith.training.memory import MemoryEstimate, estimate_training_memory
from tunesmith.training.precision import resolve_precision


def training_memory(cfg: RunConfig, *, home: Path) -> MemoryEstimate:
    """The estimated peak memory of training ``cfg`` on this machine (CUDA if present)."""
    t = cfg.train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    if t.micro_batch_size is not None:
        examples = t.micro_batch_size
    elif t.batch_size == "auto":
        examples = t.privacy.physical_batch_size if t.privacy else AUTO_BATCH_MAX
        notes.append(f"train.batch_size 'auto' depends on the data: assumed {examples}, the "
                     "most it picks" + (" per physical batch under DP" if t.privacy else ""))
    else:
        examples = int(t.batch_size)
    if t.privacy is not None:
        examples = min(examples, t.privacy.physical_batch_size)
    # a preference pair is two rows: the preferred and the non-preferred conversation
    rows = examples * (2 if t.objective != "sft" else 1)
    shape = model_shape(load_model_config(locate_model(cfg.model.base, home=home)))
    estimate = estimate_training_memory(
        shape, method=t.method, rows=rows, max_length=cfg.data.max_length, lora_r=t.lora.r,
        lora_target_modules=t.lora.target_modules, lora_dropout=t.lora.dropout,
        lora_shared_dropout=t.lora.shared_dropout,
        lora_layers=t.lora.layers, optimizer=t.optimizer,
        gradient_checkpointing=t.gradient_checkpointing,
        precision=resolve_precision(t.precision, device), base_dtype=base_dtype(cfg),
        lm_head=t.head == "lm", device=device.type,
        accumulating=t.micro_batch_size is not None and examples < (
            AUTO_BATCH_MAX if t.batch_size == "auto" else int(t.batch_size)),
        per_example_gradients=examples if t.privacy else 0, quantize_base=t.quantize_base,
        packing=t.packing)
    return dataclasses.replace(estimate, notes=tuple(notes))
