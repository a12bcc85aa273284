"""Weight-only int8 quantisation of the linear layers, through torchao.

Each linear layer's weight becomes int8 with one float scale per output row (symmetric,
torchao's ``Int8WeightOnlyConfig``, per-row granularity); activations stay in floating point.
Embeddings, norms and the LM head (or a classification head) keep their weights: transformers
leaves the output layer and anything tied to the embeddings out, so for Llama-style models the
decoder blocks' q/k/v/o and gate/up/down are what becomes int8.

Why torchao and not ``torch.ao.quantization.quantize_dynamic``: the latter quantises the
activations to int8 too (dynamic quantisation), which is a different and lossier method, and
its modules save only as pickles. torchao's int8 weight-only path runs on a CPU with plain
PyTorch operations.

On a CPU it saves memory at rest and on disk, not time: torchao's weight-only matmul converts
the int8 weight back to floating point for every call (no int8 CPU kernel for fp32
activations), so generation is slower than with the fp32 model. The flow measures and reports
this rather than assuming a speed-up.

Saving and loading go through transformers' torchao integration: ``save_pretrained`` writes
``model.safetensors`` with the int8 data and scales as plain tensors and the tensor-subclass
layout as JSON metadata; ``from_pretrained`` rebuilds them from an allow-list of torchao
classes, never from a pickle. Any ``from_pretrained`` with torchao installed, and so every
tunesmith loader, reads the directory back as the quantised model.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ModelError
from tunesmith.models.load import LOCAL_CODE

INSTALL_HINT = "install it with `pip install 'tunesmith[compress]'` (torchao)"


@contextmanager
def quiet_import() -> Iterator[None]:
    """Importing torchao without its import-time warnings on the screen.

    torchao logs a warning for each GPU kernel library it cannot load on a CPU-only torch, and
    torch one per enum torchao registers: noise for a user who asked for CPU int8. Once torchao
    is installed, transformers imports it with its model code, so wrap the first import of
    anything that loads models (the flows) too.
    """
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _int8_config() -> Any:
    with quiet_import():
        from torchao.quantization import Int8WeightOnlyConfig
    return Int8WeightOnlyConfig()


@functools.lru_cache(maxsize=1)
def int8_support() -> str | None:
    """Why int8 weight-only quantisation cannot run here, or None when it can: torchao is
    imported and a small linear layer is quantised and run once."""
    try:
        config = _int8_config()
        with quiet_import():
            from torchao.quantization import quantize_
            from transformers import TorchAoConfig  # noqa: F401  (the save/load path)
    except ImportError as err:
        return f"torchao is not installed or does not import ({err}); {INSTALL_HINT}"
    try:
        torch.manual_seed(0)
        probe = torch.nn.Sequential(torch.nn.Linear(32, 16))
        x = torch.randn(2, 32)
        expected = probe(x)
        quantize_(probe, config)
        got = probe(x)
    except Exception as err:  # any failure means this torch/torchao pair cannot do it
        return f"torchao's int8 weight-only path fails with this torch ({err})"
    if not torch.allclose(got, expected, atol=0.05, rtol=0.05):
        return "torchao's int8 weight-only path gives wrong results with this torch"
    return None


def load_int8(model_dir: Path, *, head: bool = False) -> Any:
    """The model in ``model_dir`` with its decoder linear layers quantised to int8 as it loads
    (``head``: a sequence-classification model)."""
    reason = int8_support()
    if reason:
        raise ModelError(f"cannot quantise to int8 on this machine: {reason}")
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        TorchAoConfig,
    )

    auto = AutoModelForSequenceClassification if head else AutoModelForCausalLM
    try:
        with quiet_import():
            return auto.from_pretrained(model_dir, dtype=torch.float32,
                                        quantization_config=TorchAoConfig(_int8_config()),
                                        **LOCAL_CODE)
    except Exception as err:
        raise ModelError(f"{model_dir}: cannot quantise the model to int8 ({err})") from err


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether a weight is a torchao quantised tensor (int8 data with scales)."""
    return hasattr(weight, "qdata") and hasattr(weight, "scale")


def quantized_layers(model: torch.nn.Module) -> list[str]:
    """The names of the linear layers whose weights are quantised."""
    return [name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and is_quantized(m.weight)]


def stored_values(weight: torch.Tensor) -> torch.Tensor:
    """The values a weight stores: the int8 data of a quantised weight, else the weight."""
    return weight.qdata if is_quantized(weight) else weight.detach()
